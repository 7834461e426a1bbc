"""MELO Studio: the web app (Hugging Face Spaces entry point; `make run` starts it too).

Environment: GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (where to listen), MELO_MODEL (the
model, default the bundled SmolLM2-135M-Instruct), MELO_WORKSPACES (the visitors'
workspaces), MELO_IDLE_MINUTES (remove a workspace idle this long; default a day),
MELO_THREADS (torch threads per request; default 1, see below).
"""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import threading  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from melo_engine.backbone import Backbone  # noqa: E402
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


def main() -> None:
    # Visitors' asks and edits run side by side (one ask per core and one edit at once),
    # each on one thread: with torch's default of one thread per core, every request would
    # start a team of threads that spin waiting for cores the other requests hold.
    # Measured in docs/BENCHMARKS.md ("many visitors at once").
    torch.set_num_threads(int(os.environ.get("MELO_THREADS", "1")))
    # Start-up: the model loads while gradio is imported (both take seconds); the page is built
    # once both are there. Imports below on purpose.
    loaded: dict = {}
    loader = threading.Thread(target=load_backbone, args=(os.environ.get("MELO_MODEL", DEFAULT_MODEL), loaded),
                              name="model-load")
    loader.start()
    from webapp import plots
    from webapp.downloads import Downloads
    from webapp.layout import MAX_UPLOAD_MB, build_demo, server_extras
    from webapp.sessions import WorkspacePool

    loader.join()
    if "error" in loaded:
        raise loaded["error"]
    pool = WorkspacePool(loaded["backbone"], idle_seconds=60 * float(os.environ.get("MELO_IDLE_MINUTES", 24 * 60)))
    pool.start_sweeper(every_seconds=min(60.0, pool.empty_idle_seconds / 2))
    # UMAP compiles for many seconds on its first call: done in the background, later and
    # at low priority, so that it does not slow the first answers.
    threading.Thread(target=plots.warm_up, kwargs={"delay_seconds": 30}, name="umap-warm-up", daemon=True).start()
    downloads = Downloads()
    demo = build_demo(pool, downloads)
    demo.queue(default_concurrency_limit=4)
    try:
        demo.launch(
            server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
            server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
            css_paths=[str(ROOT / "assets" / "style.css")],
            footer_links=[],
            app_kwargs=server_extras(pool, downloads),
            max_file_size=f"{MAX_UPLOAD_MB}mb",
        )
    finally:
        pool.benchmarks.stop_all()
        downloads.close()


if __name__ == "__main__":
    main()
