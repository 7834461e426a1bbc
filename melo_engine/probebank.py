"""The probe bank: the user's own questions, kept with their keys in chromadb, against which
every edit's side effects are checked.

An edit fires for every question whose key falls inside its cluster, and the questions
that matter are the user's own: the eval set a lab measures on, the question list a class
works through. The bundled reference bank (neighbours.py, 178 questions) cannot know them.
So the user loads them, thousands at a time, once per model and key setting: their keys are
computed once and kept in one chroma collection per key space (under the cache directory,
or on a chroma server named by MELO_CHROMA_URL when several machines share one bank).

Whose questions a check sees. The shared list (loaded from the shell by whoever runs the
server, `python -m melo_engine probes load`: a teacher's list for the whole class) is one
collection per key space; a workspace's own list (loaded from the web page) is a collection
of its own beside it (`owner_of`). A workspace's check sees the shared list and its own,
never another visitor's: on a public server a stranger's file must not change what
everybody's side-effect check says. A collection per owner, not an owner field on the rows:
an owner filter on every chroma query made every check slower (docs/BENCHMARKS.md, "Probe
bank"), and a removed workspace's list goes with one call (`forget`).

This is the job chroma is for: a large, persisted set of vectors with text and metadata,
searched by nearness. Its HNSW search is approximate, and a missed question would be a
side effect nobody is told about, so chroma only proposes: `within` takes its nearest k
with their stored embeddings, re-ranks them by the exact L2 distance, and doubles k while
the farthest one returned still lies inside the radius. Each side-effect candidate is then
routed exactly (ClusterState.route), as neighbours.side_effects does over the small bank.
The benchmark (bench/probebank.py) checks the result against brute force.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from .model import cache_dir
from .neighbours import Neighbour, row
from .questionfile import clean_question, read_questions_file

EF_SEARCH = 1000         # HNSW candidates per query: far above the k a side-effect check asks for
EF_CONSTRUCTION = 400
START_K = 64             # the first query's n_results; doubled while it all lies inside the radius
KEY_BATCH = 256          # questions keyed per call (bounded memory, progress per batch)
URL_ENV = "MELO_CHROMA_URL"


# ---- where the bank lives ----------------------------------------------------------------
def question_id(question: str) -> str:
    """A question's id within its collection: re-adding the same text finds it there."""
    return hashlib.sha256(question.encode()).hexdigest()[:32]


def owner_of(workspace) -> str:
    """The owner name of a workspace's own questions: its folder, made absolute. The web
    app's pool and the engine's replicas open a workspace by the same path, so they agree;
    nobody can name another's folder from the page."""
    return "ws-" + hashlib.sha256(str(Path(workspace).resolve()).encode()).hexdigest()[:24]


def space_digest(keyer) -> str:
    """Names one key space: the model, the key setting and the exact weights behind them."""
    fp = json.dumps(keyer.backbone.fingerprint, sort_keys=True, default=str)
    return hashlib.sha256(f"{keyer.cfg.model}\n{keyer.cfg.key_name()}\n{fp}".encode()).hexdigest()[:10]


def collection_name(keyer) -> str:
    """`probes-<model>-<key>-<digest>`, within chroma's rule for names (3-63 characters of
    [a-zA-Z0-9._-], alphanumeric at both ends). Model and key are shortened; the digest
    tells the spaces apart."""
    def slug(s: str, n: int) -> str:
        return re.sub(r"[^a-zA-Z0-9]+", "-", s).strip("-")[:n].strip("-") or "x"
    return f"probes-{slug(keyer.cfg.model, 18)}-{slug(keyer.cfg.key_name(), 24)}-{space_digest(keyer)}"


def _owner_tag(owner: str) -> str:
    return hashlib.sha256(owner.encode()).hexdigest()[:20]


def own_collection_name(keyer, owner: str) -> str:
    """`probes-own-<space digest>-<owner digest>`: one workspace's own list in one key space."""
    return f"probes-own-{space_digest(keyer)}-{_owner_tag(owner)}"


ROOT_ENV = "MELO_PROBE_BANK"


def default_root() -> Path:
    """Where the local bank lives: $MELO_PROBE_BANK, else the cache directory's `probes`."""
    where = os.environ.get(ROOT_ENV, "").strip()
    return Path(where).expanduser() if where else cache_dir() / "probes"


