"""Shared generations: the answers of many workspaces' questions in one batch.

Why. On a CPU the cost of a new token is mostly reading the model's weights, and a batch of
rows reads them once: a class of thirty asking at once is answered several times faster in
batches than one question per core (docs/BENCHMARKS.md, "A class on one server"). MELO
allows it without giving up anybody's edits: the LoRA layers take one block per example
(lora.ActiveBlocks), so rows routed in different workspaces, each to its own block or to
none, run in one generation, and a row without a block runs the original model exactly.

How. A caller routes its question in its own workspace on its own thread (the key costs
an encoder pass), turns it into rows (the edited answer, and the unedited one beside it
when a block fired), queues them and waits. Each of `slots` answering threads (one per
core by default) takes the next waiting rows of one prompt form, up to `max_rows`, smallest
calls first (a question's one or two rows are not kept behind a probe's ten; a probe's
rows fill the rest of the batch), and generates them together. On a decoder-only model
the generation keeps running while it has rows (decoding.RunningBatch): rows that arrive
meanwhile join it at its next token, while it has room, and each row's text goes back to
its caller at the row's own last token. An encoder-decoder generates whole batches, each
caller answered when its batch ends. A row holds its block for every new token; the rare
row that holds it for part of the answer only (a sentence correction that lets the model
go on) is generated alone, and a running generation takes nobody new while one waits.

Express lanes. With two answering threads or more, the first half take only questions
(calls of one or two rows), the others never take them. Measured in the classroom
benchmark (docs/BENCHMARKS.md, "A class on one server"), each of these was once the slowest
asks: a question waiting for a whole batch of a probe's long answers before its own began;
a question taken by a lowered thread and generated at its priority among a probe's rows;
and, with the questions' threads below the training, a burst of edits (two workers,
trainproc.TrainingCrew) taking both cores from them.

Priority. The questions' threads keep the priority of the thread that made them, which is
the training's; the probes' threads run `nice` levels below it (the app: 10). Edits train
in the app's training processes (trainproc.py), or on the request's thread elsewhere; a
class's probes are the bulk of its generation, and below the edits and the questions they
take what the cores have left. Linux lets a thread lower its own priority without
privilege (not raise it back), so the probes' threads lower themselves; the web server,
the questions, the training and everything else keep the process's.

A row's text is what it would get alone, except that rows padded to a longer neighbour
run through matrices of another shape, whose sums may round differently in the last bit:
the probe has answered in batches this way from the start.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import torch

from . import answering
from .decoding import RunningBatch, gathered, supports
from .records import Answer

Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Row:
    """One answer to generate: its question, its block's matrices by module (None: the
    original model), its token budget, its prompt form and, for the rare partial hold, how
    many new tokens the block is held for."""

    question: str
    blocks: dict[str, Pair] | None
    limit: int
    chat: bool
    hold: int | None = None
    size: int = 1                 # rows of the call it belongs to (set by `generate`)
    text: str | None = None
    error: BaseException | None = None
    ready: threading.Event = field(default_factory=threading.Event)


class AnswerBatcher:
    """Rows of any workspace on one backbone, generated in shared batches by `slots` threads
    of its own: half for questions at their creator's priority, half for the rest `nice`
    levels below it (module docstring)."""

    MAX_ROWS = 8          # rows per generation (docs/BENCHMARKS.md, "A class on one server")
    EXPRESS = 2           # a question's rows: its answer, and the unedited one beside it

    def __init__(self, backbone, slots: int | None = None, max_rows: int = MAX_ROWS, nice: int = 0):
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.backbone = backbone
        self.slots = slots or cores_here()
        self.max_rows = max_rows
        self.nice = nice
        self._waiting: list[Row] = []       # queued rows not yet taken, oldest first
        self._wake = threading.Condition()
        self._closed = False
        self.batches = 0                     # generations started or joined, and the rows they held
        self.rows = 0
        self.served = [0] * self.slots       # rows answered by each thread
        self.joins = supports(backbone) and max_rows > 1
        # With two slots or more, the first half are express lanes: questions only (calls of
        # at most EXPRESS rows), at the creator's priority, so that a visitor's question never
        # waits behind a probe's batch of long answers nor under a burst of edits (module docstring).
        express = self.slots // 2
        self._threads = [threading.Thread(target=self._work, args=(i < express,),
                                          name=f"melo-answers-{i}", daemon=True)
                         for i in range(self.slots)]
        for t in self._threads:
            t.start()

    def generate(self, rows: list[Row]) -> list[str]:
        """The texts of `rows`, generated in batches with whatever else is waiting."""
        for row in rows:
            row.size = len(rows)
        with self._wake:
            if self._closed:
                raise RuntimeError("the answering threads have stopped")
            self._waiting.extend(rows)
            self._wake.notify_all()
        for row in rows:
            row.ready.wait()
        for row in rows:
            if row.error is not None:
                raise row.error
        return [row.text for row in rows]

    def close(self) -> None:
        """Stop the threads once they finish what they generate (queued rows are answered first)."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()

    def _work(self, express: bool = False) -> None:
        lower_this_thread(0 if express else self.nice)
        while True:
            with self._wake:
                while not self._mine(express) and not self._closed:
                    self._wake.wait()
                if not self._mine(express):
                    return
                batch = self._take(express)
            if batch[0].hold is not None:
                self._alone(batch[0])
            elif self.joins:
                self._stream(batch, express)
            else:
                self._run(batch)

    def _mine(self, express: bool) -> list[Row]:
        """The waiting rows a slot may take: an express lane questions' only, the others
        (where there are express lanes) everything else: a question taken by a lowered slot
        would be generated at its priority, among a probe's long answers."""
        if express:
            return [r for r in self._waiting if r.size <= self.EXPRESS]
        return [r for r in self._waiting if r.size > self.EXPRESS] if self.slots > 1 else self._waiting

    def _take(self, express: bool = False) -> list[Row]:
        """The next rows: smallest calls first, in order of arrival among equals (a question
        of one or two rows is not kept behind a probe of ten), and with the first, unless it
        is a partial hold (those go alone), the next others of its prompt form, up to
        max_rows. Call with the lock held."""
        order = sorted(self._mine(express), key=lambda r: r.size)      # stable: arrival among equals
        first = order[0]
        batch = [first]
        if first.hold is None:
            batch += [r for r in order[1:] if r.hold is None and r.chat == first.chat][: self.max_rows - 1]
        taken = set(map(id, batch))
        self._waiting = [r for r in self._waiting if id(r) not in taken]
        return batch

    def _stream(self, batch: list[Row], express: bool) -> None:
        """Generate `batch` and, until its last row ends, every waiting row this thread may
        take that fits (`_joiners`), each joining at the next token."""
        running = RunningBatch(self.backbone, batch[0].chat)
        taken, joining = list(batch), True
        try:
            while batch or len(running):
                if batch:
                    ended, refused = running.join([(r.question, r.blocks, r.limit, r) for r in batch])
                    if not refused:
                        self._count(len(batch))
                    elif len(running):
                        self._requeue(refused)     # a fresh generation takes them
                        joining = False            # ... once this one's rows end
                        taken = [r for r in taken if all(r is not x for x in refused)]   # now the queue's
                    else:
                        self._run(refused)         # too long for a sliding window even alone
                    self._answered(ended)
                if len(running):
                    self._answered(running.step())
                with self._wake:
                    batch = self._joiners(express, running) if joining and len(running) else []
                    taken += batch
        except Exception:  # noqa: BLE001 - one visitor's row must not fail the others'
            for r in taken:
                if not r.ready.is_set():
                    self._alone(r)

    def _joiners(self, express: bool, running: RunningBatch) -> list[Row]:
        """Waiting rows that may join `running` now: of its prompt form, smallest calls first,
        up to its room. None while a row that must go elsewhere waits (another prompt form,
        a partial hold): the generation then ends with its rows, and the thread goes back to
        `_take`, which takes the smallest call waiting first. Call with the lock held."""
        mine = self._mine(express)
        room = self.max_rows - len(running)
        if room <= 0 or not mine or any(r.hold is not None or r.chat != running.chat for r in mine):
            return []
        batch = sorted(mine, key=lambda r: r.size)[:room]
        taken = set(map(id, batch))
        self._waiting = [r for r in self._waiting if id(r) not in taken]
        return batch

    def _requeue(self, rows: list[Row]) -> None:
        with self._wake:
            self._waiting[:0] = rows
            self._wake.notify_all()

    def _answered(self, ended: list[tuple[Row, str]]) -> None:
        for r, text in ended:
            r.text = text
            r.ready.set()
        if ended:
            self._served(len(ended))

    def _served(self, rows: int) -> None:
        me = threading.current_thread()
        with self._wake:
            for i, t in enumerate(self._threads):
                if t is me:
                    self.served[i] += rows

    def _run(self, batch: list[Row]) -> None:
        try:
            texts = self.backbone.generate_batch([r.question for r in batch], active(batch),
                                                 [r.limit for r in batch], chat=batch[0].chat)
        except Exception:  # noqa: BLE001 - one visitor's row must not fail the others'
            if len(batch) == 1:
                return self._alone(batch[0])
            for r in batch:
                self._alone(r)              # each alone: only a row that fails by itself fails
            return
        for r, t in zip(batch, texts):
            r.text = t
        self._count(len(batch))
        self._served(len(batch))
        for r in batch:
            r.ready.set()

    def _alone(self, row: Row) -> None:
        try:
            row.text = self.backbone.generate(row.question, active([row]), row.limit, chat=row.chat, hold=row.hold)
            self._count(1)
            self._served(1)
        except BaseException as err:  # noqa: BLE001 - re-raised to its caller
            row.error = err
        finally:
            row.ready.set()

    def _count(self, rows: int) -> None:
        with self._wake:
            self.batches += 1
            self.rows += rows

    # ---- a workspace's questions as rows -----------------------------------------------
    def ask(self, ed, question: str, compare_base: bool = False) -> Answer:
        """answering.ask, with its generations shared with other callers."""
        t0 = time.perf_counter()
        (key,), (words,) = answering.keyed(ed, [question])
        with ed.ws.state_lock:
            r = answering.decide(ed, key, question, words)
            blocks = answering.matrices(ed, r.block)
        limit = answering.budget(ed, r.edit_id)
        fired = blocks is not None
        rows = [Row(question, blocks, limit, ed.chat, answering.held_for(ed, r.edit_id) if fired else None)]
        if compare_base and fired:
            # With no block fired, the edited model *is* the base model: no second row.
            rows.append(Row(question, None, limit, ed.chat))
        texts = self.generate(rows)
        text = texts[0]
        base = (texts[-1] if fired else text) if compare_base else None
        return Answer(text, r.block if fired else None, r.distance, r.radius, r.cluster,
                      r.edit_id if fired else None, base, time.perf_counter() - t0,
                      answering.cut(ed, text, limit), answering.cut(ed, base, limit), rejected=r.rejected)

    def texts(self, ed, rows: list[tuple[str, dict | None, int, int | None]]) -> list[str]:
        """Texts of one workspace's (question, block matrices or None, token budget, partial
        hold) rows, shared with other callers' (answering.probe)."""
        return self.generate([Row(q, m, limit, ed.chat, hold if m else None) for q, m, limit, hold in rows])


def active(rows: list[Row]):
    """The LoRA layers' matrices for a batch of rows (None when no row has a block)."""
    return gathered([r.blocks for r in rows])


def cores_here() -> int:
    """The cores this process may run on (a container's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:
        return os.cpu_count() or 1


def lower_this_thread(by: int) -> bool:
    """Lower the calling thread's priority by `by` nice levels (Linux: per thread; a process
    may lower its threads but not raise them back); False where the system does not allow it."""
    if by <= 0:
        return False
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
        return True
    except (OSError, AttributeError):
        return False
