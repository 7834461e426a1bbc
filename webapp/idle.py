"""Which visitors' workspaces have rested too long: the sweep's rule, apart from how a
workspace is removed (the pool's job, under its lock, sessions.py).

A workspace that holds edits, or sits empty on a model its visitor chose or with a
question list of its own, is worth a day
(`idle_seconds`: a class comes back after lunch, a researcher the next morning); an empty
one on the default model is worth minutes (`empty_idle_seconds`): it is what a client that
only looked, or whose first edit was refused, leaves behind, and a crowd of those must not
fill the disk. The last use is the `last_used` stamp the pool writes on every request, or
the folder's own time where there is none.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from melo_engine import MeloEditor


def last_used(folder: Path) -> float:
    """When the workspace in `folder` was last used (seconds since the epoch)."""
    stamp = folder / "last_used"
    try:
        return float(stamp.read_text()) if stamp.is_file() else folder.stat().st_mtime
    except (OSError, ValueError):
        return folder.stat().st_mtime


@dataclass
class IdleRule:
    idle_seconds: float = 24 * 3600
    empty_idle_seconds: float = 600

    def __post_init__(self):
        if self.idle_seconds < 0 or self.empty_idle_seconds < 0:
            raise ValueError("idle times cannot be negative")
        self.empty_idle_seconds = min(self.empty_idle_seconds, self.idle_seconds)

    def stale(self, root: Path, now: float, chosen: Callable[[str], bool]) -> list[str]:
        """The workspace folders under `root` rested past their limit at `now`; `chosen(name)`
        says whether its visitor chose something worth keeping like edits (a model, a list)."""
        out = []
        for d in sorted(root.iterdir()) if root.is_dir() else []:
            if not d.is_dir() or d.name.startswith("."):
                continue        # the token secret, the shared empty workspace
            kept = MeloEditor.has_edits(d / "ws") or chosen(d.name)
            if now - last_used(d) > (self.idle_seconds if kept else self.empty_idle_seconds):
                out.append(d.name)
        return out


def start_sweeper(sweep: Callable[[], object], every_seconds: float, stop: threading.Event) -> threading.Thread:
    """Call `sweep` every `every_seconds` on a thread of its own until `stop` is set."""
    def loop():
        while not stop.wait(every_seconds):
            sweep()

    t = threading.Thread(target=loop, name="workspace-sweeper", daemon=True)
    t.start()
    return t
