"""The app in a process of its own, for the web-app benchmarks (bench.py, classroom.py):
start it on a free port with its own workspaces folder, wait until it answers, stop it."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def start_app(workspaces: Path, env: dict | None = None):
    """The app in its own process; returns (process, url) once it answers (`stop` it)."""
    from gradio_client import Client

    port = free_port()
    env = dict(os.environ, GRADIO_SERVER_PORT=str(port), MELO_WORKSPACES=str(workspaces),
               HF_HUB_OFFLINE="1", **(env or {}))
    with open(workspaces / "app.log", "w") as log:      # the app writes to its own copy of the handle
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError("the app did not start:\n" + (workspaces / "app.log").read_text()[-3000:])
        try:
            Client(url, verbose=False)
            return proc, url
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    stop(proc)
    raise RuntimeError("the app did not answer within 300 s")
