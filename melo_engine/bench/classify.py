"""The paper's first task: sequential edits of a classifier (GRACE's SCOTUS protocol) on the
offline stand-in, WordNet definitions by category on all-MiniLM-L6-v2 (melo_engine/classifier).

The stream is the shifted split's texts the unedited classifier gets wrong, in the
sample's (seeded) order, each edited to its true label. After every edit: edit success
(the text gets its label right after). Every N/10 edits and at the end: TRR (accuracy on
the upstream test split: nothing else broke) and ERR (accuracy on all edits so far: none
forgotten). Run as `python -m melo_engine.bench edits --dataset classification` or
`python -m melo_engine.bench classify`.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from .base import Benchmark, json_checkpoint, key_source_choices
from .machine import machine


def accuracy(predicted: list[str], labels: list[str]) -> float:
    return sum(p == y for p, y in zip(predicted, labels)) / max(1, len(labels))


def classification_benchmark(n: int, methods: list[str], backbone=None, melo_settings: dict | None = None,
                             show_progress: bool = True, checkpoint=None, test_texts: int | None = None,
                             whole_split: bool = True) -> dict:
    """`test_texts`: TRR on the first that many test texts only (None: all); `whole_split`
    False: the unedited classifier reads the shifted split only until it has N wrong texts
    (the suite's short run; the unedited edit-split accuracy is then over what it read)."""
    from tqdm import tqdm

    from melo_engine.classifier.backbone import ClassifierBackbone, load_rows
    from melo_engine.classifier.methods import CLASSIFIER_METHODS

    for m in methods:
        if m not in CLASSIFIER_METHODS:
            raise ValueError(f"unknown method {m!r} ({', '.join(CLASSIFIER_METHODS)})")
    bb = backbone or ClassifierBackbone.load()
    rows = load_rows()
    test = [r for r in rows if r["split"] == "test"][:test_texts]
    shifted = [r for r in rows if r["split"] == "edit"]
    test_x, test_y = [r["text"] for r in test], [r["label"] for r in test]
    base_test = bb.logits(test_x).argmax(-1).tolist()
    base_shift, stream = [], []
    for i in range(0, len(shifted), 64):
        part = shifted[i:i + 64]
        base_shift += [bb.labels[j] for j in bb.logits([r["text"] for r in part]).argmax(-1).tolist()]
        stream += [r for r, p in zip(part, base_shift[i:]) if p != r["label"]]
        if not whole_split and len(stream) >= n:
            break
    shifted = shifted[:len(base_shift)]
    stream = stream[:n]
    if len(stream) < n:
        print(f"note: the shifted split holds {len(stream)} texts the classifier gets wrong; editing those",
              file=sys.stderr)
    every = max(1, len(stream) // 10)
    out = {"dataset": "classification", "protocol": "GRACE SCOTUS (sequential, wrong texts of a shifted split)",
           "n": len(stream), "model": f"{bb.name} (all-MiniLM-L6-v2 + linear head)", "machine": machine(),
           "date": time.strftime("%Y-%m-%d"), "head": bb.head_info, "labels": bb.labels,
           "base": {"trr": accuracy([bb.labels[i] for i in base_test], test_y),
                    "edit_split_accuracy": accuracy(base_shift, [r["label"] for r in shifted]),
                    "test_texts": len(test), "edit_split_texts": len(shifted)},
           "methods": {}}
    for name in methods:
        with tempfile.TemporaryDirectory() as tmp:
            m = CLASSIFIER_METHODS[name](bb, Path(tmp) / "ws", melo_settings if name == "melo" else None)
            success, seconds, params, curve = [], [], [], []
            bar = tqdm(stream, desc=f"classification {name}", disable=not show_progress)
            for i, r in enumerate(bar):
                info = m.edit(r["text"], r["label"])
                seconds.append(info["seconds"])
                params.append(info["params"])
                success.append(float(m.predict([r["text"]])[0] == r["label"]))
                if (i + 1) % every == 0 or i + 1 == len(stream):
                    done = stream[: i + 1]
                    curve.append({"edits": i + 1, "trr": accuracy(m.predict(test_x), test_y),
                                  "err": accuracy(m.predict([x["text"] for x in done]), [x["label"] for x in done]),
                                  "seconds_per_edit": statistics.mean(seconds)})
                    bar.set_postfix(trr=f"{curve[-1]['trr']:.3f}", err=f"{curve[-1]['err']:.3f}")
                    if checkpoint is not None:
                        out["methods"][name] = {"partial": True, "curve": curve}
                        checkpoint(out)
            out["methods"][name] = {
                "edit_success": statistics.mean(success), "trr": curve[-1]["trr"], "err": curve[-1]["err"],
                "seconds_per_edit": statistics.mean(seconds), "median_seconds_per_edit": statistics.median(seconds),
                "params_per_edit": int(round(statistics.mean(params))), "curve": curve, **m.summary()}
            m.close()
    return out


def print_classification_table(res: dict) -> None:
    b = res["base"]
    print(f"classification, {res['n']} sequential edits, {res['model']}")
    print(f"unedited: TRR {b['trr']:.3f}, accuracy on the edit split {b['edit_split_accuracy']:.3f}")
    cols = ["edit_success", "trr", "err", "seconds_per_edit", "median_seconds_per_edit"]
    print(f"{'method':8}" + "".join(f"{c:>24}" for c in cols))
    for name, r in res["methods"].items():
        print(f"{name:8}" + "".join(f"{r[c]:24.3f}" for c in cols))


def run_classification(args) -> dict | int:
    from .base import melo_settings

    try:
        res = classification_benchmark(args.n or 20, [m.strip() for m in args.methods.split(",") if m.strip()],
                                       melo_settings=melo_settings(args), checkpoint=json_checkpoint(args))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_classification_table(res)
    return res


def _add_arguments(p) -> None:
    p.add_argument("--n", type=int, default=None, help="edits (default 20)")
    p.add_argument("--methods", default="melo,grace,lora")
    p.add_argument("--key-source", choices=key_source_choices(), default=None,
                   help="MELO's key source (default: model, the paper's neuron index)")
    p.add_argument("--radius", type=float, default=None, help="MELO's init radius (default: calibrated)")
    p.add_argument("--json", default=None)


BENCH = Benchmark("classify", "the classification task: a BERT classifier edited on a shifted split",
                  _add_arguments, run_classification)
