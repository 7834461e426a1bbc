"""Looking inside a workspace without changing it: the index as data for a map, the true
distances of a question to its nearest clusters, counts and sizes, and an edit's side
effects (which reference questions it now fires for, from keys alone).
"""
from __future__ import annotations

from .answering import decide
from .neighbours import Neighbour, merged, phrasings_marked, reference_keys, side_effects
from .probebank import ProbeBank, bank_side_effects, collection_name, location, may_exist, owner_of


def index_snapshot(ed) -> dict:
    """Everything needed to plot the index: keys, centers, radii, blocks and labels."""
    ws = ed.ws
    with ws.state_lock:
        s = ws.state
        entries = ws.entries
        return {
            "distance": ed.config.distance,
            "points": [{"edit_id": p.edit_id, "key": p.key.tolist(), "block": p.block, "cluster": p.cluster,
                        "label": entries[p.edit_id].target if p.edit_id in entries else p.label,
                        "prompt": entries[p.edit_id].prompt if p.edit_id in entries else ""}
                       for p in s.points.values()],
            "clusters": [{"id": c.id, "center": c.center.tolist(), "radius": c.radius, "label": c.label,
                          "members": list(c.members)} for c in s.clusters.values()],
        }


def distances(ed, question: str, n: int = 8) -> list[dict]:
    """The `n` clusters nearest a question, with the true distance of its key to each
    center against that cluster's radius: what a 2-D map cannot show exactly."""
    key = ed.keyer.keys([question])[0]
    ws = ed.ws
    with ws.state_lock:
        s = ws.state
        r = decide(ed, key, question)
        fired = r.cluster if r.block is not None else None
        turned_down = dict(r.rejected)
        out = []
        for cid, d in s.centers.k_nearest(key, n):
            c = s.clusters[cid]
            targets = [ws.entries[m].target for m in c.members if m in ws.entries]
            why = next((turned_down[m] for m in c.members if m in turned_down), None)
            out.append({"cluster": cid, "distance": d, "radius": c.radius, "fires": cid == fired,
                        "edits": list(c.members), "answer": targets[0] if targets else c.label,
                        "rejected": why})
        return out


def stats(ed) -> dict:
    ws = ed.ws
    n = len(ws.entries)
    params = ed.config.rank_per_block * sum(ed.backbone.loras[m].in_features + ed.backbone.loras[m].out_features
                                            for m in ed.modules)
    disk = ws.store.disk_bytes()
    return {"edits": n, "blocks": len(ws.bank), "clusters": len(ws.state.clusters),
            "trainable_params_per_edit": params, "disk_bytes": disk, "bytes_per_edit": disk // n if n else 0}


def edit_side_effects(ed, edit_id: str, reference, n: int = 8) -> list[Neighbour]:
    """The questions nearest an active edit, and every one that now fires it, with distance
    against radius: keys only, nothing generated. Over the bundled reference questions
    (neighbours.py; `reference`: their (questions, keys), or None to compute them) and the
    user's probe bank when one was loaded (probebank.py)."""
    entry = ed.ws.entry(str(edit_id))
    questions, keys = reference or reference_keys(ed.keyer)
    bank = probe_bank(ed) if may_exist() else None
    with ed.ws.state_lock:
        if entry.id not in ed.ws.state.points:
            raise ValueError(f"edit {entry.id} is {entry.status}: it fires for no question")
        route = lambda q, k: decide(ed, k, q)       # noqa: E731 - as asking would route it
        rows = side_effects(ed.ws.state, entry.id, questions, keys, n=n, route=route)
        # (an empty bank finds nothing: asking first whether it is empty costs the same lookups)
        extra = bank_side_effects(ed.ws.state, entry.id, bank, n, route=route) if bank is not None else []
        if extra:
            rows = merged(rows, extra, n)
    return phrasings_marked(rows, entry.prompt)


def probe_bank(ed, shared: bool = False) -> ProbeBank:
    """The probe bank of the editor's key space as its workspace sees it (the shared list
    and its own questions; `shared`: the shared list alone, as the shell loads it). The
    collection is opened once per backbone, for every workspace on it."""
    bank = ed.backbone.companion(f"probes:{location()}:{collection_name(ed.keyer)}", lambda: ProbeBank.open(ed.keyer))
    return bank if shared else bank.view(owner_of(ed.workspace))
