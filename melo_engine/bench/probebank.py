"""The probe bank at the size a user brings (10,000 questions): how long loading it takes,
how long an edit's side-effect check against it takes, and whether that check is exactly
what brute force (every bank key against the cluster, every one routed) finds.

No training: 20 zsRE edits are placed in a ClusterState from their real keys by the
engine's rules (as bench/routing.py does); the check itself never looks at a block.

    python -m melo_engine.bench probebank --questions 10000 --json docs/results/probebank.json
    python -m melo_engine.bench probebank --write-questions bank.txt   # the bundled bank, for `probes load`
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from ..questionfile import clean_question
from ..refdata import reference_list
from .base import Benchmark
from .data import ROOT, counterfact_records, zsre_records

ASSETS = ROOT / "assets"
REPEATS = 3          # each edit's check is timed this many times (first and best reported)

# Questions about a subject that fit people, places, works and organisations alike: with
# the 757 subjects of the bundled zsRE and CounterFact samples they bring the bundled bank
# past 10,000 questions, and each sits near the real questions about its subject, as an
# eval set's questions would.
TEMPLATES = [
    "What is {} known for?",
    "Where is {} located?",
    "When was {} founded?",
    "Who is {}?",
    "Where was {} born?",
    "Which country is {} from?",
    "What language is associated with {}?",
    "Who created {}?",
    "When did {} first appear?",
    "Why is {} famous?",
    "What is the history of {}?",
    "What kind of thing is {}?",
]


def _question(text: str) -> str:
    """zsRE's locality prompts are Natural Questions lower-case queries ("nq question: who
    sang ..."): made questions."""
    text = text.strip()
    if text.startswith("nq question:"):
        text = text[len("nq question:"):].strip()
        text = text[:1].upper() + text[1:]
        text = text if text.endswith("?") else text + "?"
    return text


def bundled_questions(n: int | None = None) -> list[str]:
    """The bundled probe bank: every distinct question and prompt of the bundled data (zsRE
    src, rephrase, loc; CounterFact prompt, rephrase, locality; the reference and unrelated
    questions), cleaned as the bank keeps them (clean_question: some CounterFact prompts
    hold line breaks), then TEMPLATES over every subject in those samples (shuffled, seed 0), cut
    at `n`. ValueError when fewer than `n` can be made."""
    zs, cf = zsre_records(), counterfact_records()
    real = []
    for r in zs:
        real += [r["src"], r["rephrase"], _question(r["loc"])]
    for r in cf:
        real += [r["prompt"], r["rephrase_prompt"], r["locality_prompt"]]
    real += reference_list()
    real += json.loads((ASSETS / "unrelated_questions.json").read_text())
    subjects = list(dict.fromkeys([r["subject"] for r in zs] + [r["subject"] for r in cf]))
    made = [t.format(s) for t in TEMPLATES for s in subjects]
    random.Random(0).shuffle(made)
    out = list(dict.fromkeys(clean_question(q) for q in real + made if q.strip()))
    if n is not None:
        if len(out) < n:
            raise ValueError(f"the bundled data makes {len(out)} questions, fewer than {n}")
        out = out[:n]
    return out


def _brute_force(state, eid: str, questions, keys, fired: list, n: int):
    """What the check must find, by brute force: exact distances to every bank key
    (torch.cdist without the matmul shortcut), the n nearest and every one routed to eid."""
    import torch

    c = state.clusters[state.points[eid].cluster]
    d = torch.cdist(c.center.float()[None], keys, compute_mode="donot_use_mm_for_euclid_dist")[0]
    order = torch.argsort(d, stable=True).tolist()
    rows = [(questions[i], float(d[i]), fired[i] == eid, fired[i]) for r, i in enumerate(order)
            if r < n or fired[i] == eid]
    return rows, d


