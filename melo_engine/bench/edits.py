"""Sequential editing: MELO, GRACE and plain LoRA on one stream, one model, one run."""
from __future__ import annotations

import collections
import sys
import tempfile
import time
from pathlib import Path

from .base import Benchmark, add_router, default_methods, json_checkpoint, key_source_choices, melo_settings, method_names
from .data import PROTOCOLS, load_stream, unedited_siblings
from .machine import machine


def edits_benchmark(dataset: str, n: int, methods: list[str], backbone=None, protocol: str | None = None,
                    melo_settings: dict | None = None, loc_tokens: int = 10, show_progress: bool = True,
                    progress=None, checkpoint=None) -> dict:
    """N sequential edits per method, same stream, same order, same model, one run.

    Per method: edit success right after each edit; retention of all earlier edits at every
    N/10 edits and at the end; generality on the stream's held-out phrasings and locality
    (agreement with the unedited model's first `loc_tokens` greedy tokens) at the end; cost
    per edit. Teacher-forced token accuracy is the headline; greedy exact match is reported
    beside it. `melo_settings` are MeloConfig fields for MELO (e.g. key_source).
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
    stream = load_stream(dataset, n, protocol)
    recs = stream.edits
    prompts, targets = [r.prompt for r in recs], [r.target for r in recs]
    base_loc = greedy_batch(bb, None, stream.locality, loc_tokens)
    siblings = [x.prompt for x in unedited_siblings(stream)]
    base_sib = greedy_batch(bb, None, siblings, loc_tokens) if siblings else []
    every = max(1, len(recs) // 10)
    out = {"dataset": dataset, "protocol": stream.protocol, "n": len(recs), "model": bb.name,
           "device": str(bb.device), "prompt_form": bb.prompt_form(),
           "machine": machine(), "date": time.strftime("%Y-%m-%d"), "target_field": stream.target_field,
           "generality_prompts": len(stream.generality), "locality_prompts": len(stream.locality),
           "sibling_prompts": len(siblings),
           "stream": stream.notes, "locality_tokens": loc_tokens, "methods": {}}
    for name in methods:
        with tempfile.TemporaryDirectory() as tmp:
            m = build(name, bb, Path(tmp) / "ws", melo_settings if name == "melo" else None)
            success, success_em, seconds, params, curve = [], [], [], [], []
            actions = collections.Counter()
            bar = tqdm(recs, desc=f"{dataset} {name}", disable=not show_progress)
            for i, r in enumerate(bar):
                info = m.edit(r.prompt, r.target)
                actions[info.get("action", "-")] += 1
                seconds.append(info["seconds"])
                params.append(info["params"])
                success.append(token_accuracy(bb, m, r.prompt, r.target))
                success_em.append(exact_match(bb, m, r.prompt, r.target))
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
            gp, gt = [g.prompt for g in stream.generality], [g.target for g in stream.generality]
            kept_em = exact_matches(bb, m, prompts, targets)
            gen = token_accuracies(bb, m, gp, gt) if gp else [0.0]
            gen_em = exact_matches(bb, m, gp, gt) if gp else [0.0]
            loc = [agreement(base, got) for base, got in
                   zip(base_loc, greedy_batch(bb, m, stream.locality, loc_tokens))]
            # Siblings (same template, another subject): agreement with the unedited answer,
            # and the share whose first tokens stay exactly as they were.
            sib = [agreement(base, got) for base, got in
                   zip(base_sib, greedy_batch(bb, m, siblings, loc_tokens))] if siblings else [1.0]
            mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
            out["methods"][name] = {
                "edit_success": mean(success), "edit_success_exact_match": mean(success_em),
                "retention": curve[-1]["retention"], "retention_exact_match": mean(kept_em),
                "generality": mean(gen), "generality_exact_match": mean(gen_em),
                "locality": mean(loc), "sibling_locality": mean(sib),
                "siblings_unchanged": sum(x == 1.0 for x in sib) / len(sib), "seconds_per_edit": mean(seconds),
                "params_per_edit": int(round(mean(params))), "retention_curve": curve,
                "actions": dict(actions), **m.summary(),
            }
            m.close()
    return out


def print_edits_table(res: dict) -> None:
    cols = ["edit_success", "retention", "generality", "locality", "siblings_unchanged", "edit_success_exact_match",
            "generality_exact_match", "seconds_per_edit", "params_per_edit"]
    print(f"{res['dataset']} ({res['protocol']} protocol), {res['n']} sequential edits, {res['model']}")
    print(f"{'method':8}" + "".join(f"{c.replace('_exact_match', ' EM'):>18}" for c in cols))
    for name, r in res["methods"].items():
        print(f"{name:8}" + "".join(f"{r[c]:18.3f}" if isinstance(r[c], float) else f"{r[c]:18d}" for c in cols))


def _add_arguments(p) -> None:
    p.add_argument("--dataset", choices=list(PROTOCOLS) + ["hallucination", "classification"], default="zsre")
    p.add_argument("--data", default=None,
                   help="hallucination: the WikiBio hallucination set as a file (JSON or JSON lines with "
                        "gpt3_sentences, annotation, wiki_bio_text); default: the bundled stand-in")
    p.add_argument("--protocol", choices=sorted({p for ps in PROTOCOLS.values() for p in ps}), default=None,
                   help="zsre: paper (default) or counterfactual; see melo_engine/bench/data.py")
    p.add_argument("--n", type=int, default=None, help="edits (default 20; hallucination: every edit of the set)")
    p.add_argument("--methods", default=default_methods())
    add_router(p)
    p.add_argument("--key-source", choices=key_source_choices(), default=None,
                   help="MELO's key source (default: the engine's default)")
    p.add_argument("--block-dtype", choices=["float16", "float32"], default=None,
                   help="how MELO stores its blocks (default: the engine's, float16)")
    p.add_argument("--model", default=None,
                   help="another model than the bundled default: a short name (gemma3-270m), hub id or folder "
                        "(the device: $MELO_DEVICE, else a GPU if there is one)")
    p.add_argument("--radius", type=float, default=None,
                   help="MELO's init radius (default: calibrated for the key source and prompt mode)")
    p.add_argument("--json", default=None)
    p.add_argument("--progress", default=None,
                   help="a file rewritten after every edit with 'METHOD DONE TOTAL' (what a front end watches)")


def progress_file(path: str | None):
    """A progress callback that rewrites `path` after every edit (None: no callback)."""
    if not path:
        return None

    def write(name: str, done: int, total: int) -> None:
        Path(path).write_text(f"{name} {done} {total}\n")
    return write


def _run(args) -> dict | int:
    """`--dataset hallucination` is the paper's third task (hallucination.py) and
    `--dataset classification` its first (classify.py), under the same command as zsRE."""
    if args.dataset == "hallucination":
        from .hallucination import run_hallucination

        return run_hallucination(args)
    if args.dataset == "classification":         # the paper's first task (classify.py)
        from .classify import run_classification

        return run_classification(args)
    if args.data:
        print("error: --data is for --dataset hallucination", file=sys.stderr)
        return 2
    try:
        from melo_engine.backbone import Backbone

        methods = method_names(args.methods)
        bb = Backbone.load(args.model) if args.model else None
        res = edits_benchmark(args.dataset, args.n or 20, methods, backbone=bb,
                              protocol=args.protocol, melo_settings=melo_settings(args),
                              checkpoint=json_checkpoint(args), progress=progress_file(args.progress))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_edits_table(res)
    return res


BENCH = Benchmark("edits", "sequential editing: MELO against GRACE and plain LoRA", _add_arguments, _run)
