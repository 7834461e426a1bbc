"""The bulk path of the scale benchmark: many edits with known keys and trained blocks
added to a workspace in one commit, each in a cluster of its own, so a workspace of 100,000
edits is built in minutes instead of days. Nothing but `bench scale` uses it.
"""
from __future__ import annotations

import time

import torch

from melo_engine.editing import block_dtype, new_id
from melo_engine.index import Cluster, ClusterState, Point, normalize_label
from melo_engine.records import EditRecord


def add_apart(state: ClusterState, edit_ids: list[str], keys: torch.Tensor, blocks: list[int],
              targets: list[str], init_radius: float, on_conflict: str = "supersede") -> None:
    """Place many keys at once, each in a cluster of its own. The rules give every key a
    cluster of its own only when no other key lies within reach (the init radius when
    superseding; the paper's radius + init radius otherwise), so that is checked, exactly,
    and a violation is refused."""
    keys = keys.detach().to(torch.float32)
    reach = init_radius if on_conflict == "supersede" else 2 * init_radius
    table = state.keys
    old = table.exact[: len(table.ids)][table.alive[: len(table.ids)]] if len(table) else None
    for i in range(0, len(keys), 512):
        chunk = keys[i:i + 512]
        for other in (old, keys):
            if other is None or len(other) == 0:
                continue
            d = torch.cdist(chunk, other)
            if other is keys:
                d[torch.arange(len(chunk)), torch.arange(i, i + len(chunk))] = float("inf")
            if bool((d <= reach).any()):
                raise ValueError("keys within reach of each other: place them one by one (add)")
    labels = [normalize_label(t) for t in targets]
    cids = [f"c{state.next_cluster + j}" for j in range(len(edit_ids))]
    state.next_cluster += len(edit_ids)
    for e, k, b, c, lab in zip(edit_ids, keys, blocks, cids, labels):
        state.points[e] = Point(e, k, int(b), c, lab)
        state.clusters[c] = Cluster(c, k, float(init_radius), lab, [e])
        state.by_label.setdefault(lab, set()).add(e)
    table.set_many(list(edit_ids), keys)
    state.centers.set_many(cids, keys, [float(init_radius)] * len(cids))


def bulk_add(ed, chunks) -> int:
    """Add many edits to editor `ed` in one commit. `chunks` yields lists of (prompt, target,
    key, {module: (A, B)}); each chunk's blocks go to one file as they come, so memory holds
    one chunk. The commit is one new snapshot: until it is on disk the workspace is as
    before. Returns the number of edits added."""
    ws = ed.ws
    ws.writable()
    dtype = block_dtype(ed)
    with ws.lock:
        state, added, files, taken = ws.state, [], {}, set(ws.entries)
        for part, chunk in enumerate(chunks):
            ids, blocks = [], {}
            chunk = list(chunk)
            for (prompt, target, key, mats), b in zip(chunk, ws.bank.allocate_many(len(chunk))):
                eid = new_id(taken, nbytes=6)
                taken.add(eid)
                blocks[b] = mats
                ids.append(eid)
                added.append((eid, prompt, target, key, b))
            file = ws.store.write_blocks(blocks, dtype, part=part)
            for b in blocks:
                ws.bank.put(b, file=file)          # not routed to until the snapshot commits
                files[b] = file
        if not added:
            return 0
        try:
            with ws.state_lock:
                add_apart(state, [a[0] for a in added], torch.stack([a[3] for a in added]), [a[4] for a in added],
                          [a[2] for a in added], ed.config.init_radius, ed.config.on_conflict)
                now = time.time()
                for eid, prompt, target, _, b in added:
                    ws.entries[eid] = EditRecord(eid, prompt, target, b, state.points[eid].cluster, "bulk", now,
                                                 bulk=True)
            ws.store.seq += 1
            ws.compact()
        except BaseException:
            ws.load()                  # memory back to what is on disk
            raise
        ws.adopt_files(files.values())
        return len(added)