def _same(got, want, n: int, tol: float = 1e-5) -> bool:
    """Equal up to ties and float rounding: the same firing questions, the same n nearest
    distances (within `tol`), and as many rows."""
    if sorted(r[0] for r in got if r[2]) != sorted(r[0] for r in want if r[2]) or len(got) != len(want):
        return False
    a, b = sorted(r[1] for r in got)[:n], sorted(r[1] for r in want)[:n]
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def probebank_benchmark(n_questions: int = 10000, n_edits: int = 20, n: int = 8, root=None) -> dict:
    from melo_engine.backbone import Backbone
    from melo_engine.bench.data import load_stream
    from melo_engine.placement import add
    from melo_engine.bench.machine import machine
    from melo_engine.calibrate import calibrated_radius
    from melo_engine.config import DEFAULT_MODEL, MeloConfig
    from melo_engine.index import ClusterState
    from melo_engine.keys import Keyer
    from melo_engine.neighbours import side_effects
    from melo_engine.probebank import ProbeBank, bank_side_effects
    from melo_engine.questionfile import read_questions_file

    t0 = time.perf_counter()
    bb = Backbone.load(DEFAULT_MODEL)
    cfg = MeloConfig().for_backbone(bb)
    keyer = Keyer(bb, cfg)
    radius = calibrated_radius(bb, cfg, keyer)
    keyer.keys(["warm up"])
    setup_s = time.perf_counter() - t0

    tmp = tempfile.TemporaryDirectory()
    root = Path(root) if root else Path(tmp.name) / "probes"
    qfile = Path(tmp.name) / "bank.txt"
    qfile.write_text("\n".join(bundled_questions(n_questions)) + "\n")

    t0 = time.perf_counter()
    bank = ProbeBank.open(keyer, root)
    questions = read_questions_file(qfile)
    added, skipped = bank.add(questions, "bundled")
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = bank.add(read_questions_file(qfile), "bundled")
    readd_s = time.perf_counter() - t0
    bank.close()
    t0 = time.perf_counter()
    bank = ProbeBank.open(keyer, root)
    count = bank.count()
    bank.within(keyer.keys(["warm up"])[0], 0.0, at_least=1)    # chroma loads its index on the first query
    reopen_s = time.perf_counter() - t0

    # 20 edits' worth of clusters from real zsRE keys (no blocks trained).
    stream = load_stream("zsre", n_edits, "counterfactual")
    state = ClusterState()
    ekeys = keyer.keys([r.prompt for r in stream.edits])
    for i, (r, k) in enumerate(zip(stream.edits, ekeys)):
        add(state, f"e{i}", k, i, r.target, radius, cfg.on_conflict)

    # Brute force: every bank key, from chroma, routed once.
    t0 = time.perf_counter()
    all_q, all_k = bank.everything()
    fired = [state.route(k).edit_id for k in all_k]
    brute_route_s = time.perf_counter() - t0

    check_ms, best_ms, memory_ms, rows, exact_side, exact_within = [], [], [], [], 0, 0
    within_checks = 0
    load_avg = [round(x, 2) for x in os.getloadavg()]
    for eid in state.points:
        times = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            got = bank_side_effects(state, eid, bank, n)
            times.append(1000 * (time.perf_counter() - t0))
        check_ms.append(times[0])
        best_ms.append(min(times))
        want, d = _brute_force(state, eid, all_q, all_k, fired, n)
        ok = _same([(r.question, r.distance, r.fires, r.fired_edit) for r in got], want, n)
        exact_side += ok
        t0 = time.perf_counter()
        side_effects(state, eid, all_q, all_k, n)          # today's check, keys in memory
        memory_ms.append(1000 * (time.perf_counter() - t0))
        c = state.clusters[state.points[eid].cluster]
        for scale in (1.0, 1.5, 2.0):
            r = scale * c.radius
            found = {q for q, _ in bank.within(c.center, r)}
            truth = {all_q[i] for i in (d <= r).nonzero().flatten().tolist()}
            within_checks += 1
            exact_within += found == truth
        rows.append({"edit": eid, "prompt": stream.edits[int(eid[1:])].prompt, "ms": round(check_ms[-1], 2), "best_ms": round(best_ms[-1], 2),
                     "rows": len(got), "fires": sum(r.fires for r in got),
                     "within_radius": int((d <= c.radius).sum()), "exact": ok})
        if not ok:
            rows[-1]["got"] = [(r.question, r.distance, r.fires, r.fired_edit) for r in got]
            rows[-1]["brute_force"] = want
    bank.close()
    tmp.cleanup()
    q = statistics.quantiles(check_ms, n=10, method="inclusive")
    return {
        "benchmark": "probebank", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
        "model": DEFAULT_MODEL, "key": cfg.key_name(), "init_radius": radius, "collection": bank.name,
        "questions": count, "edits": len(state.points), "clusters": len(state.clusters), "n_nearest": n,
        "setup_s": round(setup_s, 2),
        "load": {"added": added, "skipped": skipped, "seconds": round(load_s, 2),
                 "questions_per_s": round(added / load_s, 1),
                 "readd_same_file": {"added": again[0], "skipped": again[1], "seconds": round(readd_s, 2)},
                 "reopen_s": round(reopen_s, 3)},
        "side_effect_check_ms": {"median": round(statistics.median(check_ms), 2), "p90": round(q[-1], 2),
                                 "max": round(max(check_ms), 2),
                                 "best_of_3_median": round(statistics.median(best_ms), 2),
                                 "best_of_3_max": round(max(best_ms), 2),
                                 "note": "first check of each edit; best of 3 runs shows the cost without the other "
                                         "processes on the machine (load average in load_average)"},
        "load_average": {"before_checks": load_avg, "after_checks": [round(x, 2) for x in os.getloadavg()]},
        "in_memory_brute_force_ms": {"median": round(statistics.median(memory_ms), 2),
                                     "note": "neighbours.side_effects over all bank keys held in memory"},
        "brute_force_route_all_s": round(brute_route_s, 2),
        "exact": {"side_effects": f"{exact_side}/{len(check_ms)}", "within": f"{exact_within}/{within_checks}",
                  "all": exact_side == len(check_ms) and exact_within == within_checks},
        "per_edit": rows,
    }


