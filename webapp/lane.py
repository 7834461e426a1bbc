"""The benchmark lane: a visitor's benchmark runs in a process of its own, at low priority
on one thread, so that it never holds anyone's edit.

Why a process. A benchmark is minutes of training on the shared cores. Queued with the
edits, it made every other visitor's edit wait for all of it (343 s behind a default run);
run as a thread beside them, its forwards would still take a core at the same priority as
the edits, and GRACE's forward hook would sit on the shared model while other visitors
ask. A child process has its own copy of the model, one torch thread and a raised nice
value: the kernel gives the app's edits and asks the cores first, and the visitor who
started it can stop it at once (the process is killed; nothing of it stays behind).

The child is the benchmark's own command line (`python -m melo_engine.bench edits ...`),
so what the page shows is exactly what `docs/BENCHMARKS.md` tells a researcher to run. It
rewrites a progress file after every edit, which the page reads.

At most one run per visitor is queued or running (a claim, taken before the run starts).
One child at a time: a run that starts while another holds the lane waits its turn here,
first come first served, whether it came from the page or the API, and says its place and
how long the running one has left at its pace. (In gradio's own queue a waiting run could
not say the running one's pace, and stopping it there left a bare "Error" on the page.)
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from melo_engine.config import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parent.parent


# Runs that may wait for the lane at once. A waiting run holds one of the server's worker
# threads while it waits, so the line is short: a full one refuses the next run in one line.
MAX_WAITING = 6


@dataclass
class Progress:
    """How far a run is: `fraction` of all edits of all methods, and a line to show."""

    fraction: float
    text: str
    waiting: bool = False       # not started: another run holds the lane


class BenchmarkLane:
    """Claims (one run per visitor) and the runs themselves, each in a child process.

    `nice`: how much lower the child's priority is than the app's (0-19). A claim whose run
    never came (its page closed while it waited) lapses after `lapse_seconds`."""

    def __init__(self, model: str | None = None, nice: int = 15, lapse_seconds: float = 3600,
                 poll_seconds: float = 0.5, abandoned_seconds: float = 60):
        self.model = model
        self.nice = nice
        self.lapse_seconds = lapse_seconds
        self.poll_seconds = poll_seconds
        self.abandoned_seconds = abandoned_seconds
        self._claims: dict[str, tuple[float, bool]] = {}      # token: (since, running)
        self._running: dict[str, subprocess.Popen] = {}
        self._pace: dict[str, tuple[float, float]] = {}   # token: (started, fraction done) of a running run
        self._lock = threading.Lock()
        self._turns: list[object] = []                  # runs in order of arrival; the first has the lane
        self._turn_free = threading.Condition(self._lock)
        self._stopped: set[str] = set()     # Stop pressed: that visitor's run ends quietly, wherever it is

    # ---- claims ---------------------------------------------------------------------------
    def claim(self, token: str) -> None:
        """Before a run starts; a second claim while one holds is refused."""
        now = time.time()
        with self._lock:
            self._stopped.discard(token)        # a Stop pressed with nothing running is not kept
            since, _ = self._claims.get(token, (now - self.lapse_seconds, False))
            if now - since < self.lapse_seconds:
                raise ValueError("your benchmark is already queued or running: wait for its table")
            self._claims[token] = (now, False)

    def take(self, token: str) -> bool:
        """When the run starts: False where Stop came first (the run ends quietly); a run
        nobody claimed is refused at once."""
        with self._lock:
            if token in self._stopped:
                self._stopped.discard(token)
                return False
            if self._claims.get(token, (0.0, True))[1]:
                raise ValueError("no benchmark waits for this page: press Run benchmark")
            self._claims[token] = (time.time(), True)
            return True

    def release(self, token: str) -> None:
        with self._lock:
            self._claims.pop(token, None)

    def stop(self, token: str) -> None:
        """The visitor pressed Stop: a run under way is killed at once, one waiting for the
        lane leaves the line, one about to start does not; each ends quietly (no result, no
        error: its page says "Stopped"). A claim whose run has not started is given back, so
        the visitor can start another."""
        with self._lock:
            proc = self._running.get(token)
            if token in self._claims and not self._claims[token][1]:
                del self._claims[token]
            self._stopped.add(token)
            self._turn_free.notify_all()
        if proc is not None:
            _kill(proc)

    def busy(self) -> bool:
        """Whether a run is under way (a new one waits for it)."""
        with self._lock:
            return bool(self._running)

    def seconds_left(self) -> float | None:
        """The running run's time left at its pace so far (its edits; the scoring after each
        method's last edit is not in it), or None before it has done a twentieth."""
        with self._lock:
            paces = list(self._pace.values())
        now = time.monotonic()
        left = [(now - started) * (1 - done) / done for started, done in paces if done >= 0.05]
        return max(left) if left else None

    # ---- runs -----------------------------------------------------------------------------
    def command(self, n: int, methods: list[str], out: Path, progress: Path, model: str | None = None) -> list[str]:
        cmd = [sys.executable, "-m", "melo_engine.bench", "edits", "--dataset", "zsre", "--n", str(n),
               "--methods", ",".join(methods), "--json", str(out), "--progress", str(progress)]
        model = model or self.model
        return cmd + (["--model", model] if model and model != DEFAULT_MODEL else [])

    def run(self, token: str, n: int, methods: list[str], model: str | None = None) -> Iterator[Progress | dict]:
        """Wait for the lane (first come first served), start the child (on `model`, else the
        lane's) and yield its Progress until it ends, then the result (the JSON of `bench
        edits`). Closing the iterator, or `stop`, kills the child (or leaves the line); after
        `stop` it ends without a result. A child that fails raises ValueError with its last line."""
        ticket = object()
        with self._lock:
            if len(self._turns) > MAX_WAITING:
                raise ValueError(f"the benchmark lane has {len(self._turns) - 1} runs waiting already: "
                                 "try again when one has ended")
            self._turns.append(ticket)
        try:
            while True:
                with self._lock:
                    ahead = self._turns.index(ticket)
                    if ahead:
                        self._turn_free.wait(self.poll_seconds)
                        ahead = self._turns.index(ticket)
                    if token in self._stopped:
                        return
                if not ahead:
                    break
                left = self.seconds_left()
                yield Progress(0.0, f"{ahead} run{'s' * (ahead > 1)} ahead of yours"
                                    + (f"; the one running has about {max(1, round(left / 60))} min left at its pace"
                                       if left is not None else ""), waiting=True)
            yield from self._run_child(token, n, methods, model)
        finally:
            with self._lock:
                self._turns.remove(ticket)
                self._stopped.discard(token)
                self._turn_free.notify_all()

    def _run_child(self, token: str, n: int, methods: list[str], model: str | None) -> Iterator[Progress | dict]:
        tmp = Path(tempfile.mkdtemp(prefix="melo-bench-"))
        out, progress, log = tmp / "result.json", tmp / "progress", tmp / "log"
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", MELO_PARENT_PID=str(os.getpid()))
        nice = self.nice
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(self.command(n, methods, out, progress, model), cwd=ROOT, env=env,
                                    stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, preexec_fn=lambda: _lower_child(nice))
        with self._lock:
            self._running[token] = proc
            self._pace[token] = (time.monotonic(), 0.0)
        # Whoever iterates pulls the next step at once; a run nobody has pulled from for
        # `abandoned_seconds` lost its page (a front that never closes the iterator): killed.
        pulled = [time.monotonic()]
        watch = threading.Thread(target=self._watch, args=(proc, pulled), name="bench-watch", daemon=True)
        watch.start()
        try:
            order = {m: i for i, m in enumerate(methods)}
            yield Progress(0.0, "loading the model")
            while proc.poll() is None:
                pulled[0] = time.monotonic()
                time.sleep(self.poll_seconds)
                seen = _read_progress(progress)
                if seen:
                    name, done, of = seen
                    # After a method's last edit its scores are measured (a minute for 20
                    # edits), which writes no progress: said, so the page does not look stuck.
                    fraction = (order.get(name, 0) * of + done) / max(1, len(methods) * of)
                    with self._lock:
                        self._pace[token] = (self._pace[token][0], fraction)
                    yield Progress(fraction, f"{name}: {done}/{of} edits" + (", now scoring them" if done == of else ""))
            with self._lock:
                if token in self._stopped:
                    return                          # killed by Stop: no result, no error
            if proc.returncode != 0 or not out.is_file():
                last = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
                raise ValueError(f"the benchmark stopped: {last[-1][:300] if last else 'no output'}")
            yield json.loads(out.read_text())
        finally:
            with self._lock:
                self._running.pop(token, None)
                self._pace.pop(token, None)
            _kill(proc)
            shutil.rmtree(tmp, ignore_errors=True)

    def _watch(self, proc: subprocess.Popen, pulled: list[float]) -> None:
        while proc.poll() is None:
            if time.monotonic() - pulled[0] > self.abandoned_seconds:
                _kill(proc)
                return
            time.sleep(min(5.0, self.abandoned_seconds / 4))

    def stop_all(self) -> None:
        """Kill every run (the server is shutting down)."""
        with self._lock:
            procs = list(self._running.values())
        for p in procs:
            _kill(p)


def _read_progress(path: Path) -> tuple[str, int, int] | None:
    try:
        name, done, total = path.read_text().split()
        return name, int(done), int(total)
    except (OSError, ValueError):
        return None          # not written yet, or caught mid-write


def _lower_child(nice: int) -> None:
    """In the child, before it runs: `nice` levels lower, and its session's scheduling group
    too. Linux with autogroups (the default on many systems) shares the cores fairly between
    sessions first and by nice value only within one: a child in a session of its own (so
    that Stop kills all of it) took a whole core from the app at nice 15 (seen in the
    classroom benchmark). Its group's nice value is what puts it below the app."""
    os.nice(nice)
    # Plain system calls only: this runs between fork and exec in a threaded parent.
    try:
        fd = os.open("/proc/self/autogroup", os.O_WRONLY)
    except OSError:
        return                   # no autogroups here: the nice value alone does it
    try:
        for _ in range(20):      # the kernel takes one such write per 100 ms from unprivileged callers
            try:
                os.write(fd, str(nice).encode())
                return
            except BlockingIOError:
                time.sleep(0.02)
            except OSError:
                return
    finally:
        os.close(fd)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
