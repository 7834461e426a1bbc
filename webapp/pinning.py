"""A replica on cores of its own.

Why. A Ray CPU is a reservation, not a limit: a replica that reserved one CPU still runs
its answering thread and its training on every core of its machine, and two replicas on
one machine then split the same cores instead of using one each (docs/BENCHMARKS.md, "The
Ray engine"). So a replica claims as many whole cores as it reserved, ones that no other
replica on its machine holds, and binds all its threads to them: what it reserved is then
what it uses, and replicas on one machine do not run on each other's cores.

How. One lock file per core in a folder of this machine (not the workspaces' folder, which
every node shares: cores belong to one node). A replica takes the first free ones with a
non-blocking flock and keeps the files open for its life; the kernel lets them go when it
dies, however it dies, so its restarted successor finds them free. Where too few are
free (more replicas than cores), where the folder cannot be used, or on a system without
per-thread affinity (not Linux), it binds nothing and logs one line: it then shares the
cores as before, slower, never refused. A fractional Ray CPU pins nothing (cluster.Engine).
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from melo_engine.lock import open_for_lock, try_flock

log = logging.getLogger(__name__)


class Cores:
    """The cores this process claimed (empty: none, it shares them all) and the lock files'
    descriptors that hold them; `release` lets them go (the process's death does too)."""

    def __init__(self, cores: list[int], fds: list[int]):
        self.cores, self._fds = cores, fds

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds, self.cores = [], []


def folder() -> Path:
    """Where this machine's core locks live ($MELO_CORES_DIR, else the temporary folder)."""
    return Path(os.environ.get("MELO_CORES_DIR") or Path(tempfile.gettempdir()) / f"melo-cores-{os.getuid()}")


def claim(n: int, where: Path | None = None) -> Cores:
    """Claim `n` free cores of those this process may use and bind every thread to them;
    an empty claim, binding nothing, where that cannot be done (module docstring)."""
    if not hasattr(os, "sched_setaffinity"):
        log.warning("this system cannot bind threads to cores: the replica shares them all")
        return Cores([], [])
    held = Cores([], [])
    try:
        where = where or folder()
        where.mkdir(parents=True, exist_ok=True)
        for core in sorted(os.sched_getaffinity(0)):
            if len(held.cores) == n:
                break
            fd = open_for_lock(where / f"core-{core}")
            if try_flock(fd):
                held.cores.append(core)
                held._fds.append(fd)
            else:
                os.close(fd)
        if len(held.cores) == n:
            bind(held.cores)
            return held
        reason = f"{len(held.cores)} of the {n} cores it asked for are free"
    except OSError as err:
        reason = f"its core locks in {where} cannot be used ({err.strerror or type(err).__name__})"
    held.release()
    log.warning("replica not bound to cores: %s; it shares them all", reason)
    return held


def bind(cores: list[int]) -> None:
    """Bind every thread of this process to `cores` (threads started later inherit it from
    the thread that starts them)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError):
            pass                                   # a thread that ended meanwhile
