"""The neuron index: clusters of edit keys, the rules that grow them, and routing.

`ClusterState` is plain data with the rules; an editor plans an edit on a copy of it and
swaps the copy in only once the edit is on disk. `ClusterIndex` routes queries by exact
search in memory and mirrors the state into two chromadb collections (centers and points),
the persisted, queryable copy. The workspace files hold the same state, so the collections
can always be rebuilt from them (after a crash between the file commit and the chroma
update, say).

Routing (exact): the clusters whose radius covers the query are candidates; among their
members the nearest edit key wins and its block fires. An edit's own prompt therefore
always reaches its own block, and where two clusters overlap the nearer edit decides. The
spec's "nearest center only" would send a query that sits inside one cluster but nearer
another's center to nothing. Exact search replaced chroma's HNSW, which missed the nearest
center for a few queries in 2000 at 1000 edits (a miss silently drops an edit).

Rules for a new edit with answer L and key k (`on_conflict="supersede"`, the default):
- an active edit with another answer whose key lies within the init radius of k asks the
  same question (that is what the radius means when routing): the new edit *supersedes*
  it. It goes dormant (kept, block and all, shown as superseded) and undoing the new edit
  brings it back. So a later edit of the same fact wins, for every phrasing in reach.
- an edit with answer L within the init radius of k (the same question, the same answer):
  k joins its cluster; the center becomes the members' mean, the radius their spread (at
  least the init radius). The paper's reach (radius + init radius) merged facts that merely
  share an answer.
- otherwise k opens a cluster of the init radius. A cluster with another answer nearby is
  left as it is (the paper shrinks both; that cost earlier edits their paraphrases): in the
  overlap, the nearer edit wins.
"keep" and "forget" are the paper's split rule (both radii to half the distance), keeping
or forgetting the old cluster's members left outside; they remain for comparison.
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
    superseded_by: str | None = None    # set while dormant


@dataclass
class Placement:
    """What adding one key did to the index."""

    action: str                 # "new" | "joined" | "conflict"
    cluster: str
    distance: float | None      # to the nearest center before the edit
    forgotten: list[str]        # edit ids that fell out of a shrunk cluster (on_conflict="forget")
    moved: dict[str, str] = field(default_factory=dict)   # edit id -> its new cluster (on_conflict="keep")
    superseded: list[str] = field(default_factory=list)   # edits of the same question, now dormant


class ClusterState:
    """Clusters and points, with the MELO rules for adding and removing a key."""

    def __init__(self):
        self.clusters: dict[str, Cluster] = {}
        self.points: dict[str, Point] = {}     # active edits
        self.dormant: dict[str, Point] = {}    # superseded edits, restored when their successor goes
        self.next_cluster = 0

    def copy(self) -> "ClusterState":
        return copy.deepcopy(self)

    def nearest(self, key: torch.Tensor) -> tuple[Cluster | None, float]:
        """Nearest cluster center by brute force."""
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
            on_conflict: str = "supersede") -> Placement:
        """Place a new edit's key by the MELO rules. On a conflict, members of the shrunk
        cluster that fall outside it are forgotten (the paper's rule, `on_conflict="forget"`)
        or each moved into a one-point cluster of its own that stops short of the new key
        (`"keep"`): their edits keep working and the new edit's key still routes to it."""
        label = normalize_label(target)
        if on_conflict == "supersede":
            return self._add_superseding(edit_id, key, block, label, init_radius)
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

    def _add_superseding(self, edit_id: str, key: torch.Tensor, block: int, label: str,
                         init_radius: float) -> Placement:
        same_question = []
        if self.points:
            ids = list(self.points)
            d = (torch.stack([self.points[e].key for e in ids]) - key).norm(dim=-1)
            same_question = [ids[i] for i in (d <= init_radius).nonzero().flatten().tolist()
                             if self.points[ids[i]].label != label]
        for e in same_question:
            p = self.points[e]
            self._drop_point(e)
            self._refit_after_leaving(p.cluster, init_radius)
            self.dormant[e] = dataclasses.replace(p, superseded_by=edit_id)
        placed = self._place(edit_id, key, block, label, init_radius)
        if same_question:
            placed.action, placed.superseded = "superseded", same_question
        return placed

    def _place(self, edit_id: str, key: torch.Tensor, block: int, label: str, init_radius: float) -> Placement:
        """Join the cluster of the nearest edit with the same answer within the init radius,
        else open one ("beside" when another cluster is within the paper's reach)."""
        near, d, same = None, None, None
        if self.clusters:
            cs = list(self.clusters.values())
            dc = (torch.stack([c.center for c in cs]) - key).norm(dim=-1)
            i = int(dc.argmin())
            near, d = cs[i], float(dc[i])
            # Join only an edit of the same answer that asks the same question (within the
            # init radius of it). The paper's reach (radius + init radius) let facts that
            # merely share an answer ("English") merge into clusters spanning half the key
            # space: 6 % of unrelated questions fired at 1000 zsRE edits.
            mates = [p for p in self.points.values() if p.label == label]
            if mates:
                dm = (torch.stack([p.key for p in mates]) - key).norm(dim=-1)
                j = int(dm.argmin())
                same = self.clusters[mates[j].cluster] if float(dm[j]) <= init_radius else None
        if same is not None:
            c, action = same, "joined"
        else:
            c = self._new_cluster(key, init_radius, label)
            action = "beside" if near is not None and d <= near.radius + init_radius else "new"
        self.points[edit_id] = Point(edit_id, key.clone(), block, c.id, label)
        c.members.append(edit_id)
        if action == "joined":
            self._refit(c, init_radius)
        return Placement(action, c.id, d, [], {})

    def _refit_after_leaving(self, cid: str, init_radius: float) -> None:
        if cid in self.clusters:
            self._refit(self.clusters[cid], init_radius)

    def _drop_point(self, edit_id: str) -> None:
        p = self.points.pop(edit_id)
        c = self.clusters[p.cluster]
        c.members.remove(edit_id)
        if not c.members:
            del self.clusters[c.id]

    def remove(self, edit_id: str, init_radius: float) -> list[str]:
        """Take an edit's point out; its cluster re-centres on the rest, or goes if empty.
        Edits it superseded come back; returns their ids. A dormant edit just leaves (what it
        had superseded passes to its own successor)."""
        if edit_id in self.dormant:
            gone = self.dormant.pop(edit_id)
            for p in self.dormant.values():
                if p.superseded_by == edit_id:
                    p.superseded_by = gone.superseded_by
            return []
        self._remove_active(edit_id, init_radius)
        back = [e for e, p in self.dormant.items() if p.superseded_by == edit_id]
        for e in back:
            p = self.dormant.pop(e)
            self._place(e, p.key, p.block, p.label, init_radius)
        return back

    def _remove_active(self, edit_id: str, init_radius: float) -> None:
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
            "dormant": [{"edit_id": p.edit_id, "block": p.block, "cluster": p.cluster, "label": p.label,
                         "superseded_by": p.superseded_by} for p in self.dormant.values()],
        }
        tensors = {f"center.{c.id}": c.center.contiguous() for c in self.clusters.values()}
        tensors.update({f"key.{p.edit_id}": p.key.contiguous()
                        for p in list(self.points.values()) + list(self.dormant.values())})
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
        for p in meta.get("dormant", []):
            s.dormant[p["edit_id"]] = Point(p["edit_id"], tensors[f"key.{p['edit_id']}"], int(p["block"]),
                                            p["cluster"], p["label"], p["superseded_by"])
        return s


