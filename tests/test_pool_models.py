"""The visitors' pool holds several models by name (webapp/models.py, sessions.py): a second
model is loaded once, on first use, and shared; a workspace reopens on the model its header
records; a workspace with edits is refused a model change in one line with nothing written.
The second model is a tiny Llama made from its config (test_architectures.py), so no second
real model has to load; the first is the real bundled one."""
from __future__ import annotations

import threading
import time

import pytest

from conftest import tree_digest
from melo_engine.config import DEFAULT_MODEL
import test_architectures
from test_architectures import tiny_backbone
from webapp import callbacks
from webapp.models import ModelChoice, ModelShelf
from webapp.sessions import WorkspacePool

TINY = "tiny-llama"
tokenizer = test_architectures.tokenizer          # the fixture: a small tokenizer trained there


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return tiny_backbone("llama", tokenizer)


def shelf_with_tiny(backbone, tiny, loads: list):
    def load():
        loads.append(1)
        time.sleep(0.2)          # long enough for a second caller to arrive during the load
        return tiny
    return ModelShelf(backbone, [ModelChoice(TINY, load)])


def test_a_second_model_loads_once_on_first_use_and_is_shared(backbone, tiny, tmp_path):
    loads = []
    pool = WorkspacePool(backbone, root=tmp_path, models=shelf_with_tiny(backbone, tiny, loads))
    assert pool.models == [DEFAULT_MODEL, TINY] and pool.default_model == DEFAULT_MODEL
    a, b = pool.tokens.new(), pool.tokens.new()
    assert pool.reader(a).config.model == DEFAULT_MODEL and not pool.shelf.loaded(TINY) and loads == []

    # Two visitors asking for it at once: one load, one backbone.
    got = []
    threads = [threading.Thread(target=lambda t=t: got.append(pool.set_model(t, TINY))) for t in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == [1] and len(got) == 2
    assert all(ed.config.model == TINY and ed.backbone is tiny for ed in got)
    assert pool.model_of(a) == pool.model_of(b) == TINY
    assert pool.editor(a).backbone is tiny and pool.backbone(TINY) is tiny and pool.backbone() is backbone
    # Each model has its own shared read-only empty workspace.
    blank = pool.blank(TINY)
    assert blank.read_only and blank.backbone is tiny and blank is not pool.blank() and pool.blank().backbone is backbone

    with pytest.raises(ValueError) as err:
        pool.set_model(a, "no-such-model")
    assert str(err.value) == f"model 'no-such-model' is not offered here (offered: {DEFAULT_MODEL}, {TINY})"


def test_a_workspace_reopens_on_its_recorded_model_with_its_settings(backbone, tiny, tmp_path):
    pool = WorkspacePool(backbone, root=tmp_path, models=shelf_with_tiny(backbone, tiny, []))
    token = pool.tokens.new()
    with pool.writing(token) as ed:           # a setting first: the workspace is made on the default
        ed.update_settings(rank_per_block=8, max_iters=17)
    assert ed.config.model == DEFAULT_MODEL
    ed = pool.set_model(token, TINY)
    # Settings that do not depend on the model stay; layers and radius are the new model's.
    assert (ed.config.rank_per_block, ed.config.max_iters) == (8, 17)
    assert max(ed.config.lora_layers) == tiny.num_layers - 1 and ed.config.init_radius > 0
    pool.close(token)

    # A server started again (a new pool on the same folder) opens it on the tiny model.
    loads = []
    again = WorkspacePool(backbone, root=tmp_path, models=shelf_with_tiny(backbone, tiny, loads))
    assert again.model_of(token) == TINY and loads == []           # read from the header, nothing loaded
    reopened = again.editor(token)
    assert reopened.config.model == TINY and reopened.backbone is tiny and loads == [1]
    assert (reopened.config.rank_per_block, reopened.config.max_iters) == (8, 17)
    # And back to the default while it is still empty.
    assert again.set_model(token, DEFAULT_MODEL).backbone is backbone and again.model_of(token) == DEFAULT_MODEL


def test_a_workspace_with_edits_is_refused_a_model_change_and_nothing_is_written(backbone, tiny, tmp_path):
    loads = []
    pool = WorkspacePool(backbone, root=tmp_path, models=shelf_with_tiny(backbone, tiny, loads))
    token = pool.tokens.new()
    with pool.writing(token) as ed:
        ed.edit("What is the capital of Australia?", "Canberra is the capital of Australia.")
    folder = tmp_path / pool.tokens.folder(token)
    before = tree_digest(folder)
    with pytest.raises(ValueError) as err:
        pool.set_model(token, TINY)
    assert str(err.value) == "the model can change only while the workspace has no edits: reset it first"
    assert tree_digest(folder) == before and loads == [] and pool.model_of(token) == DEFAULT_MODEL
    assert len(pool.editor(token).edits()) == 1
    before = tree_digest(folder)           # (opening it stamped its last use)
    # The page says so the way it refuses a key source, and shows the model the workspace keeps.
    assert callbacks.set_model(pool, token, TINY) == (f"Not changed: {err.value}.", DEFAULT_MODEL)
    assert tree_digest(folder) == before
    # Beside the choice: each model's size, counted on its weights once loaded.
    note = callbacks.model_note(pool)
    counted = sum(p.numel() for p in backbone.model.parameters())
    assert f"**{DEFAULT_MODEL}**: {counted / 1e6:,.0f} million parameters" in note
    assert f"**{TINY}**: " in note and "loaded on its first use" in note.split(f"**{TINY}**")[1]
    # Reset, and the change goes through.
    pool.editor(token).reset()
    msg, shown = callbacks.set_model(pool, token, TINY)
    assert shown == TINY and msg.startswith(f"Your workspace now edits **{TINY}**") and "question-answer" in msg
    assert pool.editor(token).config.model == TINY and pool.editor(token).edits() == []
    assert f"**{TINY}**: 0 million parameters" in callbacks.model_note(pool)       # loaded: counted


def test_a_visitors_benchmark_runs_on_their_workspaces_model(backbone, tiny, tmp_path):
    """The Benchmark tab and /benchmark run the zsRE stream on the model the visitor's
    workspace was made with (a visitor on Gemma benchmarks Gemma), the default otherwise."""
    pool = WorkspacePool(backbone, root=tmp_path, models=shelf_with_tiny(backbone, tiny, []))
    a, b = pool.tokens.new(), pool.tokens.new()
    pool.set_model(a, TINY)
    assert pool.benchmark_model(a) == TINY and pool.benchmark_model(b) in (None, DEFAULT_MODEL)
    out, progress = tmp_path / "out.json", tmp_path / "progress"
    cmd = pool.benchmarks.command(5, ["melo"], out, progress, pool.benchmark_model(a))
    assert cmd[cmd.index("--model") + 1] == TINY
    assert "--model" not in pool.benchmarks.command(5, ["melo"], out, progress, pool.benchmark_model(b))
