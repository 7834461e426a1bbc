"""The neuron index: clusters of edit keys, the MELO rules that grow and split them, and
the chromadb collections that answer "which cluster, which block?" for a query key.

`ClusterState` is plain data with the rules of MELO_SPEC section 1; an editor plans an edit
on a copy of it and swaps the copy in only once the edit is on disk. `ClusterIndex` mirrors
a state into two chromadb collections (centers and points) and routes queries with them.
The workspace files hold the same state, so the collections can always be rebuilt from
them (after a crash between the file commit and the chroma update, say).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# A conflict splits two clusters at the midpoint of their centers, the old one just inside,
# the new one just past it.
SPLIT_MARGIN = 1e-3


def normalize_label(text: str) -> str:
    """The label an edit is clustered by: its target, case-, space- and end-punctuation-blind."""
    return re.sub(r"\s+", " ", text).strip().strip(".!?,;:").strip().lower()


@dataclass
class Cluster:
    id: str
    center: torch.Tensor
    radius: float
    label: str
    members: list[str] = field(default_factory=list)   # edit ids


@dataclass
class Point:
    edit_id: str
    key: torch.Tensor
    block: int
    cluster: str
    label: str


@dataclass
class Placement:
    """What adding one key did to the index."""

    action: str                 # "new" | "joined" | "conflict"
    cluster: str
    distance: float | None      # to the nearest center before the edit
    forgotten: list[str]        # edit ids that fell out of a shrunk cluster (on_conflict="forget")
    moved: dict[str, str] = field(default_factory=dict)   # edit id -> its new cluster (on_conflict="keep")


class ClusterState:
    """Clusters and points, with the MELO rules for adding and removing a key."""

    def __init__(self):
        self.clusters: dict[str, Cluster] = {}
        self.points: dict[str, Point] = {}
        self.next_cluster = 0

    def copy(self) -> "ClusterState":
        return copy.deepcopy(self)

    def nearest(self, key: torch.Tensor) -> tuple[Cluster | None, float]:
        """Nearest cluster center by brute force (the planner's view; routing uses chroma)."""
        if not self.clusters:
            return None, float("inf")
        ids = list(self.clusters)
        centers = torch.stack([self.clusters[c].center for c in ids])
        d = (centers - key).norm(dim=-1)
        i = int(d.argmin())
        return self.clusters[ids[i]], float(d[i])

    def _new_cluster(self, key: torch.Tensor, radius: float, label: str) -> Cluster:
        cid = f"c{self.next_cluster}"
        self.next_cluster += 1
        self.clusters[cid] = Cluster(cid, key.clone(), float(radius), label, [])
        return self.clusters[cid]

    def _refit(self, c: Cluster, min_radius: float) -> None:
        """Center = mean of the members; radius = farthest member, at least `min_radius`."""
        keys = torch.stack([self.points[e].key for e in c.members])
        c.center = keys.mean(0)
        c.radius = max(float((keys - c.center).norm(dim=-1).max()), float(min_radius))

    def add(self, edit_id: str, key: torch.Tensor, block: int, target: str, init_radius: float,
            on_conflict: str = "keep") -> Placement:
        """Place a new edit's key by the MELO rules. On a conflict, members of the shrunk
        cluster that fall outside it are forgotten (the paper's rule, `on_conflict="forget"`)
        or each moved into a one-point cluster of its own that stops short of the new key
        (`"keep"`): their edits keep working and the new edit's key still routes to it."""
        label = normalize_label(target)
        near, d = self.nearest(key)
        forgotten: list[str] = []
        moved: dict[str, str] = {}
        if near is None or d > near.radius + init_radius:
            c, action = self._new_cluster(key, init_radius, label), "new"
        elif near.label == label:
            c, action = near, "joined"
        else:
            # Conflict: the new edit gets its own cluster; the two meet halfway, and the old
            # cluster's members now outside its shrunk radius are forgotten.
            action = "conflict"
            c = self._new_cluster(key, 0.5 * d * (1 + SPLIT_MARGIN), label)
            near.radius = min(near.radius, 0.5 * d * (1 - SPLIT_MARGIN))
            for e in list(near.members):
                p = self.points[e]
                if float((p.key - near.center).norm()) <= near.radius:
                    continue
                if on_conflict == "forget":
                    forgotten.append(e)
                    self._drop_point(e)
                    continue
                # Half way to the new key at most, so the new edit's key stays outside it.
                d_new = float((p.key - key).norm())
                self._drop_point(e)
                home = self._new_cluster(p.key, min(init_radius, 0.5 * d_new * (1 - SPLIT_MARGIN)), p.label)
                home.members.append(e)
                self.points[e] = dataclasses.replace(p, cluster=home.id)
                moved[e] = home.id
        self.points[edit_id] = Point(edit_id, key.clone(), block, c.id, label)
        c.members.append(edit_id)
        if action == "joined":
            self._refit(c, init_radius)
        return Placement(action, c.id, None if near is None else d, forgotten, moved)

    def _drop_point(self, edit_id: str) -> None:
        p = self.points.pop(edit_id)
        c = self.clusters[p.cluster]
        c.members.remove(edit_id)
        if not c.members:
            del self.clusters[c.id]

    def remove(self, edit_id: str, init_radius: float) -> None:
        """Take an edit's point out; its cluster re-centres on the rest, or goes if empty."""
        cid = self.points[edit_id].cluster
        self._drop_point(edit_id)
        if cid in self.clusters:
            c = self.clusters[cid]
            radius = c.radius
            self._refit(c, init_radius)
            c.radius = min(c.radius, radius) if len(c.members) == 1 else c.radius

    # ---- persistence: JSON for the small fields, tensors for the vectors --------------
    def to_files(self) -> tuple[dict, dict[str, torch.Tensor]]:
        meta = {
            "next_cluster": self.next_cluster,
            "clusters": [{"id": c.id, "radius": c.radius, "label": c.label, "members": c.members}
                         for c in self.clusters.values()],
            "points": [{"edit_id": p.edit_id, "block": p.block, "cluster": p.cluster, "label": p.label}
                       for p in self.points.values()],
        }
        tensors = {f"center.{c.id}": c.center.contiguous() for c in self.clusters.values()}
        tensors.update({f"key.{p.edit_id}": p.key.contiguous() for p in self.points.values()})
        return meta, tensors

    @classmethod
    def from_files(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "ClusterState":
        s = cls()
        s.next_cluster = int(meta.get("next_cluster", 0))
        for c in meta.get("clusters", []):
            s.clusters[c["id"]] = Cluster(c["id"], tensors[f"center.{c['id']}"], float(c["radius"]),
                                          c["label"], list(c["members"]))
        for p in meta.get("points", []):
            s.points[p["edit_id"]] = Point(p["edit_id"], tensors[f"key.{p['edit_id']}"], int(p["block"]),
                                           p["cluster"], p["label"])
        return s


@dataclass
class Route:
    """Where a query key goes: the nearest cluster, how far it is, and the block that fires."""

    block: int | None
    cluster: str | None
    distance: float | None
    radius: float | None
    edit_id: str | None


# HNSW search is approximate, and a missed nearest center silently drops an edit. Over the
# index of 1000 zsRE edits, built edit by edit, chroma's default breadth (100) missed the
# exact nearest center for 1-4 of 2000 questions (6 builds, mean 2.5); this breadth for 0-5
# (9 builds, mean 1.4), at 2.8 ms per lookup instead of 1.9 ms. It lowers the misses but does
# not end them: they come from the incremental updates (the same centers inserted at once
# into a fresh graph gave none). See docs/BENCHMARKS.md.
EF_SEARCH = 1000


def _chroma_client(path: Path):
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
    import chromadb
    from chromadb.config import Settings

    return chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False,
                                                                       allow_reset=True))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).numpy()


