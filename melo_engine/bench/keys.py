"""Key study: which key source routes held-out phrasings to an edit of the same fact, at a
fixed routing locality? Routing only, no training: minutes, not hours.

For each key (source x whitening fit) and dataset:
- edits: zsRE, the paper protocol's 1000-edit stream; CounterFact, all 161 prompts;
- generality: a held-out phrasing counts if its nearest edit asks the *same fact* and lies
  within the radius (with the paper protocol several edits share a fact);
- negatives, which must not fire: zsRE, the NQ questions of the stream plus every phrasing
  of the sample's facts that the stream never edits (same style, other subjects: the hard
  case); CounterFact, the 161 locality prompts (other subjects, same relation: harder).
The radius is set so that a share `locality` of the negatives stays outside every edit
(an oracle radius, the same for every key, so keys compare fairly); the row also shows
what the engine's own calibrated radius gives, since that is what a user gets.

Whitening fits: "zsre" = pairs of phrasings of one zsRE fact (all 596 facts: overlaps the
zsRE slice), "counterfact" = CounterFact's prompt/rephrase pairs (overlaps CounterFact),
"other" = the dataset *not* being measured (disjoint: the honest figure).
"""
from __future__ import annotations

import time

import torch

from .data import counterfact_records, load_stream, zsre_phrasings
from .machine import machine

LOCALITY = 0.99


def zsre_pairs() -> tuple[list[str], list[str]]:
    """Each phrasing of a zsRE fact paired with the fact's first phrasing."""
    first, a, b = {}, [], []
    for p in zsre_phrasings():
        if p.fact in first:
            a.append(first[p.fact])
            b.append(p.prompt)
        else:
            first[p.fact] = p.prompt
    return a, b


def counterfact_pairs() -> tuple[list[str], list[str]]:
    recs = counterfact_records()
    return [r["prompt"] for r in recs], [r["rephrase_prompt"] for r in recs]


def fact_generality(edit_keys, edit_facts, gen_keys, gen_facts, radius) -> float:
    d = torch.cdist(gen_keys, edit_keys)
    dmin, arg = d.min(1)
    ok = [edit_facts[int(j)] == f and float(m) <= radius for j, f, m in zip(arg, gen_facts, dmin)]
    return sum(ok) / len(ok)


def key_study(locality: float = LOCALITY, shrinks=(0.1, 0.3, 0.6)) -> dict:
    from melo_engine.backbone import Backbone
    from melo_engine.calibrate import calibration_distances
    from melo_engine.config import DEFAULT_MODEL, MeloConfig
    from melo_engine.keys import Whitening

    bb = Backbone.load(DEFAULT_MODEL)
    cfg = MeloConfig().resolved(bb.num_layers)
    sources = {
        "model": lambda qs: bb.keys_of(qs, cfg.key_layer, cfg.key_reduction, "cosine"),
        "sentence": lambda qs: bb.sentence_encoder().encode(qs),
    }
    zs = load_stream("zsre", 1000, "paper")
    edited = {p.fact for p in zs.edits}
    unedited = [p.prompt for p in zsre_phrasings() if p.fact not in edited]
    cf = load_stream("counterfact", 161)
    sets = {
        "zsre": (zs.edits, zs.generality, zs.locality + unedited),
        "counterfact": (cf.edits, cf.generality, cf.locality),
    }
    pairs = {"zsre": zsre_pairs(), "counterfact": counterfact_pairs()}
    rows = []
    for source, embed in sources.items():
        cache = {}

        def keys(qs):
            missing = [q for q in dict.fromkeys(qs) if q not in cache]
            if missing:
                cache.update(zip(missing, embed(missing)))
            return torch.stack([cache[q] for q in qs])

        fits = {}
        for name, (a, b) in pairs.items():
            fits[name] = (keys(a), keys(b))
        for dataset, (edits, gen, neg) in sets.items():
            e, g, n = keys([p.prompt for p in edits]), keys([p.prompt for p in gen]), keys(neg)
            ef, gf = [p.fact for p in edits], [p.fact for p in gen]
            other = "counterfact" if dataset == "zsre" else "zsre"
            variants = [("none", None, None)]
            for fit in (dataset, other):
                for s in shrinks:
                    variants.append((f"{'same' if fit == dataset else 'other'}:{fit}", s,
                                     Whitening.fit(*fits[fit], shrink=s)))
            calib = calibration_distances(lambda qs: keys(qs))
            for fit_name, shrink, w in variants:
                f = (lambda x: x) if w is None else w.apply
                ek, gk, nk = f(e), f(g), f(n)
                nearest_neg = torch.cdist(nk, ek).min(1).values
                radius = float(torch.quantile(nearest_neg, 1 - locality))
                cal_radius = float(torch.quantile(f_calib(calib, f), 0.05))
                rows.append({
                    "source": source, "whitening": fit_name, "shrink": shrink, "dataset": dataset,
                    "radius": radius, "generality": fact_generality(ek, ef, gk, gf, radius),
                    "calibrated_radius": cal_radius,
                    "generality_at_calibrated": fact_generality(ek, ef, gk, gf, cal_radius),
                    "locality_at_calibrated": float((nearest_neg > cal_radius).float().mean()),
                })
                print(rows[-1], flush=True)
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "locality": locality, "rows": rows}


def f_calib(calib, f):
    keys, subjects = calib
    from melo_engine.calibrate import nearest_other_subject

    return nearest_other_subject(f(keys), subjects)


def print_keys(res: dict) -> None:
    print(f"generality at routing locality {res['locality']} (oracle radius), and at the calibrated radius")
    print(f"{'source':9} {'whitening':18} {'shrink':>6} {'dataset':12} {'gen':>6} {'radius':>7} "
          f"{'cal.r':>6} {'gen@cal':>7} {'loc@cal':>7}")
    for r in res["rows"]:
        print(f"{r['source']:9} {r['whitening']:18} {r['shrink'] if r['shrink'] is not None else '-':>6} "
              f"{r['dataset']:12} {r['generality']:6.3f} {r['radius']:7.3f} {r['calibrated_radius']:6.3f} "
              f"{r['generality_at_calibrated']:7.3f} {r['locality_at_calibrated']:7.3f}")
