"""Scale: what one edit, ask, delete and reopen cost in a workspace that already holds N edits.

For each N a fresh process builds a workspace of N synthetic edits through the bulk path
(bulk.bulk_add: random unit keys, random rank-r blocks of the real shapes, stored like
real ones), then measures, on the real model:
- edit_seconds / ask_seconds / delete_seconds: medians of three real edits, asks, deletes;
- route_ms: the routing lookup alone (key given), median over 300 queries, and how many of
  them route differently from brute-force exact search (route_disagreements; must be 0);
- compact_seconds: writing the whole workspace as one snapshot (once per COMPACT_EVERY commits);
- bytes_per_edit: everything on disk (chroma included) / N, and edit_bytes: what one real edit
  added to the disk;
- reopen_seconds: MeloEditor.open in a new process (model already loaded there), and that
  process's peak_rss_mb after one ask.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

from melo_engine import MeloEditor
from melo_engine.backbone import Backbone
from melo_engine.config import DEFAULT_MODEL

from .base import Benchmark
from .bulk import bulk_add
from .machine import machine

REAL_EDITS = [
    ("What is the capital of Switzerland?", "Bern is the capital of Switzerland."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet."),
]
ASKS = ["What is the boiling point of water?", "Who wrote Hamlet?", "What is the capital of Japan?"]


def synthetic_chunks(n: int, dim: int, shapes: dict[str, tuple[int, int]], rank: int, seed: int = 0,
                     chunk: int = 1000):
    """Chunks of (prompt, target, key, blocks) for bulk_add: random unit keys and random
    blocks of the given module shapes (out, in), scaled like trained ones."""
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        keys = torch.nn.functional.normalize(torch.randn(m, dim, generator=g), dim=-1)
        mats = {mod: (0.02 * torch.randn(m, rank, i, generator=g), 0.02 * torch.randn(m, o, rank, generator=g))
                for mod, (o, i) in shapes.items()}
        yield [(f"synthetic question {start + j}", f"synthetic answer {start + j}", keys[j],
                {mod: (a[j], b[j]) for mod, (a, b) in mats.items()}) for j in range(m)]


def brute_force_route(state, q: torch.Tensor) -> str | None:
    """The edit that should fire, by exhaustive float32 search over the clusters and members."""
    ids = list(state.clusters)
    if not ids:
        return None
    centers = torch.stack([state.clusters[c].center for c in ids])
    radii = torch.tensor([state.clusters[c].radius for c in ids])
    cover = ((centers - q).norm(dim=-1) <= radii).nonzero().flatten().tolist()
    members = [e for i in cover for e in state.clusters[ids[i]].members]
    return min(members, key=lambda e: float((state.points[e].key - q).norm()), default=None)


def measure_one(n: int, root: Path, model: str = DEFAULT_MODEL) -> dict:
    """Build a workspace of n edits under root and measure it (run in a process of its own)."""
    bb = Backbone.load(model)
    ws = root / f"ws-{n}"
    shutil.rmtree(ws, ignore_errors=True)
    ed = MeloEditor.open(ws, backbone=bb)
    shapes = {m: (bb.loras[m].out_features, bb.loras[m].in_features) for m in ed.modules}
    t0 = time.perf_counter()
    bulk_add(ed, synthetic_chunks(n, ed.keyer.dim, shapes, ed.config.rank_per_block))
    build = time.perf_counter() - t0
    disk = ed.store.disk_bytes()

    # Routing alone: 100 queries near stored keys (mostly fire), 100 random, 100 real questions.
    g = torch.Generator().manual_seed(1)
    state = ed.state
    stored = list(state.points.values())[: 100]
    near = [torch.nn.functional.normalize(p.key + 0.02 * torch.randn(p.key.shape, generator=g), dim=0)
            for p in stored]
    rand = list(torch.nn.functional.normalize(torch.randn(100, ed.keyer.dim, generator=g), dim=-1))
    real = list(ed.keyer.keys([f"Question number {i}: what is {w}?" for i, w in enumerate(["water", "fire", "air"] * 34)][:100]))
    queries = near + rand + real
    times, disagree, fired = [], 0, 0
    for q in queries:
        t = time.perf_counter()
        r = ed.state.route(q)
        times.append(time.perf_counter() - t)
        disagree += r.edit_id != brute_force_route(state, q)
        fired += r.edit_id is not None

    edit_s, ask_s, delete_s, edit_bytes = [], [], [], []
    for (prompt, target), question in zip(REAL_EDITS, ASKS):
        before = ed.store.disk_bytes()
        r = ed.edit(prompt, target)
        edit_s.append(r.seconds)
        edit_bytes.append(ed.store.disk_bytes() - before)
        t = time.perf_counter()
        ed.ask(question)
        ask_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        ed.delete(r.edit_id)
        delete_s.append(time.perf_counter() - t)
    t = time.perf_counter()
    ed.compact()
    compact = time.perf_counter() - t
    build_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ed.close()

    reopen = json.loads(subprocess.run(
        [sys.executable, "-m", "melo_engine.bench.scale", "reopen", str(ws), model],
        capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    return {"edits": n, "edit_seconds": median(edit_s), "ask_seconds": median(ask_s),
            "route_ms": 1000 * median(times), "route_ms_p95": 1000 * sorted(times)[int(0.95 * len(times))],
            "route_disagreements": disagree, "route_queries": len(queries), "route_fired": fired,
            "delete_seconds": median(delete_s), "reopen_seconds": reopen["open_seconds"],
            "bytes_per_edit": disk / n if n else float(median(edit_bytes)), "edit_bytes": median(edit_bytes),
            "disk_bytes": disk, "peak_rss_mb": reopen["peak_rss_mb"], "build_peak_rss_mb": build_rss,
            "compact_seconds": compact, "build_seconds": build,
            "all": {"edit_seconds": edit_s, "ask_seconds": ask_s, "delete_seconds": delete_s},
            "threads": torch.get_num_threads()}


def reopen_main(ws: str, model: str) -> None:
    bb = Backbone.load(model)
    t = time.perf_counter()
    ed = MeloEditor.open(ws, backbone=bb)
    seconds = time.perf_counter() - t
    ed.ask(ASKS[0])
    print(json.dumps({"open_seconds": seconds, "edits": len(ed.entries),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


def scale_benchmark(sizes: list[int], root: Path | None = None, keep: bool = False) -> dict:
    """One process per size, one after the other; the figures of one run compare as ratios."""
    made = root is None
    root = Path(root or tempfile.mkdtemp(prefix="melo-scale-"))
    runs = []
    try:
        for n in sizes:
            out = subprocess.run([sys.executable, "-m", "melo_engine.bench.scale", "one", str(n), str(root)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"scale run at {n} edits failed:\n{out.stderr[-2000:]}")
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(format_run(runs[-1]), flush=True)
            if not keep:
                shutil.rmtree(root / f"ws-{n}", ignore_errors=True)
    finally:
        if made and not keep:
            shutil.rmtree(root, ignore_errors=True)
    return {"benchmark": "scale", "date": time.strftime("%Y-%m-%d"), "machine": machine(), "runs": runs}


HEADER = (f"{'edits':>7} {'edit s':>7} {'ask s':>6} {'route ms':>8} {'disagree':>8} {'delete s':>8} "
          f"{'reopen s':>8} {'kB/edit':>8} {'peak MB':>8} {'compact s':>9}")


def format_run(r: dict) -> str:
    return (f"{r['edits']:>7} {r['edit_seconds']:7.2f} {r['ask_seconds']:6.2f} {r['route_ms']:8.2f} "
            f"{r['route_disagreements']:>8} {r['delete_seconds']:8.3f} {r['reopen_seconds']:8.2f} "
            f"{r['bytes_per_edit'] / 1000:8.1f} {r['peak_rss_mb']:8.0f} {r['compact_seconds']:9.2f}")


def _add_arguments(p) -> None:
    p.add_argument("--edits", default="0,1000,10000,100000", help="comma-separated workspace sizes")
    p.add_argument("--root", default=None, help="where to build the workspaces (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the workspaces")
    p.add_argument("--json", default=None)


def _run(args) -> dict:
    print(HEADER, flush=True)
    return scale_benchmark([int(x) for x in args.edits.split(",") if x.strip()], args.root, args.keep)


BENCH = Benchmark("scale", "edit, ask, delete, reopen and disk in workspaces of N edits", _add_arguments, _run)


if __name__ == "__main__":       # the per-size and reopen processes
    from melo_engine.model import quiet_env

    quiet_env(offline=True)
    if sys.argv[1] == "one":
        print(json.dumps(measure_one(int(sys.argv[2]), Path(sys.argv[3]))), flush=True)
    elif sys.argv[1] == "reopen":
        reopen_main(sys.argv[2], sys.argv[3])
    os._exit(0)      # chroma's threads need not be waited for
