"""The neuron index: clusters of edit keys, and exact routing. The rules that grow it are in
placement.py.

`ClusterState` is the data: clusters, active points and dormant (superseded) ones, kept in
step with two exact search tables (vectors.py). An editor changes it in place under the
workspace's state lock, through six small setters that also keep an undo log, so a change
that cannot be written to disk is put back (rollback). The workspace files hold the same
state (snapshot and journal, store.py): memory is rebuilt from them on every open.

Routing (exact): the clusters whose radius covers the query are candidates; among their
members the nearest edit key wins and its block fires. An edit's own prompt therefore
always reaches its own block, and where two clusters overlap the nearer edit decides. The
spec's "nearest center only" would send a query that sits inside one cluster but nearer
another's center to nothing. Exact search replaced chroma's HNSW, which missed the nearest
center for a few queries in 2000 at 1000 edits (a miss silently drops an edit).
"""
from __future__ import annotations

import base64
import dataclasses
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from .vectors import VectorTable


def normalize_label(text: str) -> str:
    """The label an edit is clustered by: its target, case-, space- and end-punctuation-blind."""
    return re.sub(r"\s+", " ", text).strip().strip(".!?,;:").strip().lower()


def encode_vector(v: torch.Tensor) -> str:
    """A float32 vector as base64 text, for the one-line records of the journal."""
    return base64.b64encode(v.detach().to(torch.float32).contiguous().numpy().tobytes()).decode()


def decode_vector(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.float32).copy())


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
class Route:
    """Where a query key goes: the nearest cluster, how far it is, and the block that fires."""

    block: int | None
    cluster: str | None
    distance: float | None
    radius: float | None
    edit_id: str | None
    # Edits within the radius that a verifier turned down (router.py): (edit id, why).
    rejected: list[tuple[str, str]] = field(default_factory=list)