def location() -> str:
    """Which bank a process reaches: the server's address, or the local folder."""
    return os.environ.get(URL_ENV, "").strip() or str(default_root())


def may_exist() -> bool:
    """Whether a bank can have been loaded here (a server is named, or the local folder
    exists): a workspace whose user never loaded one does not start chroma to find out."""
    return bool(os.environ.get(URL_ENV, "").strip()) or default_root().is_dir()


def _settings():
    from chromadb.config import Settings

    return Settings(anonymized_telemetry=False)


def client_for(root=None):
    """A chroma server when MELO_CHROMA_URL is set (http[s]://host[:port]), else a persistent
    client under `root` (default: the cache directory's `probes`)."""
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
    import chromadb

    url = os.environ.get(URL_ENV, "").strip()
    if url:
        u = urlparse(url if "://" in url else f"http://{url}")
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"{URL_ENV}={url!r} is not an http(s)://host[:port] address")
        ssl = u.scheme == "https"
        try:
            port = u.port or (443 if ssl else 8000)
        except ValueError:
            raise ValueError(f"{URL_ENV}={url!r} has a bad port") from None
        return chromadb.HttpClient(host=u.hostname, port=port, ssl=ssl, settings=_settings())
    path = Path(root) if root is not None else default_root()
    path.mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=str(path), settings=_settings())


# ---- the bank ------------------------------------------------------------------------------
SHARED = ""              # the owner of the shared list
HNSW = {"hnsw": {"space": "l2", "ef_search": EF_SEARCH, "ef_construction": EF_CONSTRUCTION}}


