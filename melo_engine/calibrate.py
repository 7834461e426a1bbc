"""Radius calibration: a radius in the units of *this* model's and key source's keys, from
reference questions (refdata.py), never a hand-picked number. The rules are pure functions
of keys; `calibrated_radius` computes the keys once per model and key setting and caches
the result.

The rules, by key (the figures behind each choice: docs/BENCHMARKS.md, "Key study"):

- Unwhitened model keys (the paper's neuron index): each reference question's distance to
  its nearest question about *another* subject, a low quantile.
- Sentence keys (and whitened keys of either source): the radius lies halfway between how
  far the phrasings of one fact spread (a high quantile of each phrasing's farthest
  sibling) and how near a question about another subject comes (a low quantile of the
  nearest one). A low quantile of the second alone was unstable between neighbouring ranks.
  Fit (whitening) and calibration never share a fact: a whitening fitted on a fact pushes
  its neighbours apart and would widen the radius.
- Completion mode, any key: a prompt is a point in a text the model continues, and the
  nearest other prompt is the same text a sentence earlier or later (a question's wording
  spreads; a passage's continuation points do not). The radius is half a low quantile of
  the distance between consecutive continuation points of one passage: the paper's split
  rule (half the distance) applied ahead of time, so one point's correction does not fire
  at the next.
"""
from __future__ import annotations

import json
import os

import torch

from .config import MeloConfig
from .keys import Keyer
from .model import cache_dir
from .refdata import calibration_questions, continuation_points, reference_questions

RADIUS_QUANTILE = 0.05
SPREAD_QUANTILE, OTHER_QUANTILE = 0.99, 0.01
POINTS_QUANTILE = 0.01


def _same(subjects: list[str]) -> torch.Tensor:
    return torch.tensor([[a == b for b in subjects] for a in subjects])


def nearest_other_subject(keys: torch.Tensor, subjects: list[str]) -> torch.Tensor:
    """Each key's distance to the nearest key of a question about another subject."""
    d = torch.cdist(keys, keys)
    d[_same(subjects)] = float("inf")
    return d.min(1).values


def farthest_same_subject(keys: torch.Tensor, subjects: list[str]) -> torch.Tensor:
    """For each key with a sibling (another phrasing of its subject), the farthest one."""
    d = torch.cdist(keys, keys)
    same = _same(subjects)
    same.fill_diagonal_(False)
    d[~same] = -1.0
    far = d.max(1).values
    return far[far >= 0]


def gap_radius(keys: torch.Tensor, subjects: list[str]) -> float:
    """Halfway between how far phrasings of one subject spread and how near another
    subject's questions come (whitened keys, and the sentence key)."""
    spread = float(torch.quantile(farthest_same_subject(keys, subjects), SPREAD_QUANTILE))
    other = float(torch.quantile(nearest_other_subject(keys, subjects), OTHER_QUANTILE))
    return 0.5 * (spread + other)


def quantile_radius(keys: torch.Tensor, subjects: list[str]) -> float:
    """A low quantile of the distance to another subject's nearest question (the paper's
    unwhitened neuron index)."""
    return float(torch.quantile(nearest_other_subject(keys, subjects), RADIUS_QUANTILE))


def points_radius(a: torch.Tensor, b: torch.Tensor) -> float:
    """Half a low quantile of the distance between consecutive continuation points a[i], b[i]
    (completion mode): the paper's split rule applied ahead of time."""
    return 0.5 * float(torch.quantile((a - b).norm(dim=-1), POINTS_QUANTILE))


def calibrated_radius(backbone, cfg: MeloConfig, keyer: Keyer | None = None) -> float:
    """The default init radius for this model and key setting (cached under MELO_CACHE)."""
    split = cfg.whitened or cfg.key_source != "model"
    passages = cfg.prompt_mode == "completion"
    # The unwhitened model key keeps the name it was cached under before key sources existed.
    name = (f"{cfg.model}-{cfg.key_name()}-completion-points-{POINTS_QUANTILE}" if passages
            else f"{cfg.model}-{cfg.key_name()}-gap-{SPREAD_QUANTILE}-{OTHER_QUANTILE}" if split
            else f"{cfg.model}-L{cfg.key_layer}-{cfg.key_reduction}-{cfg.distance}-q{RADIUS_QUANTILE}")
    cache = cache_dir() / "calibration.json"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    entry = known.get(name)
    if entry and entry.get("fingerprint") == backbone.fingerprint:
        return float(entry["radius"])
    keyer = keyer or Keyer(backbone, cfg)
    if passages:
        qs = continuation_points()
        radius = points_radius(keyer.keys([x for x, _ in qs]), keyer.keys([y for _, y in qs]))
    else:
        qs, subjects = calibration_questions() if split else reference_questions()
        radius = (gap_radius if split else quantile_radius)(keyer.keys(qs), subjects)
    known[name] = {"radius": radius, "fingerprint": backbone.fingerprint, "prompts": len(qs)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".calibration-{os.getpid()}.json")
    tmp.write_text(json.dumps(known, indent=1))
    tmp.replace(cache)
    return radius
