"""What every workspace on one model shares in a server: its answering threads and its
training workers.

Why a room of its own. A pool of workspaces (sessions.py) decides who gets which
workspace; how the work of many workspaces is done together is another idea. Per model
that generates, questions and probes of every workspace go to one AnswerBatcher
(melo_engine/batching.py: shared batches, an express lane for questions, the probes below
the training), and edits to one TrainingCrew (melo_engine/trainproc.py: processes of their
own, a few at once). A classifier generates nothing and trains in its own thread. Both are
made on a model's first workspace, so a model nobody uses costs nothing.
"""
from __future__ import annotations

import threading

from melo_engine.batching import AnswerBatcher, cores_here
from melo_engine.trainproc import TrainingCrew


class SharedWork:
    """Per model name, the answering threads (`answer_slots` of them, default one per core,
    the probes' `answer_nice` levels down) and `train_workers` training processes (0: edits
    train on the request's thread, one at a time)."""

    def __init__(self, answer_slots: int | None = None, answer_nice: int = 10, train_workers: int = 0):
        if train_workers < 0:
            raise ValueError("train_workers must be 0 (train in the request's thread) or more")
        self.answer_slots, self.answer_nice, self.train_workers = answer_slots, answer_nice, train_workers
        self._answers: dict[str, AnswerBatcher] = {}
        self._trainers: dict[str, TrainingCrew | None] = {}
        self._lock = threading.Lock()

    @property
    def train_concurrency(self) -> int:
        """Edits that may train at once (the page's training queue): one per worker, else one."""
        return max(1, self.train_workers)

    def answer_concurrency(self, holds_models: bool = True) -> int:
        """Requests that may generate at once: enough to fill every answering thread's shared
        batch where the server holds models, else one per core."""
        cores = self.answer_slots or cores_here()
        if not holds_models:
            return cores
        # Below gradio's 40 jobs at once, so that waiting questions never hold every place
        # an edit needs.
        return min(cores * AnswerBatcher.MAX_ROWS, 24)

    def join(self, ed, name: str, backbone):
        """`ed` answering in its model's shared batches and training in its model's workers
        (a model that generates; the classifier is left as it is)."""
        if not hasattr(backbone, "generate_batch"):
            return ed
        with self._lock:
            if name not in self._answers:
                self._answers[name] = AnswerBatcher(backbone, slots=self.answer_slots, nice=self.answer_nice)
            if self.train_workers and name not in self._trainers:
                self._trainers[name] = crew = TrainingCrew.for_backbone(backbone, self.train_workers)
                if crew is not None:
                    crew.start()                # loads the model while nobody waits
            ed.answers = self._answers[name]
            if self.train_workers:
                ed.trainer = self._trainers[name]
        return ed

    def stop(self) -> None:
        """Stop the answering threads (once they finish what they generate) and end the
        training workers; later edits train on the caller's thread."""
        with self._lock:
            batchers = list(self._answers.values())
            crews = [c for c in self._trainers.values() if c is not None]
        for batcher in batchers:
            batcher.close()
        for crew in crews:
            crew.close()
