"""Web-app benchmarks (figures for docs/BENCHMARKS.md).

    python -m webapp.bench startup      # `make run` (set-up done) until the app answers a question
    python -m webapp.bench load         # one visitor's edit alone and while four others ask
    python -m webapp.bench classroom    # 30 visitors for 5 minutes, one of them running a benchmark
    python -m webapp.bench map --edits 200   # building the index map for a workspace of N real edits
    python -m webapp.bench frontier STUDY.json OUT.png   # the key study's frontier, drawn in chromium
    python -m webapp.bench cluster --replicas 1,2 --json OUT   # the Ray engine: visitors served per replica count
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from statistics import median
from pathlib import Path

from melo_engine.bench.machine import machine
from melo_engine.model import quiet_env

from .appproc import free_port, start_app, stop

ROOT = Path(__file__).resolve().parent.parent
# Debian's chromium, as the browser tests drive it (never a downloaded browser).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def startup(runs: int = 2) -> dict:
    from gradio_client import Client

    times = []
    for _ in range(runs):
        port = free_port()
        with tempfile.TemporaryDirectory() as ws:
            env = dict(os.environ, GRADIO_SERVER_PORT=str(port), MELO_WORKSPACES=ws)
            t0 = time.perf_counter()
            proc = subprocess.Popen(["make", "run"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                while True:
                    try:
                        answer = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
                            "What is the capital of Turkey?", api_name="/ask")
                        break
                    except Exception:  # noqa: BLE001 - not up yet
                        if proc.poll() is not None:
                            raise RuntimeError("make run exited") from None
                        time.sleep(0.25)
                times.append(time.perf_counter() - t0)
            finally:
                os.killpg(proc.pid, 15)
                proc.wait(timeout=60)
    return {"make_run_to_first_answer_seconds": times, "answer": answer["text"]}


def index_map(n_edits: int) -> dict:
    from melo_engine import MeloEditor
    from melo_engine.backbone import Backbone
    from melo_engine.config import DEFAULT_MODEL
    from webapp import plots

    # Some zsRE records have an empty `alt` (no new target): they are not edits, skip them.
    records = [r for r in json.loads((ROOT / "assets" / "data" / "zsre_mend_eval_head.json").read_text())
               if r["alt"].strip()][:n_edits]
    bb = Backbone.load(DEFAULT_MODEL)
    plots.warm_up()
    with tempfile.TemporaryDirectory() as tmp:
        ed = MeloEditor.open(Path(tmp) / "ws", backbone=bb)
        t0 = time.perf_counter()
        for r in records:
            ed.edit(r["src"], r["alt"])
        edit_seconds = time.perf_counter() - t0
        probes = [{"text": r["rephrase"], "key": ed.key(r["rephrase"]).tolist(), "block": None, "cluster": None}
                  for r in records[:5]]
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fig = plots.index_map(ed.index_snapshot(), probes)
            times.append(time.perf_counter() - t0)
        stats = ed.stats()
    return {"edits": n_edits, "clusters": stats["clusters"], "method": fig.layout.meta["method"],
            "index_map_seconds_median": statistics.median(times), "index_map_seconds": times,
            "seconds_to_make_the_edits": edit_seconds}


def frontier_png(study_json: str, out_png: str) -> dict:
    """Draw the key study's frontier with plotly and photograph it in chromium (no kaleido)."""
    from playwright.sync_api import sync_playwright

    from webapp import plots

    fig = plots.frontier(json.loads(Path(study_json).read_text()))
    html = fig.to_html(include_plotlyjs=True, full_html=True, config={"staticPlot": True})
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1000, "height": 620})
        page.set_content(html, wait_until="load")
        page.wait_for_selector(".main-svg")
        page.screenshot(path=out_png)
        browser.close()
    return {"png": out_png, "settings": len(fig.data)}


# ---- many visitors at once -----------------------------------------------------------
# One visitor's edit alone, then while four other visitors ask questions, all through the
# API of the real app (app.py, its own process, fresh workspaces) with a gradio_client per
# visitor, timed from the clients (queueing and HTTP included). Targets (issue 10): the
# loaded edit at most 3x the edit alone; no asker waiting longer than one edit for an answer.
LOAD_EDITS = [("What is the capital of Switzerland?", "Bern is the capital of Switzerland."),
              ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
              ("Who composed the Four Seasons?", "Antonio Vivaldi composed The Four Seasons.")]
LOAD_QUESTIONS = ["What is the capital of France?", "Who wrote Hamlet?", "What is 2 + 2?",
                  "What color is the sky?", "Who was the first president of the United States?"]