class ClusterState:
    """Clusters and points, and routing; the rules that change them are in placement.py.

    Every change goes through six small setters (`put_*`, `del_*`) that keep two exact
    search tables in step (cluster centers with their radii, active keys), so an edit or a
    query costs one scan, not a rebuild, however many edits there are. Between `begin()` and
    `end()` the setters also remember what they overwrote: `delta()` is the change to write
    to disk and `rollback()` puts everything back if writing it failed.
    """

    def __init__(self):
        self.clusters: dict[str, Cluster] = {}
        self.points: dict[str, Point] = {}     # active edits
        self.dormant: dict[str, Point] = {}    # superseded edits, restored when their successor goes
        self.next_cluster = 0
        self.centers = VectorTable()           # cluster id -> center, with the cluster's radius
        self.keys = VectorTable()              # active edit id -> key
        self.by_label: dict[str, set[str]] = {}
        self._undo: dict | None = None

    # ---- changes: begin, then delta / rollback, then end --------------------------------
    def begin(self) -> None:
        self._undo = {"clusters": {}, "points": {}, "dormant": {}, "next_cluster": self.next_cluster}

    def end(self) -> None:
        self._undo = None

    def _save(self, table: str, name: str) -> None:
        if self._undo is not None and name not in self._undo[table]:
            self._undo[table][name] = getattr(self, table).get(name)

    def rollback(self) -> None:
        undo, self._undo = self._undo, None
        if undo is None:
            return
        for pid, p in undo["points"].items():
            self.put_point(p) if p is not None else self.del_point(pid)
        for pid, p in undo["dormant"].items():
            self.put_dormant(p) if p is not None else self.del_dormant(pid)
        for cid, c in undo["clusters"].items():
            self.put_cluster(c) if c is not None else self.del_cluster(cid)
        self.next_cluster = undo["next_cluster"]

    def delta(self) -> dict:
        """What changed since begin(), as JSON-ready data (None: removed)."""
        def point(p: Point | None, dormant: bool):
            if p is None:
                return None
            out = {"block": p.block, "cluster": p.cluster, "label": p.label, "key": encode_vector(p.key)}
            if dormant:
                out["superseded_by"] = p.superseded_by
            return out
        return {
            "clusters": {cid: None if cid not in self.clusters else self._cluster_json(self.clusters[cid])
                         for cid in self._undo["clusters"]},
            "points": {pid: point(self.points.get(pid), False) for pid in self._undo["points"]},
            "dormant": {pid: point(self.dormant.get(pid), True) for pid in self._undo["dormant"]},
            "next_cluster": self.next_cluster,
        }

    def _on_its_key(self, c: Cluster) -> bool:
        """A one-member cluster centred on its key (most clusters): files need not repeat the key."""
        return len(c.members) == 1 and torch.equal(c.center, self.points[c.members[0]].key)

    def _cluster_json(self, c: Cluster) -> dict:
        out = {"radius": c.radius, "label": c.label, "members": list(c.members)}
        if not self._on_its_key(c):
            out["center"] = encode_vector(c.center)
        return out

    def apply(self, delta: dict) -> None:
        """Replay a delta() (opening a workspace). Points first: clusters may refer to their keys."""
        for pid, p in delta["points"].items():
            if p is None:
                self.del_point(pid)
            else:
                self.put_point(Point(pid, decode_vector(p["key"]), int(p["block"]), p["cluster"], p["label"]))
        for pid, p in delta["dormant"].items():
            if p is None:
                self.del_dormant(pid)
            else:
                self.put_dormant(Point(pid, decode_vector(p["key"]), int(p["block"]), p["cluster"], p["label"],
                                        p["superseded_by"]))
        for cid, c in delta["clusters"].items():
            if c is None:
                self.del_cluster(cid)
                continue
            center = decode_vector(c["center"]) if "center" in c else self.points[c["members"][0]].key
            self.put_cluster(Cluster(cid, center, float(c["radius"]), c["label"], list(c["members"])))
        self.next_cluster = int(delta["next_cluster"])

    # ---- the six setters -------------------------------------------------------------------
    def put_cluster(self, c: Cluster) -> None:
        self._save("clusters", c.id)
        self.clusters[c.id] = c
        self.centers.set(c.id, c.center, c.radius)

    def del_cluster(self, cid: str) -> None:
        self._save("clusters", cid)
        self.clusters.pop(cid, None)
        self.centers.remove(cid)

    def put_point(self, p: Point) -> None:
        self._save("points", p.edit_id)
        old = self.points.get(p.edit_id)
        if old is not None:
            self.by_label.get(old.label, set()).discard(p.edit_id)
        self.points[p.edit_id] = p
        self.keys.set(p.edit_id, p.key)
        self.by_label.setdefault(p.label, set()).add(p.edit_id)

    def del_point(self, pid: str) -> None:
        self._save("points", pid)
        p = self.points.pop(pid, None)
        if p is not None:
            self.by_label.get(p.label, set()).discard(pid)
        self.keys.remove(pid)

    def put_dormant(self, p: Point) -> None:
        self._save("dormant", p.edit_id)
        self.dormant[p.edit_id] = p

    def del_dormant(self, pid: str) -> None:
        self._save("dormant", pid)
        self.dormant.pop(pid, None)

    def changing(self, cid: str) -> Cluster:
        """A copy of a cluster to change and then put_cluster (the original stays for undo)."""
        c = self.clusters[cid]
        return dataclasses.replace(c, members=list(c.members))

    # ---- reading ---------------------------------------------------------------------------
    def nearest(self, key: torch.Tensor) -> tuple[Cluster | None, float]:
        """Nearest cluster center, exactly."""
        cid, d = self.centers.nearest(key)
        return (self.clusters[cid] if cid is not None else None), d

    def route(self, key: torch.Tensor) -> Route:
        """Among the clusters whose radius covers the key, the nearest member's block fires;
        covered by none, nothing fires (the nearest cluster is reported)."""
        members, miss = self.candidates(key, 1)
        return self.route_to(members[0][0], members[0][1]) if members else miss

    def candidates(self, key: torch.Tensor, limit: int | None = None) -> tuple[list[tuple[str, float]], Route]:
        """The members of the clusters whose radius covers the key, nearest first, each with
        the key's distance to its cluster's center (at most `limit`); and the route when
        none of them fires (the nearest cluster, nothing fired)."""
        covering, dist, near, near_d = self.centers.query(key)
        if not covering:
            miss = Route(None, None, None, None, None)
            return [], miss if near is None else Route(None, near, near_d, self.clusters[near].radius, None)
        center_d = {cid: float(x) for cid, x in zip(covering, dist)}
        members = [m for cid in covering for m in self.clusters[cid].members]
        d = (self.keys.exact[self.keys.rows_of(members)] - key).norm(dim=-1)
        order = torch.argsort(d, stable=True).tolist()[:limit]
        ranked = [(members[i], center_d[self.points[members[i]].cluster]) for i in order]
        c = self.clusters[self.points[ranked[0][0]].cluster]
        return ranked, Route(None, c.id, ranked[0][1], c.radius, None)

    def route_to(self, edit_id: str, center_distance: float, rejected=()) -> Route:
        p = self.points[edit_id]
        return Route(p.block, p.cluster, center_distance, self.clusters[p.cluster].radius, edit_id, list(rejected))

    # ---- small changes the placement rules are made of --------------------------------
    def new_cluster(self, key: torch.Tensor, radius: float, label: str, member: str) -> Cluster:
        cid = f"c{self.next_cluster}"
        self.next_cluster += 1
        c = Cluster(cid, key.clone(), float(radius), label, [member])
        self.put_cluster(c)
        return c

    def refit(self, c: Cluster, min_radius: float) -> None:
        """Center = mean of the members; radius = farthest member, at least `min_radius`."""
        keys = self.keys.exact[self.keys.rows_of(c.members)]
        c.center = keys.mean(0)
        c.radius = max(float((keys - c.center).norm(dim=-1).max()), float(min_radius))

    def drop_point(self, edit_id: str, init_radius: float | None = None) -> None:
        """Take an active point out of its cluster; an emptied cluster goes. With
        `init_radius`, the cluster left behind re-centres on its other members."""
        p = self.points[edit_id]
        c = self.changing(p.cluster)
        c.members.remove(edit_id)
        self.del_point(edit_id)
        if not c.members:
            self.del_cluster(c.id)
            return
        if init_radius is not None:
            self.refit(c, init_radius)
        self.put_cluster(c)

    def reset(self) -> None:
        """Empty, as new (a workspace reset)."""
        self.__init__()

    # ---- snapshot: JSON for the small fields, two matrices for the vectors ---------------
    def to_files(self) -> tuple[dict, dict[str, torch.Tensor]]:
        keys, rows = [], {}
        for p in list(self.points.values()) + list(self.dormant.values()):
            rows[p.edit_id] = len(keys)
            keys.append(p.key)
        centers, clusters = [], []
        for c in self.clusters.values():
            entry = {"id": c.id, "radius": c.radius, "label": c.label, "members": list(c.members), "center": -1}
            if not self._on_its_key(c):
                entry["center"] = len(centers)
                centers.append(c.center)
            clusters.append(entry)
        meta = {
            "next_cluster": self.next_cluster,
            "clusters": clusters,
            "points": [{"edit_id": p.edit_id, "block": p.block, "cluster": p.cluster, "label": p.label,
                        "key": rows[p.edit_id]} for p in self.points.values()],
            "dormant": [{"edit_id": p.edit_id, "block": p.block, "cluster": p.cluster, "label": p.label,
                         "superseded_by": p.superseded_by, "key": rows[p.edit_id]} for p in self.dormant.values()],
        }
        dim = keys[0].shape[0] if keys else 0
        tensors = {"keys": torch.stack(keys) if keys else torch.zeros(0, dim),
                   "centers": torch.stack(centers) if centers else torch.zeros(0, dim)}
        return meta, tensors

    @classmethod
    def from_files(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "ClusterState":
        s = cls()
        s.next_cluster = int(meta.get("next_cluster", 0))
        keys, centers = tensors.get("keys"), tensors.get("centers")
        points = [Point(p["edit_id"], keys[p["key"]], int(p["block"]), p["cluster"], p["label"])
                  for p in meta.get("points", [])]
        for p in points:
            s.points[p.edit_id] = p
            s.by_label.setdefault(p.label, set()).add(p.edit_id)
        if points:     # one bulk write of the search table, not one per point
            s.keys.set_many([p.edit_id for p in points], torch.stack([p.key for p in points]))
        for p in meta.get("dormant", []):
            s.dormant[p["edit_id"]] = Point(p["edit_id"], keys[p["key"]], int(p["block"]), p["cluster"],
                                            p["label"], p["superseded_by"])
        clusters = []
        for c in meta.get("clusters", []):
            center = centers[c["center"]] if c["center"] >= 0 else s.points[c["members"][0]].key
            clusters.append(Cluster(c["id"], center, float(c["radius"]), c["label"], list(c["members"])))
        for c in clusters:
            s.clusters[c.id] = c
        if clusters:
            s.centers.set_many([c.id for c in clusters], torch.stack([c.center for c in clusters]),
                               [c.radius for c in clusters])
        return s