class ProbeBank:
    """The probe questions of one key space as one owner sees them. `owner` SHARED sees and
    changes the shared list (one chroma collection: L2, embeddings always passed in,
    metadata {source, question}); a workspace's owner (`owner_of`) sees the shared list and
    its own collection, made when it first adds, and adds and removes only there."""

    def __init__(self, client, collection, keyer, owner: str = SHARED):
        self.client = client
        self.collection = collection           # the shared list
        self.keyer = keyer
        self.owner = owner
        self.name = collection.name

    @classmethod
    def open(cls, keyer, root=None, owner: str = SHARED) -> "ProbeBank":
        client = client_for(root)
        return cls(client, _collection(client, collection_name(keyer), keyer), keyer, owner)

    def view(self, owner: str) -> "ProbeBank":
        """The same bank as `owner` sees it (one client, no second open)."""
        return type(self)(self.client, self.collection, self.keyer, owner)

    def _own(self, make: bool = False):
        """This owner's own collection: None for the shared view, or where it has none yet
        (made when `make`)."""
        if self.owner == SHARED:
            return None
        name = own_collection_name(self.keyer, self.owner)
        if make:
            return _collection(self.client, name, self.keyer, owner=self.owner)
        from chromadb.errors import NotFoundError

        try:
            return self.client.get_collection(name)
        except NotFoundError:          # only "none yet": an unreachable server is an error
            return None

    def _writable(self, make: bool = False):
        return self.collection if self.owner == SHARED else self._own(make)

    def _seen(self) -> list:
        """The collections this owner's checks run over: the shared list, then its own."""
        own = self._own()
        return [self.collection] + ([own] if own is not None else [])

    # ---- contents ------------------------------------------------------------------------
    def count(self) -> int:
        """How many questions this owner's checks run over (the shared list and its own; a
        question in both counts once)."""
        total = self.collection.count()
        own = self._own()
        if own is not None:
            step = self._batch()
            ids = _all(own, [], step)["ids"]
            both = sum(len(self.collection.get(ids=ids[i:i + step], include=[])["ids"])
                       for i in range(0, len(ids), step))
            total += len(ids) - both
        return total

    def _batch(self) -> int:
        try:
            return max(1, min(4096, int(self.client.get_max_batch_size())))
        except Exception:  # noqa: BLE001 - older servers do not say
            return 1024

    def add(self, questions: list[str], source: str = "user", progress=None) -> tuple[int, int]:
        """Add questions (keys computed here, in batches) from `source` (a file name, "user")
        to this owner's list. Returns (added, skipped): a question this owner already sees
        (its own or the shared list's, from any source) or twice in the list is skipped and
        keeps its first source. All are checked before any is added."""
        source = clean_question(source, "source")
        qs = [clean_question(q, f"question {i + 1}") for i, q in enumerate(questions)]
        ids = [question_id(q) for q in qs]
        step = self._batch()
        present = set()
        for col in self._seen():
            for i in range(0, len(ids), step):
                present.update(col.get(ids=ids[i:i + step], include=[])["ids"])
        fresh, seen = [], set()
        for q, qid in zip(qs, ids):
            if qid not in present and qid not in seen:
                seen.add(qid)
                fresh.append((q, qid))
        target = self._writable(make=bool(fresh))
        step = min(step, KEY_BATCH)
        for i in range(0, len(fresh), step):
            chunk = fresh[i:i + step]
            keys = self.keyer.keys([q for q, _ in chunk]).detach().to(torch.float32).numpy()
            target.add(ids=[qid for _, qid in chunk], embeddings=keys, documents=[q for q, _ in chunk],
                       metadatas=[{"source": source, "question": q} for q, _ in chunk])
            if progress is not None:
                progress(min(i + step, len(fresh)), len(fresh))
        return len(fresh), len(qs) - len(fresh)

    def add_file(self, path, source: str | None = None, progress=None) -> tuple[int, int]:
        """read_questions_file, then add with the file's name as the source."""
        return self.add(read_questions_file(path), source or Path(path).name, progress)

    def sources(self) -> dict[str, int]:
        """How many questions each source brought, of those this owner sees."""
        out: dict[str, int] = {}
        for col in self._seen():
            for m in _all(col, ["metadatas"], self._batch())["metadatas"]:
                s = (m or {}).get("source", "")
                out[s] = out.get(s, 0) + 1
        return out

    def remove_source(self, source: str) -> int:
        """Remove every question a source brought to this owner's list; returns how many."""
        col = self._writable()
        if col is None:
            return 0
        ids = _all(col, [], self._batch(), where={"source": source})["ids"]
        step = self._batch()
        for i in range(0, len(ids), step):
            col.delete(ids=ids[i:i + step])
        return len(ids)

    def everything(self) -> tuple[list[str], torch.Tensor]:
        """Every question this owner sees, with its key (for brute-force checks and exports);
        a question both shared and its own comes once."""
        docs, embs = [], []
        for col in self._seen():
            got = _all(col, ["documents", "embeddings"], self._batch())
            docs += got["documents"]
            embs += list(got["embeddings"])
        first = {}
        for i, q in enumerate(docs):
            first.setdefault(q, i)
        if not first:
            return [], torch.zeros(0, self.keyer.dim)
        keep = sorted(first.values())
        return [docs[i] for i in keep], torch.from_numpy(np.asarray([embs[i] for i in keep], dtype=np.float32))

    # ---- search --------------------------------------------------------------------------
    def search(self, center: torch.Tensor, radius: float, at_least: int = 0):
        """The questions this owner sees within `radius` of `center`, and at least the
        `at_least` nearest, nearest first: (questions, keys [m, dim], exact distances [m]).
        In each collection chroma proposes its k nearest (HNSW, squared L2); they are
        re-ranked by the exact distance from their stored keys, and k doubles while the
        farthest of them is still inside the radius. A question both shared and the owner's
        comes once."""
        c = center.detach().to(torch.float32).reshape(-1)
        docs, keys = [], []
        for col in self._seen():
            d, k = _near(col, c, radius, at_least)
            docs += d
            keys.append(k)
        if not docs:
            return [], torch.zeros(0, c.shape[0]), torch.zeros(0)
        keys = torch.cat(keys)
        dist = (keys - c).norm(dim=-1)
        order, seen = [], set()
        for i in torch.argsort(dist, stable=True).tolist():
            if docs[i] not in seen:
                seen.add(docs[i])
                order.append(i)
        keep = [i for n, i in enumerate(order) if n < at_least or float(dist[i]) <= radius]
        idx = torch.tensor(keep, dtype=torch.long)
        return [docs[i] for i in keep], keys[idx], dist[idx]

    def within(self, center: torch.Tensor, radius: float, at_least: int = 0) -> list[tuple[str, float]]:
        """Every question this owner sees whose key lies within `radius` of `center` (and at
        least the `at_least` nearest), with its exact distance, nearest first."""
        qs, _, d = self.search(center, radius, at_least)
        return list(zip(qs, d.tolist()))

    def close(self) -> None:
        """Let go of chroma's handles (a persistent client's files, a server's connection)."""
        try:
            self.client.close()
        except Exception:  # noqa: BLE001 - older clients have no close
            pass


