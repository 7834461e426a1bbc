"""Side effects of an edit, found before anyone asks: which everyday questions now fire it.

An edit fires for every question whose key falls inside its cluster, and some of those are
not paraphrases ("capital of Austria" after an edit of "capital of Switzerland"). Generating
answers to find them would take seconds per question; comparing keys takes milliseconds. So
a bank of reference questions (assets/reference_questions.json: capitals, elements, planets,
painters, ... in the templates a class is likely to edit) has its keys computed once per
model and key setting and cached; after an edit, the bank is routed against the index and
the questions nearest the edit are listed with distance against radius, and whether the
edit now fires for them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import torch

from .model import cache_dir, cached_tensors
from .refdata import phrasing_groups, same_question, side_effect_questions


@dataclass
class Neighbour:
    question: str
    distance: float         # to the center of the edit's cluster
    radius: float           # that cluster's radius
    fires: bool             # routing this question now fires the edit's block
    fired_edit: str | None  # the edit that fires for it (this one, another, or None)
    rejected: str | None = None   # within the radius, but the verifier turned the edit down: why
    # A phrasing of the edited question (the fix should reach it), another question (it
    # should not), or None where the bank cannot say: refdata.phrasing_groups.
    same: bool | None = None


def row(question: str, distance: float, radius: float, edit_id: str, route) -> Neighbour:
    """One question's line of an edit's side-effect check, from its route."""
    why = next((r for e, r in route.rejected if e == edit_id), None)
    return Neighbour(question, distance, radius, route.edit_id == edit_id, route.edit_id, why)


def reference_keys(keyer, questions: list[str] | None = None) -> tuple[list[str], torch.Tensor]:
    """The bank's questions (or `questions`: another workspace kind's reference texts) and
    their keys under this workspace's key setting (cached)."""
    questions = side_effect_questions() if questions is None else list(questions)
    digest = hashlib.sha256("\n".join(questions).encode()).hexdigest()[:12]
    cfg = keyer.cfg
    path = cache_dir() / "reference" / f"{cfg.model}-{cfg.key_name()}-{digest}.safetensors"
    tensors, _ = cached_tensors(path, keyer.backbone.fingerprint,
                                lambda: ({"keys": keyer.keys(questions).float()}, {}))
    return questions, tensors["keys"]


def side_effects(state, edit_id: str, questions: list[str], keys: torch.Tensor, n: int = 8,
                 route=None) -> list[Neighbour]:
    """The `n` reference questions nearest the center of `edit_id`'s cluster, and every one
    that fires the edit, nearest first. `route(question, key)`: how a question is routed
    (default: the index alone, state.route)."""
    route = route or (lambda _q, k: state.route(k))
    point = state.points[edit_id]
    cluster = state.clusters[point.cluster]
    dist = torch.linalg.vector_norm(keys - cluster.center.float()[None], dim=-1)
    out = []
    for i in torch.argsort(dist).tolist():
        if len(out) >= n and float(dist[i]) > cluster.radius:
            break                # farther ones are outside the cluster: none of them fires it
        line = row(questions[i], float(dist[i]), float(cluster.radius), edit_id, route(questions[i], keys[i]))
        if len(out) < n or line.fires:
            out.append(line)
    return out


def phrasings_marked(rows: list[Neighbour], edited: str) -> list[Neighbour]:
    """`rows` with `same` filled in for the edited question `edited`: known only when both
    it and the row's question are in the bank's phrasing groups."""
    groups = phrasing_groups()
    mine = groups.get(same_question(edited))
    return [replace(r, same=None if mine is None or same_question(r.question) not in groups
                    else groups[same_question(r.question)] == mine) for r in rows]


def merged(a: list[Neighbour], b: list[Neighbour], n: int = 8) -> list[Neighbour]:
    """Two side-effect lists of one edit as one: the `n` nearest questions of both, and
    every one that fires the edit, nearest first, each question once."""
    seen, out = set(), []
    for x in sorted(a + b, key=lambda x: x.distance):
        if x.question in seen:
            continue
        seen.add(x.question)
        if len(out) < n or x.fires:
            out.append(x)
    return out
