"""python -m melo_engine.bench {speed,keys,edits,routing,scale,layers,standin} [...]: prints a table and, with
--json OUT, writes the figures."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from melo_engine.model import quiet_env

from .data import PROTOCOLS


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
    s.add_argument("--key-source", choices=["model", "sentence"], default=None)
    s.add_argument("--json", default=None, help="also write the figures to this file")
    k = sub.add_parser("keys", help="key study: generality at fixed routing locality per key source")
    k.add_argument("--json", default=None)
    ly = sub.add_parser("layers", help="layer study for the model's own key: generality per layer, reduction, distance")
    ly.add_argument("--edits", type=int, default=200)
    ly.add_argument("--json", default=None)
    e = sub.add_parser("edits", help="sequential editing: MELO against GRACE and plain LoRA")
    e.add_argument("--dataset", choices=list(PROTOCOLS) + ["hallucination"], default="zsre")
    e.add_argument("--data", default=None,
                   help="hallucination: the WikiBio hallucination set as a file (JSON or JSON lines with "
                        "gpt3_sentences, annotation, wiki_bio_text); default: the bundled stand-in")
    e.add_argument("--protocol", choices=sorted({p for ps in PROTOCOLS.values() for p in ps}), default=None,
                   help="zsre: paper (default) or counterfactual; see melo_engine/bench/data.py")
    e.add_argument("--n", type=int, default=None, help="edits (default 20; hallucination: every edit of the set)")
    e.add_argument("--methods", default="melo,grace,lora")
    e.add_argument("--key-source", choices=["model", "sentence"], default=None,
                   help="MELO's key source (default: the engine's default)")
    e.add_argument("--block-dtype", choices=["float16", "float32"], default=None,
                   help="how MELO stores its blocks (default: the engine's, float16)")
    e.add_argument("--model", default=None,
                   help="hallucination: another model than the bundled default (hub id or folder)")
    e.add_argument("--radius", type=float, default=None,
                   help="MELO's init radius (default: calibrated for the key source and prompt mode)")
    e.add_argument("--json", default=None)
    r = sub.add_parser("routing", help="where the index of N edits routes their prompts and held-out phrasings")
    r.add_argument("--dataset", choices=list(PROTOCOLS), default="zsre")
    r.add_argument("--protocol", default=None)
    r.add_argument("--n", type=int, default=1000)
    r.add_argument("--key-source", choices=["model", "sentence"], default=None)
    r.add_argument("--json", default=None)
    st = sub.add_parser("standin", help="write the hallucination stand-in and the completion-mode calibration "
                                        "passages: passages the default model writes")
    st.add_argument("--out", default=None, help="the stand-in only, to this file (default: both, into assets/)")
    sc = sub.add_parser("scale", help="edit, ask, delete, reopen and disk in workspaces of N edits")
    sc.add_argument("--edits", default="0,1000,10000,100000", help="comma-separated workspace sizes")
    sc.add_argument("--root", default=None, help="where to build the workspaces (default: a temporary folder)")
    sc.add_argument("--keep", action="store_true", help="keep the workspaces")
    sc.add_argument("--json", default=None)
    args = p.parse_args(argv)
    settings = {"key_source": args.key_source} if getattr(args, "key_source", None) else {}
    if getattr(args, "block_dtype", None):
        settings["block_dtype"] = args.block_dtype
    if getattr(args, "radius", None) is not None:
        settings["init_radius"] = args.radius
    if args.what == "scale":
        from .scale import HEADER, scale_benchmark

        print(HEADER, flush=True)
        res = scale_benchmark([int(x) for x in args.edits.split(",") if x.strip()], args.root, args.keep)
    elif args.what == "standin":
        from melo_engine.backbone import Backbone
        from melo_engine.config import DEFAULT_MODEL

        from .hallucination import CALIBRATION, STANDIN, build_calibration_passages, build_standin

        bb = Backbone.load(DEFAULT_MODEL)
        res = build_standin(bb)
        Path(args.out or STANDIN).write_text(json.dumps(res, indent=1) + "\n")
        if args.out is None:
            CALIBRATION.write_text(json.dumps(build_calibration_passages(bb), indent=1) + "\n")
        marks = [m for p in res["passages"] for m in p["annotation"]]
        print(f"{len(res['passages'])} passages: {marks.count('inaccurate')} inaccurate sentences (edits), "
              f"{marks.count('accurate')} accurate")
        return 0
    elif args.what == "edits" and args.dataset == "hallucination":
        from .hallucination import hallucination_benchmark, print_hallucination_table

        def write(partial):
            if args.json:
                Path(args.json).write_text(json.dumps(partial, indent=1))
        try:
            res = hallucination_benchmark(args.n, [m.strip() for m in args.methods.split(",") if m.strip()],
                                          data=args.data, melo_settings=settings, checkpoint=write,
                                          model=args.model)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print_hallucination_table(res)
    elif args.what == "edits":
        from .edits import edits_benchmark, print_edits_table

        if args.data or args.model:
            print("error: --data and --model are for --dataset hallucination", file=sys.stderr)
            return 2
        def write(partial):
            if args.json:
                Path(args.json).write_text(json.dumps(partial, indent=1))
        try:
            res = edits_benchmark(args.dataset, args.n or 20, [m.strip() for m in args.methods.split(",") if m.strip()],
                                  protocol=args.protocol, melo_settings=settings, checkpoint=write)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print_edits_table(res)
    elif args.what == "routing":
        from .routing import print_routing, routing_study

        res = routing_study(args.dataset, args.n, protocol=args.protocol, settings=settings)
        print_routing(res)
    elif args.what == "layers":
        from .layers import layer_study

        res = layer_study(args.edits)
        print(f"{'layer':>5} {'reduction':10} {'distance':12} {'radius':>8} {'generality':>10} {'nearest=own':>11}")
        for r in res["rows"]:
            print(f"{r['layer']:>5} {r['reduction']:10} {r['distance']:12} {r['radius']:8.3f} {r['generality']:10.3f}"
                  f" {r['nearest_is_own']:11.3f}")
    elif args.what == "keys":
        from .keys import key_study, print_keys

        res = key_study()
        print_keys(res)
    else:
        from .speed import speed

        res = speed(args.edits, settings=settings)
        print_table(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
