"""A write the disk refuses, said in one line.

A full disk, a quota, a read-only mount or a missing permission used to surface as a
traceback: safetensors raises its own SafetensorError (neither ValueError nor OSError) and
OSError texts name server paths. Every write of a workspace goes through `writing`, which
turns them into StorageError: one plain line that says what could not be written and that
the workspace is as it was (each write path undoes its own part before the error leaves it).
"""
from __future__ import annotations

import contextlib
import errno
import re

from safetensors import SafetensorError

_REASONS = {
    errno.ENOSPC: "no space left on the disk",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the disk is read-only",
    errno.EACCES: "no permission to write",
    errno.EPERM: "no permission to write",
    errno.EFBIG: "the file would be too large for the disk",
}
# safetensors (Rust) reports an I/O failure only as text: "I/O error: No space left on
# device (os error 28)" (0.8), "IoError(Os { code: 28, ... })" (older releases).
_RUST_CODE = re.compile(r"os error (\d+)|code: (\d+)")


class StorageError(OSError, ValueError):
    """A refused write, in one line. A ValueError, so every caller that shows a user's
    mistake in one line shows this too; an OSError, so code that already treated a failed
    write as an OSError (a compaction after a commit) still does."""


def reason(err: BaseException) -> str:
    """Why a write failed, in plain words, without a path."""
    code = getattr(err, "errno", None)
    if code is None and isinstance(err, SafetensorError):
        m = _RUST_CODE.search(str(err))
        code = int(m.group(1) or m.group(2)) if m else None
    if code in _REASONS:
        return _REASONS[code]
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower()
    return f"the write failed ({type(err).__name__})"


def message(err: BaseException, what: str) -> str:
    return f"{reason(err)} while writing {what}: the workspace is as it was"


@contextlib.contextmanager
def writing(what: str):
    """Any OSError or SafetensorError inside becomes a StorageError about `what`."""
    try:
        yield
    except StorageError:
        raise
    except (OSError, SafetensorError) as err:
        raise StorageError(message(err, what)) from None
