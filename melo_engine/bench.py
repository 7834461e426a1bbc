"""Benchmarks: `python -m melo_engine.bench speed` (cost of editing and routing on this machine),
`python -m melo_engine.bench keys` (which key routes paraphrases best),
`python -m melo_engine.bench edits` (sequential editing, MELO against GRACE and plain LoRA) and
`python -m melo_engine.bench routing` (where N edits' index sends prompts and paraphrases).

Prints a table and, with --json OUT, writes the figures. Numbers are measured, never
asserted: docs/BENCHMARKS.md records them with the machine and date.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from melo_engine.model import quiet_env

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def _load_seconds(cache: str) -> float:
    """Time to load the default model in a fresh process with MELO_CACHE=cache."""
    code = ("import time; t=time.perf_counter(); from melo_engine.model import load_model; load_model(); "
            "print(time.perf_counter()-t)")
    env = dict(os.environ, MELO_CACHE=cache, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def speed(n_edits: int = 10, gen_tokens: int = 32) -> dict:
    import torch

    from melo_engine import MeloEditor
    from melo_engine.backbone import Backbone
    from melo_engine.config import DEFAULT_MODEL

    with tempfile.TemporaryDirectory() as tmp:
        cold = _load_seconds(tmp)          # converts the GGUF into the empty cache
        cached = _load_seconds(tmp)        # loads the safetensors written just before

    bb = Backbone.load(DEFAULT_MODEL)
    edits = json.loads((ROOT / "assets" / "example_edits.json").read_text())[:n_edits]
    unrelated = json.loads((ROOT / "assets" / "unrelated_questions.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        ed = MeloEditor.open(Path(tmp) / "ws", backbone=bb)
        results = [ed.edit(e["prompt"], e["target"]) for e in edits]
        per_edit = [r.seconds for r in results]
        steps = [r.steps for r in results]

        # Routing = what a query costs to decide its block: reduce the key (taken from the
        # prefill forward, which generation runs anyway), query chroma, gather the block.
        route_t = []

        def choose(key):
            t0 = time.perf_counter()
            r = ed.index.route(key)
            active = ed.bank.gather([r.block], ed.modules)
            route_t.append(time.perf_counter() - t0)
            return active, r

        c = ed.config
        prompts = [e["prompt"] for e in edits] + [e["paraphrase"] for e in edits] + unrelated
        def plain(q):
            bb.generate(q, None, gen_tokens, min_new_tokens=gen_tokens)
        def routed(q):
            bb.generate_routed(q, c.key_layer, c.key_reduction, c.distance, choose, gen_tokens,
                               min_new_tokens=gen_tokens)
        plain(prompts[0]); routed(prompts[0])          # warm-up
        route_t.clear()
        t_plain, t_routed = [], []
        for q in prompts:                              # interleaved, so drift hits both alike
            t0 = time.perf_counter(); plain(q); t1 = time.perf_counter(); routed(q); t2 = time.perf_counter()
            t_plain.append(t1 - t0)
            t_routed.append(t2 - t1)
        fired = sum(1 for q in prompts if ed.route(q).block is not None)
        key_t = []
        for q in prompts:
            t0 = time.perf_counter(); ed.key(q); key_t.append(time.perf_counter() - t0)
        stats = ed.stats()
        state_bytes = sum(p.stat().st_size for p in Path(ed.workspace).glob("state-*.safetensors"))
        ed.close()

    return {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "model": DEFAULT_MODEL,
        "edits": len(per_edit),
        "median_seconds_per_edit": statistics.median(per_edit),
        "max_seconds_per_edit": max(per_edit),
        "median_steps_per_edit": statistics.median(steps),
        "median_route_ms": 1000 * statistics.median(route_t),
        "median_standalone_key_ms": 1000 * statistics.median(key_t),
        "prompts_timed": len(prompts),
        "prompts_with_a_block": fired,
        "generation_seconds_plain": sum(t_plain),
        "generation_seconds_routed": sum(t_routed),
        "generation_overhead_percent": 100 * (sum(t_routed) / sum(t_plain) - 1),
        "generated_tokens_per_prompt": gen_tokens,
        "trainable_params_per_edit": stats["trainable_params_per_edit"],
        "bytes_per_edit_estimate": stats["bytes_per_edit"],
        "bytes_per_edit_on_disk": state_bytes // max(1, len(per_edit)),
        "load_seconds_cold": cold,
        "load_seconds_cached": cached,
    }


FRONTIER_LOCALITY = (0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 1.0)


def key_study(n_edits: int = 200, layers=(3, 5, 8, 10, 12, 15, 18), locality: float = 0.99) -> dict:
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
    from melo_engine.calibrate import reference_questions
    from melo_engine.config import DEFAULT_MODEL

    bb = Backbone.load(DEFAULT_MODEL)
    records = json.loads((ROOT / "assets" / "data" / "zsre_mend_eval_head.json").read_text())
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


def load_records(dataset: str, n: int) -> list[dict]:
    """The first n usable records of a bundled sample as {prompt, target, paraphrase, locality}.

    zsRE: target = `alt` (the MEND/EasyEdit convention), records with an empty `alt` are
    skipped; locality = the unrelated NQ question `loc`. CounterFact: target = `target_new`,
    locality = `locality_prompt` (a different subject with the same relation: harder).
    """
    if dataset == "zsre":
        raw = json.loads((ROOT / "assets" / "data" / "zsre_mend_eval_head.json").read_text())
        recs = [{"prompt": r["src"], "target": r["alt"], "paraphrase": r["rephrase"], "locality": r["loc"]}
                for r in raw if r["alt"].strip()]
    elif dataset == "counterfact":
        raw = json.loads((ROOT / "assets" / "data" / "counterfact_head.json").read_text())
        recs = [{"prompt": r["prompt"], "target": r["target_new"], "paraphrase": r["rephrase_prompt"],
                 "locality": r["locality_prompt"]} for r in raw]
    else:
        raise ValueError(f"unknown dataset {dataset!r} (zsre, counterfact)")
    return recs[:n]


def edits_benchmark(dataset: str, n: int, methods: list[str], backbone=None, loc_tokens: int = 10,
                    show_progress: bool = True, progress=None, checkpoint=None) -> dict:
    """N sequential edits per method, same records, same order, same model, one run.

    Per method: edit success right after each edit; retention of all earlier edits at every
    N/10 edits and at the end; generality on the paraphrases and locality (agreement with
    the unedited model's first `loc_tokens` greedy tokens) at the end; cost per edit.
    Teacher-forced token accuracy is the headline; greedy exact match is reported beside it.
    `progress(method, edits_done, n)` is called after every edit (the web app's progress bar);
    `checkpoint(partial_result)` at every retention checkpoint, so a long run that is stopped
    still leaves its curve so far (the CLI writes it to --json).
    """
    from tqdm import tqdm

    from melo_engine.backbone import Backbone
    from melo_engine.config import DEFAULT_MODEL
    from melo_engine.evaluate import agreement, exact_match, exact_matches, greedy_batch, token_accuracies, token_accuracy
    from melo_engine.methods import build

    bb = backbone or Backbone.load(DEFAULT_MODEL)
    recs = load_records(dataset, n)
    prompts, targets = [r["prompt"] for r in recs], [r["target"] for r in recs]
    paraphrases, unrelated = [r["paraphrase"] for r in recs], [r["locality"] for r in recs]
    base_loc = greedy_batch(bb, None, unrelated, loc_tokens)
    every = max(1, len(recs) // 10)
    out = {"dataset": dataset, "n": len(recs), "model": DEFAULT_MODEL, "machine": machine(),
           "date": time.strftime("%Y-%m-%d"), "target_field": "alt" if dataset == "zsre" else "target_new",
           "locality_tokens": loc_tokens, "methods": {}}
    for name in methods:
        with tempfile.TemporaryDirectory() as tmp:
            m = build(name, bb, Path(tmp) / "ws")
            success, success_em, seconds, params, curve = [], [], [], [], []
            bar = tqdm(recs, desc=f"{dataset} {name}", disable=not show_progress)
            for i, r in enumerate(bar):
                info = m.edit(r["prompt"], r["target"])
                seconds.append(info["seconds"])
                params.append(info["params"])
                success.append(token_accuracy(bb, m, r["prompt"], r["target"]))
                success_em.append(exact_match(bb, m, r["prompt"], r["target"]))
                if progress is not None:
                    progress(name, i + 1, len(recs))
                if (i + 1) % every == 0 or i + 1 == len(recs):
                    kept = token_accuracies(bb, m, prompts[: i + 1], targets[: i + 1])
                    curve.append({"edits": i + 1, "retention": sum(kept) / len(kept),
                                  "seconds_per_edit": sum(seconds) / len(seconds)})
                    bar.set_postfix(retention=f"{curve[-1]['retention']:.3f}")
                    if checkpoint is not None:
                        out["methods"][name] = {"partial": True, "retention_curve": curve, **m.summary()}
                        checkpoint(out)
            kept_em = exact_matches(bb, m, prompts, targets)
            gen = token_accuracies(bb, m, paraphrases, targets)
            gen_em = exact_matches(bb, m, paraphrases, targets)
            loc = [agreement(base, got) for base, got in zip(base_loc, greedy_batch(bb, m, unrelated, loc_tokens))]
            mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
            out["methods"][name] = {
                "edit_success": mean(success), "edit_success_exact_match": mean(success_em),
                "retention": curve[-1]["retention"], "retention_exact_match": mean(kept_em),
                "generality": mean(gen), "generality_exact_match": mean(gen_em),
                "locality": mean(loc), "seconds_per_edit": mean(seconds),
                "params_per_edit": int(round(mean(params))), "retention_curve": curve, **m.summary(),
            }
            if hasattr(m, "editor"):
                m.editor.close()
    return out


def routing_study(dataset: str, n: int, backbone=None) -> dict:
    """Where MELO's index sends each question once N edits are in it, without training a block.

    Builds the index from the edits' keys alone by the same cluster rules (blocks are
    numbered, not trained), then routes every prompt and paraphrase twice: through chroma
    (what the engine does) and by exact nearest-center search. It separates what routing
    allows from what training achieves: a paraphrase that does not reach its own block can
    only be right by luck. Takes minutes where `edits` takes an hour.
    """
    from melo_engine.backbone import Backbone
    from melo_engine.calibrate import calibrated_radius
    from melo_engine.config import DEFAULT_MODEL, MeloConfig
    from melo_engine.index import ClusterIndex

    bb = backbone or Backbone.load(DEFAULT_MODEL)
    cfg = MeloConfig().resolved(bb.num_layers)
    radius = calibrated_radius(bb, cfg)
    recs = load_records(dataset, n)

    prompts, paraphrases = (bb.keys_of([r[f] for r in recs], cfg.key_layer, cfg.key_reduction, cfg.distance)
                            for f in ("prompt", "paraphrase"))
    with tempfile.TemporaryDirectory() as tmp:
        index = ClusterIndex(Path(tmp))
        for i, (r, k) in enumerate(zip(recs, prompts)):
            state = index.state.copy()
            state.add(f"e{i}", k, i, r["target"], radius, cfg.on_conflict)
            index.commit(state, i + 1)

        def exact_block(key):
            near, d = index.state.nearest(key)
            if d > near.radius:
                return None
            own = min(near.members, key=lambda e: float((index.state.points[e].key - key).norm()))
            return index.state.points[own].block

        out = {"dataset": dataset, "n": len(recs), "model": DEFAULT_MODEL, "machine": machine(),
               "date": time.strftime("%Y-%m-%d"), "init_radius": radius,
               "clusters": len(index.state.clusters)}
        route_ms = []
        for name, ks in (("prompts", prompts), ("paraphrases", paraphrases)):
            routed = []
            for k in ks:
                t0 = time.perf_counter()
                routed.append(index.route(k).block)
                route_ms.append(1000 * (time.perf_counter() - t0))
            exact = [exact_block(k) for k in ks]
            out[name] = {"own_block": sum(b == i for i, b in enumerate(routed)) / len(ks),
                         "other_block": sum(b is not None and b != i for i, b in enumerate(routed)) / len(ks),
                         "no_block": sum(b is None for b in routed) / len(ks),
                         "chroma_differs_from_exact": sum(a != b for a, b in zip(routed, exact))}
        out["route_ms_median"] = statistics.median(route_ms)
        index.close()
    return out


def print_edits_table(res: dict) -> None:
    cols = ["edit_success", "retention", "generality", "locality", "edit_success_exact_match",
            "generality_exact_match", "seconds_per_edit", "params_per_edit"]
    print(f"{res['dataset']}, {res['n']} sequential edits, {res['model']}")
    print(f"{'method':8}" + "".join(f"{c.replace('_exact_match', ' EM'):>18}" for c in cols))
    for name, r in res["methods"].items():
        print(f"{name:8}" + "".join(f"{r[c]:18.3f}" if isinstance(r[c], float) else f"{r[c]:18d}" for c in cols))


def print_table(res: dict) -> None:
    width = max(len(k) for k in res)
    for k, v in res.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")


def main(argv=None) -> int:
    quiet_env(offline=True)
    p = argparse.ArgumentParser(prog="python -m melo_engine.bench")
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed", help="seconds per edit, routing time, generation overhead, sizes, load time")
    s.add_argument("--edits", type=int, default=10)
    s.add_argument("--json", default=None, help="also write the figures to this file")
    k = sub.add_parser("keys", help="key study: generality at fixed locality per layer, reduction, distance")
    k.add_argument("--edits", type=int, default=200)
    k.add_argument("--json", default=None)
    e = sub.add_parser("edits", help="sequential editing: MELO against GRACE and plain LoRA")
    e.add_argument("--dataset", choices=["zsre", "counterfact"], default="zsre")
    e.add_argument("--n", type=int, default=20)
    e.add_argument("--methods", default="melo,grace,lora")
    e.add_argument("--json", default=None)
    r = sub.add_parser("routing", help="where the index of N edits routes their prompts and paraphrases")
    r.add_argument("--dataset", choices=["zsre", "counterfact"], default="zsre")
    r.add_argument("--n", type=int, default=1000)
    r.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.what == "edits":
        def write(partial):
            if args.json:
                Path(args.json).write_text(json.dumps(partial, indent=1))
        res = edits_benchmark(args.dataset, args.n, [m.strip() for m in args.methods.split(",") if m.strip()],
                              checkpoint=write)
        print_edits_table(res)
    elif args.what == "routing":
        res = routing_study(args.dataset, args.n)
        print(f"{res['dataset']}, {res['n']} edits, {res['clusters']} clusters, radius {res['init_radius']:.3f}, "
              f"chroma lookup {res['route_ms_median']:.2f} ms per query (median)")
        for name in ("prompts", "paraphrases"):
            r = res[name]
            print(f"{name:12} own block {r['own_block']:.3f}  other block {r['other_block']:.3f}  "
                  f"no block {r['no_block']:.3f}  chroma differs from exact search: {r['chroma_differs_from_exact']}")
    elif args.what == "keys":
        res = key_study(args.edits)
        print(f"{'layer':>5} {'reduction':10} {'distance':12} {'radius':>8} {'generality':>10} {'nearest=own':>11}")
        for r in res["rows"]:
            print(f"{r['layer']:>5} {r['reduction']:10} {r['distance']:12} {r['radius']:8.3f} {r['generality']:10.3f}"
                  f" {r['nearest_is_own']:11.3f}")
    else:
        res = speed(args.edits)
        print_table(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
