"""Where a new edit's key goes in the index: the placement rules, one function each, chosen
by name (`MeloConfig.on_conflict`, the table PLACEMENTS at the end).

Rules for a new edit with answer L and key k ("supersede", the default):
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

Every function changes the state only through its setters (index.py), so a change that
cannot be written to disk can be rolled back.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from .index import ClusterState, Point, normalize_label

# A conflict splits two clusters at the midpoint of their centers, the old one just inside,
# the new one just past it.
SPLIT_MARGIN = 1e-3


@dataclass
class Placement:
    """What adding one key did to the index."""

    action: str                 # "new" | "joined" | "conflict" | "beside" | "superseded"
    cluster: str
    distance: float | None      # to the nearest center before the edit
    forgotten: list[str]        # edit ids that fell out of a shrunk cluster (on_conflict="forget")
    moved: dict[str, str] = field(default_factory=dict)   # edit id -> its new cluster (on_conflict="keep")
    superseded: list[str] = field(default_factory=list)   # edits of the same question, now dormant


def add(state: ClusterState, edit_id: str, key: torch.Tensor, block: int, target: str, init_radius: float,
        on_conflict: str = "supersede", same_question: Callable[[str], bool] | None = None) -> Placement:
    """Place a new edit's key by the rule named `on_conflict`. `same_question(edit_id)`:
    whether an earlier edit asks the same question as the new one (router.py's verifier);
    without it, every edit within the init radius does."""
    if on_conflict not in PLACEMENTS:
        raise ValueError(f"unknown on_conflict {on_conflict!r} ({', '.join(PLACEMENTS)})")
    return PLACEMENTS[on_conflict](state, edit_id, key, block, normalize_label(target), init_radius,
                                   same_question or (lambda _: True))


def supersede(state: ClusterState, edit_id: str, key: torch.Tensor, block: int, label: str,
              init_radius: float, same: Callable[[str], bool]) -> Placement:
    near_ids, _ = state.keys.within(key, init_radius)
    same_question = [e for e in near_ids if state.points[e].label != label and same(e)]
    for e in same_question:
        p = state.points[e]
        state.drop_point(e, init_radius)
        state.put_dormant(dataclasses.replace(p, superseded_by=edit_id))
    placed = place(state, edit_id, key, block, label, init_radius)
    if same_question:
        placed.action, placed.superseded = "superseded", same_question
    return placed


def place(state: ClusterState, edit_id: str, key: torch.Tensor, block: int, label: str,
          init_radius: float) -> Placement:
    """Join the cluster of the nearest edit with the same answer within the init radius,
    else open one ("beside" when another cluster is within the paper's reach)."""
    near, d = state.nearest(key)
    d = None if near is None else d
    # Join only an edit of the same answer that asks the same question (within the init
    # radius of it). The paper's reach (radius + init radius) let facts that merely share
    # an answer ("English") merge into clusters spanning half the key space.
    mates = sorted(state.by_label.get(label, ()))
    same = None
    if mates:
        dm = (state.keys.exact[state.keys.rows_of(mates)] - key).norm(dim=-1)
        j = int(dm.argmin())
        same = state.points[mates[j]].cluster if float(dm[j]) <= init_radius else None
    if same is not None:
        _join(state, same, Point(edit_id, key.clone(), block, same, label), init_radius)
        return Placement("joined", same, d, [], {})
    action = "beside" if near is not None and d <= near.radius + init_radius else "new"
    c = state.new_cluster(key, init_radius, label, edit_id)
    state.put_point(Point(edit_id, key.clone(), block, c.id, label))
    return Placement(action, c.id, d, [], {})


def _join(state: ClusterState, cid: str, point: Point, init_radius: float) -> None:
    state.put_point(point)
    c = state.changing(cid)
    c.members.append(point.edit_id)
    state.refit(c, init_radius)
    state.put_cluster(c)


def _split(state: ClusterState, edit_id: str, key: torch.Tensor, block: int, label: str, init_radius: float,
           forget: bool) -> Placement:
    """The paper's rule. On a conflict, members of the shrunk cluster that fall outside it
    are forgotten (`forget`) or each moved into a one-point cluster of its own that stops
    short of the new key: their edits keep working and the new edit's key still routes to it."""
    near, d = state.nearest(key)
    forgotten: list[str] = []
    moved: dict[str, str] = {}
    if near is None or d > near.radius + init_radius:
        c = state.new_cluster(key, init_radius, label, edit_id)
        state.put_point(Point(edit_id, key.clone(), block, c.id, label))
        return Placement("new", c.id, None if near is None else d, [], {})
    if near.label == label:
        _join(state, near.id, Point(edit_id, key.clone(), block, near.id, label), init_radius)
        return Placement("joined", near.id, d, [], {})
    # Conflict: the new edit gets its own cluster; the two meet halfway, and the old
    # cluster's members now outside its shrunk radius are forgotten or re-homed.
    c = state.new_cluster(key, 0.5 * d * (1 + SPLIT_MARGIN), label, edit_id)
    old = state.changing(near.id)
    old.radius = min(old.radius, 0.5 * d * (1 - SPLIT_MARGIN))
    outside = [e for e in old.members if float((state.points[e].key - old.center).norm()) > old.radius]
    old.members = [e for e in old.members if e not in outside]
    state.put_cluster(old) if old.members else state.del_cluster(old.id)
    for e in outside:
        p = state.points[e]
        state.del_point(e)
        if forget:
            forgotten.append(e)
            continue
        # Half way to the new key at most, so the new edit's key stays outside it.
        d_new = float((p.key - key).norm())
        home = state.new_cluster(p.key, min(init_radius, 0.5 * d_new * (1 - SPLIT_MARGIN)), p.label, e)
        state.put_point(dataclasses.replace(p, cluster=home.id))
        moved[e] = home.id
    state.put_point(Point(edit_id, key.clone(), block, c.id, label))
    return Placement("conflict", c.id, d, forgotten, moved)


def keep(state, edit_id, key, block, label, init_radius, same=None) -> Placement:
    return _split(state, edit_id, key, block, label, init_radius, forget=False)


def forget(state, edit_id, key, block, label, init_radius, same=None) -> Placement:
    return _split(state, edit_id, key, block, label, init_radius, forget=True)


def remove(state: ClusterState, edit_id: str, init_radius: float) -> list[str]:
    """Take an edit's point out; its cluster re-centres on the rest, or goes if empty.
    Edits it superseded come back; returns their ids. A dormant edit just leaves (what it
    had superseded passes to its own successor)."""
    if edit_id in state.dormant:
        gone = state.dormant[edit_id]
        state.del_dormant(edit_id)
        for p in list(state.dormant.values()):
            if p.superseded_by == edit_id:
                state.put_dormant(dataclasses.replace(p, superseded_by=gone.superseded_by))
        return []
    p = state.points[edit_id]
    c = state.clusters[p.cluster]
    radius, alone = c.radius, len(c.members) == 2
    state.drop_point(edit_id, init_radius)
    if alone and p.cluster in state.clusters:   # the one left keeps the radius it had, not more
        rest = state.changing(p.cluster)
        rest.radius = min(rest.radius, radius)
        state.put_cluster(rest)
    back = [e for e, q in state.dormant.items() if q.superseded_by == edit_id]
    for e in back:
        q = state.dormant[e]
        state.del_dormant(e)
        place(state, e, q.key, q.block, q.label, init_radius)
    return back


# The rules by name (MeloConfig.on_conflict).
PLACEMENTS = {"supersede": supersede, "keep": keep, "forget": forget}