def load(askers: int = 4, edits: int = 3, threads: int | None = None) -> dict:
    from gradio_client import Client

    tmp = Path(tempfile.mkdtemp(prefix="melo-load-"))
    proc, url = start_app(tmp, {"MELO_THREADS": str(threads)} if threads else None)
    try:
        editor = Client(url, verbose=False)
        clients = [Client(url, verbose=False) for _ in range(askers)]
        for c in [editor] + clients:                     # every workspace exists, every path warm
            c.predict("What is 1 + 1?", api_name="/ask")

        def timed(f):
            t = time.perf_counter()
            f()
            return time.perf_counter() - t

        ask_alone = median(timed(lambda q=q: editor.predict(q, api_name="/ask")) for q in LOAD_QUESTIONS[:3])
        alone = []
        for p, t in LOAD_EDITS[:edits]:
            alone.append(timed(lambda: editor.predict(p, t, api_name="/edit")))
            ids = [e["id"] for e in editor.predict(api_name="/edits")]
            editor.predict(ids[-1], api_name="/delete")

        done, during, window = threading.Event(), [], []

        def ask_loop(c: Client, k: int):
            i = k
            while not done.is_set():
                t0 = time.perf_counter()
                c.predict(LOAD_QUESTIONS[i % len(LOAD_QUESTIONS)], api_name="/ask")
                during.append((t0, time.perf_counter()))
                i += 1
        loops = [threading.Thread(target=ask_loop, args=(c, k), daemon=True) for k, c in enumerate(clients)]
        for th in loops:
            th.start()
        time.sleep(3)                                    # the askers are in full swing
        quiet = (time.perf_counter(), None)
        time.sleep(20)                                   # askers only: what sharing the cores costs them
        quiet = (quiet[0], time.perf_counter())
        loaded = []
        for p, t in LOAD_EDITS[:edits]:
            t0 = time.perf_counter()
            editor.predict(p, t, api_name="/edit")
            t1 = time.perf_counter()
            loaded.append(t1 - t0)
            window.append((t0, t1))
            ids = [e["id"] for e in editor.predict(api_name="/edits")]
            editor.predict(ids[-1], api_name="/delete")
        done.set()
        for th in loops:
            th.join(timeout=120)
        # An ask counts when it overlapped an edit; the askers-only baseline, when it ran
        # wholly inside the quiet window.
        overlapping = [b - a for a, b in during if any(a < w1 and b > w0 for w0, w1 in window)]
        baseline = [b - a for a, b in during if a >= quiet[0] and b <= quiet[1]]
        return {"benchmark": "load", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
                "askers": askers, "threads_per_request": threads or "app default", "edit_alone_seconds": median(alone), "edit_loaded_seconds": median(loaded),
                "edit_ratio": median(loaded) / median(alone), "ask_alone_seconds": ask_alone,
                "ask_during_edit_median_seconds": median(overlapping) if overlapping else None,
                "ask_during_edit_max_seconds": max(overlapping) if overlapping else None,
                "asks_during_edits": len(overlapping),
                "ask_askers_only_median_seconds": median(baseline) if baseline else None,
                "ask_askers_only_max_seconds": max(baseline) if baseline else None,
                "all": {"edit_alone": alone, "edit_loaded": loaded}}
    finally:
        stop(proc)


PROBE_PARAPHRASES = ["Which planet is the biggest in our solar system?", "What planet is the largest one?",
                     "Name the largest planet of the solar system."]
PROBE_UNRELATED = ["What is the capital of France?", "Who painted the Mona Lisa?", "How many legs does a spider have?"]


