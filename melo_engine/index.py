"""The neuron index: clusters of edit keys, the rules that grow them, and routing.

`ClusterState` is the data with the rules and exact routing; an editor changes it in
place under the index lock, and puts it back (rollback) if the change cannot be written to
disk. `ClusterIndex` holds it and mirrors the cluster centers into a chromadb collection,
the persisted, queryable copy. The workspace files hold the same state, so the collection
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

import base64
import dataclasses
import os
import re
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .vectors import VectorTable

# A conflict splits two clusters at the midpoint of their centers, the old one just inside,
# the new one just past it.
SPLIT_MARGIN = 1e-3


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
class Placement:
    """What adding one key did to the index."""

    action: str                 # "new" | "joined" | "conflict" | "beside" | "superseded"
    cluster: str
    distance: float | None      # to the nearest center before the edit
    forgotten: list[str]        # edit ids that fell out of a shrunk cluster (on_conflict="forget")
    moved: dict[str, str] = field(default_factory=dict)   # edit id -> its new cluster (on_conflict="keep")
    superseded: list[str] = field(default_factory=list)   # edits of the same question, now dormant


@dataclass
class Route:
    """Where a query key goes: the nearest cluster, how far it is, and the block that fires."""

    block: int | None
    cluster: str | None
    distance: float | None
    radius: float | None
    edit_id: str | None


class ClusterState:
    """Clusters and points, with the MELO rules for adding and removing a key, and routing.

    Every change goes through six small setters (`_put_*`, `_del_*`) that keep two exact
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
            self._put_point(p) if p is not None else self._del_point_row(pid)
        for pid, p in undo["dormant"].items():
            self._put_dormant(p) if p is not None else self._del_dormant(pid)
        for cid, c in undo["clusters"].items():
            self._put_cluster(c) if c is not None else self._del_cluster(cid)
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
                self._del_point_row(pid)
            else:
                self._put_point(Point(pid, decode_vector(p["key"]), int(p["block"]), p["cluster"], p["label"]))
        for pid, p in delta["dormant"].items():
            if p is None:
                self._del_dormant(pid)
            else:
                self._put_dormant(Point(pid, decode_vector(p["key"]), int(p["block"]), p["cluster"], p["label"],
                                        p["superseded_by"]))
        for cid, c in delta["clusters"].items():
            if c is None:
                self._del_cluster(cid)
                continue
            center = decode_vector(c["center"]) if "center" in c else self.points[c["members"][0]].key
            self._put_cluster(Cluster(cid, center, float(c["radius"]), c["label"], list(c["members"])))
        self.next_cluster = int(delta["next_cluster"])

    # ---- the six setters -------------------------------------------------------------------
    def _put_cluster(self, c: Cluster) -> None:
        self._save("clusters", c.id)
        self.clusters[c.id] = c
        self.centers.set(c.id, c.center, c.radius)

    def _del_cluster(self, cid: str) -> None:
        self._save("clusters", cid)
        self.clusters.pop(cid, None)
        self.centers.remove(cid)

    def _put_point(self, p: Point) -> None:
        self._save("points", p.edit_id)
        old = self.points.get(p.edit_id)
        if old is not None:
            self.by_label.get(old.label, set()).discard(p.edit_id)
        self.points[p.edit_id] = p
        self.keys.set(p.edit_id, p.key)
        self.by_label.setdefault(p.label, set()).add(p.edit_id)

    def _del_point_row(self, pid: str) -> None:
        self._save("points", pid)
        p = self.points.pop(pid, None)
        if p is not None:
            self.by_label.get(p.label, set()).discard(pid)
        self.keys.remove(pid)

    def _put_dormant(self, p: Point) -> None:
        self._save("dormant", p.edit_id)
        self.dormant[p.edit_id] = p

    def _del_dormant(self, pid: str) -> None:
        self._save("dormant", pid)
        self.dormant.pop(pid, None)

    def _changing(self, cid: str) -> Cluster:
        """A copy of a cluster to change and then _put_cluster (the original stays for undo)."""
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
        covering, dist, near, near_d = self.centers.query(key)
        if not covering:
            if near is None:
                return Route(None, None, None, None, None)
            return Route(None, near, near_d, self.clusters[near].radius, None)
        members = [m for cid in covering for m in self.clusters[cid].members]
        d = (self.keys.exact[self.keys.rows_of(members)] - key).norm(dim=-1)
        p = self.points[members[int(d.argmin())]]
        c = self.clusters[p.cluster]
        return Route(p.block, c.id, float(dist[covering.index(c.id)]), c.radius, p.edit_id)

    # ---- the rules -------------------------------------------------------------------------
    def _new_cluster(self, key: torch.Tensor, radius: float, label: str, member: str) -> Cluster:
        cid = f"c{self.next_cluster}"
        self.next_cluster += 1
        c = Cluster(cid, key.clone(), float(radius), label, [member])
        self._put_cluster(c)
        return c

    def _refit(self, c: Cluster, min_radius: float) -> None:
        """Center = mean of the members; radius = farthest member, at least `min_radius`."""
        keys = self.keys.exact[self.keys.rows_of(c.members)]
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
            action, cid = "new", None
        elif near.label == label:
            action, cid = "joined", near.id
        else:
            # Conflict: the new edit gets its own cluster; the two meet halfway, and the old
            # cluster's members now outside its shrunk radius are forgotten or re-homed.
            action, cid = "conflict", None
            c = self._new_cluster(key, 0.5 * d * (1 + SPLIT_MARGIN), label, edit_id)
            old = self._changing(near.id)
            old.radius = min(old.radius, 0.5 * d * (1 - SPLIT_MARGIN))
            outside = [e for e in old.members if float((self.points[e].key - old.center).norm()) > old.radius]
            old.members = [e for e in old.members if e not in outside]
            self._put_cluster(old) if old.members else self._del_cluster(old.id)
            for e in outside:
                p = self.points[e]
                self._del_point_row(e)
                if on_conflict == "forget":
                    forgotten.append(e)
                    continue
                # Half way to the new key at most, so the new edit's key stays outside it.
                d_new = float((p.key - key).norm())
                home = self._new_cluster(p.key, min(init_radius, 0.5 * d_new * (1 - SPLIT_MARGIN)), p.label, e)
                self._put_point(dataclasses.replace(p, cluster=home.id))
                moved[e] = home.id
        if action == "new":
            c = self._new_cluster(key, init_radius, label, edit_id)
        if cid is None:
            self._put_point(Point(edit_id, key.clone(), block, c.id, label))
        else:
            self._put_point(Point(edit_id, key.clone(), block, cid, label))
            c = self._changing(cid)
            c.members.append(edit_id)
            self._refit(c, init_radius)
            self._put_cluster(c)
        return Placement(action, c.id, None if near is None else d, forgotten, moved)

    def add_apart(self, edit_ids: list[str], keys: torch.Tensor, blocks: list[int], targets: list[str],
                  init_radius: float, on_conflict: str = "supersede") -> None:
        """Place many keys at once, each in a cluster of its own: the bulk path (benchmarks,
        restoring). The rules give every key a cluster of its own only when no other key lies
        within reach (the init radius when superseding; the paper's radius + init radius
        otherwise), so that is checked, exactly, and a violation is refused."""
        keys = keys.detach().to(torch.float32)
        reach = init_radius if on_conflict == "supersede" else 2 * init_radius
        old = self.keys.exact[: len(self.keys.ids)][self.keys.alive[: len(self.keys.ids)]] if len(self.keys) else None
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
        cids = [f"c{self.next_cluster + j}" for j in range(len(edit_ids))]
        self.next_cluster += len(edit_ids)
        for e, k, b, c, lab in zip(edit_ids, keys, blocks, cids, labels):
            self.points[e] = Point(e, k, int(b), c, lab)
            self.clusters[c] = Cluster(c, k, float(init_radius), lab, [e])
            self.by_label.setdefault(lab, set()).add(e)
        self.keys.set_many(list(edit_ids), keys)
        self.centers.set_many(cids, keys, [float(init_radius)] * len(cids))

    def _add_superseding(self, edit_id: str, key: torch.Tensor, block: int, label: str,
                         init_radius: float) -> Placement:
        near_ids, _ = self.keys.within(key, init_radius)
        same_question = [e for e in near_ids if self.points[e].label != label]
        for e in same_question:
            p = self.points[e]
            self._drop_point(e, init_radius)
            self._put_dormant(dataclasses.replace(p, superseded_by=edit_id))
        placed = self._place(edit_id, key, block, label, init_radius)
        if same_question:
            placed.action, placed.superseded = "superseded", same_question
        return placed

    def _place(self, edit_id: str, key: torch.Tensor, block: int, label: str, init_radius: float) -> Placement:
        """Join the cluster of the nearest edit with the same answer within the init radius,
        else open one ("beside" when another cluster is within the paper's reach)."""
        near, d = self.nearest(key)
        d = None if near is None else d
        # Join only an edit of the same answer that asks the same question (within the init
        # radius of it). The paper's reach (radius + init radius) let facts that merely share
        # an answer ("English") merge into clusters spanning half the key space: 6 % of
        # unrelated questions fired at 1000 zsRE edits.
        mates = sorted(self.by_label.get(label, ()))
        same = None
        if mates:
            dm = (self.keys.exact[self.keys.rows_of(mates)] - key).norm(dim=-1)
            j = int(dm.argmin())
            same = self.points[mates[j]].cluster if float(dm[j]) <= init_radius else None
        if same is not None:
            action = "joined"
            self._put_point(Point(edit_id, key.clone(), block, same, label))
            c = self._changing(same)
            c.members.append(edit_id)
            self._refit(c, init_radius)
            self._put_cluster(c)
        else:
            action = "beside" if near is not None and d <= near.radius + init_radius else "new"
            c = self._new_cluster(key, init_radius, label, edit_id)
            self._put_point(Point(edit_id, key.clone(), block, c.id, label))
        return Placement(action, c.id, d, [], {})

    def _drop_point(self, edit_id: str, init_radius: float | None = None) -> None:
        """Take an active point out of its cluster; an emptied cluster goes. With
        `init_radius`, the cluster left behind re-centres on its other members."""
        p = self.points[edit_id]
        c = self._changing(p.cluster)
        c.members.remove(edit_id)
        self._del_point_row(edit_id)
        if not c.members:
            self._del_cluster(c.id)
            return
        if init_radius is not None:
            self._refit(c, init_radius)
        self._put_cluster(c)

    def remove(self, edit_id: str, init_radius: float) -> list[str]:
        """Take an edit's point out; its cluster re-centres on the rest, or goes if empty.
        Edits it superseded come back; returns their ids. A dormant edit just leaves (what it
        had superseded passes to its own successor)."""
        if edit_id in self.dormant:
            gone = self.dormant[edit_id]
            self._del_dormant(edit_id)
            for p in list(self.dormant.values()):
                if p.superseded_by == edit_id:
                    self._put_dormant(dataclasses.replace(p, superseded_by=gone.superseded_by))
            return []
        p = self.points[edit_id]
        c = self.clusters[p.cluster]
        radius, alone = c.radius, len(c.members) == 2
        self._drop_point(edit_id, init_radius)
        if alone and p.cluster in self.clusters:   # the one left keeps the radius it had, not more
            rest = self._changing(p.cluster)
            rest.radius = min(rest.radius, radius)
            self._put_cluster(rest)
        back = [e for e, q in self.dormant.items() if q.superseded_by == edit_id]
        for e in back:
            q = self.dormant[e]
            self._del_dormant(e)
            self._place(e, q.key, q.block, q.label, init_radius)
        return back

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


