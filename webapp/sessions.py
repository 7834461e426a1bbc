"""Visitors' workspaces: one MeloEditor per visitor, all on one shared, frozen Backbone.

A visitor is known by a token only the server can issue (tokens.py): the page keeps it in
the browser's local storage (so a reload finds the same workspace), API clients get it as a
cookie. Workspaces idle for too long are removed by a background sweep.

A workspace is made on a visitor's first write (an edit, a correction, an import, a
setting), never on a read: until then asks, probes and listings are answered by one shared,
read-only empty workspace per model (`reader`), so a crowd that only looks or is refused fills no
folder and no place under the cap. A write that is refused removes the workspace it made.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from melo_engine import MeloEditor
from melo_engine.backbone import Backbone
from melo_engine.batching import AnswerBatcher
from melo_engine.config import DEFAULT_MODEL
from melo_engine.lock import WorkspaceLock

from .lane import BenchmarkLane
from .tokens import WorkspaceTokens


def default_root() -> Path:
    """$MELO_WORKSPACES, else the user's data directory."""
    env = os.environ.get("MELO_WORKSPACES")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("melo-studio")) / "workspaces"


class WorkspacePool:
    """Open workspaces by visitor. Workspaces with edits are removed after `idle_seconds`
    unused, ones without after `empty_idle_seconds` (a client that only looked costs
    minutes, not a day); at most `max_open` are open at once, so no one client can exhaust
    the server's files and threads. At the cap, the workspace used least recently (and not
    for `close_after_seconds`) is closed to make room: its files stay and it opens again on
    its next use, so a crowd of clients that only looked cannot shut a visitor out."""

    def __init__(self, backbone: Backbone, root: Path | None = None, idle_seconds: float = 24 * 3600,
                 empty_idle_seconds: float = 600, max_open: int = 256, close_after_seconds: float = 30,
                 answer_nice: int = 0):
        self.backbone = backbone
        self.root = Path(root or default_root())
        self.root.mkdir(parents=True, exist_ok=True)
        self.tokens = WorkspaceTokens(self.root)
        self.idle_seconds = idle_seconds
        self.empty_idle_seconds = min(empty_idle_seconds, idle_seconds)
        self.max_open = max_open
        self.close_after_seconds = close_after_seconds
        self._used: dict[str, float] = {}       # open workspaces: last use (monotonic), by folder
        self._editors: dict[str, MeloEditor] = {}
        self._blank: MeloEditor | None = None
        self._fresh: set[str] = set()           # made by a write that has not yet succeeded
        self._writers: dict[str, int] = {}      # writes in progress, by folder
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # A visitor's benchmark: a child process with its own copy of this model (a front
        # that holds none, cluster.RayPool, runs the model MELO_MODEL names, or the default).
        model = backbone.name if backbone is not None else os.environ.get("MELO_MODEL")
        self.benchmarks = BenchmarkLane(None if model in (None, DEFAULT_MODEL) else model)
        # Visitors' questions share generations, on threads below the edits' training
        # (melo_engine/batching.py).
        self.answers = AnswerBatcher(backbone, nice=answer_nice) if backbone is not None else None

    @property
    def answer_concurrency(self) -> int:
        """Requests that may generate at once: enough to fill every slot's shared batch
        where questions are batched here, else one per core."""
        if self.answers is not None:
            return self.answers.slots * self.answers.max_rows
        return os.cpu_count() or 2

    def editor(self, token: str) -> MeloEditor:
        """The editor of the token's workspace, opening (or creating) it on first use."""
        folder = self.tokens.folder(token)
        with self._lock:
            full = folder not in self._editors and len(self._editors) >= self.max_open
        if full:
            self.sweep()
            self._close_least_used()
        with self._lock:
            ed = self._editors.get(folder)
            if ed is None:
                if len(self._editors) >= self.max_open:
                    raise ValueError("the server has as many visitors as it can hold: try again in a few minutes")
                ed = MeloEditor.open(self.root / folder / "ws", backbone=self.backbone)
                ed.answers = self.answers
                self._editors[folder] = ed
            self._used[folder] = time.monotonic()
        (self.root / folder / "last_used").write_text(str(time.time()))
        return ed

    def _close_least_used(self) -> None:
        """At the cap: close the open workspace used least recently, if nobody is writing to
        it and it has rested `close_after_seconds` (its files stay; the next use reopens it)."""
        now = time.monotonic()
        with self._lock:
            if len(self._editors) < self.max_open:
                return
            idle = [(self._used.get(f, 0.0), f) for f in self._editors
                    if f not in self._writers and now - self._used.get(f, 0.0) >= self.close_after_seconds]
            if not idle:
                return
            folder = min(idle)[1]
            ed = self._editors.pop(folder)
            self._used.pop(folder, None)
        ed.close()

    def existing(self, token: str) -> MeloEditor | None:
        """The token's editor if its workspace exists; never creates one."""
        if (self.root / self.tokens.folder(token) / "ws").is_dir():
            return self.editor(token)
        return None

    def reader(self, token: str) -> MeloEditor:
        """For reading only: the token's editor if its workspace exists, else the shared empty
        workspace (opened read-only: every change is refused), so a read creates nothing."""
        ed = self.existing(token)
        if ed is not None:
            return ed
        with self._lock:
            if self._blank is None:
                # One per model: a workspace is tied to the model it was made with.
                mark = hashlib.sha256(json.dumps(self.backbone.fingerprint, sort_keys=True).encode()).hexdigest()
                blank = self.root / f".blank-{mark[:16]}" / "ws"
                if not blank.is_dir():
                    MeloEditor.open(blank, backbone=self.backbone).close()
                self._blank = MeloEditor.open(blank, backbone=self.backbone, read_only=True)
                self._blank.answers = self.answers
            return self._blank

    @contextmanager
    def writing(self, token: str):
        """The token's editor for a write, its workspace made if there is none; if the write
        fails (refused, or its client gone) and left the new workspace without an edit,
        the workspace goes again."""
        folder = self.tokens.folder(token)
        with self._lock:
            if not (self.root / folder / "ws").is_dir():
                self._fresh.add(folder)
            self._writers[folder] = self._writers.get(folder, 0) + 1
        ok = False
        try:
            yield self.editor(token)
            ok = True
        finally:
            with self._lock:
                self._writers[folder] -= 1
                last = self._writers[folder] == 0
                if last:
                    del self._writers[folder]
                if ok:
                    self._fresh.discard(folder)
                drop = not ok and last and folder in self._fresh
                if drop:
                    self._fresh.discard(folder)
            if drop and not MeloEditor.has_edits(self.root / folder / "ws"):
                self._remove(folder)

    def close(self, token: str) -> None:
        """Let go of the token's workspace (and its lock), keeping its files: the next use
        opens it again, caught up from its journal. An engine replica closes the workspaces
        it evicts (webapp/cluster.py), so that another replica can open them."""
        folder = self.tokens.folder(token)
        with self._lock:
            ed = self._editors.pop(folder, None)
            self._used.pop(folder, None)
        if ed is not None:
            ed.close()

    def _remove(self, folder: str) -> bool:
        """Delete a workspace: one open here is closed first; one that another process
        holds open for writing (another app or engine replica on the same folder) is left
        alone. Returns whether it went."""
        with self._lock:
            ed = self._editors.pop(folder, None)
            self._used.pop(folder, None)
        if ed is not None:
            ed.close()
        lock = WorkspaceLock(self.root / folder / "ws", wait=0)
        try:
            if lock.path.parent.is_dir():
                lock.acquire()
        except ValueError:
            return False
        try:
            shutil.rmtree(self.root / folder, ignore_errors=True)
        finally:
            lock.release()
        return True

    def sweep(self, now: float | None = None) -> list[str]:
        """Remove workspaces idle for too long (see the class); return the folders removed."""
        now = time.time() if now is None else now
        removed = []
        for d in self.root.iterdir() if self.root.is_dir() else []:
            if not d.is_dir() or d.name.startswith("."):
                continue        # the token secret, the shared empty workspace
            stamp = d / "last_used"
            try:
                last = float(stamp.read_text()) if stamp.is_file() else d.stat().st_mtime
            except (OSError, ValueError):
                last = d.stat().st_mtime
            limit = self.idle_seconds if MeloEditor.has_edits(d / "ws") else self.empty_idle_seconds
            if now - last <= limit:
                continue
            if self._remove(d.name):
                removed.append(d.name)
        return removed

    def start_sweeper(self, every_seconds: float = 600) -> threading.Thread:
        def loop():
            while not self._stop.wait(every_seconds):
                self.sweep()

        t = threading.Thread(target=loop, name="workspace-sweeper", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()
        if self.answers is not None:
            self.answers.close()
