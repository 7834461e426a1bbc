"""Training in a process of its own: a block trains beside the answering, not under it.

Why. Training a block is a loop of small tensor operations with Python between them. In
the app it ran on a request's thread, so it shared the interpreter lock with the answering
threads' generation loops (batching.py): with a class asking at once it ran 3-5x slower
than alone, whatever its thread's priority, and every edit waited for the ones before it
(docs/BENCHMARKS.md, "A class on one server"). A process has its own interpreter lock, so
only the kernel shares the cores between training and answering, and it does so by
priority: the answering threads sit 10 nice levels below this process.

How. `TrainingProcess(backbone)` starts one worker (spawned, never forked: the parent has
threads) that loads the same model the same way (`Backbone.load`, from the cache: seconds)
and then waits on a pipe. `train` sends it the encoded edit with the workspace's settings
and seed, relays each step's loss to `progress`, and returns the block (train.Trained),
the one `train_block` would have made here: the same weights, the same initial block from
the same seed, the same steps. Nothing about a workspace lives in the worker; keys,
placement and the commit stay in the app. One edit trains at a time (the app trains one at
a time: its training queue).

Failure. A worker that dies mid-edit (killed, out of memory) makes that edit fail in one
line, with nothing written; the next edit starts a new worker. A worker whose parent dies
reads the end of its pipe and exits. A model that cannot be rebuilt by name (one wrapped in
memory, as in the tests) has no worker: `for_backbone` returns None and training stays on
the caller's thread.
"""
from __future__ import annotations

import multiprocessing
import threading
from typing import Callable

import torch

from .backbone import Backbone, Encoded
from .config import MeloConfig
from .train import Trained, train_block


class TrainingStopped(RuntimeError):
    """The training process ended before the edit was trained (nothing was written)."""


def _serve(conn, spec: dict, threads: int) -> None:
    """The worker: load the model once, then train whatever arrives until the pipe closes."""
    torch.set_num_threads(threads)
    try:
        backbone = Backbone.load(**spec)
    except BaseException as err:  # noqa: BLE001 - told to the parent, which trains itself
        conn.send(("failed", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            enc, cfg, seed = conn.recv()
        except (EOFError, OSError):
            return                      # the app has gone
        try:
            modules = backbone.ensure_lora(cfg.lora_layers, cfg.lora_modules)
            trained = train_block(backbone, enc, modules, cfg, seed=seed,
                                  progress=lambda step, loss: conn.send(("step", (step, loss))))
            conn.send(("done", trained))
        except Exception as err:  # noqa: BLE001 - the edit's own error, said to its caller
            conn.send(("error", err if isinstance(err, ValueError) else RuntimeError(f"{type(err).__name__}: {err}")))


class TrainingProcess:
    """One worker process that trains blocks for every workspace on one model (module
    docstring). Thread-safe: callers take turns."""

    def __init__(self, spec: dict, threads: int | None = None):
        self.spec = dict(spec)
        self.threads = threads or torch.get_num_threads()
        self._lock = threading.Lock()
        self._proc = None
        self._conn = None
        self.started = 0                 # workers started (a restart after a death counts)
        self.failed: str | None = None   # why the model could not load in a worker (then: trains here)

    @classmethod
    def for_backbone(cls, backbone, threads: int | None = None) -> "TrainingProcess | None":
        """A training process for a backbone loaded by name (None for one wrapped in memory)."""
        spec = getattr(backbone, "loaded_as", None)
        return cls(spec, threads) if spec else None

    def start(self) -> None:
        """Start the worker now (it loads the model in the background)."""
        with self._lock:
            self._ensure()

    def _ensure(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(theirs, self.spec, self.threads),
                                 name="melo-training", daemon=True)
        self._proc.start()
        theirs.close()
        self._conn, self._ready = ours, False
        self.started += 1

    def _recv(self):
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            self._stop()
            raise TrainingStopped("the training process stopped during this edit: nothing was applied, "
                                  "try the edit again") from None

    def train(self, enc: Encoded, cfg: MeloConfig, seed: int,
              progress: Callable[[int, float], None] | None = None) -> Trained | None:
        """The block for `enc` (one prompt and its target), trained in the worker; None when
        no worker can load the model (the caller trains it itself)."""
        with self._lock:
            if self.failed is not None:
                return None
            self._ensure()
            if not self._ready:
                kind, why = self._recv()
                if kind == "failed":
                    self.failed = why
                    self._stop()
                    return None
                self._ready = True
            try:
                self._conn.send((enc, cfg, seed))
            except (BrokenPipeError, OSError):
                self._stop()
                raise TrainingStopped("the training process had stopped: nothing was applied, try the edit again") \
                    from None
            while True:
                kind, value = self._recv()
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
            self._proc.join(timeout=5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(timeout=5)
        self._proc = self._conn = None

    def close(self) -> None:
        """End the worker (it exits on the closed pipe)."""
        with self._lock:
            self._stop()
