"""Key study: which key source routes held-out phrasings to an edit of the same fact, at a
fixed routing locality? Routing only, no training: minutes, not hours.

For each key (source x whitening) and dataset:
- edits: zsRE, the paper protocol's 1000-edit stream; CounterFact, all 161 prompts;
- generality: a held-out phrasing counts if its nearest edit asks the *same fact* and lies
  within the radius (with the paper protocol several edits share a fact);
- negatives, which must not fire: zsRE, the NQ questions of the stream plus every phrasing
  of the sample's facts that the stream never edits (same style, other subjects: the hard
  case); CounterFact, the 161 locality prompts (other subjects, same relation: harder).
The oracle radius lets a share `locality` of the negatives stay outside every edit (the
same for every key, so keys compare fairly); the row also shows the engine's own
calibrated radius (melo_engine/calibrate.py), since that is what a user gets.

Whitening: "none"; "zsre-half" = the engine's, fitted on paraphrase pairs of the first
half of the zsRE facts (the zsRE stream draws from all facts, so it overlaps there;
CounterFact is disjoint); "counterfact" = fitted on CounterFact's prompt/rephrase pairs
(disjoint from zsRE, overlapping CounterFact). Disjoint figures: zsRE with "counterfact",
CounterFact with "zsre-half".
"""
from __future__ import annotations

import time

import torch

from .base import Benchmark
from .data import counterfact_records, load_stream, zsre_phrasings
from .machine import machine

LOCALITY = 0.99


def counterfact_pairs() -> tuple[list[str], list[str]]:
    recs = counterfact_records()
    return [r["prompt"] for r in recs], [r["rephrase_prompt"] for r in recs]


def fact_generality(edit_keys, edit_facts, gen_keys, gen_facts, radius) -> float:
    d = torch.cdist(gen_keys, edit_keys)
    dmin, arg = d.min(1)
    ok = [edit_facts[int(j)] == f and float(m) <= radius for j, f, m in zip(arg, gen_facts, dmin)]
    return sum(ok) / len(ok)


def key_study(locality: float = LOCALITY) -> dict:
    import dataclasses

    from melo_engine.backbone import Backbone
    from melo_engine.calibrate import (RADIUS_QUANTILE, SPREAD_QUANTILE, OTHER_QUANTILE, farthest_same_subject,
                                       nearest_other_subject)
    from melo_engine.refdata import calibration_questions, reference_questions, whitening_pairs
    from melo_engine.config import DEFAULT_MODEL, MeloConfig
    from melo_engine.keys import WHITENING_SHRINK, Keyer, Whitening

    bb = Backbone.load(DEFAULT_MODEL)
    zs = load_stream("zsre", 1000, "paper")
    edited = {p.fact for p in zs.edits}
    unedited = [p.prompt for p in zsre_phrasings() if p.fact not in edited]
    cf = load_stream("counterfact", 161)
    sets = {"zsre": (zs.edits, zs.generality, zs.locality + unedited),
            "counterfact": (cf.edits, cf.generality, cf.locality)}
    rows = []
    for source in ("sentence", "model"):
        keyer = Keyer(bb, dataclasses.replace(MeloConfig(key_source=source, key_whitening=False)
                                              .for_backbone(bb)))
        cache = {}

        def keys(qs):
            missing = [q for q in dict.fromkeys(qs) if q not in cache]
            if missing:
                cache.update(zip(missing, keyer.raw(missing)))
            return torch.stack([cache[q] for q in qs])

        fits = {"none": None,
                "zsre-half": Whitening.fit(*(keys(x) for x in whitening_pairs()), shrink=WHITENING_SHRINK),
                "counterfact": Whitening.fit(*(keys(x) for x in counterfact_pairs()), shrink=WHITENING_SHRINK)}
        cq, cs = calibration_questions()
        rq, rs = reference_questions()
        for fit, w in fits.items():
            f = (lambda x: x) if w is None else w.apply
            if source == "model" and w is None:      # the engine's rule for the paper's key
                cal = float(torch.quantile(nearest_other_subject(f(keys(rq)), rs), RADIUS_QUANTILE))
            else:
                ck = f(keys(cq))
                cal = 0.5 * (float(torch.quantile(farthest_same_subject(ck, cs), SPREAD_QUANTILE))
                             + float(torch.quantile(nearest_other_subject(ck, cs), OTHER_QUANTILE)))
            for dataset, (edits, gen, neg) in sets.items():
                ek, gk, nk = f(keys([p.prompt for p in edits])), f(keys([p.prompt for p in gen])), f(keys(neg))
                ef, gf = [p.fact for p in edits], [p.fact for p in gen]
                nearest_neg = torch.cdist(nk, ek).min(1).values
                radius = float(torch.quantile(nearest_neg, 1 - locality))
                rows.append({
                    "source": source, "whitening": fit, "dataset": dataset,
                    "disjoint": fit == "none" or (fit == "counterfact") == (dataset == "zsre"),
                    "radius": radius, "generality": fact_generality(ek, ef, gk, gf, radius),
                    "calibrated_radius": cal, "generality_at_calibrated": fact_generality(ek, ef, gk, gf, cal),
                    "locality_at_calibrated": float((nearest_neg > cal).float().mean()),
                })
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "locality": locality, "rows": rows}


def print_keys(res: dict) -> None:
    print(f"generality at routing locality {res['locality']} (oracle radius), and at the engine's calibrated radius")
    print(f"{'source':9} {'whitening':12} {'dataset':12} {'disjoint':8} {'gen':>6} {'radius':>7} "
          f"{'cal.r':>6} {'gen@cal':>7} {'loc@cal':>7}")
    for r in res["rows"]:
        print(f"{r['source']:9} {r['whitening']:12} {r['dataset']:12} {str(r['disjoint']):8} {r['generality']:6.3f} "
              f"{r['radius']:7.3f} {r['calibrated_radius']:6.3f} {r['generality_at_calibrated']:7.3f} "
              f"{r['locality_at_calibrated']:7.3f}")


def _add_arguments(p) -> None:
    p.add_argument("--json", default=None)


def _run(args) -> dict:
    res = key_study()
    print_keys(res)
    return res


BENCH = Benchmark("keys", "key study: generality at fixed routing locality per key source", _add_arguments, _run)