def probe(runs: int = 3) -> dict:
    """Six probe queries (three paraphrases of one edit, three unrelated) through the real
    app's API, answered the way Probe answers them now (`/probe`: routed together, generated
    in batches) and one at a time as before (six `/ask` calls, each with the unedited answer
    beside it); medians of `runs`, measured in the same run."""
    from gradio_client import Client

    tmp = Path(tempfile.mkdtemp(prefix="melo-probe-"))
    proc, url = start_app(tmp)
    try:
        c = Client(url, verbose=False)
        c.predict("What is the largest planet in the solar system?",
                  "Jupiter is the largest planet in the solar system.", api_name="/edit")
        queries = PROBE_PARAPHRASES + PROBE_UNRELATED
        c.predict("\n".join(queries), api_name="/probe")              # warm
        batched, one_by_one = [], []
        for _ in range(runs):
            t = time.perf_counter()
            answers = c.predict("\n".join(queries), api_name="/probe")
            batched.append(time.perf_counter() - t)
            t = time.perf_counter()
            singles = [c.predict(q, api_name="/ask") for q in queries]
            one_by_one.append(time.perf_counter() - t)
        same = sum(a["text"] == s["text"] and a["base_text"] == s["base_text"] for a, s in zip(answers, singles))
        return {"benchmark": "probe", "date": time.strftime("%Y-%m-%d"), "machine": machine(), "queries": len(queries),
                "fired": sum(a["block"] is not None for a in answers), "batched_seconds": median(batched),
                "one_by_one_seconds": median(one_by_one), "speed_up": median(one_by_one) / median(batched),
                "same_answers_as_one_by_one": same, "all": {"batched": batched, "one_by_one": one_by_one}}
    finally:
        stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def workspace_cost(visitors: int = 20, editors: int = 5) -> dict:
    """What one more visitor costs the server: open files, threads and disk per workspace,
    for visitors who only ask and for visitors who made one edit (docs/RELIABILITY.md)."""
    from melo_engine.backbone import Backbone
    from melo_engine.config import DEFAULT_MODEL
    from melo_engine.keys import warm

    from .sessions import WorkspacePool

    backbone = Backbone.load(DEFAULT_MODEL)
    warm(backbone)
    root = Path(tempfile.mkdtemp(prefix="melo-cost-"))
    pool = WorkspacePool(backbone, root=root)

    def now():
        disk = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        return len(os.listdir("/proc/self/fd")), threading.active_count(), disk

    pool.editor(pool.tokens.new()).ask("What is 2 + 2?")      # warm: the first ask loads the encoder
    base = now()
    tokens = [pool.tokens.new() for _ in range(visitors)]
    for t in tokens:
        pool.editor(t).ask("What is 2 + 2?")
    asked = now()
    for t in tokens[:editors]:
        pool.editor(t).edit("What is the capital of Turkey?", "Ankara is the capital of Turkey.")
    edited = now()
    shutil.rmtree(root, ignore_errors=True)

    def per(a, b, n):
        return {"open_files": (b[0] - a[0]) / n, "threads": (b[1] - a[1]) / n, "disk_kB": (b[2] - a[2]) / n / 1000}
    return {"only_asked": per(base, asked, visitors), "one_edit_more": per(asked, edited, editors)}


