"""Shared fixtures: the real default model, loaded once per test session."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

# Never wait on a hub or send telemetry, whoever starts pytest.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


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
