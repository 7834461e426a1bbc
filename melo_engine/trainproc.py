"""Training in a process of its own: a block trains beside the answering, not under it.

Why. Training a block is a loop of small tensor operations with Python between them. In
the app it ran on a request's thread, so it shared the interpreter lock with the answering
threads' generation loops (batching.py): with a class asking at once it ran 3-5x slower
than alone, whatever its thread's priority, and every edit waited for the ones before it
(docs/BENCHMARKS.md, "A class on one server"). A process has its own interpreter lock, so
only the kernel shares the cores between training and answering, and it does so by
priority: the questions' thread at the training's, the probes' below it (batching.py).

How. `TrainingProcess(backbone)` starts one worker (spawned, never forked: the parent has
threads) that loads the same model the same way (`Backbone.load`, from the cache: seconds)
and then waits on a pipe. `train` sends it the encoded edit with the workspace's settings
and seed, relays each step's loss to `progress`, and returns the block (train.Trained),
the one `train_block` would have made here: the same weights, the same initial block from
the same seed, the same steps. Nothing about a workspace lives in the worker; keys,
placement and the commit stay in the app. A worker trains one edit at a time; `TrainingCrew` keeps several
workers for one model, so that edits arriving together (a class told "now edit") train
side by side instead of queueing behind each other.

Failure. A worker that dies mid-edit (killed, out of memory), or falls silent for
STEP_SECONDS, makes that edit fail in one line, with nothing written; the next edit starts a
new worker. A worker that cannot load the model (an error, or it dies while loading) is
given up on, and the log says why; a crew goes on with the workers it has left, and once
none is left that model's edits train on the caller's thread, as without a worker. A worker whose parent dies reads the end of its pipe and exits; Ctrl-C on
the app is left to the app. A model that cannot be rebuilt by name (one wrapped in memory,
as in the tests) has no worker: `for_backbone` returns None and training stays on the
caller's thread.
"""
from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
from typing import Callable

import torch

from .backbone import Backbone, Encoded
from .config import MeloConfig
from .train import Trained, train_block

# How long a silent worker is waited for: its model's load (a cold cache converts first:
# minutes on two cores), then each training step (seconds).
LOAD_SECONDS, STEP_SECONDS = 900.0, 300.0
STOPPED = "the training process stopped during this edit: nothing was applied, try the edit again"


class TrainingStopped(RuntimeError):
    """The training process ended before the edit was trained (nothing was written)."""


def _serve(conn, spec: dict, threads: int) -> None:
    """The worker: load the model once, then train whatever arrives until the pipe closes."""
    # Ctrl-C on the app reaches its whole process group: the app ends this worker itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    try:
        try:
            backbone = Backbone.load(**spec)
        except Exception as err:  # noqa: BLE001 - told to the parent, which trains itself
            conn.send(("failed", f"{type(err).__name__}: {err}"))
            return
        conn.send(("ready", None))
        while True:
            enc, cfg, seed = conn.recv()
            try:
                modules = backbone.ensure_lora(cfg.lora_layers, cfg.lora_modules)
                trained = train_block(backbone, enc, modules, cfg, seed=seed,
                                      progress=lambda step, loss: conn.send(("step", (step, loss))))
            except (EOFError, OSError):
                raise
            except Exception as err:  # noqa: BLE001 - the edit's own error, said to its caller
                conn.send(("error", err if isinstance(err, ValueError) else RuntimeError(f"{type(err).__name__}: {err}")))
                continue
            conn.send(("done", trained))
    except (EOFError, OSError):
        return                          # the app has gone, or closed the pipe: nothing to say


