"""Visitors' workspaces: one MeloEditor per visitor, on shared, frozen backbones by model name.

A visitor is known by a token only the server can issue (tokens.py): the page keeps it in
the browser's local storage (so a reload finds the same workspace), API clients get it as a
cookie. Workspaces idle for too long are removed by a background sweep.

A workspace is made on a visitor's first write (an edit, a correction, an import, a
setting), never on a read: until then asks, probes and listings are answered by one shared,
read-only empty workspace per model (`reader`), so a crowd that only looks or is refused fills no
folder and no place under the cap. A write that is refused removes the workspace it made.

Several models (models.py, workspace_models.py): `pool.models` lists the names offered (the default first),
`pool.backbone(name)` is a model's backbone (loaded once per process on first use, then
shared), `pool.model_of(token)` the model a visitor's workspace was made with (its header
records it; a workspace reopens on that model), `pool.set_model(token, name)` remakes a
workspace without edits on another model, `pool.blank(name)` is a model's shared read-only
empty workspace. A workspace is new on the default model unless `set_model` says otherwise.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from melo_engine import MeloEditor
from melo_engine.backbone import Backbone
from melo_engine.config import DEFAULT_MODEL
from melo_engine.lock import WorkspaceLock

from . import questionlists
from .idle import IdleRule, start_sweeper
from .lane import BenchmarkLane
from .models import ModelShelf
from .tokens import WorkspaceTokens
from .workers import SharedWork
from .workspace_models import WorkspaceModels


def default_root() -> Path:
    """$MELO_WORKSPACES, else the user's data directory."""
    env = os.environ.get("MELO_WORKSPACES")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("melo-studio")) / "workspaces"


