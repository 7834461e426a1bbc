"""Export and import: one safetensors file with every active edit (text, key, trained
block), read back into another workspace of the same model and key space without training.

Reading one checks everything it brings before the workspace is touched: the marker and
format, the model it came from, the key space, and for every edit a safe id (it becomes a
name in the edit log), non-empty texts, a finite float32 key of the workspace's size that
is not zero, and for every LoRA module a finite float32 block of the shapes that module
takes. A file that fails any check is refused with one line saying what is wrong.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import disk, placement
from .checks import clean_text, export_path
from .config import MeloConfig
from .editing import asks_the_same, block_dtype, new_id
from .index import normalize_label
from .records import EditRecord, answer_text

EXPORT_MAGIC = "melo-studio-edits"
EXPORT_FORMAT = 1
SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_RANK = 64
# What an export keeps of each edit beyond its texts, key and block, so that an import shows
# the same history (older exports lack them: the importer's defaults apply), with the range
# a value must fall in: (field, low, high).
KEPT_NUMBERS = (("created", 0.0, 4.0e9), ("seconds", 0.0, 1.0e6), ("steps", 0, 10 ** 6), ("radius", 1e-6, 4.0),
                ("taught_tokens", 0, 10 ** 5))
# A sentence correction also keeps the text before its sentence (any text, this long at most).
MAX_PREFIX_CHARS = 10_000


def read_export(path: Path) -> tuple[dict, list[dict], dict[str, torch.Tensor]]:
    """(metadata, edits, tensors) of an export file; ValueError when it is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such file: {path.name}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("magic") != EXPORT_MAGIC:
            raise ValueError("missing the MELO Studio marker")
        edits = json.loads(meta["edits"])
        meta = dict(meta, fingerprint=json.loads(meta["fingerprint"]), settings=json.loads(meta.get("settings", "{}")))
    except ValueError as err:
        raise ValueError(f"{path.name} is not a MELO Studio export ({err})") from None
    except Exception as err:  # noqa: BLE001 - any parse failure is a bad file to the user
        what = "not a safetensors file" if "Safetensor" in type(err).__name__ else "unreadable"
        raise ValueError(f"{path.name} is not a MELO Studio export ({what})") from None
    if meta.get("format") != str(EXPORT_FORMAT):
        raise ValueError(f"{path.name} has export format {str(meta.get('format'))[:20]!r}; "
                         f"this version reads format {EXPORT_FORMAT}")
    if not isinstance(edits, list) or not all(isinstance(e, dict) for e in edits):
        raise ValueError(f"{path.name} has an unreadable edit list")
    return meta, edits, tensors


