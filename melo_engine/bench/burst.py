"""A burst of questions on one answering thread: whole batches against rows that join the
running generation (decoding.RunningBatch).

The classroom benchmark's slowest asks were a burst: one question starts a generation and
three more arrive within three seconds. With whole batches the late ones wait for the first
to end and then share a batch of their own; joining, each starts at the running
generation's next token. This measures that alone, without the class around it: the same
burst (seeded arrival times, real questions, the app's token budget), answered by an
AnswerBatcher with one thread both ways, the two ways taking turns so that both see the same
machine. A question alone is timed first, in the same run.
"""
from __future__ import annotations

import json
import random
import statistics
import threading
import time

from .base import Benchmark, print_table
from .data import ROOT
from .machine import machine


def _burst(batcher, questions: list[str], arrivals: list[float], limit: int) -> list[float]:
    """Seconds from arrival to answer for each question, arriving at `arrivals` (seconds)."""
    from melo_engine.batching import Row

    took = [0.0] * len(questions)
    start = time.perf_counter()

    def ask(i):
        time.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
        t0 = time.perf_counter()
        batcher.generate([Row(questions[i], None, limit, True)])
        took[i] = time.perf_counter() - t0

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return took


def burst(size: int = 4, within: float = 3.0, rounds: int = 3, seed: int = 0, model: str | None = None,
          limit: int | None = None) -> dict:
    from melo_engine.backbone import Backbone
    from melo_engine.batching import AnswerBatcher, Row
    from melo_engine.config import DEFAULT_MODEL, MeloConfig

    model = model or DEFAULT_MODEL
    bb = Backbone.load(model)
    limit = limit or MeloConfig().max_new_tokens                              # the app's answer budget
    pool = json.loads((ROOT / "assets" / "unrelated_questions.json").read_text())
    rng = random.Random(seed)
    batcher = AnswerBatcher(bb, slots=1)
    try:
        batcher.generate([Row(pool[0], None, limit, True)])                    # warm-up
        alone = []
        for q in pool[1:4]:
            t0 = time.perf_counter()
            batcher.generate([Row(q, None, limit, True)])
            alone.append(time.perf_counter() - t0)
        runs = {"whole batches": [], "joining": []}
        for r in range(rounds):
            questions = rng.sample(pool, size)
            arrivals = [0.0] + sorted(rng.uniform(0.2, within) for _ in range(size - 1))
            for way in (list(runs) if r % 2 == 0 else list(reversed(runs))):   # alternate who goes first
                batcher.joins = way == "joining"
                runs[way].append({"arrivals": arrivals, "seconds": _burst(batcher, questions, arrivals, limit)})
    finally:
        batcher.close()
    one = statistics.median(alone)
    res = {"machine": machine(), "model": model, "burst_size": size, "arrivals_within_seconds": within,
           "rounds": rounds, "token_budget": limit, "ask_alone_seconds": one, "ask_alone_all": alone}
    for way, got in runs.items():
        worst = [max(run["seconds"]) for run in got]
        key = way.replace(" ", "_")
        res[key] = got
        res[f"{key}_slowest_median_seconds"] = statistics.median(worst)
        res[f"{key}_slowest_over_alone"] = statistics.median(worst) / one
        res[f"{key}_mean_seconds"] = statistics.mean(s for run in got for s in run["seconds"])
    return res


def _add_arguments(p) -> None:
    p.add_argument("--size", type=int, default=4, help="questions in a burst")
    p.add_argument("--within", type=float, default=3.0, help="seconds over which the later ones arrive")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default=None)
    p.add_argument("--json", default=None, help="also write the figures to this file")


def _run(args) -> dict:
    res = burst(args.size, args.within, args.rounds, model=args.model)
    print_table({k: v for k, v in res.items() if not isinstance(v, list)})
    return res


BENCH = Benchmark("burst", "a burst of questions: whole batches against joining the running generation",
                  _add_arguments, _run)
