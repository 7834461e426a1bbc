"""MeloEditor: one workspace of edits on top of a frozen model.

An editor owns its block bank, its cluster index and its files; it borrows a Backbone
(possibly shared with other editors) for every forward. Nothing lives at module level, so
two editors in one process never see each other's edits.
"""
from __future__ import annotations

import dataclasses
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import store
from .backbone import Backbone
from .bank import BlockBank
from .calibrate import calibrated_radius
from .config import DEFAULT_MODEL, EDIT_SETTINGS, MeloConfig
from .index import ClusterIndex, ClusterState, Route
from .keys import Keyer
from .train import train_block

FORMAT = 1                      # workspace and export format version
EXPORT_MAGIC = "melo-studio-edits"


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


def _apply_placement(edits: list[dict], placed, new_id: str) -> None:
    """Record in the edit log what placing edit `new_id` did to earlier edits."""
    for e in edits:
        if e["id"] in placed.forgotten:
            e.update(status="forgotten", forgotten_by=new_id, block=None, cluster=None)
        if e["id"] in placed.moved:
            e.update(cluster=placed.moved[e["id"]])
        if e["id"] in placed.superseded:
            e.update(status="superseded", superseded_by=new_id)


def _clean(text: str, what: str, limit: int) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{what} is empty")
    text = text.strip()
    if len(text) > limit:
        raise ValueError(f"{what} is {len(text)} characters long; the limit is {limit}")
    return text


