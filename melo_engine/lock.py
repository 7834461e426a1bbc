"""One writer per workspace: an exclusive OS lock on the file `lock` inside it.

Two processes that both append to one journal write the same record number twice and
overwrite each other's block files (issue 21). So every writing open takes this lock and
keeps it until the editor is closed; read-only opens take none (they never write, and a
commit is one appended line or one rename, so they see the last commit whole).

The lock is flock(2) on an open file: the kernel drops it when its process dies, however it
dies, so a SIGKILL never leaves a workspace locked, and no stale-lock guessing is needed.
flock also conflicts between two open files of one process: two editors of one workspace
in one process must not both write either. A second writer waits a bounded time, then is
refused in one line naming the holder's pid (read from /proc/locks: nothing is written
into the lock file, so taking the lock changes no byte of the workspace).
"""
from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

LOCK_FILE = "lock"
DEFAULT_WAIT_SECONDS = 5.0
_POLL_SECONDS = 0.05


def wait_seconds(wait: float | None = None) -> float:
    """How long a second writer waits: `wait`, else $MELO_LOCK_WAIT_SECONDS, else the default."""
    if wait is not None:
        return max(0.0, float(wait))
    try:
        return max(0.0, float(os.environ.get("MELO_LOCK_WAIT_SECONDS", DEFAULT_WAIT_SECONDS)))
    except ValueError:
        return DEFAULT_WAIT_SECONDS


def holder_pid(fd: int) -> int | None:
    """The pid holding a flock on the file open as `fd`, from /proc/locks (Linux); None
    where that cannot be told."""
    st = os.fstat(fd)
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 5751 fe:00:2146819 0 EOF"; "->" marks a waiter
        if len(parts) < 6 or parts[1] != "FLOCK" or parts[2] == "->":
            continue
        try:
            major, minor, inode = parts[5].split(":")
            if (int(inode), int(major, 16), int(minor, 16)) == (st.st_ino, os.major(st.st_dev), os.minor(st.st_dev)):
                return int(parts[4])
        except ValueError:
            continue
    return None


def open_for_lock(path: Path) -> int:
    """A descriptor of lock file `path`, created if missing, never through a link
    (O_NOFOLLOW: a file planted as a link must not make us create or open a file elsewhere)."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


def try_flock(fd: int) -> bool:
    """Take the exclusive flock on `fd` unless another open file holds it (then False)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class WorkspaceLock:
    """The exclusive lock of workspace folder `ws`, held from `acquire` to `release`."""

    def __init__(self, ws: Path, wait: float | None = None):
        self.path = Path(ws) / LOCK_FILE
        self.wait = wait_seconds(wait)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        try:
            fd = open_for_lock(self.path)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise ValueError(f"the workspace's {LOCK_FILE} file is a link; a workspace's parts "
                                 f"must be its own files") from None
            raise ValueError(f"cannot lock the workspace for writing: "
                             f"{err.strerror or type(err).__name__}") from None
        deadline = time.monotonic() + self.wait
        while not try_flock(fd):
            if time.monotonic() >= deadline:
                pid = holder_pid(fd)
                os.close(fd)
                who = f" (pid {pid})" if pid is not None else ""
                raise ValueError(f"the workspace is in use by another process{who}; "
                                 f"try again when it is done") from None
            time.sleep(_POLL_SECONDS)
        # Whoever held it may have removed the workspace meanwhile (a refused command that
        # created it): our file is then no longer the one at the path.
        try:
            same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except OSError:
            same = False
        if not same:
            os.close(fd)
            raise ValueError("the workspace was removed by another process while this one waited for it")
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)        # closing the only descriptor drops the flock
