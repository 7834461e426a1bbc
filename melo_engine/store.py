"""The files of a workspace, and how they change: an append-only journal of small records.

    ws/
      workspace.json              header: format, model, its fingerprint, creation time
      config.json                 MeloConfig
      snapshot-<s>.json           the whole workspace as of record s: edit list, cluster and
      snapshot-<s>.safetensors      point metadata, which file holds each block; keys, centers
      journal-<s>.jsonl           the records after s, one line each: what one commit changed
      blocks/<n>.safetensors      the LoRA blocks that record n brought (one edit: one block)
      index/                      chromadb, a mirror of the centers (rebuilt if it lags behind)

A commit writes only what changed. An edit writes its block file (flushed, then renamed into
place, then the directory flushed), then appends one line to the journal and flushes it: that
flush is the commit. A line carries its own checksum, so a process killed mid-append leaves a
torn last line that is not a commit; it is ignored, and cut off before the next append. A
block file that no committed record names is left over from such a crash and removed when the
workspace is next opened for writing.

Replaying records costs time at opening, so every COMPACT_EVERY records the whole state is
written once as a new snapshot (flushed before the rename that commits it) and a new, empty
journal starts; that costs O(edits) once per COMPACT_EVERY commits. Nothing else ever
rewrites what earlier commits wrote.

A writing Store holds the workspace's lock (lock.py) until `close`: one writer at a time.
Every part of a workspace is its own file or folder: a part that is a symbolic link is
refused when the workspace is opened (`check_own_files`), so no read, write or clean-up
ever reaches outside it. A write the disk refuses is a StorageError in one line (disk.py),
and the files are as before it.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .disk import writing
from .lock import WorkspaceLock

FORMAT = 2
HEADER = "workspace.json"
CONFIG = "config.json"
INDEX_DIR = "index"
BLOCKS_DIR = "blocks"
COMPACT_EVERY = 1000

_SNAPSHOT = re.compile(r"snapshot-(\d+)\.json$")
_SEQ_FILE = re.compile(r"(snapshot|journal)-(\d+)\.(json|safetensors|jsonl)$")


# ---- writing files so that a crash leaves the old or the new one ---------------------
def fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_atomically(path: Path, write) -> None:
    """`write(tmp)` a temporary file beside `path`, flush it, rename it over `path`, flush
    the directory: a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _replace_atomically(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    _replace_atomically(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                                                    metadata=metadata))


def snapshot_bytes(seq: int, edits: list[dict], state: dict, blocks: dict) -> bytes:
    return json.dumps({"seq": seq, "edits": edits, "state": state, "blocks": blocks},
                      separators=(",", ":")).encode()


def check_own_files(ws: Path) -> None:
    """Refuse, in one line, a workspace any part of which is a symbolic link: a linked
    blocks/ or journal would make a sweep, a repair or a commit read, write or delete files
    elsewhere. The workspace folder itself may be reached through a link."""
    ws = Path(ws)
    if not ws.is_dir():
        return
    for root, dirs, names in os.walk(ws):     # never follows links
        for name in dirs + names:
            if os.path.islink(os.path.join(root, name)):
                part = os.path.relpath(os.path.join(root, name), ws)
                raise ValueError(f"the workspace's {part} is a link to elsewhere; a workspace's parts must "
                                 f"be its own files, so it is not opened")


def read_header(ws: Path) -> dict | None:
    """The workspace header, None when there is none; ValueError when it is damaged or any
    of its parts is a link (read first by every open, so nothing outside is read)."""
    check_own_files(ws)
    p = Path(ws) / HEADER
    if not p.is_file():
        return None
    try:
        header = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict) or "format" not in header:
        raise ValueError(f"the workspace's {HEADER} is damaged (not a workspace header)")
    return header


def _plain_file(p: Path) -> bool:
    """A regular file, not a link to one: a clean-up may remove it."""
    return p.is_file() and not p.is_symlink()


def _line(record: dict) -> bytes:
    body = json.dumps(record, separators=(",", ":"))
    return f"{zlib.crc32(body.encode()):08x} {body}\n".encode()


