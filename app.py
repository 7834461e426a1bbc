"""MELO Studio: the web app (Hugging Face Spaces entry point; `make run` starts it too).

Environment: GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (where to listen), MELO_MODEL (the
model, default the bundled SmolLM2-135M-Instruct), MELO_WORKSPACES (the visitors'
workspaces), MELO_IDLE_MINUTES (remove a workspace idle this long; default a day).
"""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import threading  # noqa: E402
from pathlib import Path  # noqa: E402

from melo_engine.backbone import Backbone  # noqa: E402
from melo_engine.config import DEFAULT_MODEL  # noqa: E402
from webapp import plots  # noqa: E402
from webapp.layout import build_demo  # noqa: E402
from webapp.sessions import WorkspacePool  # noqa: E402

ROOT = Path(__file__).resolve().parent


def main() -> None:
    backbone = Backbone.load(os.environ.get("MELO_MODEL", DEFAULT_MODEL))
    pool = WorkspacePool(backbone, idle_seconds=60 * float(os.environ.get("MELO_IDLE_MINUTES", 24 * 60)))
    pool.start_sweeper(every_seconds=min(600.0, pool.idle_seconds / 2))
    threading.Thread(target=plots.warm_up, name="umap-warm-up", daemon=True).start()
    demo = build_demo(pool)
    demo.queue(default_concurrency_limit=4)
    demo.launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        css_paths=[str(ROOT / "assets" / "style.css")],
        footer_links=[],
    )


if __name__ == "__main__":
    main()