def check_edits(name: str, edits: list[dict], tensors: dict[str, torch.Tensor], key_dim: int,
                shapes: dict[str, tuple[int, int]], clean) -> None:
    """Refuse the file (ValueError, one line) unless every edit is whole and sound.
    `shapes`: module -> (out_features, in_features); `clean(text, what)` checks a text."""
    seen = set()
    for e in edits:
        eid = e.get("id")
        if not isinstance(eid, str) or not SAFE_ID.match(eid):
            raise ValueError(f"{name} has an edit id that is not a plain name ({str(eid)[:40]!r})")
        if eid in seen:
            raise ValueError(f"{name} has the edit id {eid!r} twice")
        seen.add(eid)
        for what in ("prompt", "target"):
            if not isinstance(e.get(what), str):
                raise ValueError(f"{name}: edit {eid} has no {what}")
            clean(e[what], f"an imported {what}")
        prefix = e.get("prefix")
        if prefix is not None and (not isinstance(prefix, str) or len(prefix) > MAX_PREFIX_CHARS or "\x00" in prefix):
            raise ValueError(f"{name}: edit {eid} has an unusable text before its sentence")
        if "ends_answer" in e and not isinstance(e["ends_answer"], bool):
            raise ValueError(f"{name}: edit {eid} has an unreadable ends_answer")
        for what, low, high in KEPT_NUMBERS:
            value = e.get(what)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not low <= value <= high):   # NaN fails both comparisons
                raise ValueError(f"{name}: edit {eid} has an impossible {what} ({str(value)[:20]})")
        needed = [f"key.{eid}"] + [f"edit.{eid}.{m}.{w}" for m in shapes for w in "AB"]
        missing = [n for n in needed if n not in tensors]
        if missing:
            raise ValueError(f"{name} lacks {missing[0]} (exported with other LoRA settings?)")
        key = tensors[f"key.{eid}"]
        if key.dtype != torch.float32 or key.shape != (key_dim,):
            raise ValueError(f"{name}: the key of edit {eid} is not {key_dim} float32 numbers")
        if not bool(torch.isfinite(key).all()) or float(key.norm()) == 0.0:
            raise ValueError(f"{name}: the key of edit {eid} is not a usable vector (NaN, infinite or zero)")
        for m, (out_f, in_f) in shapes.items():
            a, b = tensors[f"edit.{eid}.{m}.A"], tensors[f"edit.{eid}.{m}.B"]
            rank = a.shape[0] if a.dim() == 2 else -1
            if (a.dtype, b.dtype) != (torch.float32, torch.float32) or not 1 <= rank <= MAX_RANK \
                    or a.shape != (rank, in_f) or b.shape != (out_f, rank):
                raise ValueError(f"{name}: the block of edit {eid} does not fit {m} "
                                 f"(A {tuple(a.shape)}, B {tuple(b.shape)}; want A (r, {in_f}), B ({out_f}, r))")
            if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
                raise ValueError(f"{name}: the block of edit {eid} holds NaN or infinite numbers")


