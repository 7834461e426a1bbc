"""Layer study for the model's own key (the paper's neuron index): which layer, reduction
and distance route paraphrases to their own edit best, at each routing locality. It chose
layer 10, mean over the question, cosine, for `key_source="model"`; `python -m webapp.bench
frontier` draws its frontier. (`keys.py` compares key *sources*.)"""
from __future__ import annotations

import json
import time

from .base import Benchmark
from .data import DATA
from .machine import machine

FRONTIER_LOCALITY = (0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 1.0)


def layer_study(n_edits: int = 200, layers=(3, 5, 8, 10, 12, 15, 18), locality: float = 0.99) -> dict:
    """Which key (layer, reduction, distance) routes paraphrases to their own edit best?

    Edits: the first n_edits zsRE questions. Negatives: the next n_edits zsRE questions
    (same style, other subjects: the hard case) and the NQ questions of the edits' `loc`.
    For each setting and each routing locality in FRONTIER_LOCALITY, the radius is set so
    that that share of the negatives stays outside every edit; generality is the share of
    paraphrases whose nearest edit is their own and lies within that radius. `rows` holds
    the table at `locality`; `frontier` the whole generality-against-locality curve.
    Distances: l2, cosine, and "standardized" (l2 after scaling each dimension by its mean
    and spread over the calibration questions, which no edit or negative comes from).
    """
    import torch

    from melo_engine.backbone import Backbone, reduce_key
    from melo_engine.refdata import reference_questions
    from melo_engine.config import DEFAULT_MODEL

    bb = Backbone.load(DEFAULT_MODEL)
    records = json.loads((DATA / "zsre_mend_eval_head.json").read_text())
    edits, held = records[:n_edits], records[n_edits:2 * n_edits]
    reductions = ("mean_user", "last_user", "last")

    def keys(questions):
        out = {(l, r): [] for l in layers for r in reductions}
        for i in range(0, len(questions), 32):
            enc = bb.encode(questions[i:i + 32])
            with torch.no_grad():
                hs = bb.model(input_ids=enc.ids, attention_mask=enc.mask, output_hidden_states=True,
                              use_cache=False).hidden_states
            for l in layers:
                for r in reductions:
                    out[(l, r)].append(reduce_key(hs[l + 1], enc, r))
        return {k: torch.cat(v) for k, v in out.items()}

    src = keys([r["src"] for r in edits])
    para = keys([r["rephrase"] for r in edits])
    neg = keys([r["src"] for r in held] + [r["loc"] for r in edits])
    ref = keys(reference_questions()[0])
    rows, frontier = [], []
    for (layer, red) in src:
        mu, sd = ref[(layer, red)].mean(0), ref[(layer, red)].std(0).clamp_min(1e-6)
        transforms = {"l2": lambda x: x, "cosine": lambda x: torch.nn.functional.normalize(x, dim=-1),
                      "standardized": lambda x: (x - mu) / sd}
        for dist, f in transforms.items():
            s, p, n = f(src[(layer, red)]), f(para[(layer, red)]), f(neg[(layer, red)])
            dp = torch.cdist(p, s)
            own = dp.argmin(1) == torch.arange(len(s))
            nearest_neg = torch.cdist(n, s).min(1).values
            curve = []
            for loc in FRONTIER_LOCALITY:
                # Just under the nearest negative at 100 %, so that none of them fires.
                radius = (float(nearest_neg.min()) * (1 - 1e-6) if loc >= 1
                          else float(torch.quantile(nearest_neg, 1 - loc)))
                gen = float((own & (dp.min(1).values <= radius)).float().mean())
                curve.append({"locality": loc, "radius": radius, "generality": gen})
            at = min(curve, key=lambda c: abs(c["locality"] - locality))
            rows.append({"layer": layer, "reduction": red, "distance": dist, "radius": at["radius"],
                         "generality": at["generality"], "nearest_is_own": float(own.float().mean())})
            frontier.append({"layer": layer, "reduction": red, "distance": dist, "curve": curve})
    rows.sort(key=lambda r: -r["generality"])
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "edits": n_edits, "locality": locality,
            "rows": rows, "frontier": frontier}


def print_layers(res: dict) -> None:
    print(f"{'layer':>5} {'reduction':10} {'distance':12} {'radius':>8} {'generality':>10} {'nearest=own':>11}")
    for r in res["rows"]:
        print(f"{r['layer']:>5} {r['reduction']:10} {r['distance']:12} {r['radius']:8.3f} {r['generality']:10.3f}"
              f" {r['nearest_is_own']:11.3f}")


def _add_arguments(p) -> None:
    p.add_argument("--edits", type=int, default=200)
    p.add_argument("--json", default=None)


def _run(args) -> dict:
    res = layer_study(args.edits)
    print_layers(res)
    return res


BENCH = Benchmark("layers", "layer study for the model's own key: generality per layer, reduction, distance",
                  _add_arguments, _run)