# Chroma holds the persisted, queryable mirror of the cluster centers; routing does not use
# its HNSW search (approximate: at 1000 edits it missed the nearest center for a few
# queries in 2000). Edit keys are not mirrored: they live in the workspace files, and
# doubling them in chroma would cost 2.4 kB per edit of the 110 kB budget.
EF_SEARCH = 1000


def _chroma_client(path: Path):
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
    import chromadb
    from chromadb.config import Settings

    try:
        return chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False,
                                                                           allow_reset=True))
    except Exception:
        # chroma caches a client's system per path before starting it, so a start that
        # failed (a damaged database) would be handed out again after a repair.
        from chromadb.api.shared_system_client import SharedSystemClient

        SharedSystemClient._identifier_to_system.pop(str(path), None)
        SharedSystemClient._identifier_to_refcount.pop(str(path), None)
        raise


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).numpy()


class ClusterIndex:
    """A ClusterState, routed exactly in memory and mirrored into chromadb.

    Embeddings are always passed in (no embedding function), distances are L2. `gen` stamps
    which committed state the collection holds. A change is made to the state under `lock`
    (see MeloEditor), so a query routes on one whole state, before or after an edit.

    chroma is opened only when there is something to write (the first commit after
    opening, or `sync`): starting chroma rewrites its own files, and a workspace that is only
    read, or that refuses a bad input, must stay byte for byte as it was.
    """

    def __init__(self, path: Path, mirror: bool = True):
        self.path = path
        self.writable = mirror        # False: read-only, chroma never opened
        self.client = None
        self.state = ClusterState()
        self.lock = threading.RLock()
        self._loaded_gen = -1         # the committed state `load` was given
        self._stale = False           # a write to chroma failed: rebuild on the next one

    def _connect(self) -> None:
        """Open chroma; ValueError (one line, naming `repair`) when it cannot start."""
        if self.client is not None:
            return
        if not self.writable:
            raise ValueError("this workspace is open read-only")
        try:
            self.client = _chroma_client(self.path)
            self._open()
            if "points" in {c.name if hasattr(c, "name") else c for c in self.client.list_collections()}:
                self.client.delete_collection("points")    # format 1 mirrored edit keys too
        except Exception as err:  # noqa: BLE001 - chroma's own errors, whatever their type
            self.client = None
            raise ValueError(f"the index (chromadb) cannot be opened ({type(err).__name__}); "
                             f"`repair` rebuilds it from the workspace files") from None
        self._stale = self.gen != self._loaded_gen

    def _open(self):
        cfg = {"hnsw": {"space": "l2", "ef_search": EF_SEARCH}}
        self.centers = self.client.get_or_create_collection("centers", embedding_function=None, configuration=cfg)
        with warnings.catch_warnings():       # chroma calls "no embedding function" legacy
            warnings.simplefilter("ignore", DeprecationWarning)
            hnsw = (self.centers.configuration or {}).get("hnsw") or {}
        if hnsw.get("ef_search") != EF_SEARCH:   # a workspace made before EF_SEARCH existed
            self.centers.modify(configuration={"hnsw": {"ef_search": EF_SEARCH}})

    @property
    def gen(self) -> int:
        return int((self.centers.metadata or {}).get("gen", -1))

    def load(self, state: ClusterState, gen: int) -> None:
        """Adopt a committed state (chroma is brought in step when it is next written)."""
        with self.lock:
            self.state = state
            self._loaded_gen = gen

    def sync(self, gen: int) -> None:
        """Bring chroma in step with the state now: opened, and rebuilt if it lags."""
        self._connect()
        if self._stale or self.gen != gen or self.centers.count() != len(self.state.clusters):
            self.rebuild(gen)

    def rebuild(self, gen: int) -> None:
        self._connect()
        try:
            self.client.delete_collection("centers")
        except Exception:  # noqa: BLE001 - absent is fine
            pass
        self._open()
        ids = list(self.state.clusters)
        for i in range(0, len(ids), 4096):     # chroma takes bounded batches
            self._write(ids[i:i + 4096], [], gen)
        self.centers.modify(metadata={"gen": gen})
        self._stale = False

    def _write(self, changed: list[str], gone: list[str], gen: int) -> None:
        s = self.state
        if gone:
            self.centers.delete(ids=gone)
        if changed:
            cs = [s.clusters[c] for c in changed]
            self.centers.upsert(
                ids=changed,
                embeddings=np.stack([_np(c.center) for c in cs]),
                metadatas=[{"radius": c.radius, "label": c.label, "size": len(c.members),
                            # The only block of a one-member cluster: routing then needs one query.
                            "block": s.points[c.members[0]].block if len(c.members) == 1 else -1,
                            "edit_id": c.members[0] if len(c.members) == 1 else ""} for c in cs],
            )
        self.centers.modify(metadata={"gen": gen})

    def mirror(self, clusters_changed: list[str], gen: int) -> None:
        """Write the clusters a commit touched (already on disk and in the state) to chroma;
        the whole mirror when it lagged behind (opened behind, or an earlier write failed)."""
        self._connect()
        if self._stale:
            return self.rebuild(gen)
        try:
            self._write([c for c in clusters_changed if c in self.state.clusters],
                        [c for c in clusters_changed if c not in self.state.clusters], gen)
        except BaseException:
            self._stale = True
            raise

    def route(self, key: torch.Tensor) -> Route:
        """Which block fires for this key (ClusterState.route), on one whole committed state."""
        with self.lock:
            return self.state.route(key)

    def close(self) -> None:
        """Let go of chroma's handles (before the workspace directory is removed or reopened)."""
        if self.client is not None:
            self.client.close()