class ClusterIndex:
    """A ClusterState mirrored into chromadb, which answers the routing queries.

    Embeddings are always passed in (no embedding function), distances are L2 (chroma
    reports them squared; we take the root). `gen` stamps which committed state the
    collections hold.
    """

    def __init__(self, path: Path):
        self.client = _chroma_client(path)
        self.state = ClusterState()
        self._open()

    def _open(self):
        cfg = {"hnsw": {"space": "l2", "ef_search": EF_SEARCH}}
        self.centers = self.client.get_or_create_collection("centers", embedding_function=None, configuration=cfg)
        self.points = self.client.get_or_create_collection("points", embedding_function=None, configuration=cfg)
        for col in (self.centers, self.points):   # a workspace made before EF_SEARCH existed
            with warnings.catch_warnings():       # chroma calls "no embedding function" legacy
                warnings.simplefilter("ignore", DeprecationWarning)
                hnsw = (col.configuration or {}).get("hnsw") or {}
            if hnsw.get("ef_search") != EF_SEARCH:
                col.modify(configuration={"hnsw": {"ef_search": EF_SEARCH}})

    @property
    def gen(self) -> int:
        return int((self.centers.metadata or {}).get("gen", -1))

    def load(self, state: ClusterState, gen: int) -> None:
        """Adopt a committed state; rebuild the collections unless they already hold it."""
        self.state = state
        if self.gen != gen or self.centers.count() != len(state.clusters) or self.points.count() != len(state.points):
            self._rebuild(gen)

    def _rebuild(self, gen: int) -> None:
        for name in ("centers", "points"):
            try:
                self.client.delete_collection(name)
            except Exception:  # noqa: BLE001 - absent is fine
                pass
        self._open()
        self._write(list(self.state.clusters), list(self.state.points), [], [], gen)

    def _write(self, centers: list[str], points: list[str], gone_centers: list[str], gone_points: list[str], gen: int):
        s = self.state
        if gone_centers:
            self.centers.delete(ids=gone_centers)
        if gone_points:
            self.points.delete(ids=gone_points)
        if centers:
            cs = [s.clusters[c] for c in centers]
            self.centers.upsert(
                ids=centers,
                embeddings=np.stack([_np(c.center) for c in cs]),
                metadatas=[{"radius": c.radius, "label": c.label, "size": len(c.members),
                            # The only block of a one-member cluster: routing then needs one query.
                            "block": s.points[c.members[0]].block if len(c.members) == 1 else -1,
                            "edit_id": c.members[0] if len(c.members) == 1 else ""} for c in cs],
            )
        if points:
            ps = [s.points[p] for p in points]
            self.points.upsert(
                ids=points,
                embeddings=np.stack([_np(p.key) for p in ps]),
                metadatas=[{"block": p.block, "cluster": p.cluster, "label": p.label} for p in ps],
            )
        self.centers.modify(metadata={"gen": gen})

    def commit(self, new: ClusterState, gen: int) -> None:
        """Swap in a new state (already on disk) and write only what changed to chroma."""
        old = self.state
        self.state = new
        changed_c = [c for c, v in new.clusters.items()
                     if c not in old.clusters or v.radius != old.clusters[c].radius
                     or v.members != old.clusters[c].members or not torch.equal(v.center, old.clusters[c].center)]
        changed_p = [p for p, v in new.points.items()
                     if p not in old.points or v.cluster != old.points[p].cluster or v.block != old.points[p].block]
        self._write(changed_c, changed_p, [c for c in old.clusters if c not in new.clusters],
                    [p for p in old.points if p not in new.points], gen)

    def route(self, key: torch.Tensor) -> Route:
        """Nearest center; inside its radius, the block of the nearest member point."""
        if not self.state.clusters:
            return Route(None, None, None, None, None)
        q = _np(key)[None]
        r = self.centers.query(query_embeddings=q, n_results=1, include=["distances", "metadatas"])
        cid, meta = r["ids"][0][0], r["metadatas"][0][0]
        dist = float(np.sqrt(max(r["distances"][0][0], 0.0)))
        radius = float(meta["radius"])
        if dist > radius:
            return Route(None, cid, dist, radius, None)
        if meta["block"] >= 0:
            return Route(int(meta["block"]), cid, dist, radius, meta["edit_id"])
        p = self.points.query(query_embeddings=q, n_results=1, where={"cluster": cid}, include=["metadatas"])
        return Route(int(p["metadatas"][0][0]["block"]), cid, dist, radius, p["ids"][0][0])

    def close(self) -> None:
        """Let go of chroma's handles (before the workspace directory is removed or reopened)."""
        self.client.close()
