"""MeloEditor: one workspace of edits on top of a frozen model.

An editor owns its block bank, its cluster index and its files; it borrows a Backbone
(possibly shared with other editors) for every forward. Nothing lives at module level, so
two editors in one process never see each other's edits.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import disk, store
from .backbone import Backbone
from .bank import BlockBank
from .calibrate import calibrated_radius
from .config import DEFAULT_MODEL, EDIT_SETTINGS, MeloConfig
from .exchange import EXPORT_FORMAT, EXPORT_MAGIC, KEPT_NUMBERS, check_edits, read_export
from .index import ClusterIndex, ClusterState, Route
from .keys import Keyer
from .neighbours import Neighbour, reference_keys, side_effects
from .sentences import joined, text_before
from .text import shows_nothing
from .train import Trained, train_block
from .upgrade import upgrade_format1

log = logging.getLogger(__name__)


@dataclass
class Answer:
    """The model's answer to a question, and how it was routed."""

    text: str
    block: int | None             # the LoRA block that fired; None: the original model answered
    distance: float | None        # to the nearest cluster center (None: index empty)
    radius: float | None          # that cluster's radius: the block fires when distance <= radius
    cluster: str | None
    edit_id: str | None = None    # the edit whose block fired
    base_text: str | None = None  # the unedited model's answer, when asked for
    seconds: float = 0.0


@dataclass
class EditResult:
    edit_id: str
    block: int
    cluster: str
    action: str                   # "new" | "joined" | "conflict"
    steps: int
    losses: list[float]
    seconds: float
    forgotten: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)   # earlier edits given clusters of their own
    token_accuracy: float = 0.0   # teacher-forced, on the edit prompt, at the end of training
    params: int = 0               # trainable parameters of this edit's block
    superseded: list[str] = field(default_factory=list)   # earlier edits of the same question, now dormant


@dataclass
class TrainedEdit:
    """A block trained for prompt -> target that is not part of the workspace yet (MeloEditor.train)."""

    prompt: str
    target: str
    key: torch.Tensor
    trained: Trained
    started: float                # perf_counter at the start of training
    prefix: str | None = None     # a sentence correction: the answer's text kept before `target`
    taught_tokens: int = 0        # tokens of what the block was taught to say
    ends_answer: bool = False     # a sentence correction that also ends the answer


class _Change:
    """What one commit does to the edit list and the blocks, so that it can be written as
    one journal record and undone in memory if writing it fails."""

    def __init__(self, entries: dict[str, dict]):
        self.entries = entries
        self.old: dict[str, dict | None] = {}
        self.blocks: dict[int, str | None] = {}       # block -> its file (None: freed)
        self.new_blocks: dict[int, dict] = {}          # block -> matrices, to cache

    def set(self, edit_id: str, entry: dict | None) -> None:
        if edit_id not in self.old:
            self.old[edit_id] = self.entries.get(edit_id)
        if entry is None:
            self.entries.pop(edit_id, None)
        else:
            self.entries[edit_id] = entry

    def update(self, edit_id: str, **fields) -> None:
        self.set(edit_id, dict(self.entries[edit_id], **fields))

    def undo(self) -> None:
        removed = any(e is not None and k not in self.entries for k, e in self.old.items())
        for k, e in self.old.items():
            if e is None:
                self.entries.pop(k, None)
            else:
                self.entries[k] = e
        if removed:        # put a restored edit back in its place, not at the end
            ordered = sorted(self.entries.values(), key=lambda e: e.get("created", 0))
            self.entries.clear()
            self.entries.update((e["id"], e) for e in ordered)

    def placed(self, placed, new_id: str) -> None:
        """Record in the edit list what placing edit `new_id` did to earlier edits; a
        forgotten edit's block is freed, a superseded one keeps its block (an undo of the
        newer edit brings it back)."""
        for e in placed.forgotten:
            self.blocks[self.entries[e]["block"]] = None
            self.update(e, status="forgotten", forgotten_by=new_id, block=None, cluster=None)
        for e, cluster in placed.moved.items():
            self.update(e, cluster=cluster)
        for e in placed.superseded:
            self.update(e, status="superseded", superseded_by=new_id)

    def record(self, op: str, state_delta: dict) -> dict:
        return {"op": op, "at": time.time(), "edits": {k: self.entries.get(k) for k in self.old},
                "state": state_delta, "blocks": {str(b): f for b, f in self.blocks.items()}}


