"""Radius calibration: a radius in the units of *this* model's keys, from reference prompts.

Hidden-state distances differ by model, layer and reduction, so a hand-picked number does
not carry over. We take factual questions about many subjects, compute each one's distance
to its nearest question about *another* subject, and use a low quantile of those
distances. Measured on the default model (200 zsRE edits, 200 held-out questions): the
5% quantile (0.19) puts 64% of paraphrases inside their edit's radius, lets a held-out
question fire a single edit 0.015% of the time, and keeps 97% of held-out questions
away from all 200 edits; the 2% quantile gives 47% / 0.005% / 99%.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import MeloConfig
from .model import cache_dir

RADIUS_QUANTILE = 0.05
ASSETS = Path(__file__).resolve().parent.parent / "assets"
# zsRE questions from the end of the bundled sample: the benchmarks draw from its start.
REFERENCE_SLICE = slice(826, 1126)


def reference_questions() -> tuple[list[str], list[str]]:
    """(questions, their subjects) for calibration."""
    records = json.loads((ASSETS / "data" / "zsre_mend_eval_head.json").read_text())[REFERENCE_SLICE]
    return [r["src"] for r in records], [r["subject"] for r in records]


def nearest_other_subject(keys: torch.Tensor, subjects: list[str]) -> torch.Tensor:
    """Each key's distance to the nearest key of a question about another subject."""
    d = torch.cdist(keys, keys)
    same = torch.tensor([[a == b for b in subjects] for a in subjects])
    d[same] = float("inf")
    return d.min(1).values


def calibrated_radius(backbone, cfg: MeloConfig) -> float:
    """The default init radius for this model and key setting (cached under MELO_CACHE)."""
    name = f"{cfg.model}-L{cfg.key_layer}-{cfg.key_reduction}-{cfg.distance}-q{RADIUS_QUANTILE}"
    cache = cache_dir() / "calibration.json"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    entry = known.get(name)
    if entry and entry.get("fingerprint") == backbone.fingerprint:
        return float(entry["radius"])
    qs, subjects = reference_questions()
    keys = backbone.keys_of(qs, cfg.key_layer, cfg.key_reduction, cfg.distance)
    radius = float(torch.quantile(nearest_other_subject(keys, subjects), RADIUS_QUANTILE))
    known[name] = {"radius": radius, "fingerprint": backbone.fingerprint, "prompts": len(qs)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".calibration-{os.getpid()}.json")
    tmp.write_text(json.dumps(known, indent=1))
    tmp.replace(cache)
    return radius