class WorkspacePool:
    """Open workspaces by visitor. Workspaces with edits are removed after `idle_seconds`
    unused, ones without after `empty_idle_seconds` (idle.py says why); at most `max_open`
    are open at once, so no one client can exhaust the server's files and threads. At the
    cap, the workspace used least recently (and not for `close_after_seconds`) is closed to
    make room: its files stay and it opens again on its next use, so a crowd of clients that
    only looked cannot shut a visitor out.

    `backbone` is the default model's, already loaded; `models` the models offered (default:
    it and every bundled model installed here, models.ModelShelf.installed). A pool without
    a backbone (cluster.RayPool, a front) offers the one model its engine runs."""

    def __init__(self, backbone: Backbone | None, root: Path | None = None, idle_seconds: float = 24 * 3600,
                 empty_idle_seconds: float = 600, max_open: int = 256, close_after_seconds: float = 30,
                 models: ModelShelf | None = None, answer_nice: int = 10, answer_slots: int | None = None,
                 train_workers: int = 0):
        self.shelf = models if models is not None else (ModelShelf.installed(backbone) if backbone is not None else None)
        self.root = Path(root or default_root())
        self.root.mkdir(parents=True, exist_ok=True)
        self.tokens = WorkspaceTokens(self.root)
        self.idle = IdleRule(idle_seconds, empty_idle_seconds)
        self.max_open = max_open
        self.close_after_seconds = close_after_seconds
        self._used: dict[str, float] = {}       # open workspaces: last use (monotonic), by folder
        self._editors: dict[str, MeloEditor] = {}
        self._fresh: set[str] = set()           # made by a write that has not yet succeeded
        self._writers: dict[str, int] = {}      # writes in progress, by folder
        self._dropping: dict[str, int] = {}     # removals under way, by folder (a failed first write, the sweep)
        self._lock = threading.Lock()
        self._dropped = threading.Condition(self._lock)
        self._stop = threading.Event()
        # Per model, the answering threads and the training workers every workspace on it
        # shares (workers.py); the app trains in `train_workers` processes of their own.
        self.work = SharedWork(answer_slots, answer_nice, train_workers)
        # Which model each workspace is on, and each model's shared empty workspace.
        self.workspace_models = WorkspaceModels(self.shelf, self.root, self.work)
        # A visitor's benchmark: a child process with its own copy of this model (a front
        # that holds none, cluster.RayPool, runs the model MELO_MODEL names, or the default).
        model = self.default_model
        self.benchmarks = BenchmarkLane(None if model in (None, DEFAULT_MODEL) else model)
        # The page's queue widths (layout.py): generations and trainings at once (RayPool's own).
        self.answer_concurrency = self.work.answer_concurrency(holds_models=self.shelf is not None)
        self.train_concurrency = self.work.train_concurrency

    # ---- models (workspace_models.py) ---------------------------------------------------
    @property
    def models(self) -> list[str]:
        """The names of the models a workspace can be made with, the default first."""
        return self.workspace_models.names

    @property
    def default_model(self) -> str:
        return self.workspace_models.default

    def backbone(self, name: str | None = None):
        """The named model's backbone (default: the default model's); unknown names: one line."""
        return self.workspace_models.backbone(name)

    def blank(self, name: str | None = None) -> MeloEditor:
        """The named model's shared read-only empty workspace (default: the default model's)."""
        return self.workspace_models.blank(name)

    def benchmark_model(self, token: str) -> str | None:
        """The model a visitor's benchmark (a zsRE run) runs on: their workspace's, where it
        is a model that answers questions; else None (the lane's own: the default)."""
        name = self.model_of(token)
        return name if self.workspace_models.answers_questions(name) else None

    def model_of(self, token: str) -> str:
        """The model of the token's workspace: the one it was made with, else the default."""
        folder = self.tokens.folder(token)
        with self._lock:
            ed = self._editors.get(folder)
        return ed.config.model if ed is not None else self.workspace_models.recorded(folder)

    def editor(self, token: str, create: bool = True) -> MeloEditor | None:
        """The editor of the token's workspace, opening (or creating) it on first use, on
        the model its header records (a new one: the default model). With `create` False,
        None where the workspace does not exist (`existing`).

        Whether it exists is decided under the pool's lock, after any removal of it now
        under way (a failed first write's, the sweep's): a visitor's page reads while its
        refused first edit removes the workspace, and a check made before that removal
        would open, so make, the workspace again and keep it empty."""
        folder = self.tokens.folder(token)
        with self._lock:
            ed, absent = self._lookup(folder)
            if ed is not None:
                self._mark_used(folder)
                return ed
            if absent and not create:
                return None
            full = len(self._editors) >= self.max_open
        if full:
            self.sweep()
            self._close_least_used()
        name = self.workspace_models.recorded(folder)
        self.backbone(name)                      # a first use loads it: no pool lock held
        with self._lock:
            ed, absent = self._lookup(folder)
            if ed is None:
                if absent and not create:
                    return None
                if len(self._editors) >= self.max_open:
                    raise ValueError("the server has as many visitors as it can hold: try again in a few minutes")
                ed = self._editors[folder] = self.workspace_models.open(self.root / folder / "ws", name)
            self._mark_used(folder)
        return ed

    def _lookup(self, folder: str) -> tuple[MeloEditor | None, bool]:
        """(Under the pool's lock.) Once no removal of `folder` is under way: its open
        editor (or None), and whether its workspace is absent from disk."""
        self._dropped.wait_for(lambda: folder not in self._dropping)
        ed = self._editors.get(folder)
        return ed, ed is None and not (self.root / folder / "ws").is_dir()

    def _mark_used(self, folder: str) -> None:
        """(Under the pool's lock: a removal never runs between the check and the stamp.)"""
        self._used[folder] = time.monotonic()
        (self.root / folder / "last_used").write_text(str(time.time()))

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
        return self.editor(token, create=False)

    def reader(self, token: str) -> MeloEditor:
        """For reading only: the token's editor if its workspace exists, else the shared empty
        workspace (opened read-only: every change is refused), so a read creates nothing."""
        ed = self.existing(token)
        if ed is not None:
            return ed
        return self.blank()

    def set_model(self, token: str, name: str) -> MeloEditor:
        """Remake the token's workspace on model `name`, only while it has no edits (like
        the key source: blocks of one model mean nothing on another); refused in one line,
        with nothing written, otherwise. Settings that do not depend on the model are kept
        (when both models open with the same editor class). Returns the workspace's editor
        (the model's shared empty one when there was no workspace and `name` is the default)."""
        folder = self.tokens.folder(token)
        if name not in self.models:
            raise ValueError(f"model {name!r} is not offered here (offered: {', '.join(self.models)})")
        ws = self.root / folder / "ws"
        refused = "the model can change only while the workspace has no edits: reset it first"
        if MeloEditor.has_edits(ws):
            raise ValueError(refused)
        current = self.model_of(token)
        if current == name:
            return self.existing(token) or self.blank(name)
        self.backbone(name)                           # loads first: a failed load changes nothing
        with self._lock:                              # no write can start while it is remade
            old, _ = self._lookup(folder)             # after a removal under way, like every opening
            if folder in self._writers:
                raise ValueError("an edit or import is running in this workspace: change the model once it is done")
            if (old is not None and old.ws.entries) or MeloEditor.has_edits(ws):
                raise ValueError(refused)
            config = self.workspace_models.carried(ws, old, current, name)
            if ws.is_dir():
                if old is not None:
                    del self._editors[folder]
                    self._used.pop(folder, None)
                    old.close()
                lock = WorkspaceLock(ws, wait=0)
                lock.acquire()                # another process holding it: one line, nothing changed
                try:
                    shutil.rmtree(ws)
                finally:
                    lock.release()
            ed = self._editors[folder] = self.workspace_models.open(ws, name, config)
            self._mark_used(folder)
        return ed

    @contextmanager
    def writing(self, token: str):
        """The token's editor for a write, its workspace made if there is none; if the write
        fails (refused, or its client gone) and left the new workspace without an edit,
        the workspace goes again."""
        folder = self.tokens.folder(token)
        with self._lock:
            # A failed first write may be removing this workspace now (a double click's
            # first edit refused): _lookup waits for it, so this write makes the workspace
            # afresh and removes it too if it fails, instead of finding it half gone and keeping it.
            if self._lookup(folder)[1]:
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
                    self._mark_dropping(folder, +1)     # with the decision: no write starts between
            if drop:
                try:
                    if not MeloEditor.has_edits(self.root / folder / "ws"):
                        self._remove(folder)
                finally:
                    with self._lock:
                        self._mark_dropping(folder, -1)

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

    def _remove(self, folder: str, idle: bool = False) -> bool:
        """Delete a workspace: one open here is closed first; one that another process
        holds open for writing (another app or engine replica on the same folder) is left
        alone, and with `idle` (the sweep) so is one a write here is under way on (a long
        question list loading). Returns whether it went. Nobody opens it meanwhile
        (`_lookup` waits)."""
        with self._lock:
            if idle and folder in self._writers:
                return False
            self._mark_dropping(folder, +1)
            ed = self._editors.pop(folder, None)
            self._used.pop(folder, None)
        try:
            if ed is not None:
                ed.close()
            lock = WorkspaceLock(self.root / folder / "ws", wait=0)
            try:
                if lock.path.parent.is_dir():
                    lock.acquire()
            except ValueError:
                return False
            listed = questionlists.marked(self.root / folder)
            try:
                shutil.rmtree(self.root / folder, ignore_errors=True)
            finally:
                lock.release()
            if listed:
                questionlists.forget(self.root / folder)
            return True
        finally:
            with self._lock:
                self._mark_dropping(folder, -1)

    def _mark_dropping(self, folder: str, step: int) -> None:
        """(Under the pool's lock.) Count a removal of `folder` in (+1) or out (-1): two may
        overlap (two sweeps; a sweep and a failed first write's), and `_lookup` waits for both."""
        n = self._dropping.get(folder, 0) + step
        if n:
            self._dropping[folder] = n
        else:
            del self._dropping[folder]
            self._dropped.notify_all()

    def sweep(self, now: float | None = None) -> list[str]:
        """Remove the workspaces rested past their limit (idle.py); return the folders removed."""
        def kept(folder: str) -> bool:          # its visitor chose a model, or loaded a list
            return (self.workspace_models.recorded(folder) != self.default_model
                    or questionlists.marked(self.root / folder))
        stale = self.idle.stale(self.root, time.time() if now is None else now, kept)
        return [folder for folder in stale if self._remove(folder, idle=True)]

    def start_sweeper(self, every_seconds: float = 600) -> threading.Thread:
        return start_sweeper(self.sweep, every_seconds, self._stop)

    def stop(self) -> None:
        self._stop.set()
        self.work.stop()
