"""Web-app benchmarks (figures for docs/BENCHMARKS.md).

    python -m webapp.bench startup      # `make run` (set-up done) until the app answers a question
    python -m webapp.bench map --edits 200   # building the index map for a workspace of N real edits
    python -m webapp.bench frontier STUDY.json OUT.png   # the key study's frontier, drawn in chromium
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from melo_engine.model import quiet_env

ROOT = Path(__file__).resolve().parent.parent
# Debian's chromium, as the browser tests drive it (never a downloaded browser).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def startup(runs: int = 2) -> dict:
    from gradio_client import Client

    times = []
    for _ in range(runs):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
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


def main(argv=None) -> int:
    quiet_env(offline=True)
    p = argparse.ArgumentParser(prog="python -m webapp.bench")
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("startup", help="make run (set-up done) to the first answer")
    m = sub.add_parser("map", help="index map time for N real edits")
    m.add_argument("--edits", type=int, default=200)
    f = sub.add_parser("frontier", help="draw the layer study's frontier (bench layers --json) to a PNG")
    f.add_argument("study")
    f.add_argument("png")
    args = p.parse_args(argv)
    if args.what == "frontier":
        res = frontier_png(args.study, args.png)
    else:
        res = startup() if args.what == "startup" else index_map(args.edits)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
