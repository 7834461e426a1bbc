"""Radius calibration and the reference data behind keys: a radius in the units of *this*
model's and key source's keys, from reference questions, never a hand-picked number.

Both come from the bundled zsRE sample (596 facts, one subject each, several phrasings):

- Unwhitened model keys (the paper's neuron index): questions of records 826-1125, each
  one's distance to its nearest question about *another* subject, 5 % quantile. Measured on
  200 zsRE edits: it put 64 % of paraphrases inside their edit's radius and kept 97 % of
  held-out questions away from all 200 edits.
- Sentence keys (and whitened keys of either source): the whitening is fitted on
  paraphrase pairs of the *first* half of the facts; the radius is calibrated on every
  phrasing of the *second* half, so that fit and calibration never share a fact (a
  whitening fitted on a fact pushes its neighbours apart and would widen the radius). The
  radius lies halfway between how far the phrasings of one fact spread (99th percentile of
  each phrasing's farthest sibling: 0.73 for the default key) and how near a question about
  another subject comes (1st percentile of the nearest one: 0.90). A low quantile of the
  second alone was unstable: the 0.5 % quantile jumped from 0.68 to 0.87 between
  neighbouring ranks, and at 0.87 3 % of CounterFact's same-relation questions fired.
- Completion mode, any key: a prompt is a point in a text the model continues, and the
  nearest other prompt is the same text a sentence earlier or later (a question's wording
  spreads; a passage's continuation points do not). The radius is half the 1st percentile
  of the distance between consecutive continuation points of one passage (the header, then
  each of the model's first two sentences after it; assets/calibration_passages.json,
  zsRE subjects of the calibration half): the paper's split rule (half the distance)
  applied ahead of time, so one point's correction does not fire at the next.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import MeloConfig
from .model import cache_dir

ASSETS = Path(__file__).resolve().parent.parent / "assets"
RADIUS_QUANTILE = 0.05
REFERENCE_SLICE = slice(826, 1126)
SPREAD_QUANTILE, OTHER_QUANTILE = 0.99, 0.01
POINTS_QUANTILE = 0.01


def _zsre() -> list[dict]:
    return json.loads((ASSETS / "data" / "zsre_mend_eval_head.json").read_text())


def reference_questions() -> tuple[list[str], list[str]]:
    """(questions, their subjects) for calibrating unwhitened model keys."""
    records = _zsre()[REFERENCE_SLICE]
    return [r["src"] for r in records], [r["subject"] for r in records]


def _facts() -> dict[str, list[str]]:
    """Every distinct phrasing of each zsRE fact, facts in the sample's order."""
    out: dict[str, list[str]] = {}
    for r in _zsre():
        for q in (r["src"], r["rephrase"]):
            if q not in out.setdefault(r["subject"], []):
                out[r["subject"]].append(q)
    return out


def whitening_pairs() -> tuple[list[str], list[str]]:
    """Paraphrase pairs (each phrasing with its fact's first) of the first half of the facts."""
    facts = list(_facts().values())
    a, b = [], []
    for qs in facts[: len(facts) // 2]:
        a += [qs[0]] * (len(qs) - 1)
        b += qs[1:]
    return a, b


def calibration_questions() -> tuple[list[str], list[str]]:
    """Every phrasing of the second half of the facts, with its subject."""
    facts = list(_facts().items())
    qs, subjects = [], []
    for subject, phrasings in facts[len(facts) // 2:]:
        qs += phrasings
        subjects += [subject] * len(phrasings)
    return qs, subjects


def passage_header(name: str) -> str:
    """How a passage about `name` begins (the paper's hallucination prompts; the calibration
    passages begin the same way)."""
    return f"This is a Wikipedia passage about {name}."


def continuation_points() -> list[tuple[str, str]]:
    """Consecutive continuation points (a, b) of the reference passages: the header and the
    header with the first sentence, that and the header with both sentences."""
    data = json.loads((ASSETS / "calibration_passages.json").read_text())
    out = []
    for p in data["passages"]:
        points = [passage_header(p["name"])]
        for sentence in p["sentences"]:
            points.append(f"{points[-1]} {sentence}")
        out += list(zip(points, points[1:]))
    return out


def nearest_other_subject(keys: torch.Tensor, subjects: list[str]) -> torch.Tensor:
    """Each key's distance to the nearest key of a question about another subject."""
    d = torch.cdist(keys, keys)
    same = torch.tensor([[a == b for b in subjects] for a in subjects])
    d[same] = float("inf")
    return d.min(1).values


def farthest_same_subject(keys: torch.Tensor, subjects: list[str]) -> torch.Tensor:
    """For each key with a sibling (another phrasing of its subject), the farthest one."""
    d = torch.cdist(keys, keys)
    same = torch.tensor([[a == b for b in subjects] for a in subjects])
    same.fill_diagonal_(False)
    d[~same] = -1.0
    far = d.max(1).values
    return far[far >= 0]


def calibrated_radius(backbone, cfg: MeloConfig, keyer=None) -> float:
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
    if keyer is None:
        from .keys import Keyer

        keyer = Keyer(backbone, cfg)
    if passages:
        pairs = continuation_points()
        a, b = keyer.keys([x for x, _ in pairs]), keyer.keys([y for _, y in pairs])
        radius = 0.5 * float(torch.quantile((a - b).norm(dim=-1), POINTS_QUANTILE))
        qs = pairs
    elif split:
        qs, subjects = calibration_questions()
        keys = keyer.keys(qs)
        spread = float(torch.quantile(farthest_same_subject(keys, subjects), SPREAD_QUANTILE))
        other = float(torch.quantile(nearest_other_subject(keys, subjects), OTHER_QUANTILE))
        radius = 0.5 * (spread + other)
    else:
        qs, subjects = reference_questions()
        radius = float(torch.quantile(nearest_other_subject(keyer.keys(qs), subjects), RADIUS_QUANTILE))
    known[name] = {"radius": radius, "fingerprint": backbone.fingerprint, "prompts": len(qs)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".calibration-{os.getpid()}.json")
    tmp.write_text(json.dumps(known, indent=1))
    tmp.replace(cache)
    return radius
