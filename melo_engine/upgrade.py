"""Opening a workspace of format 1 rewrites it in format 2 (store.py), keeping every edit.

Format 1 held everything in one state file rewritten by every commit: workspace.json (edit
log, cluster metadata, generation n) and state-<n>.safetensors (every block, key and center,
one tensor each). The upgrade writes its blocks to one block file as they were (float32),
a snapshot of generation n, and last the new header: until that rename the workspace is
still format 1 (an interrupted upgrade is redone), and state-<n> is removed only after it.
"""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from . import store
from .index import Cluster, ClusterState, Point


def _state_of_format1(meta: dict, tensors: dict) -> ClusterState:
    s = ClusterState()
    s.next_cluster = int(meta.get("next_cluster", 0))
    for p in meta.get("points", []):
        s.put_point(Point(p["edit_id"], tensors[f"key.{p['edit_id']}"], int(p["block"]), p["cluster"], p["label"]))
    for p in meta.get("dormant", []):
        s.put_dormant(Point(p["edit_id"], tensors[f"key.{p['edit_id']}"], int(p["block"]), p["cluster"],
                             p["label"], p["superseded_by"]))
    for c in meta.get("clusters", []):
        s.put_cluster(Cluster(c["id"], tensors[f"center.{c['id']}"], float(c["radius"]), c["label"],
                               list(c["members"])))
    return s


def _blocks_of_format1(tensors: dict) -> dict[int, dict]:
    blocks: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("block."):
            _, blk, rest = name.split(".", 2)
            module, which = rest.rsplit(".", 1)
            a, b = blocks.setdefault(int(blk), {}).get(module, (None, None))
            blocks[int(blk)][module] = (value, b) if which == "A" else (a, value)
    return blocks


def upgrade_format1(ws: Path, log: dict) -> None:
    ws = Path(ws)
    gen = int(log["gen"])
    state_path = ws / f"state-{gen}.safetensors"
    tensors = load_file(str(state_path)) if state_path.is_file() else {}
    st = store.Store(ws)
    (ws / store.BLOCKS_DIR).mkdir(exist_ok=True)
    blocks = _blocks_of_format1(tensors)
    st.seq = gen - 1          # write_blocks names its file after the next record: the snapshot's
    file = st.write_blocks(blocks, next(iter(tensors.values())).dtype) if blocks else None
    st.base = st.seq = gen
    meta, state_tensors = _state_of_format1(log.get("clusters", {}), tensors).to_files()
    st.write_snapshot(gen, store.snapshot_bytes(gen, log.get("edits", []), meta, {str(b): file for b in blocks}),
                      state_tensors)
    header = {k: v for k, v in log.items() if k in ("model", "fingerprint", "created")}
    store.atomic_write_json(ws / store.HEADER, dict(header, format=store.FORMAT, upgraded_from=1))
    state_path.unlink(missing_ok=True)
