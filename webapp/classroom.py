"""A class on one server: thirty visitors asking, editing and probing for five minutes while
one of them runs a benchmark (`python -m webapp.bench classroom`).

Why. A teacher puts thirty laptops in front of one server; what matters is that a student's
edit comes back in about the time it takes alone, even when someone started a benchmark,
and that nobody sees anybody else's edits. This runs the real app (its own process, the
real model) and drives it through gradio_client, one client (so one workspace) per
visitor, each at a seeded random moment of the window: ask, edit, edit, probe. One visitor
starts a benchmark at `bench_at` seconds. An edit alone and an ask alone are measured in
the same run, before the class arrives, so the ratios compare like with like on a shared
machine.

Leaks: afterwards every visitor's edit list must hold exactly its own edits, and a few
visitors ask another visitor's edited question and must not get that visitor's answer.
"""
from __future__ import annotations

import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

from melo_engine.bench.machine import machine


def _p95(xs: list[float]) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


def classroom(visitors: int = 30, seconds: float = 300, bench_at: float = 60, bench_edits: int = 10,
              seed: int = 0) -> dict:
    from gradio_client import Client

    from melo_engine.bench.data import load_stream

    from .appproc import start_app, stop

    stream = load_stream("zsre", 2 * visitors + 3, "paper")
    facts = [(p.prompt, p.target) for p in stream.edits]
    # Each visitor's edits: two facts of its own, the answer marked with who taught it.
    mine = [[(q, f"{t} (visitor {v})") for q, t in facts[2 * v:2 * v + 2]] for v in range(visitors)]
    spare = facts[2 * visitors:]
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="melo-classroom-"))
    proc, url = start_app(tmp)
    records: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def timed(v: int, op: str, call):
        t0 = time.perf_counter()
        try:
            out = call()
        except Exception as err:  # noqa: BLE001 - every failure a visitor sees is counted
            with lock:
                errors.append(f"visitor {v} {op}: {str(err).splitlines()[0][:200] if str(err) else type(err).__name__}")
            return None
        with lock:
            records.append({"visitor": v, "op": op, "start": round(t0 - start, 3),
                            "seconds": round(time.perf_counter() - t0, 3)})
        return out

    try:
        # Alone: one client, nothing else running (the app warmed up by a first ask).
        solo = Client(url, verbose=False)
        solo.predict("What is 1 + 1?", api_name="/ask")
        ask_alone, edit_alone = [], []
        for q, t in spare:
            t0 = time.perf_counter()
            solo.predict(q, api_name="/ask")
            ask_alone.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            r = solo.predict(q, t, api_name="/edit")
            edit_alone.append(time.perf_counter() - t0)
            solo.predict(r["edit_id"], api_name="/delete")
        clients = [Client(url, verbose=False) for _ in range(visitors)]
        starts = sorted(rng.uniform(0, seconds * 0.8) for _ in range(visitors))
        rng.shuffle(starts)
        start = time.perf_counter()
        bench_result: dict = {}

        def visitor(v: int):
            time.sleep(max(0.0, starts[v] - (time.perf_counter() - start)))
            c = clients[v]
            (q1, t1), (q2, t2) = mine[v]
            timed(v, "ask", lambda: c.predict(q1, api_name="/ask"))
            time.sleep(rng.uniform(2, 8))                 # reading the answer, typing the fix
            timed(v, "edit", lambda: c.predict(q1, t1, api_name="/edit"))
            time.sleep(rng.uniform(2, 8))
            timed(v, "edit", lambda: c.predict(q2, t2, api_name="/edit"))
            time.sleep(rng.uniform(2, 8))
            timed(v, "probe", lambda: c.predict(f"{q1}\n{q2}\nWhat is the capital of France?", api_name="/probe"))

        def benchmarker():
            time.sleep(bench_at)
            t0 = time.perf_counter()
            res = timed(-1, "benchmark", lambda: Client(url, verbose=False).predict(
                bench_edits, "melo,grace,lora", api_name="/benchmark"))
            bench_result.update(started_at=bench_at, seconds=round(time.perf_counter() - t0, 1),
                                finished=bool(res and res.get("methods")))

        threads = [threading.Thread(target=visitor, args=(v,), daemon=True) for v in range(visitors)]
        threads.append(threading.Thread(target=benchmarker, daemon=True))
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=seconds + 1800)
        # Leaks: each visitor's list holds its own edits only; some ask another's question.
        leaks = []
        for v, c in enumerate(clients):
            listed = {(e["prompt"], e["target"]) for e in c.predict(api_name="/edits") if e["status"] == "active"}
            if not listed <= set(mine[v]):
                leaks.append(f"visitor {v} lists edits that are not its own: {sorted(listed - set(mine[v]))[:2]}")
        for v in rng.sample(range(visitors), min(5, visitors)):
            other = (v + 1) % visitors
            q, t = mine[other][0]
            a = clients[v].predict(q, api_name="/ask")
            if f"(visitor {other})" in a["text"]:
                leaks.append(f"visitor {v} got visitor {other}'s answer to {q!r}")
    finally:
        stop(proc)
    edits = [r["seconds"] for r in records if r["op"] == "edit"]
    asks = [r["seconds"] for r in records if r["op"] == "ask"]
    probes = [r["seconds"] for r in records if r["op"] == "probe"]
    edit_alone_s, ask_alone_s = statistics.median(edit_alone), statistics.median(ask_alone)
    bench_window = [r for r in records if r["op"] == "benchmark"]
    during = [r["seconds"] for r in records if r["op"] == "edit" and bench_window
              and bench_at <= r["start"] <= bench_at + bench_window[0]["seconds"]]
    return {
        "benchmark": "classroom", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
        "visitors": visitors, "window_seconds": seconds, "seed": seed,
        "edit_alone_seconds": round(edit_alone_s, 3), "ask_alone_seconds": round(ask_alone_s, 3),
        "edit_median_seconds": round(statistics.median(edits), 3) if edits else None,
        "edit_p95_seconds": _p95(edits), "ask_p95_seconds": _p95(asks),
        "edit_p95_ratio": round(_p95(edits) / edit_alone_s, 2) if edits else None,
        "ask_p95_ratio": round(_p95(asks) / ask_alone_s, 2) if asks else None,
        "edits_while_benchmark_ran": len(during), "edit_p95_while_benchmark_ran_seconds": _p95(during),
        "probe_median_seconds": round(statistics.median(probes), 3) if probes else None,
        "benchmark_ran": bool(bench_window), "benchmark_run": bench_result,
        "requests": len(records), "errors": len(errors), "error_lines": errors[:20],
        "leaks": len(leaks), "leak_lines": leaks[:20],
        "all": records, "alone": {"edit": edit_alone, "ask": ask_alone},
    }
