"""MELO Studio: the web app (Hugging Face Spaces entry point; `make run` starts it too).

Environment: GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (where to listen), MELO_MODEL (the
default model, loaded at start: the bundled SmolLM2-135M-Instruct unless it says otherwise;
every other installed bundle, Gemma 3 270M, is offered in Settings and loaded on its first
use: webapp/models.py), MELO_WORKSPACES (the visitors'
workspaces), MELO_IDLE_MINUTES (remove a workspace idle this long; default a day),
MELO_THREADS (torch threads per request; default 1, see below), MELO_TRAIN_WORKERS (edits
trained at once, each worker a process with its own copy of the model; default 2 where
there are two cores or more).

MELO_ENGINE=ray (or `--ray-address ADDRESS`, "auto" for the cluster `ray start` made on this
machine) serves the engine from a Ray Serve deployment instead (webapp/cluster.py; README,
"More than one machine"): this process is then a front that holds no model. MELO_REPLICAS,
MELO_CPUS_PER_REPLICA, MELO_WORKSPACES_PER_REPLICA size it. The default (MELO_ENGINE=local)
is one process and starts no Ray.
"""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from melo_engine.backbone import Backbone  # noqa: E402
from melo_engine.batching import cores_here  # noqa: E402
from melo_engine.config import DEFAULT_MODEL  # noqa: E402
from melo_engine.keys import warm  # noqa: E402

ROOT = Path(__file__).resolve().parent


def load_backbone(name: str, out: dict) -> None:
    """The model and the sentence encoder of the default key, for a thread of its own."""
    try:
        out["backbone"] = Backbone.load(name)
        warm(out["backbone"])
    except BaseException as err:  # noqa: BLE001 - re-raised by main
        out["error"] = err


ENGINES = ("local", "ray")


def engine_choice(argv=None) -> tuple[str, str | None]:
    """(engine, Ray address or None) from the command line and MELO_ENGINE."""
    p = argparse.ArgumentParser(prog="app.py")
    p.add_argument("--ray-address", default=None, help='serve the engine from the Ray cluster at this address '
                                                       '("auto": the one started on this machine)')
    args, _ = p.parse_known_args(argv)
    engine = os.environ.get("MELO_ENGINE", "local").strip().lower() or "local"
    if engine not in ENGINES:
        raise SystemExit(f"MELO_ENGINE={engine!r}: choose one of {', '.join(ENGINES)}")
    return ("ray" if args.ray_address else engine), args.ray_address


def whole_number(name: str, default: int) -> int:
    """A setting from the environment that must be a whole number of at least 1 (one line
    if it is not)."""
    raw = os.environ.get(name, "").strip() or str(default)
    if not raw.isdigit() or int(raw) < 1:
        raise SystemExit(f"{name}={raw!r}: give a whole number of at least 1")
    return int(raw)


def main(argv=None) -> None:
    engine, address = engine_choice(argv)
    if engine == "ray":
        return front(address)
    # Visitors' asks and edits run side by side (one ask per core and one edit at once),
    # each on one thread: with torch's default of one thread per core, every request would
    # start a team of threads that spin waiting for cores the other requests hold.
    # Measured in docs/BENCHMARKS.md ("many visitors at once").
    torch.set_num_threads(whole_number("MELO_THREADS", 1))
    # Two training workers where there are two cores, so that a burst of edits (a class told
    # "now edit") trains two at a time (docs/BENCHMARKS.md, "A class on one server").
    train_workers = whole_number("MELO_TRAIN_WORKERS", min(2, cores_here()))
    # Start-up: the model loads while gradio is imported (both take seconds); the page is built
    # once both are there. Imports below on purpose.
    loaded: dict = {}
    loader = threading.Thread(target=load_backbone, args=(os.environ.get("MELO_MODEL", DEFAULT_MODEL), loaded),
                              name="model-load")
    loader.start()
    from webapp import plots
    from webapp.downloads import Downloads
    from webapp.layout import build_demo
    from webapp.sessions import WorkspacePool

    loader.join()
    if "error" in loaded:
        raise loaded["error"]
    # Edits train in processes of their own (melo_engine/trainproc.py), started by the pool.
    pool = WorkspacePool(loaded["backbone"], idle_seconds=60 * float(os.environ.get("MELO_IDLE_MINUTES", 24 * 60)),
                         train_workers=train_workers)
    pool.start_sweeper(every_seconds=min(60.0, pool.idle.empty_idle_seconds / 2))
    # UMAP compiles for many seconds on its first call: done in the background, later and
    # at low priority, so that it does not slow the first answers.
    threading.Thread(target=plots.warm_up, kwargs={"delay_seconds": 30}, name="umap-warm-up", daemon=True).start()
    downloads = Downloads()
    demo = build_demo(pool, downloads)
    demo.queue(default_concurrency_limit=4)
    try:
        serve(demo, pool, downloads)
    finally:
        pool.benchmarks.stop_all()
        pool.stop()
        downloads.close()


def serve(demo, pool, downloads) -> None:
    """Serve the page and the API (blocks until the server stops), the same way for the
    one-process app and the Ray front."""
    from webapp.layout import MAX_UPLOAD_MB, server_extras

    demo.launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        css_paths=[str(ROOT / "assets" / "style.css")],
        footer_links=[],
        app_kwargs=server_extras(pool, downloads),
        max_file_size=f"{MAX_UPLOAD_MB}mb",
    )


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def front(address: str | None) -> None:
    """The page and the API over the Ray engine: no model in this process (webapp/cluster.py)."""
    from webapp import cluster, plots
    from webapp.downloads import Downloads
    from webapp.layout import build_demo
    from webapp.sessions import default_root

    cfg = cluster.ClusterConfig.from_env()
    downloads = Downloads()
    try:
        pool = cluster.start(default_root(), os.environ.get("MELO_MODEL", DEFAULT_MODEL), cfg, address,
                             idle_seconds=60 * float(os.environ.get("MELO_IDLE_MINUTES", 24 * 60)))
        # A SIGTERM ends the front like Ctrl-C: the engine is taken down, a local Ray with
        # it (set after ray.init, which installs a handler of its own that would not).
        signal.signal(signal.SIGTERM, _interrupt)
        pool.start_sweeper(every_seconds=min(60.0, pool.idle.empty_idle_seconds / 2))
        threading.Thread(target=plots.warm_up, kwargs={"delay_seconds": 30}, name="umap-warm-up", daemon=True).start()
        # Enough questions at once to fill every replica's shared batches (melo_engine/batching.py).
        from melo_engine.batching import AnswerBatcher

        demo = build_demo(pool, downloads, answer_concurrency=cfg.replicas * max(1, round(cfg.cpus_per_replica))
                          * AnswerBatcher.MAX_ROWS)
        demo.queue(default_concurrency_limit=2 * cfg.replicas)
        serve(demo, pool, downloads)
    finally:
        downloads.close()
        cluster.stop()


if __name__ == "__main__":
    main()