class TrainingProcess:
    """One worker process that trains blocks for every workspace on one model (module
    docstring). Thread-safe: callers take turns."""

    def __init__(self, spec: dict, threads: int | None = None):
        self.spec = dict(spec)
        self.threads = threads or torch.get_num_threads()
        self._lock = threading.Lock()
        self._proc = None
        self._conn = None
        self._ready = False
        self._closed = False
        self.started = 0                 # workers started (a restart after a death counts)
        self.failed: str | None = None   # why no worker could load the model (then: trains here)

    @classmethod
    def for_backbone(cls, backbone, threads: int | None = None) -> "TrainingProcess | None":
        """A training process for a backbone loaded by name (None for one wrapped in memory)."""
        spec = getattr(backbone, "loaded_as", None)
        return cls(spec, threads) if spec else None

    def start(self) -> None:
        """Start the worker now (it loads the model in the background)."""
        with self._lock:
            if not self._closed:
                self._ensure()

    def _ensure(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        self._stop()                     # a worker that died while idle: its pipe too
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(theirs, self.spec, self.threads),
                                 name="melo-training", daemon=True)
        self._proc.start()
        theirs.close()
        self._conn, self._ready = ours, False
        self.started += 1

    def _recv(self, seconds: float):
        try:
            if not self._conn.poll(seconds):
                raise EOFError               # a worker silent that long is taken as stopped
            return self._conn.recv()
        except (EOFError, OSError):
            self._stop()
            raise TrainingStopped(STOPPED) from None

    def _give_up(self, why: str) -> None:
        """No worker can load this model: its edits train on the caller's thread from now on."""
        self.failed = why
        self._stop()
        logging.getLogger(__name__).warning("edits of %s train in the app: its training process "
                                            "could not load it (%s)", self.spec.get("name"), why)

    def train(self, enc: Encoded, cfg: MeloConfig, seed: int,
              progress: Callable[[int, float], None] | None = None) -> Trained | None:
        """The block for `enc` (one prompt and its target), trained in the worker; None when
        no worker can load the model, or this one was closed (the caller trains it itself)."""
        with self._lock:
            if self.failed is not None or self._closed:
                return None
            self._ensure()
            if not self._ready:
                try:
                    kind, why = self._recv(LOAD_SECONDS)
                except TrainingStopped:
                    kind, why = "failed", "it stopped while loading the model"
                if kind == "failed":
                    self._give_up(why)
                    return None
                self._ready = True
            try:
                self._conn.send((enc, cfg, seed))
            except OSError:
                self._stop()
                raise TrainingStopped(STOPPED) from None
            while True:
                kind, value = self._recv(STEP_SECONDS)
                if kind == "step":
                    if progress is not None:
                        try:
                            progress(*value)
                        except BaseException:
                            self._stop()        # its remaining steps would be read by the next edit
                            raise
                elif kind == "done":
                    return value
                else:
                    raise value

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    def _stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._proc is not None:
            if self._ready:
                self._proc.join(timeout=5)      # an idle worker leaves on the closed pipe
            if self._proc.is_alive():
                self._proc.kill()               # one still loading does not read its pipe
            self._proc.join(timeout=5)
        self._proc = self._conn = None
        self._ready = False

    def close(self) -> None:
        """End the worker; later edits of this model train on the caller's thread."""
        with self._lock:
            self._closed = True
            self._stop()


class TrainingCrew:
    """`workers` training processes for one model: each edit takes whichever is free, and
    waits when none is. Same calls as one TrainingProcess (`train`, `start`, `close`).

    Why more than one: in a class, edits come in bursts (everyone edits when told to), and
    with one worker the last of a burst waits for every training before it. Each worker is
    another copy of the model in memory, and on a machine with fewer cores than workers
    they share the cores with the answers, so the app sizes the crew by its cores (app.py).
    A worker that cannot load the model leaves the crew; with none left, or once closed,
    `train` returns None (the caller trains the block itself)."""

    def __init__(self, spec: dict, workers: int = 1, threads: int | None = None):
        if workers < 1:
            raise ValueError("a training crew needs at least one worker")
        self.members = [TrainingProcess(spec, threads) for _ in range(workers)]
        self._free = list(self.members)
        self._turn = threading.Condition()
        self._closed = False

    @classmethod
    def for_backbone(cls, backbone, workers: int = 1, threads: int | None = None) -> "TrainingCrew | None":
        """A crew for a backbone loaded by name (None for one wrapped in memory)."""
        spec = getattr(backbone, "loaded_as", None)
        return cls(spec, workers, threads) if spec else None

    def start(self) -> None:
        for member in self.members:
            member.start()

    def _working(self) -> bool:
        return not self._closed and any(m.failed is None for m in self.members)

    def train(self, enc: Encoded, cfg: MeloConfig, seed: int,
              progress: Callable[[int, float], None] | None = None) -> Trained | None:
        """TrainingProcess.train on the first free worker; None when no worker is left."""
        while True:
            with self._turn:
                while not self._free and self._working():
                    self._turn.wait()
                if not self._working():
                    return None
                member = self._free.pop(0)
            try:
                trained = member.train(enc, cfg, seed, progress)
            finally:
                with self._turn:
                    if member.failed is None:
                        self._free.append(member)
                    self._turn.notify_all()
            if trained is not None or member.failed is None:
                return trained          # None here: the crew was closed meanwhile
            # That worker could not load the model: the edit goes to another.

    @property
    def pids(self) -> list[int]:
        return [pid for m in self.members if (pid := m.pid) is not None]

    def close(self) -> None:
        """End every worker; edits waiting for one, and later ones, train on the caller's thread."""
        with self._turn:
            self._closed = True
            self._turn.notify_all()
        for member in self.members:
            member.close()
