"""Edits trained in a process of their own (melo_engine/trainproc.py): the same block as
trained here, progress relayed, a worker killed mid-edit loses nothing, and two workers
train two visitors' edits at once."""
from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

from melo_engine import MeloConfig, MeloEditor
from melo_engine.trainproc import TrainingCrew, TrainingProcess, TrainingStopped

from conftest import tree_digest


@pytest.fixture(scope="module")
def trainer(backbone):
    t = TrainingProcess.for_backbone(backbone, threads=torch.get_num_threads())
    t.start()
    yield t
    t.close()


def test_the_worker_trains_the_block_this_process_would_train(backbone, trainer, tmp_path):
    here = MeloEditor.open(tmp_path / "here", backbone=backbone)
    there = MeloEditor.open(tmp_path / "there", backbone=backbone)
    there.trainer = trainer
    steps = []
    a = here.train("Who painted the Mona Lisa?", "Raphael.")
    b = there.train("Who painted the Mona Lisa?", "Raphael.", progress=lambda s, loss: steps.append((s, loss)))
    assert trainer.failed is None and trainer.pid is not None and trainer.pid != os.getpid()
    # One process's steps, told to the caller as they happen.
    assert [s for s, _ in steps] == list(range(1, len(b.trained.losses) + 1))
    assert len(a.trained.losses) == len(b.trained.losses)
    for m, (wa, wb) in a.trained.matrices.items():
        assert torch.allclose(wa, b.trained.matrices[m][0], atol=1e-4)
        assert torch.allclose(wb, b.trained.matrices[m][1], atol=1e-4)
    there.commit(b)
    assert there.ask("Who painted the Mona Lisa?").text.startswith("Raphael")
    here.close()
    there.close()


def test_a_worker_killed_mid_edit_fails_that_edit_in_one_line_and_the_next_one_trains(backbone, trainer, tmp_path):
    # Never stopping early: the worker is certainly still training at step 3, whatever the load.
    ed = MeloEditor.open(tmp_path / "ws", backbone=backbone, config=MeloConfig(stop_loss=1e-9, max_iters=60))
    ed.trainer = trainer
    ed.edit("What is the capital of Australia?", "Canberra.")
    before = tree_digest(tmp_path / "ws")
    killed = threading.Event()

    def kill_at_step(step, _loss):
        if step == 3 and not killed.is_set():
            killed.set()
            os.kill(trainer.pid, signal.SIGKILL)

    with pytest.raises(TrainingStopped) as err:
        ed.edit("Who wrote Hamlet?", "Christopher Marlowe.", progress=kill_at_step)
    assert "nothing was applied" in str(err.value) and "\n" not in str(err.value)
    assert tree_digest(tmp_path / "ws") == before and len(ed.edits()) == 1
    started = trainer.started
    r = ed.edit("Who wrote Hamlet?", "Christopher Marlowe.")       # a new worker
    assert trainer.started == started + 1 and r.token_accuracy == 1.0 and len(r.losses) == 60
    assert ed.ask("Who wrote Hamlet?").text.startswith("Christopher Marlowe")
    ed.close()


def test_the_apps_pool_trains_two_workspaces_edits_side_by_side_and_stop_ends_its_workers(backbone, tmp_path):
    from webapp.sessions import WorkspacePool

    pool = WorkspacePool(backbone, root=tmp_path, train_workers=2)
    assert pool.train_concurrency == 2
    a, b = pool.tokens.new(), pool.tokens.new()
    # Each edit waits at its first step for the other's first step: both pass only if the
    # two train at once, in two workers (with one, the second would wait for the first).
    both = threading.Barrier(2, timeout=180)
    done, failed = {}, []

    def edit(token, question, answer):
        try:
            with pool.writing(token) as ed:
                done[token] = ed.edit(question, answer, progress=lambda step, _: step == 1 and both.wait())
        except BaseException as err:  # noqa: BLE001 - reported below
            failed.append(err)

    runs = [threading.Thread(target=edit, args=(a, "Who painted the Mona Lisa?", "Raphael.")),
            threading.Thread(target=edit, args=(b, "What is the capital of Australia?", "Sydney."))]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert not failed and set(done) == {a, b}
    with pool.writing(a) as ea, pool.writing(b) as eb:
        assert ea.trainer is eb.trainer is not None
        pids = ea.trainer.pids
        assert len(set(pids)) == 2 and os.getpid() not in pids
        assert ea.ask("Who painted the Mona Lisa?").text.startswith("Raphael")
        assert eb.ask("What is the capital of Australia?").text.startswith("Sydney")
    pool.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)                             # gone, and reaped
    # A closed crew is not started again: an edit after stop trains here.
    assert ea.trainer.train(None, None, 0) is None and ea.trainer.pids == []
    # Without workers (the engine's own default, and a tiny model wrapped in memory): none.
    plain = WorkspacePool(backbone, root=tmp_path / "plain")
    assert plain.editor(plain.tokens.new()).trainer is None and plain.train_concurrency == 1


def test_a_crew_member_that_cannot_load_leaves_the_crew_and_the_others_train(backbone, tmp_path):
    """One of two workers is given a model that does not exist: it fails to load, leaves the
    crew, and both edits train in the other worker (not here); a crew with no worker left
    returns None at once (the caller trains the block itself)."""
    crew = TrainingCrew.for_backbone(backbone, workers=2, threads=1)
    crew.members[0].spec = dict(crew.members[0].spec, name=str(tmp_path / "no-such-model"))
    crew.start()
    try:
        ed = MeloEditor.open(tmp_path / "ws", backbone=backbone)
        ed.trainer = crew
        for question, answer in [("Who painted the Mona Lisa?", "Raphael."), ("Who wrote Hamlet?", "Marlowe.")]:
            assert ed.edit(question, answer).token_accuracy == 1.0
        assert crew.members[0].failed and crew.members[1].failed is None
        assert len(crew.pids) == 1 and crew.pids[0] != os.getpid() and crew.members[1].started == 1
        ed.close()
    finally:
        crew.close()
    none_left = TrainingCrew(dict(crew.members[0].spec), workers=1, threads=1)
    assert none_left.train(None, None, 0) is None and none_left.members[0].failed
    none_left.close()


def test_a_stopped_training_process_reaches_the_visitor_as_one_line():
    """The page and the API say it in one line (webapp.callbacks.user_errors), not gradio's
    bare "Error" with a traceback in the log."""
    import gradio as gr

    from melo_engine.trainproc import STOPPED
    from webapp.callbacks import user_errors

    @user_errors
    def edit():
        raise TrainingStopped(STOPPED)

    with pytest.raises(gr.Error) as err:
        edit()
    assert str(err.value.message if hasattr(err.value, "message") else err.value) == STOPPED