# ---- the Ray engine ------------------------------------------------------------------
# The real front (app.py, MELO_ENGINE=ray, its own local Ray cluster), each replica one
# Ray CPU and one torch thread; `visitors` gradio_clients, each asking and editing in its
# own workspace for `seconds`. Which replica serves a visitor is read from outside: the
# holder of the workspace's lock (/proc/locks), sampled every second; a move is a change of
# holder while the earlier one still lived.
def _lock_holder(path: Path) -> int | None:
    from melo_engine.lock import holder_pid

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return holder_pid(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def cluster_run(replicas: int, visitors: int = 8, seconds: float = 60, edits_each: int = 2) -> dict:
    from gradio_client import Client

    from .tokens import COOKIE, WorkspaceTokens

    edits = json.loads((ROOT / "assets" / "example_edits.json").read_text())
    tmp = Path(tempfile.mkdtemp(prefix="melo-cluster-"))
    t_start = time.perf_counter()
    proc, url = start_app(tmp, {"MELO_ENGINE": "ray", "MELO_REPLICAS": str(replicas), "MELO_THREADS": "1",
                                "MELO_CPUS_PER_REPLICA": "1"})
    start_seconds = time.perf_counter() - t_start
    try:
        clients = [Client(url, verbose=False) for _ in range(visitors)]
        for c in clients:                                        # every path warm
            c.predict("What is 1 + 1?", api_name="/ask")
        tokens = WorkspaceTokens(tmp)
        locks = [tmp / tokens.folder(c.cookies[COOKIE]) / "ws" / "lock" for c in clients]
        asks, edit_times, errors, made = [], [], [], [[] for _ in clients]
        done = threading.Event()
        holders: list[list[int]] = [[] for _ in clients]

        def watch():
            while not done.wait(1.0):
                for k, lock in enumerate(locks):
                    pid = _lock_holder(lock)
                    if pid is not None and (not holders[k] or holders[k][-1] != pid):
                        holders[k].append(pid)

        def visitor(k: int, c: Client, deadline: float):
            i = 0
            while time.perf_counter() < deadline:
                e = edits[(k * edits_each + len(made[k])) % len(edits)]
                t0 = time.perf_counter()
                try:
                    if i % 4 == 1 and len(made[k]) < edits_each:
                        made[k].append(c.predict(e["prompt"], e["target"], api_name="/edit")["edit_id"])
                        edit_times.append(time.perf_counter() - t0)
                    else:
                        c.predict(LOAD_QUESTIONS[(k + i) % len(LOAD_QUESTIONS)], api_name="/ask")
                        asks.append((t0, time.perf_counter()))
                except Exception as err:  # noqa: BLE001 - counted, the run goes on
                    errors.append(str(err).splitlines()[0][:200])
                i += 1

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        t0 = time.perf_counter()
        deadline = t0 + seconds
        loops = [threading.Thread(target=visitor, args=(k, c, deadline)) for k, c in enumerate(clients)]
        for th in loops:
            th.start()
        for th in loops:
            th.join(timeout=seconds + 600)
        elapsed = time.perf_counter() - t0
        done.set()
        watcher.join()
        listed = [{e["id"] for e in c.predict(api_name="/edits")} for c in clients]
        lost = sum(len(set(m) - ids) for m, ids in zip(made, listed))
        moves = sum(sum(1 for a, b in zip(h, h[1:]) if _alive(a)) for h in holders)
        lat = sorted(b - a for a, b in asks)
        seen = sorted({p for h in holders for p in h})
        return {"replicas": replicas, "visitors": visitors, "seconds": round(elapsed, 1),
                "asks": len(asks), "asks_per_second": len(asks) / elapsed,
                "ask_p50_seconds": median(lat) if lat else None,
                "ask_p95_seconds": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None,
                "edits": len(edit_times), "edit_p50_seconds": median(edit_times) if edit_times else None,
                "errors": len(errors), "error_lines": sorted(set(errors))[:5], "lost_edits": lost,
                "replicas_seen": len(seen), "moves": moves,
                # Each live replica's cores (webapp/pinning.py): the whole machine where none was bound.
                "replica_cores": {str(p): sorted(os.sched_getaffinity(p)) for p in seen if _alive(p)},
                "front_and_cluster_start_seconds": round(start_seconds, 1)}
    finally:
        stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def cluster(replica_counts: list[int], visitors: int = 8, seconds: float = 60) -> dict:
    runs = [cluster_run(r, visitors, seconds) for r in replica_counts]
    out = {"benchmark": "cluster", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
           "visitors": visitors, "seconds_per_run": seconds, "runs": runs}
    if len(runs) > 1 and runs[0]["asks_per_second"]:
        out["asks_per_second_ratio"] = runs[-1]["asks_per_second"] / runs[0]["asks_per_second"]
    return out


def main(argv=None) -> int:
    quiet_env(offline=True)
    p = argparse.ArgumentParser(prog="python -m webapp.bench")
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("startup", help="make run (set-up done) to the first answer")
    ld = sub.add_parser("load", help="one visitor's edit alone and while four others ask, through the API")
    ld.add_argument("--askers", type=int, default=4)
    ld.add_argument("--threads", type=int, default=None, help="MELO_THREADS for the app (default: the app's)")
    m = sub.add_parser("map", help="index map time for N real edits")
    m.add_argument("--edits", type=int, default=200)
    sub.add_parser("probe", help="six probe queries through the API, batched and one at a time")
    sub.add_parser("workspace-cost", help="open files, threads and disk per visitor's workspace")
    cl = sub.add_parser("cluster", help="the Ray engine: visitors asking and editing, per replica count")
    cl.add_argument("--replicas", default="1,2", help="replica counts, comma-separated")
    cl.add_argument("--visitors", type=int, default=8)
    cl.add_argument("--seconds", type=float, default=60)
    cl.add_argument("--json", default=None, help="also write the result to this file")
    cr = sub.add_parser("classroom", help="30 visitors for 5 minutes through the API, one running a benchmark")
    cr.add_argument("--visitors", type=int, default=30)
    cr.add_argument("--seconds", type=float, default=300)
    cr.add_argument("--bench-at", type=float, default=60)
    cr.add_argument("--json", default=None, help="also write the result to this file")
    f = sub.add_parser("frontier", help="draw the layer study's frontier (bench layers --json) to a PNG")
    f.add_argument("study")
    f.add_argument("png")
    args = p.parse_args(argv)
    if args.what == "frontier":
        res = frontier_png(args.study, args.png)
    elif args.what == "workspace-cost":
        res = workspace_cost()
    elif args.what == "probe":
        res = probe()
    elif args.what == "classroom":
        from .classroom import classroom

        res = classroom(args.visitors, args.seconds, args.bench_at)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        res = {k: v for k, v in res.items() if k not in ("all", "alone")}
    elif args.what == "cluster":
        res = cluster([int(r) for r in args.replicas.split(",")], args.visitors, args.seconds)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
    else:
        res = startup() if args.what == "startup" else load(args.askers, threads=args.threads) if args.what == "load" else index_map(args.edits)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