def clean_text(text: str, what: str, limit: int) -> str:
    """A text the user typed, stripped; refused when it shows nothing, is not valid text or
    is too long."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be text, not {type(text).__name__}")
    if shows_nothing(text):
        raise ValueError(f"{what} is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid UTF-8 text") from None
    text = text.strip()
    if len(text) > limit:
        raise ValueError(f"{what} is {len(text)} characters long; the limit is {limit}")
    return text


class MeloEditor:
    """Edit, ask, undo, export: the whole MELO workflow on one workspace directory."""

    def __init__(self, workspace: Path, backbone: Backbone, config: MeloConfig, keyer: Keyer | None = None,
                 read_only: bool = False):
        self.workspace = Path(workspace)
        self.read_only = read_only
        self.backbone = backbone
        self.config = config
        self.keyer = keyer or Keyer(backbone, config)
        self._reference = None                # the side-effect bank's keys, loaded when first needed
        self.modules = backbone.ensure_lora(config.lora_layers, config.lora_modules)
        self._lock = threading.RLock()        # one change to this workspace at a time
        self.store = store.Store(self.workspace, writable=not read_only)   # a writer holds the lock until close
        self.entries: dict[str, dict] = {}    # edit id -> its record, oldest first
        self.bank = BlockBank(reader=self.store.read_block)
        self._file_users: Counter = Counter()   # block file -> live blocks in it
        # Routing needs no chroma (it is exact, in memory): it is opened on the first commit.
        self.index = ClusterIndex(self.workspace / store.INDEX_DIR, mirror=not read_only)

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, workspace, model: str | None = None, config: MeloConfig | None = None,
             backbone: Backbone | None = None, read_only: bool = False) -> "MeloEditor":
        """Create or reopen a workspace. `backbone` lets many workspaces share one loaded model.

        A new workspace takes `config` (default settings otherwise); an existing one keeps
        the settings it was made with. Opening it with a different model is an error.
        `read_only`: an existing workspace, opened without writing a byte (no chroma, no
        clean-up of what a crash left); asking, listing and exporting work, changes refuse.
        """
        ws = Path(workspace).expanduser()
        if ws.exists() and not ws.is_dir():
            raise ValueError(f"{ws.name} is a file, not a workspace folder")
        if any(p.exists() and not p.is_dir() for p in ws.parents):
            raise ValueError(f"{ws.name} would be inside a file, not a folder")
        log = store.read_header(ws) if ws.is_dir() else None
        if read_only and log is None:
            raise ValueError(f"there is no workspace at {ws.name or ws}")
        if read_only and log.get("format") != store.FORMAT:
            raise ValueError("this workspace has an older format: open it once for writing, which upgrades it")
        if log is not None:
            try:
                saved = MeloConfig.load(ws / store.CONFIG)
            except (OSError, ValueError, TypeError, AttributeError):
                raise ValueError("the workspace's config.json is missing or damaged") from None
            if model is not None and model != saved.model:
                raise ValueError(f"workspace {ws.name} was made with model {saved.model!r}, not {model!r}")
            cfg = saved
        else:
            cfg = dataclasses.replace(config or MeloConfig(), model=model or (config.model if config else DEFAULT_MODEL))
            cfg.validate()
        if backbone is None:
            backbone = Backbone.load(cfg.model)
        elif backbone.name != cfg.model:
            raise ValueError(f"workspace {ws.name} is for model {cfg.model!r}; the loaded model is {backbone.name!r}")
        if log is not None and log.get("fingerprint") != backbone.fingerprint:
            raise ValueError(f"workspace {ws.name} was made with another model than {backbone.name!r} (fingerprints differ)")
        cfg = cfg.resolved(backbone.num_layers)
        keyer = Keyer(backbone, cfg)
        if cfg.init_radius is None:
            cfg = dataclasses.replace(cfg, init_radius=calibrated_radius(backbone, cfg, keyer))
        ed = cls(ws, backbone, cfg, keyer, read_only) if log is not None else cls._create(ws, backbone, cfg, keyer)
        try:
            ed._load()
        except BaseException:
            ed.close()          # chroma would otherwise keep this path's files open
            raise
        return ed

    @classmethod
    def repair(cls, workspace, backbone: Backbone | None = None) -> dict:
        """Rebuild what the files allow, without guessing: journal records after damage are
        moved aside (kept in a file of their own), the chroma index is rebuilt from the
        snapshot and journal, leftovers of interrupted writes are removed."""
        ws = Path(workspace).expanduser()
        if store.read_header(ws) is None:
            raise ValueError(f"there is no workspace at {ws.name or ws}")
        held = store.Store(ws, writable=True)        # repair writes: no other writer meanwhile
        try:
            kept, aside = held.set_aside_damage()
            shutil.rmtree(ws / store.INDEX_DIR, ignore_errors=True)
        finally:
            held.close()
        ed = cls.open(ws, backbone=backbone)
        ed.index.sync(ed.store.seq)
        out = {"journal_records_kept": kept, "set_aside": aside, "edits": len(ed.entries),
               "index_rebuilt_clusters": len(ed.index.state.clusters)}
        ed.close()
        return out

    @classmethod
    def _create(cls, ws: Path, backbone: Backbone, cfg: MeloConfig, keyer: Keyer) -> "MeloEditor":
        store.Store.create(ws, {"model": cfg.model, "fingerprint": backbone.fingerprint, "created": time.time()},
                           cfg.to_json())
        return cls(ws, backbone, cfg, keyer)

    def _load(self) -> None:
        """Read the snapshot, replay the journal after it, and bring the index up to date."""
        header = store.read_header(self.workspace)
        if header.get("format") == 1:
            upgrade_format1(self.workspace, header)
            header = store.read_header(self.workspace)
        if header.get("format") != store.FORMAT:
            raise ValueError(f"workspace format {header.get('format')} is not supported")
        loaded = self.store.load(writable=not self.read_only)
        snap = loaded.snapshot
        self.entries = {e["id"]: e for e in snap.get("edits", [])}
        state = ClusterState.from_files(snap.get("state", {}), loaded.tensors)
        self.bank.clear()
        for b, f in snap.get("blocks", {}).items():
            self.bank.put(int(b), file=f)
        for rec in loaded.records:
            self._replay(rec, state)
        self._file_users = Counter(f for f in self.bank.files.values() if f is not None)
        if not self.read_only:
            self.store.sweep(set(self._file_users))
        self.index.load(state, self.store.seq)

    def _replay(self, rec: dict, state: ClusterState) -> None:
        if rec.get("op") == "reset":
            state.__init__()
            self.entries.clear()
            self.bank.clear()
            return
        state.apply(rec["state"])
        for k, e in rec["edits"].items():
            if e is None:
                self.entries.pop(k, None)
            else:
                self.entries[k] = e
        for b, f in rec["blocks"].items():
            if f is None:
                self.bank.free(int(b))
            else:
                self.bank.put(int(b), file=f)

    def close(self) -> None:
        """Release the chroma index and the workspace's lock (waits for an edit in progress to finish)."""
        with self._lock:
            self.index.close()
            self.store.close()

    # ---- asking --------------------------------------------------------------------------
    def _check(self, text: str, what: str) -> str:
        return clean_text(text, what, self.config.max_text_chars)

    def key(self, question: str) -> torch.Tensor:
        return self.keyer.keys([question])[0]

    def route(self, question: str) -> Route:
        """Which block (if any) fires for this question, and why: distance versus radius."""
        return self.index.route(self.key(self._check(question, "the question")))

    def ask(self, question: str, compare_base: bool = False) -> Answer:
        """Answer with the edited model: route once from the prompt, hold that block throughout."""
        question = self._check(question, "the question")
        c = self.config
        t0 = time.perf_counter()
        text, r = self.generate(question, c.max_new_tokens)
        base = None
        if compare_base:
            # With no block fired, the edited model *is* the base model: no second run needed.
            base = text if r.block is None else self.backbone.generate(question, None, self.budget(r.edit_id),
                                                                      chat=self.chat)
        return Answer(text, r.block, r.distance, r.radius, r.cluster, r.edit_id, base, time.perf_counter() - t0)

    def generate(self, question: str, max_new_tokens: int, min_new_tokens: int = 0,
                 timer: Callable[[float], None] | None = None) -> tuple[str, Route]:
        """Greedy text from the edited model, routed once from the prompt: (text, route).
        `timer(seconds)` gets what deciding the block cost (key, lookup, gathering it)."""
        c = self.config

        def choose(key, started):
            # Under the index lock, not the editor's: an edit trains without it and holds it
            # only to commit, so a query sees the workspace before or after an edit, whole.
            with self.index.lock:
                r = self.index.state.route(key)
                active = self.bank.gather([r.block], self.modules)
            if timer is not None:
                timer(time.perf_counter() - started)
            return active, r

        if self.keyer.in_prefill and not any("prefix" in e for e in self.entries.values()):
            # The model's own key, taken inside the prefill: no extra forward. (Not with
            # sentence corrections: their length budget must be known before generating.)
            return self.backbone.generate_routed(
                question, c.key_layer, c.key_reduction, c.distance,
                lambda raw: choose(self.keyer.finish(raw[None])[0], time.perf_counter()),
                max_new_tokens, min_new_tokens, chat=self.chat)
        t0 = time.perf_counter()
        active, r = choose(self.key(question), t0)
        budget = max(max_new_tokens, self.budget(r.edit_id))
        return self.backbone.generate(question, active, budget, min_new_tokens, chat=self.chat), r

    @property
    def chat(self) -> bool:
        """Prompts go through the chat template (else: plain text the model continues)."""
        return self.config.prompt_mode == "chat"

    def budget(self, edit_id: str | None) -> int:
        """New tokens to generate when edit `edit_id` fires (None: no edit). A sentence
        correction taught the whole answer up to its sentence, which may be longer than the
        usual limit: it gets room for that and a little of what follows."""
        e = self.entries.get(edit_id) if edit_id is not None else None
        if e is None or "prefix" not in e:
            return self.config.max_new_tokens
        return max(self.config.max_new_tokens, int(e.get("taught_tokens", 0)) + 16)

    def probe(self, questions: list[str], workers: int | None = None) -> list[Answer]:
        """Ask many questions, each with the unedited answer beside it, answered together:
        every question is routed once, then the rows (the edited answers, and the unedited
        twins of those that fired a block) are generated as `workers` batches side by side,
        one per core by default (each on the calling thread's torch threads: the app gives a
        request one). Six queries through the app: 6.7 s, against 20.3 s asked one at a time
        (docs/BENCHMARKS.md, "Probe")."""
        if not isinstance(questions, (list, tuple)):
            raise ValueError("the questions must be a list of texts")
        qs = [self._check(q, f"question {i + 1}") for i, q in enumerate(questions)]
        if not qs:
            raise ValueError("no questions to probe")
        t0 = time.perf_counter()
        keys = self.keyer.keys(qs)
        with self.index.lock:
            routes = [self.index.state.route(k) for k in keys]
        # (question, block, token budget); the unedited twin of a fired row gets its budget
        rows = [(q, r.block, self.budget(r.edit_id)) for q, r in zip(qs, routes)]
        rows += [(q, None, self.budget(r.edit_id)) for q, r in zip(qs, routes) if r.block is not None]
        n = max(1, min(workers or os.cpu_count() or 1, len(rows)))
        parts = [rows[i::n] for i in range(n)]        # interleaved: long and short answers spread out

        def generate(part):
            with self.index.lock:
                active = self.bank.gather([b for _, b, _ in part], self.modules)
            # Each thread holds its own blocks (the LoRA layers keep them per thread).
            return self.backbone.generate_batch([q for q, _, _ in part], active, [n for _, _, n in part],
                                                chat=self.chat)

        with ThreadPoolExecutor(n) as pool:
            done = list(pool.map(generate, parts))
        texts = [None] * len(rows)
        for i, part_texts in enumerate(done):
            texts[i::n] = part_texts
        base = iter(texts[len(qs):])
        seconds = (time.perf_counter() - t0) / len(qs)
        return [Answer(t, r.block, r.distance, r.radius, r.cluster, r.edit_id,
                       next(base) if r.block is not None else t, seconds)
                for t, r in zip(texts[:len(qs)], routes)]

    def side_effects(self, edit_id: str, n: int = 8) -> list[Neighbour]:
        """The reference questions nearest an active edit, and every one that now fires it,
        with distance against radius (neighbours.py): keys only, nothing generated."""
        entry = self._entry(str(edit_id))
        if self._reference is None:
            self._reference = reference_keys(self.keyer)
        with self.index.lock:
            if entry["id"] not in self.index.state.points:
                raise ValueError(f"edit {entry['id']} is {entry['status']}: it fires for no question")
            return side_effects(self.index.state, entry["id"], *self._reference, n=n)

    # ---- editing -------------------------------------------------------------------------
    def edit(self, prompt: str, target: str, progress: Callable[[int, float], None] | None = None,
             prefix: str | None = None, end: bool = False) -> EditResult:
        """Teach the model to answer `prompt` with `target`, in a fresh LoRA block.

        With `prefix` the edit corrects one sentence of a longer answer: for `prompt` the
        model says `prefix` (the answer's text before the wrong sentence, kept exactly; ""
        for the first sentence), then `target` in place of the wrong sentence, and goes on
        from there (what follows may change), or, with `end`, stops there.
        """
        return self.commit(self.train(prompt, target, progress, prefix, end))

    def correct(self, question: str, number: int, sentence: str, answer: str | None = None,
                progress: Callable[[int, float], None] | None = None, end: bool = False) -> EditResult:
        """Correct sentence `number` (1 for the first) of the answer to `question`: the
        answer given now, or `answer` as it was shown. The sentences before it stay exactly
        as they are (sentences.py splits the answer); with `end` the answer stops after the
        corrected sentence."""
        self._check(sentence, "the corrected sentence")      # refused before anything is generated
        return self.edit(question, sentence, progress, prefix=self.sentence_prefix(question, number, answer), end=end)

    def sentence_prefix(self, question: str, number: int, answer: str | None = None) -> str:
        """The text before sentence `number` (1 for the first) of the answer to `question`
        (the answer given now, unless `answer` says what was shown): what a correction of
        that sentence keeps."""
        if isinstance(number, bool) or not isinstance(number, int):
            raise ValueError("the sentence number must be a whole number")
        question = self._check(question, "the question")
        if answer is None:
            answer = self.ask(question).text
        return text_before(answer, number - 1)

    def train(self, prompt: str, target: str, progress: Callable[[int, float], None] | None = None,
              prefix: str | None = None, end: bool = False) -> TrainedEdit:
        """The first half of `edit`: train the block, write nothing. A caller can still drop
        it (the app does when the visitor who asked has gone); `commit` makes it an edit."""
        self._writable()
        prompt = self._check(prompt, "the prompt")
        target = self._check(target, "the corrected sentence" if prefix is not None else "the target")
        if prefix is not None:
            prefix = self._check_prefix(prefix)
        taught = joined(prefix, target) if prefix is not None else target
        with self._lock:
            t0 = time.perf_counter()
            key = self.key(prompt)
            enc = self.backbone.encode([prompt], [taught], chat=self.chat, ends=prefix is None or bool(end))
            trained = train_block(self.backbone, enc, self.modules, self.config, seed=len(self.entries),
                                  progress=progress)
        return TrainedEdit(prompt, target, key, trained, t0, prefix,
                           int(enc.mask.sum() - enc.prompt_mask.sum()), prefix is not None and bool(end))

    def _check_prefix(self, prefix: str) -> str:
        """The kept text before a corrected sentence: any text (empty for the first
        sentence), valid UTF-8, at most four times the text limit; kept as given but for
        white space at its start (answers never begin with any)."""
        if not isinstance(prefix, str):
            raise ValueError(f"the text before the sentence must be text, not {type(prefix).__name__}")
        try:
            prefix.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("the text before the sentence is not valid UTF-8 text") from None
        if "\x00" in prefix:
            raise ValueError("the text before the sentence contains a NUL character")
        limit = 4 * self.config.max_text_chars
        if len(prefix) > limit:
            raise ValueError(f"the text before the sentence is {len(prefix)} characters long; the limit is {limit}")
        return prefix.lstrip()

    def commit(self, pending: TrainedEdit) -> EditResult:
        """The second half of `edit`: write the trained block and place its key in the index."""
        self._writable()
        c = self.config
        with self._lock:
            edit_id = secrets.token_hex(4)
            while edit_id in self.entries:
                edit_id = secrets.token_hex(4)
            # Queries go on being answered while the block trains; only the commit holds them.
            block = self.bank.allocate()
            trained = pending.trained
            matrices = {m: (a.to(self._dtype), b.to(self._dtype)) for m, (a, b) in trained.matrices.items()}
            file = self.store.write_blocks({block: matrices}, self._dtype)
            with self._change("edit") as ch:
                placed = self.index.state.add(edit_id, pending.key, block, pending.target, c.init_radius,
                                              c.on_conflict)
                ch.blocks[block], ch.new_blocks[block] = file, matrices
                ch.placed(placed, edit_id)
                seconds = time.perf_counter() - pending.started
                entry = {"id": edit_id, "prompt": pending.prompt, "target": pending.target, "block": block,
                         "cluster": placed.cluster, "action": placed.action, "created": time.time(),
                         "steps": len(trained.losses), "seconds": round(seconds, 3),
                         "final_loss": trained.losses[-1], "token_accuracy": trained.token_accuracy,
                         "status": "active"}
                if pending.prefix is not None:
                    entry.update(prefix=pending.prefix, taught_tokens=pending.taught_tokens)
                    if pending.ends_answer:
                        entry["ends_answer"] = True
                ch.set(edit_id, entry)
            return EditResult(edit_id, block, placed.cluster, placed.action, len(trained.losses),
                              trained.losses, seconds, placed.forgotten, list(placed.moved),
                              trained.token_accuracy, trained.params, list(placed.superseded))

    @property
    def _dtype(self) -> torch.dtype:
        return getattr(torch, self.config.block_dtype)

    def _writable(self) -> None:
        if self.read_only:
            raise ValueError("this workspace is open read-only")

    def _entry(self, edit_id: str) -> dict:
        if edit_id not in self.entries:
            shown = edit_id if len(edit_id) <= 40 else edit_id[:40] + "..."
            raise ValueError(f"unknown edit id {shown!r}")
        return self.entries[edit_id]

    @contextlib.contextmanager
    def _change(self, op: str):
        """One commit. The body changes the index state and (through the yielded _Change) the
        edit list and blocks, under the index lock; then the change is written as one journal
        record. If anything fails before that record is on disk, memory goes back to the last
        commit and the error propagates; the workspace files are as before."""
        state = self.index.state
        ch = _Change(self.entries)
        with self.index.lock:
            state.begin()
            try:
                yield ch
                delta = state.delta()
                self.store.append(ch.record(op, delta))
            except BaseException:
                state.rollback()
                ch.undo()
                for b, f in ch.blocks.items():     # the block file of an edit that did not commit
                    if f is not None and b not in self.bank:
                        self.store.remove_block_file(f)
                raise
            state.end()
            gone_files = []
            for b, f in ch.blocks.items():
                if f is None:
                    old = self.bank.free(b)
                    if old is not None:
                        self._file_users[old] -= 1
                        if self._file_users[old] <= 0:
                            del self._file_users[old]
                            gone_files.append(old)
                else:
                    self.bank.put(b, ch.new_blocks.get(b), file=f)
                    self._file_users[f] += 1
        for f in gone_files:
            self.store.remove_block_file(f)
        try:
            self.index.mirror(list(delta["clusters"]), self.store.seq)
        except Exception as err:  # noqa: BLE001 - the mirror is rebuilt from the files on the next commit
            log.warning("the chroma mirror lags behind the workspace (%s); the next change rebuilds it, "
                        "`repair` too", err)
        if self.store.tail >= store.COMPACT_EVERY:
            try:
                self.compact()
            except OSError as err:   # the change is committed; the journal stays the record of it
                log.warning("compaction failed (%s); the journal keeps every change", err)

    def compact(self) -> None:
        """Write the whole workspace as one snapshot and start an empty journal (done by
        itself every store.COMPACT_EVERY commits; opening then replays fewer records)."""
        self._writable()
        with self._lock:
            with self.index.lock:
                meta, tensors = self.index.state.to_files()
                seq = self.store.seq
                snap = store.snapshot_bytes(seq, list(self.entries.values()), meta,
                                            {str(b): f for b, f in self.bank.files.items()})
            self.store.write_snapshot(seq, snap, tensors)

    def edits(self) -> list[dict]:
        """Every edit, oldest first: id, prompt, target, block, cluster, status, timing."""
        return [dict(e) for e in self.entries.values()]

    def delete(self, edit_id: str) -> list[str]:
        """Undo one edit: its point leaves the index and its block is dropped. Edits it had
        superseded become active again; returns their ids."""
        self._writable()
        with self._lock:
            entry = self._entry(str(edit_id))
            state = self.index.state
            with self._change("delete") as ch:
                back = []
                if entry["id"] in state.points or entry["id"] in state.dormant:
                    back = state.remove(entry["id"], self.config.init_radius)
                    ch.blocks[entry["block"]] = None
                ch.set(entry["id"], None)
                for e in back:
                    restored = dict(self.entries[e], status="active", cluster=state.points[e].cluster)
                    restored.pop("superseded_by", None)
                    ch.set(e, restored)
                for e, p in state.dormant.items():     # a chain of supersedes passes on
                    if self.entries[e].get("superseded_by") != p.superseded_by:
                        ch.update(e, superseded_by=p.superseded_by)
            return back

    def default_settings(self) -> dict:
        """The settings a new workspace of this model and key source starts with."""
        fresh = MeloConfig()
        out = {k: getattr(fresh, k) for k in EDIT_SETTINGS if k != "init_radius"}
        out["init_radius"] = calibrated_radius(self.backbone, self.config, self.keyer)
        return out

    def reset(self, default_settings: bool = False) -> None:
        """Remove every edit; the settings stay, unless `default_settings`."""
        self._writable()
        with self._lock:
            with self.index.lock:
                self.store.append({"op": "reset", "at": time.time()})
                self.index.state = ClusterState()
                self.entries.clear()
                self.bank.clear()
                self._file_users.clear()
            self.store.sweep(set())
            self.compact()
            self.index.rebuild(self.store.seq)
        if default_settings:        # chat prompts too (a mode changes only while there are no edits)
            self.set_prompt_mode("chat")
            self.update_settings(**self.default_settings())

    def update_settings(self, **changes) -> MeloConfig:
        """Change settings that affect new edits only (radius, rank, lr, iterations, ...)."""
        bad = set(changes) - set(EDIT_SETTINGS)
        if bad:
            raise ValueError(f"cannot change {sorted(bad)} on an existing workspace")
        self._writable()
        with self._lock:
            cfg = dataclasses.replace(self.config, **changes)
            cfg.validate()
            cfg.save(self.workspace / store.CONFIG)
            self.config = cfg
        return cfg

    def set_key_source(self, source: str) -> MeloConfig:
        """Route by another key source ("sentence" or "model"). Only while the workspace has
        no edits (reset it first): stored keys of one source do not compare with the other's.
        The radius goes back to the one calibrated for the new source."""
        return self._reroute("key source", key_source=source, key_whitening=None)

    def set_prompt_mode(self, mode: str) -> MeloConfig:
        """Prompt the model through its chat template ("chat") or as plain text it continues
        ("completion"). Only while the workspace has no edits: a block is trained on prompts
        formatted one way and would not fit the other. The radius goes back to the one
        calibrated for the mode (calibrate.py: passages in completion mode)."""
        return self._reroute("prompt mode", prompt_mode=mode)

    def _reroute(self, what: str, **changes) -> MeloConfig:
        """A setting that decides what keys mean: changed only while there are no edits, and
        the radius recalibrated. The first of `changes` is the one asked for."""
        self._writable()
        first, value = next(iter(changes.items()))
        with self._lock:
            if getattr(self.config, first) == value:
                return self.config
            if self.entries:
                raise ValueError(f"the {what} can change only while the workspace has no edits: reset it first")
            cfg = dataclasses.replace(self.config, init_radius=None, **changes)
            cfg.validate()
            keyer = Keyer(self.backbone, cfg)
            cfg = dataclasses.replace(cfg, init_radius=calibrated_radius(self.backbone, cfg, keyer))
            cfg.save(self.workspace / store.CONFIG)
            self.config, self.keyer, self._reference = cfg, keyer, None
            return cfg

    # ---- looking inside ------------------------------------------------------------------
    def index_snapshot(self) -> dict:
        """Everything needed to plot the index: keys, centers, radii, blocks and labels."""
        s = self.index.state
        by_id = self.entries
        return {
            "distance": self.config.distance,
            "points": [{"edit_id": p.edit_id, "key": p.key.tolist(), "block": p.block, "cluster": p.cluster,
                        "label": by_id.get(p.edit_id, {}).get("target", p.label),
                        "prompt": by_id.get(p.edit_id, {}).get("prompt", "")}
                       for p in s.points.values()],
            "clusters": [{"id": c.id, "center": c.center.tolist(), "radius": c.radius, "label": c.label,
                          "members": list(c.members)} for c in s.clusters.values()],
        }

    def distances(self, question: str, n: int = 8) -> list[dict]:
        """The `n` clusters nearest a question, with the true distance of its key to each
        center against that cluster's radius: what a 2-D map cannot show exactly."""
        key = self.key(self._check(question, "the question"))
        with self.index.lock:
            s = self.index.state
            r = s.route(key)
            fired = r.cluster if r.block is not None else None
            out = []
            for cid, d in s.centers.k_nearest(key, n):
                c = s.clusters[cid]
                targets = [self.entries[m]["target"] for m in c.members if m in self.entries]
                out.append({"cluster": cid, "distance": d, "radius": c.radius, "fires": cid == fired,
                            "edits": list(c.members), "answer": targets[0] if targets else c.label})
            return out

    def stats(self) -> dict:
        n = len(self.entries)
        c = self.config
        params = c.rank_per_block * sum(self.backbone.loras[m].in_features + self.backbone.loras[m].out_features
                                        for m in self.modules)
        disk = self.store.disk_bytes()
        return {"edits": n, "blocks": len(self.bank), "clusters": len(self.index.state.clusters),
                "trainable_params_per_edit": params, "disk_bytes": disk,
                "bytes_per_edit": disk // n if n else 0}

    # ---- export / import -----------------------------------------------------------------
    def export(self, path) -> Path:
        """Write every active edit (text, key, block matrices) to one safetensors file."""
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        path = Path(path).expanduser()
        if path.is_dir():
            raise ValueError(f"{path.name or path} is a folder: give a file name to export to")
        if not path.parent.is_dir():
            raise ValueError(f"there is no folder {path.parent.name!r} to export into")
        if path.resolve().is_relative_to(self.workspace.resolve()):
            raise ValueError("an export cannot go inside the workspace it comes from")
        with self._lock:
            active = [e for e in self.entries.values() if e["status"] == "active"]
            tensors = {}
            for e in active:
                tensors[f"key.{e['id']}"] = self.index.state.points[e["id"]].key.contiguous()
                for m, (a, b) in self.bank.matrices(e["block"]).items():   # float32, as exports always were
                    tensors[f"edit.{e['id']}.{m}.A"] = a.to(torch.float32).contiguous()
                    tensors[f"edit.{e['id']}.{m}.B"] = b.to(torch.float32).contiguous()
            meta = {"magic": EXPORT_MAGIC, "format": str(EXPORT_FORMAT), "model": self.config.model,
                    "fingerprint": json.dumps(self.backbone.fingerprint),
                    "settings": json.dumps(self.config.to_json()),
                    "edits": json.dumps([self._exported(e) for e in active])}
            tmp = path.with_name(f".{path.name}.tmp")
            try:
                save_file(tensors, str(tmp), metadata=meta)
                tmp.replace(path)
            except (OSError, SafetensorError) as err:     # a full disk, a read-only folder: one line
                tmp.unlink(missing_ok=True)
                raise disk.StorageError(disk.message(err, f"the export {path.name}")) from None
            return path

    def _exported(self, e: dict) -> dict:
        """What an export keeps of an edit: its texts and history, and the radius of its
        cluster now (what decides where it fires)."""
        out = {k: e[k] for k in ("id", "prompt", "target", "prefix", "ends_answer") if k in e}
        out.update({k: e[k] for k, _, _ in KEPT_NUMBERS if k in e and k != "radius"})
        out["radius"] = self.index.state.clusters[self.index.state.points[e["id"]].cluster].radius
        return out

    def import_(self, path) -> list[str]:
        """Add the edits of an export file (trained blocks included: nothing retrains).

        Returns the new edit ids. A bad file raises ValueError and changes nothing.
        """
        self._writable()
        edits, tensors = self._read_export(Path(path))
        with self._lock:
            state = self.index.state
            taken = set(self.entries)
            ids, blocks = [], {}
            for e, free in zip(edits, self.bank.allocate_many(len(edits))):
                eid = e["id"]
                while eid in taken:
                    eid = secrets.token_hex(4)
                taken.add(eid)
                blocks[free] = {m: (tensors[f"edit.{e['id']}.{m}.A"].to(self._dtype),
                                    tensors[f"edit.{e['id']}.{m}.B"].to(self._dtype)) for m in self.modules}
                ids.append((eid, free))
            file = self.store.write_blocks(blocks, self._dtype) if blocks else None
            with self._change("import") as ch:
                for e, (eid, block) in zip(edits, ids):
                    ch.blocks[block], ch.new_blocks[block] = file, blocks[block]
                    # The radius it had where it was exported: it fires for the same questions.
                    radius = e.get("radius", self.config.init_radius)
                    placed = state.add(eid, tensors[f"key.{e['id']}"], block, e["target"], radius,
                                       self.config.on_conflict)
                    ch.placed(placed, eid)
                    entry = {"id": eid, "prompt": e["prompt"], "target": e["target"], "block": block,
                             "cluster": placed.cluster, "action": placed.action,
                             "created": e.get("created", time.time()), "steps": e.get("steps", 0),
                             "seconds": e.get("seconds", 0.0), "status": "active", "imported": True}
                    if "prefix" in e:      # a sentence correction stays one
                        entry.update(prefix=e["prefix"], taught_tokens=e.get("taught_tokens", 0))
                        if e.get("ends_answer") is True:
                            entry["ends_answer"] = True
                    ch.set(eid, entry)
            return [eid for eid, _ in ids]

    def bulk_add(self, chunks) -> int:
        """Add many edits with known keys and trained blocks in one commit, each in a cluster
        of its own (ClusterState.add_apart refuses keys within reach of each other). `chunks`
        yields lists of (prompt, target, key, {module: (A, B)}); each chunk's blocks go to one
        file as they come, so memory holds one chunk. The commit is one new snapshot: until
        it is on disk the workspace is as before. Returns the number of edits added."""
        self._writable()
        with self._lock:
            state, added, files = self.index.state, [], {}
            for part, chunk in enumerate(chunks):
                ids, blocks = [], {}
                chunk = list(chunk)
                for (prompt, target, key, mats), b in zip(chunk, self.bank.allocate_many(len(chunk))):
                    eid = secrets.token_hex(6)
                    while eid in self.entries or eid in ids:
                        eid = secrets.token_hex(6)
                    blocks[b] = mats
                    ids.append(eid)
                    added.append((eid, prompt, target, key, b))
                file = self.store.write_blocks(blocks, self._dtype, part=part)
                for b in blocks:
                    self.bank.put(b, file=file)          # not routed to until the snapshot commits
                    files[b] = file
            if not added:
                return 0
            try:
                with self.index.lock:
                    state.add_apart([a[0] for a in added], torch.stack([a[3] for a in added]),
                                    [a[4] for a in added], [a[2] for a in added], self.config.init_radius,
                                    self.config.on_conflict)
                    now = time.time()
                    for eid, prompt, target, _, b in added:
                        self.entries[eid] = {"id": eid, "prompt": prompt, "target": target, "block": b,
                                             "cluster": state.points[eid].cluster, "action": "bulk",
                                             "created": now, "steps": 0, "seconds": 0.0, "status": "active",
                                             "bulk": True}
                self.store.seq += 1
                self.compact()
            except BaseException:
                self._load()                  # memory back to what is on disk
                raise
            self._file_users.update(files.values())
            self.index.rebuild(self.store.seq)
            return len(added)

    def _read_export(self, path: Path):
        """The edits of an export file, every part checked (exchange.py); nothing is written."""
        meta, edits, tensors = read_export(path)
        name = Path(path).name
        if meta["fingerprint"] != self.backbone.fingerprint:
            raise ValueError(f"{name} was exported from another model ({str(meta.get('model'))[:80]})")
        try:
            theirs = MeloConfig.from_json(meta["settings"]).key_name()
        except (TypeError, ValueError, AttributeError):
            raise ValueError(f"{name} has unreadable settings") from None
        mode = meta["settings"].get("prompt_mode", "chat") if isinstance(meta["settings"], dict) else "chat"
        if mode != self.config.prompt_mode:
            raise ValueError(f"{name} was exported from a workspace in {mode} mode; this one is in "
                             f"{self.config.prompt_mode} mode, where its blocks would not fit the prompts")
        if theirs != self.config.key_name():
            raise ValueError(f"{name} was exported with keys {theirs}; this workspace uses "
                             f"{self.config.key_name()}, so its keys would not compare")
        shapes = {m: (self.backbone.loras[m].out_features, self.backbone.loras[m].in_features) for m in self.modules}
        check_edits(name, edits, tensors, self.keyer.dim, shapes,
                    lambda text, what: clean_text(text, what, self.config.max_text_chars))
        return edits, tensors
