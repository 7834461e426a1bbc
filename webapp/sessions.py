"""Visitors' workspaces: one MeloEditor per visitor, all on one shared, frozen Backbone.

A visitor is known by a random token the page keeps in the browser's local storage (so a
reload finds the same workspace); API clients without one get a workspace per session.
Workspaces idle for longer than `idle_seconds` are removed by a background sweep.
"""
from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path

from melo_engine import MeloEditor
from melo_engine.backbone import Backbone

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


def default_root() -> Path:
    """$MELO_WORKSPACES, else the user's data directory."""
    env = os.environ.get("MELO_WORKSPACES")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("melo-studio")) / "workspaces"


class WorkspacePool:
    def __init__(self, backbone: Backbone, root: Path | None = None, idle_seconds: float = 24 * 3600):
        self.backbone = backbone
        self.root = Path(root or default_root())
        self.root.mkdir(parents=True, exist_ok=True)
        self.idle_seconds = idle_seconds
        self._editors: dict[str, MeloEditor] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def editor(self, visitor: str) -> MeloEditor:
        """The visitor's editor, opening (or creating) the workspace on first use."""
        if not visitor or not _TOKEN.match(visitor):
            raise ValueError("this page has no workspace yet: reload it")
        with self._lock:
            ed = self._editors.get(visitor)
            if ed is None:
                ed = MeloEditor.open(self.root / visitor / "ws", backbone=self.backbone)
                self._editors[visitor] = ed
        (self.root / visitor / "last_used").write_text(str(time.time()))
        return ed

    def sweep(self, now: float | None = None) -> list[str]:
        """Remove workspaces idle for longer than idle_seconds; return the visitors removed."""
        now = time.time() if now is None else now
        removed = []
        for d in self.root.iterdir() if self.root.is_dir() else []:
            stamp = d / "last_used"
            try:
                last = float(stamp.read_text()) if stamp.is_file() else d.stat().st_mtime
            except (OSError, ValueError):
                last = d.stat().st_mtime
            if now - last <= self.idle_seconds:
                continue
            with self._lock:
                ed = self._editors.pop(d.name, None)
            if ed is not None:
                ed.close()
            shutil.rmtree(d, ignore_errors=True)
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
