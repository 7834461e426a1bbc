"""A replica on cores of its own.

Why. A Ray CPU is a reservation, not a limit: a replica that reserved one CPU still runs
its answering thread and its training on every core of its machine, and two replicas on
one machine then split the same cores instead of using one each (docs/BENCHMARKS.md, "The
Ray engine"). So a replica claims as many whole cores as it reserved, ones that no other
replica on its machine holds, and binds all its threads to them: what it reserved is then
what it uses, and a second replica adds a core's work instead of halving the first's.

How. One lock file per core in a folder of this machine (not the workspaces' folder, which
every node shares: cores belong to one node). A replica takes the first free ones with a
non-blocking flock and keeps the files open for its life; the kernel lets them go when it
dies, however it dies, so its restarted successor finds them free. Where too few are free
(more replicas than cores), it binds nothing and says so: it then shares the cores as
before, slower, never refused.
"""
from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path


class Cores:
    """The cores this process claimed (empty: none were free) and the open lock files that
    hold them; `release` lets them go (the process's death does too)."""

    def __init__(self, cores: list[int], files: list):
        self.cores, self._files = cores, files

    def release(self) -> None:
        for f in self._files:
            f.close()
        self._files, self.cores = [], []


def folder() -> Path:
    """Where this machine's core locks live ($MELO_CORES_DIR, else the temporary folder)."""
    return Path(os.environ.get("MELO_CORES_DIR") or Path(tempfile.gettempdir()) / f"melo-cores-{os.getuid()}")


def claim(n: int, where: Path | None = None) -> Cores:
    """Claim `n` free cores of those this process may use and bind every thread to them;
    an empty claim, binding nothing, where fewer than `n` are free."""
    where = where or folder()
    where.mkdir(parents=True, exist_ok=True)
    held, files = [], []
    for core in sorted(os.sched_getaffinity(0)):
        if len(held) == n:
            break
        f = open(where / f"core-{core}", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        held.append(core)
        files.append(f)
    if len(held) < n:
        Cores(held, files).release()
        return Cores([], [])
    bind(held)
    return Cores(held, files)


def bind(cores: list[int]) -> None:
    """Bind every thread of this process to `cores` (threads started later inherit it from
    the thread that starts them)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError):
            pass                                   # a thread that ended meanwhile