class MeloEditor:
    """Edit, ask, undo, export: the whole MELO workflow on one workspace directory."""

    def __init__(self, workspace: Path, backbone: Backbone, config: MeloConfig, keyer: Keyer | None = None):
        self.workspace = Path(workspace)
        self.backbone = backbone
        self.config = config
        self.keyer = keyer or Keyer(backbone, config)
        self.modules = backbone.ensure_lora(config.lora_layers, config.lora_modules)
        self._lock = threading.RLock()        # one change to this workspace at a time
        self.log: dict = {}
        self.bank = BlockBank()
        self.index = ClusterIndex(self.workspace / store.INDEX_DIR)

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, workspace, model: str | None = None, config: MeloConfig | None = None,
             backbone: Backbone | None = None) -> "MeloEditor":
        """Create or reopen a workspace. `backbone` lets many workspaces share one loaded model.

        A new workspace takes `config` (default settings otherwise); an existing one keeps
        the settings it was made with. Opening it with a different model is an error.
        """
        ws = Path(workspace).expanduser()
        log = store.read_log(ws) if ws.is_dir() else None
        if log is not None:
            saved = MeloConfig.load(ws / store.CONFIG)
            if model is not None and model != saved.model:
                raise ValueError(f"workspace {ws} was made with model {saved.model!r}, not {model!r}")
            cfg = saved
        else:
            cfg = dataclasses.replace(config or MeloConfig(), model=model or (config.model if config else DEFAULT_MODEL))
            cfg.validate()
        if backbone is None:
            backbone = Backbone.load(cfg.model)
        elif backbone.name != cfg.model:
            raise ValueError(f"workspace {ws} is for model {cfg.model!r}; the loaded model is {backbone.name!r}")
        if log is not None and log.get("fingerprint") != backbone.fingerprint:
            raise ValueError(f"workspace {ws} was made with another model than {backbone.name!r} (fingerprints differ)")
        cfg = cfg.resolved(backbone.num_layers)
        keyer = Keyer(backbone, cfg)
        if cfg.init_radius is None:
            cfg = dataclasses.replace(cfg, init_radius=calibrated_radius(backbone, cfg, keyer))
        ed = cls(ws, backbone, cfg, keyer) if log is not None else cls._create(ws, backbone, cfg, keyer)
        ed._load()
        return ed

    @classmethod
    def _create(cls, ws: Path, backbone: Backbone, cfg: MeloConfig, keyer: Keyer) -> "MeloEditor":
        ws.mkdir(parents=True, exist_ok=True)
        if any(p for p in ws.iterdir() if not p.name.startswith(".")):
            raise ValueError(f"{ws} is not empty and is not a MELO workspace")
        cfg.save(ws / store.CONFIG)
        log = {"format": FORMAT, "model": cfg.model, "fingerprint": backbone.fingerprint,
               "gen": 0, "edits": [], "clusters": {}, "created": time.time()}
        store.commit(ws, log, {})
        return cls(ws, backbone, cfg, keyer)

    def _load(self) -> None:
        log = store.read_log(self.workspace)
        if log.get("format") != FORMAT:
            raise ValueError(f"workspace format {log.get('format')} is not supported")
        store.remove_stale(self.workspace, int(log["gen"]))
        tensors = store.read_tensors(self.workspace, int(log["gen"]))
        self.log = log
        self.bank = BlockBank.from_tensors(tensors)
        self.index.load(ClusterState.from_files(log["clusters"], tensors), int(log["gen"]))

    def close(self) -> None:
        """Release the chroma index (waits for an edit in progress to finish)."""
        with self._lock:
            self.index.close()

    # ---- asking --------------------------------------------------------------------------
    def _check(self, text: str, what: str) -> str:
        return _clean(text, what, self.config.max_text_chars)

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
            base = text if r.block is None else self.backbone.generate(question, None, c.max_new_tokens)
        return Answer(text, r.block, r.distance, r.radius, r.cluster, r.edit_id, base, time.perf_counter() - t0)

    def generate(self, question: str, max_new_tokens: int, min_new_tokens: int = 0,
                 timer: Callable[[float], None] | None = None) -> tuple[str, Route]:
        """Greedy text from the edited model, routed once from the prompt: (text, route).
        `timer(seconds)` gets what deciding the block cost (key, lookup, gathering it)."""
        c = self.config

        def choose(key, started):
            # Reads the current index and bank without the editor lock: a commit swaps both
            # by assignment, so a query sees the workspace before or after an edit, whole.
            r = self.index.route(key)
            active = self.bank.gather([r.block], self.modules)
            if timer is not None:
                timer(time.perf_counter() - started)
            return active, r

        if self.keyer.in_prefill:
            # The model's own key, taken inside the prefill: no extra forward.
            return self.backbone.generate_routed(
                question, c.key_layer, c.key_reduction, c.distance,
                lambda raw: choose(self.keyer.finish(raw[None])[0], time.perf_counter()),
                max_new_tokens, min_new_tokens)
        t0 = time.perf_counter()
        active, r = choose(self.key(question), t0)
        return self.backbone.generate(question, active, max_new_tokens, min_new_tokens), r

    def probe(self, questions: list[str]) -> list[Answer]:
        """Ask many questions, each with the unedited answer beside it."""
        qs = [q for q in (questions or []) if isinstance(q, str) and q.strip()]
        if not qs:
            raise ValueError("no questions to probe")
        return [self.ask(q, compare_base=True) for q in qs]

    # ---- editing -------------------------------------------------------------------------
    def edit(self, prompt: str, target: str, progress: Callable[[int, float], None] | None = None) -> EditResult:
        """Teach the model to answer `prompt` with `target`, in a fresh LoRA block."""
        prompt = self._check(prompt, "the prompt")
        target = self._check(target, "the target")
        c = self.config
        with self._lock:
            t0 = time.perf_counter()
            key = self.key(prompt)
            edit_id = secrets.token_hex(4)
            while any(e["id"] == edit_id for e in self.log["edits"]):
                edit_id = secrets.token_hex(4)
            block = self.bank.allocate()
            state = self.index.state.copy()
            placed = state.add(edit_id, key, block, target, c.init_radius, c.on_conflict)

            enc = self.backbone.encode([prompt], [target])
            trained = train_block(self.backbone, enc, self.modules, c, seed=len(self.log["edits"]), progress=progress)

            bank = BlockBank()
            bank.blocks = dict(self.bank.blocks)
            for e in placed.forgotten:
                bank.free(self._entry(e)["block"])
            bank.put(block, trained.matrices)   # superseded edits keep theirs: an undo brings them back
            seconds = time.perf_counter() - t0
            entry = {"id": edit_id, "prompt": prompt, "target": target, "block": block,
                     "cluster": placed.cluster, "action": placed.action, "created": time.time(),
                     "steps": len(trained.losses), "seconds": round(seconds, 3),
                     "final_loss": trained.losses[-1], "token_accuracy": trained.token_accuracy,
                     "status": "active"}
            edits = [dict(e) for e in self.log["edits"]]
            _apply_placement(edits, placed, edit_id)
            self._commit(edits + [entry], state, bank)
            return EditResult(edit_id, block, placed.cluster, placed.action, len(trained.losses),
                              trained.losses, seconds, placed.forgotten, list(placed.moved),
                              trained.token_accuracy, trained.params, list(placed.superseded))

    def _entry(self, edit_id: str) -> dict:
        for e in self.log["edits"]:
            if e["id"] == edit_id:
                return e
        raise ValueError(f"unknown edit id {edit_id!r}")

    def _commit(self, edits: list[dict], state: ClusterState, bank: BlockBank) -> None:
        """Write the new state to disk (all or nothing), then adopt it in memory and chroma."""
        meta, tensors = state.to_files()
        tensors.update(bank.to_tensors())
        log = dict(self.log, edits=edits, clusters=meta, gen=int(self.log["gen"]) + 1)
        store.commit(self.workspace, log, tensors)
        self.log, self.bank = log, bank
        self.index.commit(state, int(log["gen"]))

    def edits(self) -> list[dict]:
        """Every edit, oldest first: id, prompt, target, block, cluster, status, timing."""
        return [dict(e) for e in self.log["edits"]]

    def delete(self, edit_id: str) -> list[str]:
        """Undo one edit: its point leaves the index and its block is dropped. Edits it had
        superseded become active again; returns their ids."""
        with self._lock:
            entry = self._entry(str(edit_id))
            state = self.index.state.copy()
            bank = BlockBank()
            bank.blocks = dict(self.bank.blocks)
            back = []
            if entry["id"] in state.points or entry["id"] in state.dormant:
                back = state.remove(entry["id"], self.config.init_radius)
                bank.free(entry["block"])
            edits = [dict(e) for e in self.log["edits"] if e["id"] != entry["id"]]
            for e in edits:
                if e["id"] in back:
                    e.update(status="active", cluster=state.points[e["id"]].cluster)
                    e.pop("superseded_by", None)
                elif e.get("superseded_by") == entry["id"] and e["id"] in state.dormant:
                    e["superseded_by"] = state.dormant[e["id"]].superseded_by
            self._commit(edits, state, bank)
            return back

    def reset(self) -> None:
        """Remove every edit (the settings stay)."""
        with self._lock:
            self._commit([], ClusterState(), BlockBank())

    def update_settings(self, **changes) -> MeloConfig:
        """Change settings that affect new edits only (radius, rank, lr, iterations, ...)."""
        bad = set(changes) - set(EDIT_SETTINGS)
        if bad:
            raise ValueError(f"cannot change {sorted(bad)} on an existing workspace")
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
        with self._lock:
            if source == self.config.key_source:
                return self.config
            if self.log["edits"]:
                raise ValueError("the key source can change only while the workspace has no edits: reset it first")
            cfg = dataclasses.replace(self.config, key_source=source, key_whitening=None, init_radius=None)
            cfg.validate()
            keyer = Keyer(self.backbone, cfg)
            cfg = dataclasses.replace(cfg, init_radius=calibrated_radius(self.backbone, cfg, keyer))
            cfg.save(self.workspace / store.CONFIG)
            self.config, self.keyer = cfg, keyer
            return cfg

    # ---- looking inside ------------------------------------------------------------------
    def index_snapshot(self) -> dict:
        """Everything needed to plot the index: keys, centers, radii, blocks and labels."""
        s = self.index.state
        by_id = {e["id"]: e for e in self.log["edits"]}
        return {
            "distance": self.config.distance,
            "points": [{"edit_id": p.edit_id, "key": p.key.tolist(), "block": p.block, "cluster": p.cluster,
                        "label": p.label, "prompt": by_id.get(p.edit_id, {}).get("prompt", "")}
                       for p in s.points.values()],
            "clusters": [{"id": c.id, "center": c.center.tolist(), "radius": c.radius, "label": c.label,
                          "members": list(c.members)} for c in s.clusters.values()],
        }

    def stats(self) -> dict:
        n = len(self.bank)
        params = sum(self.bank.params_per_block(b) for b in self.bank.blocks)
        return {"edits": len(self.log["edits"]), "blocks": n, "clusters": len(self.index.state.clusters),
                "trainable_params_per_edit": params // n if n else 0,
                "bytes_per_edit": (params * 4 + self.keyer.dim * 4) // n if n else 0}

    # ---- export / import -----------------------------------------------------------------
    def export(self, path) -> Path:
        """Write every active edit (text, key, block matrices) to one safetensors file."""
        from safetensors.torch import save_file

        with self._lock:
            active = [e for e in self.log["edits"] if e["status"] == "active"]
            tensors = {}
            for e in active:
                tensors[f"key.{e['id']}"] = self.index.state.points[e["id"]].key.contiguous()
                for m, (a, b) in self.bank.blocks[e["block"]].items():
                    tensors[f"edit.{e['id']}.{m}.A"] = a.contiguous()
                    tensors[f"edit.{e['id']}.{m}.B"] = b.contiguous()
            meta = {"magic": EXPORT_MAGIC, "format": str(FORMAT), "model": self.config.model,
                    "fingerprint": json.dumps(self.backbone.fingerprint),
                    "settings": json.dumps(self.config.to_json()),
                    "edits": json.dumps([{k: e[k] for k in ("id", "prompt", "target")} for e in active])}
            path = Path(path)
            tmp = path.with_name(f".{path.name}.tmp")
            save_file(tensors, str(tmp), metadata=meta)
            tmp.replace(path)
            return path

    def import_(self, path) -> list[str]:
        """Add the edits of an export file (trained blocks included: nothing retrains).

        Returns the new edit ids. A bad file raises ValueError and changes nothing.
        """
        edits, tensors = self._read_export(Path(path))
        with self._lock:
            state = self.index.state.copy()
            bank = BlockBank()
            bank.blocks = dict(self.bank.blocks)
            log_edits = [dict(e) for e in self.log["edits"]]
            taken = {e["id"] for e in log_edits}
            new_ids = []
            for e in edits:
                eid = e["id"]
                while eid in taken:
                    eid = secrets.token_hex(4)
                taken.add(eid)
                block = bank.allocate()
                bank.put(block, {m: (tensors[f"edit.{e['id']}.{m}.A"], tensors[f"edit.{e['id']}.{m}.B"])
                                 for m in self.modules})
                placed = state.add(eid, tensors[f"key.{e['id']}"], block, e["target"], self.config.init_radius,
                                   self.config.on_conflict)
                for f in placed.forgotten:
                    bank.free(next(le["block"] for le in log_edits if le["id"] == f))
                _apply_placement(log_edits, placed, eid)
                log_edits.append({"id": eid, "prompt": e["prompt"], "target": e["target"], "block": block,
                                  "cluster": placed.cluster, "action": placed.action, "created": time.time(),
                                  "steps": 0, "seconds": 0.0, "status": "active", "imported": True})
                new_ids.append(eid)
            self._commit(log_edits, state, bank)
            return new_ids

    def _read_export(self, path: Path):
        from safetensors import safe_open

        if not path.is_file():
            raise ValueError(f"no such file: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if meta.get("magic") != EXPORT_MAGIC:
                raise ValueError("missing the MELO Studio marker")
            edits = json.loads(meta["edits"])
            fingerprint = json.loads(meta["fingerprint"])
        except ValueError as err:
            raise ValueError(f"{path.name} is not a MELO Studio export ({err})") from None
        except Exception as err:  # noqa: BLE001 - any parse failure is a bad file to the user
            raise ValueError(f"{path.name} is not a MELO Studio export ({type(err).__name__})") from None
        if fingerprint != self.backbone.fingerprint:
            raise ValueError(f"{path.name} was exported from another model ({meta.get('model')})")
        settings = json.loads(meta.get("settings", "{}"))
        try:
            theirs = MeloConfig.from_json(settings).key_name()
        except (TypeError, ValueError):
            raise ValueError(f"{path.name} has unreadable settings") from None
        if theirs != self.config.key_name():
            raise ValueError(f"{path.name} was exported with keys {theirs}; this workspace uses "
                             f"{self.config.key_name()}, so its keys would not compare")
        for e in edits:
            needed = [f"key.{e['id']}"] + [f"edit.{e['id']}.{m}.{w}" for m in self.modules for w in "AB"]
            missing = [n for n in needed if n not in tensors]
            if missing:
                raise ValueError(f"{path.name} lacks {missing[0]} (exported with other LoRA settings?)")
            if tensors[needed[0]].shape != (self.keyer.dim,):
                raise ValueError(f"{path.name} has keys of the wrong size")
            _clean(e.get("prompt", ""), "an imported prompt", self.config.max_text_chars)
            _clean(e.get("target", ""), "an imported target", self.config.max_text_chars)
        return edits, tensors