# ---- writing and reading an editor's edits --------------------------------------------
def export_edits(ed, path) -> Path:
    """Write every active edit (text, key, block matrices) of editor `ed` to one file."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = export_path(path, ed.workspace)
    ws = ed.ws
    with ws.lock:
        active = [e for e in ws.entries.values() if e.status == "active"]
        tensors = {}
        for e in active:
            tensors[f"key.{e.id}"] = ws.state.points[e.id].key.contiguous()
            for m, (a, b) in ws.bank.matrices(e.block).items():   # float32, as exports always were
                tensors[f"edit.{e.id}.{m}.A"] = a.to(torch.float32).contiguous()
                tensors[f"edit.{e.id}.{m}.B"] = b.to(torch.float32).contiguous()
        meta = {"magic": EXPORT_MAGIC, "format": str(EXPORT_FORMAT), "model": ed.config.model,
                "fingerprint": json.dumps(ed.backbone.fingerprint),
                "settings": json.dumps(ed.config.to_json()),
                "edits": json.dumps([_exported(ws, e) for e in active])}
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            save_file(tensors, str(tmp), metadata=meta)
            tmp.replace(path)
        except (OSError, SafetensorError) as err:     # a full disk, a read-only folder: one line
            tmp.unlink(missing_ok=True)
            raise disk.StorageError(disk.message(err, f"the export {path.name}")) from None
        return path


def _exported(ws, e: EditRecord) -> dict:
    """What an export keeps of an edit: its texts and history, and the radius of its
    cluster now (what decides where it fires)."""
    d = e.to_json()
    out = {k: d[k] for k in ("id", "prompt", "target", "prefix", "ends_answer") if k in d}
    out.update({k: d[k] for k, _, _ in KEPT_NUMBERS if k in d and k != "radius"})
    out["radius"] = ws.state.clusters[ws.state.points[e.id].cluster].radius
    return out


@dataclass
class ImportReport:
    """What an import did: the new edits' ids, the file's edits already in the workspace
    (skipped), and the earlier edits the new ones replaced (superseded)."""

    added: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)      # their ids in the file
    superseded: list[str] = field(default_factory=list)


def _already_there(ws, e: dict) -> bool:
    """The same edit: its id with the same question and answer, or an active edit of the
    same question with the same answer (re-importing a file adds nothing twice)."""
    same = ws.entries.get(e["id"])
    if same is not None and same.prompt == e["prompt"] and same.target == e["target"]:
        return True
    label = normalize_label(e["target"])
    return any(x.status == "active" and x.prompt == e["prompt"] and normalize_label(x.target) == label
               and x.prefix == e.get("prefix") for x in ws.entries.values())


def import_edits(ed, path) -> ImportReport:
    """Add the edits of an export file to editor `ed` (trained blocks included: nothing
    retrains); edits already in the workspace are skipped. A bad file raises ValueError and
    changes nothing."""
    edits, tensors = _checked_export(ed, Path(path))
    ws, c = ed.ws, ed.config
    dtype = block_dtype(ed)
    report = ImportReport()
    with ws.lock:
        fresh, seen = [], set()
        for e in edits:
            same = (e["prompt"], normalize_label(e["target"]), e.get("prefix"))
            if same in seen or _already_there(ws, e):
                report.skipped.append(e["id"])
            else:
                seen.add(same)
                fresh.append(e)
        taken = set(ws.entries)
        ids, blocks = [], {}
        for e, free in zip(fresh, ws.bank.allocate_many(len(fresh))):
            eid = e["id"] if e["id"] not in taken else new_id(taken)
            taken.add(eid)
            blocks[free] = {m: (tensors[f"edit.{e['id']}.{m}.A"].to(dtype),
                                tensors[f"edit.{e['id']}.{m}.B"].to(dtype)) for m in ed.modules}
            ids.append((eid, free))
        if not fresh:
            return report
        file = ws.store.write_blocks(blocks, dtype)
        with ws.change("import") as ch:
            for e, (eid, block) in zip(fresh, ids):
                ch.add_block(block, file, blocks[block])
                # The radius it had where it was exported: it fires for the same questions.
                answer = answer_text(e["target"], e.get("prefix"), e.get("ends_answer") is True)
                placed = placement.add(ws.state, eid, tensors[f"key.{e['id']}"], block, answer,
                                       e.get("radius", c.init_radius), c.on_conflict,
                                       same_question=asks_the_same(ed, e["prompt"]))
                ch.placed(placed, eid)
                report.superseded += [x for x in placed.superseded if x in ws.entries]
                correction = "prefix" in e         # a sentence correction stays one
                ch.set(eid, EditRecord(
                    eid, e["prompt"], e["target"], block, placed.cluster, placed.action,
                    e.get("created", time.time()), steps=e.get("steps", 0), seconds=e.get("seconds", 0.0),
                    imported=True, prefix=e["prefix"] if correction else None,
                    taught_tokens=e.get("taught_tokens", 0) if correction else 0,
                    ends_answer=correction and e.get("ends_answer") is True))
        report.added = [eid for eid, _ in ids]
        return report


def _checked_export(ed, path: Path):
    """The edits of an export file, every part checked; nothing is written."""
    meta, edits, tensors = read_export(path)
    name = Path(path).name
    if meta["fingerprint"] != ed.backbone.fingerprint:
        raise ValueError(f"{name} was exported from another model ({str(meta.get('model'))[:80]})")
    try:
        theirs = MeloConfig.from_json(meta["settings"]).key_name()
    except (TypeError, ValueError, AttributeError):
        raise ValueError(f"{name} has unreadable settings") from None
    mode = meta["settings"].get("prompt_mode", "chat") if isinstance(meta["settings"], dict) else "chat"
    if mode != ed.config.prompt_mode:
        raise ValueError(f"{name} was exported from a workspace in {mode} mode; this one is in "
                         f"{ed.config.prompt_mode} mode, where its blocks would not fit the prompts")
    if theirs != ed.config.key_name():
        raise ValueError(f"{name} was exported with keys {theirs}; this workspace uses "
                         f"{ed.config.key_name()}, so its keys would not compare")
    shapes = {m: (ed.backbone.loras[m].out_features, ed.backbone.loras[m].in_features) for m in ed.modules}
    limit = ed.config.max_text_chars
    check_edits(name, edits, tensors, ed.keyer.dim, shapes, lambda text, what: clean_text(text, what, limit))
    return edits, tensors