def _collection(client, name: str, keyer, owner: str = SHARED):
    """Get or make one of the bank's collections (L2, chroma's HNSW settings checked)."""
    meta = {"model": str(keyer.cfg.model), "key": keyer.cfg.key_name(), "space": space_digest(keyer)}
    if owner != SHARED:
        meta["owner"] = owner
    col = client.get_or_create_collection(name, embedding_function=None, configuration=HNSW, metadata=meta)
    with warnings.catch_warnings():       # chroma calls "no embedding function" legacy
        warnings.simplefilter("ignore", DeprecationWarning)
        hnsw = (col.configuration or {}).get("hnsw") or {}
    if hnsw.get("space", "l2") != "l2":
        raise ValueError(f"probe collection {col.name} is not in L2 space")
    if hnsw.get("ef_search") != EF_SEARCH:
        col.modify(configuration={"hnsw": {"ef_search": EF_SEARCH}})
    return col


def _all(col, include: list[str], step: int, where: dict | None = None) -> dict:
    """Every row of a collection (or those matching `where`), in pages of `step`."""
    out = {"ids": [], **{f: [] for f in include}}
    offset = 0
    while True:
        got = col.get(where=where, include=include, limit=step, offset=offset)
        out["ids"] += got["ids"]
        for f in include:
            out[f] += list(got[f])
        if len(got["ids"]) < step:
            return out
        offset += step


def _near(col, c: torch.Tensor, radius: float, at_least: int) -> tuple[list[str], torch.Tensor]:
    """One collection's rows within `radius` of `c` and its `at_least` nearest (maybe more):
    (documents, keys). k doubles while all k proposed lie inside the radius."""
    total = col.count()
    if total == 0:
        return [], torch.zeros(0, c.shape[0])
    k = min(total, max(START_K, 2 * int(at_least)))
    while True:
        got = col.query(query_embeddings=c.numpy()[None], n_results=k, include=["embeddings", "documents"])
        keys = torch.from_numpy(np.asarray(got["embeddings"][0], dtype=np.float32)).reshape(-1, c.shape[0])
        if k >= total or len(keys) < k or float((keys - c).norm(dim=-1).max()) > radius:
            return list(got["documents"][0]), keys
        k = min(total, 2 * k)


def forget(owner: str, root=None) -> int:
    """Remove `owner`'s own list in every key space (a workspace that was removed); returns
    how many questions went. The shared list cannot be forgotten this way."""
    if not owner or owner == SHARED:
        raise ValueError("only a workspace's own questions can be forgotten")
    if not may_exist() and root is None:
        return 0
    client = client_for(root)
    gone, tail = 0, "-" + _owner_tag(owner)
    try:
        for col in client.list_collections():
            name = col if isinstance(col, str) else col.name
            if name.startswith("probes-own-") and name.endswith(tail):
                gone += client.get_collection(name).count()
                client.delete_collection(name)
    finally:
        try:
            client.close()
        except Exception:  # noqa: BLE001 - older clients have no close
            pass
    return gone


# Margin on the radius for side-effect candidates: routing computes the same distance, but a
# candidate set that is a hair too wide costs one route, a hair too narrow a missed side effect.
CANDIDATE_MARGIN = 1e-5


def bank_side_effects(state, edit_id: str, bank: ProbeBank, n: int = 8, route=None) -> list[Neighbour]:
    """neighbours.side_effects over the probe bank: the `n` bank questions nearest the center
    of `edit_id`'s cluster, and every one that fires the edit, nearest first. Candidates are
    the bank's questions within the cluster's radius (a question fires an edit only from
    inside its cluster) plus the n nearest; each is routed exactly (`route(question, key)`,
    default: the index alone)."""
    route = route or (lambda _q, k: state.route(k))
    cluster = state.clusters[state.points[edit_id].cluster]
    radius = float(cluster.radius)
    qs, keys, dist = bank.search(cluster.center, radius * (1 + CANDIDATE_MARGIN) + CANDIDATE_MARGIN, at_least=n)
    out = []
    for i, q in enumerate(qs):
        line = row(q, float(dist[i]), radius, edit_id, route(q, keys[i]))
        if i < n or line.fires:
            out.append(line)
    return out
