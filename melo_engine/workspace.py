"""One workspace in memory and on disk: its edit records, blocks and cluster state, the
commits that change them, and how it is opened, replayed, compacted and repaired.

Everything that changes a workspace goes through `Workspace.change(op)`: the body changes
the cluster state (through its setters) and the edit list and blocks (through the yielded
`Change`); the change is then written as one journal record (store.py). If anything fails
before that record is on disk, memory goes back to the last commit and the files are as
before. Queries read the state under `state_lock` only, so an edit can train without
holding them up and a query sees the workspace before or after a commit, never half of it.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

from . import store
from .bank import BlockBank
from .index import ClusterState
from .records import EditRecord
from .upgrade import upgrade_format1

log = logging.getLogger(__name__)


class Change:
    """What one commit does to the edit list and the blocks, so that it can be written as
    one journal record and undone in memory if writing it fails."""

    def __init__(self, entries: dict[str, EditRecord]):
        self.entries = entries
        self.old: dict[str, EditRecord | None] = {}
        self.blocks: dict[int, str | None] = {}       # block -> its file (None: freed)
        self.new_blocks: dict[int, dict] = {}          # block -> matrices, to cache

    def set(self, edit_id: str, entry: EditRecord | None) -> None:
        if edit_id not in self.old:
            self.old[edit_id] = self.entries.get(edit_id)
        if entry is None:
            self.entries.pop(edit_id, None)
        else:
            self.entries[edit_id] = entry

    def update(self, edit_id: str, **fields) -> None:
        self.set(edit_id, self.entries[edit_id].replace(**fields))

    def add_block(self, block: int, file: str, matrices: dict) -> None:
        self.blocks[block], self.new_blocks[block] = file, matrices

    def undo(self) -> None:
        removed = any(e is not None and k not in self.entries for k, e in self.old.items())
        for k, e in self.old.items():
            if e is None:
                self.entries.pop(k, None)
            else:
                self.entries[k] = e
        if removed:        # put a restored edit back in its place, not at the end
            ordered = sorted(self.entries.values(), key=lambda e: e.created)
            self.entries.clear()
            self.entries.update((e.id, e) for e in ordered)

    def placed(self, placed, new_id: str) -> None:
        """Record in the edit list what placing edit `new_id` did to earlier edits; a
        forgotten edit's block is freed, a superseded one keeps its block (an undo of the
        newer edit brings it back)."""
        for e in placed.forgotten:
            self.blocks[self.entries[e].block] = None
            self.update(e, status="forgotten", forgotten_by=new_id, block=None, cluster=None)
        for e, cluster in placed.moved.items():
            self.update(e, cluster=cluster)
        for e in placed.superseded:
            self.update(e, status="superseded", superseded_by=new_id)

    def record(self, op: str, state_delta: dict) -> dict:
        return {"op": op, "at": time.time(),
                "edits": {k: (e.to_json() if (e := self.entries.get(k)) is not None else None) for k in self.old},
                "state": state_delta, "blocks": {str(b): f for b, f in self.blocks.items()}}


class Workspace:
    """The records, blocks and cluster state of one workspace folder, and its commits."""

    def __init__(self, folder: Path, read_only: bool = False):
        self.folder = Path(folder)
        self.read_only = read_only
        self.store = store.Store(self.folder, writable=not read_only)   # a writer holds the lock until close
        self.entries: dict[str, EditRecord] = {}    # edit id -> its record, oldest first
        self.bank = BlockBank(reader=self.store.read_block)
        self.state = ClusterState()
        self.lock = threading.RLock()          # one change to this workspace at a time
        self.state_lock = threading.RLock()    # a query sees one whole state
        self._file_users: Counter = Counter()  # block file -> live blocks in it

    @classmethod
    def create(cls, folder: Path, header: dict, config: dict) -> "Workspace":
        """A new workspace in an empty (or new) folder, with these settings: it appears
        complete or not at all (store.Store.create)."""
        store.Store.create(folder, header, config)
        return cls(folder)

    def close(self) -> None:
        """Let go of the workspace's lock (waits for a change in progress to finish)."""
        with self.lock:
            self.store.close()

    # ---- reading it back -----------------------------------------------------------------
    def load(self) -> None:
        """Read the snapshot, replay the journal after it, and clean up what a crash left."""
        header = store.read_header(self.folder)
        if header.get("format") == 1:
            upgrade_format1(self.folder, header)
            header = store.read_header(self.folder)
        if header.get("format") != store.FORMAT:
            raise ValueError(f"workspace format {header.get('format')} is not supported")
        loaded = self.store.load(writable=not self.read_only)
        snap = loaded.snapshot
        self.entries = {e["id"]: EditRecord.from_json(e) for e in snap.get("edits", [])}
        state = ClusterState.from_files(snap.get("state", {}), loaded.tensors)
        self.bank.clear()
        for b, f in snap.get("blocks", {}).items():
            self.bank.put(int(b), file=f)
        for rec in loaded.records:
            self._replay(rec, state)
        self._file_users = Counter(f for f in self.bank.files.values() if f is not None)
        if not self.read_only:
            self.store.sweep(set(self._file_users))
        with self.state_lock:
            self.state = state

    def _replay(self, rec: dict, state: ClusterState) -> None:
        if rec.get("op") == "reset":
            state.reset()
            self.entries.clear()
            self.bank.clear()
            return
        state.apply(rec["state"])
        for k, e in rec["edits"].items():
            if e is None:
                self.entries.pop(k, None)
            else:
                self.entries[k] = EditRecord.from_json(e)
        for b, f in rec["blocks"].items():
            if f is None:
                self.bank.free(int(b))
            else:
                self.bank.put(int(b), file=f)

    # ---- changing it ---------------------------------------------------------------------
    def writable(self) -> None:
        if self.read_only:
            raise ValueError("this workspace is open read-only")

    def entry(self, edit_id: str) -> EditRecord:
        if edit_id not in self.entries:
            shown = edit_id if len(edit_id) <= 40 else edit_id[:40] + "..."
            raise ValueError(f"unknown edit id {shown!r}")
        return self.entries[edit_id]

    @contextlib.contextmanager
    def change(self, op: str):
        """One commit (see the module's docstring). Call with `lock` held."""
        state = self.state
        ch = Change(self.entries)
        with self.state_lock:
            state.begin()
            try:
                yield ch
                self.store.append(ch.record(op, state.delta()))
            except BaseException:
                state.rollback()
                ch.undo()
                for b, f in ch.blocks.items():     # the block file of an edit that did not commit
                    if f is not None and b not in self.bank:
                        self.store.remove_block_file(f)
                raise
            state.end()
            gone_files = self._settle_blocks(ch)
        for f in gone_files:
            self.store.remove_block_file(f)
        if self.store.tail >= store.COMPACT_EVERY:
            try:
                self.compact()
            except OSError as err:   # the change is committed; the journal stays the record of it
                log.warning("compaction failed (%s); the journal keeps every change", err)

    def _settle_blocks(self, ch: Change) -> list[str]:
        """Put a committed change's blocks in the bank; returns the block files no block uses now."""
        gone = []
        for b, f in ch.blocks.items():
            if f is None:
                old = self.bank.free(b)
                if old is not None:
                    self._file_users[old] -= 1
                    if self._file_users[old] <= 0:
                        del self._file_users[old]
                        gone.append(old)
            else:
                self.bank.put(b, ch.new_blocks.get(b), file=f)
                self._file_users[f] += 1
        return gone

    def adopt_files(self, files) -> None:
        """Block files written outside `change` (the bulk path) that live blocks now use."""
        self._file_users.update(files)

    def compact(self) -> None:
        """Write the whole workspace as one snapshot and start an empty journal (done by
        itself every store.COMPACT_EVERY commits; opening then replays fewer records)."""
        self.writable()
        with self.lock:
            with self.state_lock:
                meta, tensors = self.state.to_files()
                seq = self.store.seq
                snap = store.snapshot_bytes(seq, [e.to_json() for e in self.entries.values()], meta,
                                            {str(b): f for b, f in self.bank.files.items()})
            self.store.write_snapshot(seq, snap, tensors)

    def reset(self) -> None:
        """Remove every edit, as one journal record, then compact."""
        self.writable()
        with self.lock:
            with self.state_lock:
                self.store.append({"op": "reset", "at": time.time()})
                self.state.reset()
                self.entries.clear()
                self.bank.clear()
                self._file_users.clear()
            self.store.sweep(set())
            self.compact()

    @staticmethod
    def set_aside_damage(folder: Path) -> tuple[int, str | None]:
        """Journal records after damage moved aside (kept in a file of their own); what a
        format-2 workspace before 2026-11-30 mirrored into chroma (index/) is dropped."""
        held = store.Store(folder, writable=True)        # repair writes: no other writer meanwhile
        try:
            kept, aside = held.set_aside_damage()
            if (folder / store.INDEX_DIR).is_dir() and not (folder / store.INDEX_DIR).is_symlink():
                shutil.rmtree(folder / store.INDEX_DIR, ignore_errors=True)
        finally:
            held.close()
        return kept, aside

    @staticmethod
    def has_edits(folder) -> bool:
        """Whether a workspace folder holds any edit (a block file), without opening it."""
        blocks = Path(folder) / store.BLOCKS_DIR
        return blocks.is_dir() and any(blocks.iterdir())