def _parse(line: bytes) -> dict | None:
    """A journal line's record, or None when the line is torn or damaged."""
    if not line.endswith(b"\n") or len(line) < 10:
        return None
    crc, _, body = line[:-1].partition(b" ")
    try:
        if int(crc, 16) != zlib.crc32(body):
            return None
        return json.loads(body)
    except ValueError:
        return None


@dataclass
class Loaded:
    snapshot: dict                      # "seq", "edits", "state", "blocks"
    tensors: dict[str, torch.Tensor]    # the snapshot's "keys" and "centers"
    records: list[dict] = field(default_factory=list)


class Store:
    """One workspace's files: load them, append commits, compact, read blocks."""

    def __init__(self, ws: Path, writable: bool = False, wait: float | None = None):
        """`writable`: take the workspace's lock first (waiting at most `wait` seconds,
        lock.py), so that this is its only writer until `close`."""
        self.ws = Path(ws)
        self.base = 0        # the snapshot the journal continues
        self.seq = 0         # the last committed record
        self.tail = 0        # records in the journal
        self._journal_size = 0
        self.lock = WorkspaceLock(self.ws, wait)
        if writable:
            self.lock.acquire()

    def close(self) -> None:
        """Let another writer in."""
        self.lock.release()

    # ---- paths -------------------------------------------------------------------------
    def snapshot_json(self, seq: int) -> Path:
        return self.ws / f"snapshot-{seq}.json"

    def snapshot_tensors(self, seq: int) -> Path:
        return self.ws / f"snapshot-{seq}.safetensors"

    def journal(self, seq: int) -> Path:
        return self.ws / f"journal-{seq}.jsonl"

    # ---- creating and opening ----------------------------------------------------------
    @classmethod
    def create(cls, ws: Path, header: dict, config: dict) -> None:
        """A new, empty workspace at `ws`, which appears complete or not at all: its files
        are written in a folder beside it, then renamed to `ws` (an empty folder there is
        replaced). A half-made workspace under its final name would be taken for a damaged
        one; a refused command could not tell it from one another process had filled."""
        ws = Path(ws)
        ws.parent.mkdir(parents=True, exist_ok=True)
        if ws.is_dir() and any(ws.iterdir()):
            raise ValueError(f"{ws.name} is not empty and is not a MELO workspace")
        tmp = ws.with_name(f".{ws.name}.new-{secrets.token_hex(4)}")
        try:
            with writing("the new workspace"):
                tmp.mkdir()
                atomic_write_json(tmp / CONFIG, config)
                (tmp / BLOCKS_DIR).mkdir()
                cls(tmp).write_snapshot(0, snapshot_bytes(0, [], {}, {}), {})
                atomic_write_json(tmp / HEADER, dict(header, format=FORMAT))
                try:
                    os.rename(tmp, ws)
                except OSError as err:
                    if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    made = read_header(ws) is not None      # another process was quicker
                    raise ValueError(f"{ws.name} was just created by another process; run the command again"
                                     if made else f"{ws.name} is not empty and is not a MELO workspace") from None
                fsync_dir(ws.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def discard(self) -> bool:
        """Remove this workspace if this store holds its lock and it has never committed a
        record: what a refused command created, and nothing anyone else wrote. It is renamed
        away first, so no one opens it half removed. Returns whether it was removed."""
        if not self.lock.held or self.seq != 0 or read_header(self.ws) is None:
            return False
        gone = self.ws.with_name(f".{self.ws.name}.gone-{secrets.token_hex(4)}")
        os.rename(self.ws, gone)
        self.close()
        shutil.rmtree(gone, ignore_errors=True)
        return True

    def load(self, writable: bool = True) -> Loaded:
        """The newest snapshot and the records after it. Opened for writing, a torn last
        journal line is cut off (it was never committed)."""
        check_own_files(self.ws)
        seqs = [int(m.group(1)) for p in self.ws.iterdir() if (m := _SNAPSHOT.match(p.name))]
        if not seqs:
            raise ValueError("the workspace has no snapshot file")
        self.base = max(seqs)
        later = sorted(p.name for p in self.ws.iterdir()
                       if (m := _SEQ_FILE.match(p.name)) and m.group(1) == "journal" and int(m.group(2)) > self.base)
        if later:      # a journal whose snapshot is gone (a restored backup?): never guess, never delete
            raise ValueError(f"{later[0]} continues a snapshot that is not in the workspace; "
                             f"`repair` sets it aside and opens what the snapshot holds")
        try:
            snapshot = json.loads(self.snapshot_json(self.base).read_text())
            tensors = load_file(str(self.snapshot_tensors(self.base)))
        except Exception as err:  # noqa: BLE001 - any parse failure means a damaged file
            raise ValueError(f"the snapshot {self.snapshot_json(self.base).stem} is damaged "
                             f"({type(err).__name__})") from None
        records, good = [], 0
        journal = self.journal(self.base)
        if journal.is_file():
            data = journal.read_bytes()
            for line in data.splitlines(keepends=True):
                rec = _parse(line)
                if rec is None or rec.get("seq") != self.base + len(records) + 1:
                    break
                records.append(rec)
                good += len(line)
            if good < len(data):
                if b"\n" in data[good:]:     # a whole line that does not check: damage, not a crash
                    raise ValueError(f"the journal {journal.name} is damaged after record "
                                     f"{self.base + len(records)}; `repair` keeps the records before it")
                if writable:
                    with open(journal, "r+b") as f:
                        f.truncate(good)
                        os.fsync(f.fileno())
        self.seq, self.tail, self._journal_size = self.base + len(records), len(records), good
        return Loaded(snapshot, tensors, records)

    def set_aside_damage(self) -> tuple[int, str | None]:
        """Keep the journal's records up to the first that does not check and move the rest,
        untouched, to a file of its own (nothing is deleted). Returns (records kept, the
        name of the file set aside or None)."""
        seqs = [int(m.group(1)) for p in self.ws.iterdir() if (m := _SNAPSHOT.match(p.name))]
        if not seqs:
            raise ValueError("the workspace has no snapshot file: nothing to repair from")
        for p in list(self.ws.iterdir()):     # journals of a snapshot that is not there
            m = _SEQ_FILE.match(p.name)
            if m and m.group(1) == "journal" and int(m.group(2)) > max(seqs):
                p.rename(self.ws / f"damaged-{p.stem}-{int(time.time())}.jsonl")
        journal = self.journal(max(seqs))
        if not journal.is_file():
            return 0, None
        data, good, kept = journal.read_bytes(), 0, 0
        for line in data.splitlines(keepends=True):
            rec = _parse(line)
            if rec is None or rec.get("seq") != max(seqs) + kept + 1:
                break
            good, kept = good + len(line), kept + 1
        if good == len(data):
            return kept, None
        aside = self.ws / f"damaged-{journal.stem}-{int(time.time())}.jsonl"
        with writing(f"the set-aside {aside.name}"):
            atomic_write_bytes(aside, data[good:])
        with writing(f"the journal {journal.name}"):
            atomic_write_bytes(journal, data[:good])
        return kept, aside.name

    def sweep(self, live_block_files: set[str]) -> None:
        """Remove what no commit refers to: older snapshots and journals, block files of
        uncommitted edits, temporaries of interrupted writes. Only plain files are removed,
        and blocks/ is read only when it is a folder of this workspace, not a link."""
        check_own_files(self.ws)
        for p in self.ws.iterdir():
            m = _SEQ_FILE.match(p.name)
            # Older snapshots and journals are superseded by the current snapshot; a newer
            # snapshot's tensors without its JSON are a compaction that did not finish.
            stale = m is not None and (int(m.group(2)) < self.base or
                                       (int(m.group(2)) > self.base and m.group(3) == "safetensors"))
            if _plain_file(p) and (stale or p.name.startswith(".") or p.name.startswith("state-")):
                p.unlink(missing_ok=True)
        blocks = self.ws / BLOCKS_DIR
        blocks.mkdir(exist_ok=True)
        for p in blocks.iterdir():
            if _plain_file(p) and f"{BLOCKS_DIR}/{p.name}" not in live_block_files:
                p.unlink(missing_ok=True)

    # ---- committing --------------------------------------------------------------------
    def write_blocks(self, blocks: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]],
                     dtype: torch.dtype, part: int | None = None) -> str:
        """Write the blocks the next record will bring (flushed, not yet committed); returns
        the file's name, for the record. `part` numbers the files of one bulk commit."""
        name = f"{BLOCKS_DIR}/{self.seq + 1:08d}{'' if part is None else f'-{part}'}.safetensors"
        modules = sorted({m for mats in blocks.values() for m in mats})
        tensors = {}
        for b, mats in blocks.items():
            for i, m in enumerate(modules):
                if m in mats:
                    tensors[f"{b}.{i}.A"] = mats[m][0].detach().to(dtype)
                    tensors[f"{b}.{i}.B"] = mats[m][1].detach().to(dtype)
        with writing(f"the block file {name}"):
            atomic_save_tensors(self.ws / name, tensors, {"modules": json.dumps(modules)})
        return name

    def append(self, record: dict) -> int:
        """Commit one record: append its line to the journal and flush. Returns its seq."""
        record = dict(record, seq=self.seq + 1)
        line = _line(record)
        path = self.journal(self.base)
        new = not path.exists()
        with writing(f"the journal {path.name}"):
            # Unbuffered: a buffered file that failed to flush would try again on close,
            # after the cut below.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                done = 0
                while done < len(line):
                    done += os.write(fd, line[done:])
                os.fsync(fd)
            except BaseException:
                # Not committed: cut what may have reached the file, so the next record does
                # not follow a torn line.
                os.ftruncate(fd, self._journal_size)
                if new:
                    path.unlink(missing_ok=True)
                raise
            finally:
                os.close(fd)
            if new:
                fsync_dir(self.ws)
        self.seq, self.tail = record["seq"], self.tail + 1
        self._journal_size += len(line)
        return self.seq

    def write_snapshot(self, seq: int, snapshot: bytes, tensors: dict[str, torch.Tensor]) -> None:
        """Commit the whole state as of record `seq` (= self.seq; `snapshot` is its JSON) and
        start an empty journal after it; the older snapshot and journal go."""
        with writing(f"the snapshot {self.snapshot_json(seq).stem}"):
            atomic_save_tensors(self.snapshot_tensors(seq), tensors)
            try:
                atomic_write_bytes(self.snapshot_json(seq), snapshot)
            except BaseException:
                if seq != self.base:        # tensors without their JSON: not a snapshot yet
                    self.snapshot_tensors(seq).unlink(missing_ok=True)
                raise
        old = self.base
        self.base, self.tail, self._journal_size = seq, 0, 0
        if old != seq:
            for p in (self.snapshot_json(old), self.snapshot_tensors(old), self.journal(old)):
                p.unlink(missing_ok=True)

    def remove_block_file(self, name: str) -> None:
        """A block file no live edit uses any more (after the commit that freed it)."""
        (self.ws / name).unlink(missing_ok=True)

    # ---- reading blocks ----------------------------------------------------------------
    def read_block(self, name: str, block: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        with safe_open(str(self.ws / name), framework="pt") as f:
            modules = json.loads((f.metadata() or {})["modules"])
            names = set(f.keys())
            return {m: (f.get_tensor(f"{block}.{i}.A"), f.get_tensor(f"{block}.{i}.B"))
                    for i, m in enumerate(modules) if f"{block}.{i}.A" in names}

    def disk_bytes(self) -> int:
        """Everything the workspace holds on disk, the index included."""
        total = 0
        for root, _, files in os.walk(self.ws):
            for name in files:
                try:
                    total += os.stat(os.path.join(root, name)).st_size
                except FileNotFoundError:
                    pass
        return total