@dataclass
class Route:
    """Where a query key goes: the nearest cluster, how far it is, and the block that fires."""

    block: int | None
    cluster: str | None
    distance: float | None
    radius: float | None
    edit_id: str | None


class RouteTable:
    """A state's centers and active keys as matrices: exact routing in memory.

    Built once per committed state (an edit or undo), read by any number of queries.
    """

    def __init__(self, state: ClusterState):
        self.cluster_ids = list(state.clusters)
        pos = {c: i for i, c in enumerate(self.cluster_ids)}
        clusters = [state.clusters[c] for c in self.cluster_ids]
        points = list(state.points.values())
        self.centers = torch.stack([c.center for c in clusters]) if clusters else None
        self.radii = torch.tensor([c.radius for c in clusters])
        self.point_ids = [p.edit_id for p in points]
        self.keys = torch.stack([p.key for p in points]) if points else None
        self.blocks = [p.block for p in points]
        self.point_cluster = torch.tensor([pos[p.cluster] for p in points], dtype=torch.long)

    def route(self, key: torch.Tensor) -> Route:
        if self.centers is None:
            return Route(None, None, None, None, None)
        dc = (self.centers - key).norm(dim=-1)
        cover = dc <= self.radii
        if not bool(cover.any()):
            i = int(dc.argmin())
            return Route(None, self.cluster_ids[i], float(dc[i]), float(self.radii[i]), None)
        # Among the members of every covering cluster, the nearest key wins.
        members = cover[self.point_cluster].nonzero().squeeze(1)
        j = int(members[(self.keys[members] - key).norm(dim=-1).argmin()])
        ci = int(self.point_cluster[j])
        return Route(self.blocks[j], self.cluster_ids[ci], float(dc[ci]), float(self.radii[ci]), self.point_ids[j])


# Chroma holds the persisted, queryable mirror; routing does not use its HNSW search (which
# is approximate: at 1000 edits it missed the nearest center for a few queries in 2000).
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
    """A ClusterState, routed exactly in memory and mirrored into chromadb.

    Embeddings are always passed in (no embedding function), distances are L2. `gen` stamps
    which committed state the collections hold.
    """

    def __init__(self, path: Path):
        self.client = _chroma_client(path)
        self.state = ClusterState()
        self.table = RouteTable(self.state)
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
        self.table = RouteTable(state)
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
        self.table = RouteTable(new)
        self.state = new
        changed_c = [c for c, v in new.clusters.items()
                     if c not in old.clusters or v.radius != old.clusters[c].radius
                     or v.members != old.clusters[c].members or not torch.equal(v.center, old.clusters[c].center)]
        changed_p = [p for p, v in new.points.items()
                     if p not in old.points or v.cluster != old.points[p].cluster or v.block != old.points[p].block]
        self._write(changed_c, changed_p, [c for c in old.clusters if c not in new.clusters],
                    [p for p in old.points if p not in new.points], gen)

    def route(self, key: torch.Tensor) -> Route:
        """Which block fires for this key: see RouteTable. Reads one committed state whole."""
        return self.table.route(key)

    def close(self) -> None:
        """Let go of chroma's handles (before the workspace directory is removed or reopened)."""
        self.client.close()