def print_probebank(res: dict) -> None:
    lo, s = res["load"], res["side_effect_check_ms"]
    print(f"{res['questions']} questions, key {res['key']}, radius {res['init_radius']:.3f}, {res['machine']}")
    print(f"load: {lo['added']} added in {lo['seconds']:.1f} s ({lo['questions_per_s']:.0f}/s); same file again: "
          f"{lo['readd_same_file']['added']} added, {lo['readd_same_file']['seconds']:.2f} s; reopen {lo['reopen_s']:.3f} s")
    print(f"side-effect check per edit ({res['edits']} edits): median {s['median']:.1f} ms, p90 {s['p90']:.1f} ms, "
          f"max {s['max']:.1f} ms (best of 3: median {s['best_of_3_median']:.1f}, max {s['best_of_3_max']:.1f}); "
          f"load average {res['load_average']['before_checks'][0]}; in-memory brute force {res['in_memory_brute_force_ms']['median']:.1f} ms")
    print(f"equal to brute force: side effects {res['exact']['side_effects']}, within {res['exact']['within']}")


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--questions", type=int, default=10000)
    p.add_argument("--edits", type=int, default=20)
    p.add_argument("--n", type=int, default=8, help="nearest bank questions listed per edit")
    p.add_argument("--root", help="keep the bank here (default: a temporary folder, so loading is measured)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--write-questions", metavar="FILE", help="only write the bundled bank (one question a line)")


def _run(args: argparse.Namespace) -> "dict | int":
    if args.write_questions:
        qs = bundled_questions(args.questions)
        Path(args.write_questions).write_text("\n".join(qs) + "\n")
        print(f"{len(qs)} questions -> {args.write_questions}")
        return 0
    res = probebank_benchmark(args.questions, args.edits, args.n, args.root)
    print_probebank(res)
    return res


BENCH = Benchmark("probebank", "the probe bank: load N questions into chroma once, then time each edit's "
                               "side-effect check against them and compare it with brute force", _arguments, _run)
