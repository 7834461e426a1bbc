"""One writer per workspace (melo_engine/lock.py, issue 21 finding 1): two writers on one
workspace once wrote the same record twice and overwrote each other's blocks. Here a
second writer waits, then is refused in one line; readers need no lock; a dead holder's
lock is gone; and 50 rounds of edits from three processes at once (two engine processes
and the command line) lose nothing. On the real model, the real files and chromadb."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from melo_engine import MeloConfig, MeloEditor, store
from conftest import ROOT, tree_digest

# Fifty questions that are far apart (each its own cluster at the small radius below), and
# one-word answers: an edit trains in a few steps, so fifty fit in the test's time.
AGENTS = ("Alice Bruno Carmen Dmitri Elena Farouk Greta Hiro Ingrid Jamal Kaito Lena Mateo Nadia Oskar Priya "
          "Quentin Rosa Sven Tariq Uma Viktor Wanda Xavier Yusuf Zora Anselm Bianca Cyrus Delia Emil Fiona "
          "Gustav Helga Igor Jana Kofi Lucia Milan Noor Otto Paola Rafael Selma Teodor Ulla Vera Wilhelm "
          "Ximena Yara").split()
WORDS = ("Falcon Granite Harbor Ivory Juniper Kestrel Lantern Meadow Nickel Orchid Pepper Quartz Raven Saffron "
         "Thistle Umber Velvet Willow Yarrow Zephyr Amber Basalt Cobalt Dahlia Ember Fennel Garnet Hazel Indigo "
         "Jasper Kelp Lilac Maple Nectar Onyx Pebble Quill Russet Sorrel Tundra Ursa Vortex Walnut Xenon "
         "Yonder Zinnia Acorn Birch Cedar Dune").split()
ROUNDS = [(f"What is the codename of agent {a}?", f"{w}.") for a, w in zip(AGENTS, WORDS)]
FAST = MeloConfig(stop_loss=1.0, lr=1e-2, init_radius=0.05)   # stop once the answer is exact

ENGINE = textwrap.dedent("""
    import json, sys, time
    from melo_engine import MeloEditor
    from melo_engine.backbone import Backbone
    from melo_engine.config import DEFAULT_MODEL

    backbone = Backbone.load(DEFAULT_MODEL)
    for prompt, target in json.loads(sys.argv[2]):
        try:
            ed = MeloEditor.open(sys.argv[1], backbone=backbone)
            try:
                r = ed.edit(prompt, target)
            finally:
                ed.close()
            print(json.dumps({"prompt": prompt, "target": target, "id": r.edit_id}), flush=True)
        except ValueError as err:
            print(json.dumps({"prompt": prompt, "refused": str(err)}), flush=True)
        time.sleep(0.3)       # let a waiting writer in, as a person between two edits would
""")


def _env(wait_seconds: float) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), MELO_LOCK_WAIT_SECONDS=str(wait_seconds), OMP_NUM_THREADS="1")


@pytest.fixture()
def fast_ws(backbone, tmp_path):
    ed = MeloEditor.open(tmp_path / "ws", backbone=backbone, config=FAST)
    ed.close()
    return tmp_path / "ws"


def test_a_second_writer_waits_then_is_refused_in_one_line_and_readers_need_no_lock(backbone, fast_ws, monkeypatch):
    first = MeloEditor.open(fast_ws, backbone=backbone)
    r = first.edit(*ROUNDS[0])
    before = tree_digest(fast_ws)
    monkeypatch.setenv("MELO_LOCK_WAIT_SECONDS", "0.6")
    t0 = time.monotonic()
    with pytest.raises(ValueError) as err:     # two editors in one process conflict too
        MeloEditor.open(fast_ws, backbone=backbone)
    waited = time.monotonic() - t0
    assert str(err.value) == (f"the workspace is in use by another process (pid {os.getpid()}); "
                              f"try again when it is done")
    assert 0.6 <= waited < 5
    with pytest.raises(ValueError, match="in use by another process"):
        MeloEditor.repair(fast_ws, backbone=backbone)
    reader = MeloEditor.open(fast_ws, backbone=backbone, read_only=True)      # no lock, the last commit
    assert [e["id"] for e in reader.edits()] == [r.edit_id] and reader.ask(ROUNDS[0][0]).text == ROUNDS[0][1]
    reader.close()
    # The command line on a workspace another process keeps open (the app keeps visitors'
    # workspaces open): one line, exit 2, nothing written.
    out = subprocess.run([sys.executable, "-m", "melo_engine", "-w", str(fast_ws), "edit", *ROUNDS[1]], cwd=ROOT,
                         env=_env(0.5), capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and out.stderr.splitlines() == [f"error: {err.value}"]
    assert tree_digest(fast_ws) == before
    first.close()
    again = MeloEditor.open(fast_ws, backbone=backbone)      # closed: the next writer gets in at once
    assert [e["id"] for e in again.edits()] == [r.edit_id]
    again.close()


# lock.py alone (stdlib only), without the package and torch: the holder starts in a blink.
HOLD = "import sys, time; sys.path.insert(0, sys.argv[2]); from lock import WorkspaceLock; " \
       "WorkspaceLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)"


def test_the_lock_of_a_killed_process_is_gone_at_once(backbone, fast_ws, monkeypatch):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(fast_ws), str(ROOT / "melo_engine")], env=_env(5),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("MELO_LOCK_WAIT_SECONDS", "0.2")
        with pytest.raises(ValueError, match=rf"in use by another process \(pid {holder.pid}\)"):
            MeloEditor.open(fast_ws, backbone=backbone)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    finally:
        holder.kill()
        holder.wait(timeout=60)
    ed = MeloEditor.open(fast_ws, backbone=backbone)
    ed.edit(*ROUNDS[0])
    ed.close()


def _cli_rounds(ws, rounds, out):
    for prompt, target in rounds:
        p = subprocess.run([sys.executable, "-m", "melo_engine", "-w", str(ws), "--json", "edit", prompt, target],
                           cwd=ROOT, env=_env(90), capture_output=True, text=True, timeout=600)
        out.append((prompt, target, p.returncode, p.stdout, p.stderr))


def test_fifty_rounds_from_four_processes_at_once_lose_nothing(backbone, fast_ws):
    """Two engine processes (open, edit, close, 24 times each, waiting at most 10 s for the
    lock) and two command-line edits (a process each, waiting up to 90 s) edit one
    workspace at once. Afterwards every edit that reported success is there and answers
    its own target, every refusal was one line, the journal reads to its end with one
    record per success, and repair sets nothing aside."""
    engine_rounds, cli = [ROUNDS[0:24], ROUNDS[24:48]], ROUNDS[48:50]
    engines = [subprocess.Popen([sys.executable, "-c", ENGINE, str(fast_ws), json.dumps(r)], cwd=ROOT, env=_env(10),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in engine_rounds]
    cli_out: list = []
    cli_threads = [threading.Thread(target=_cli_rounds, args=(fast_ws, cli[i::2], cli_out)) for i in range(2)]
    for t in cli_threads:
        t.start()
    results = []
    for p in engines:
        stdout, stderr = p.communicate(timeout=900)
        assert p.returncode == 0, stderr[-3000:]
        results += [json.loads(line) for line in stdout.splitlines()]
    for t in cli_threads:
        t.join(timeout=900)
    for prompt, target, rc, stdout, stderr in cli_out:
        if rc == 0:
            results.append({"prompt": prompt, "target": target, "id": json.loads(stdout)["edit_id"]})
        else:
            assert rc == 2 and len(stderr.splitlines()) == 1, stderr[-3000:]
            results.append({"prompt": prompt, "refused": stderr.strip().removeprefix("error: ")})
    assert len(results) == 50
    done = [r for r in results if "id" in r]
    refused = [r for r in results if "refused" in r]
    for r in refused:
        assert r["refused"].startswith("the workspace is in use by another process") and "\n" not in r["refused"]
    assert sum(r["prompt"] in dict(cli) for r in done) >= 1 and len(done) >= 25

    ed = MeloEditor.open(fast_ws, backbone=backbone)
    assert sorted(e["id"] for e in ed.edits()) == sorted(r["id"] for r in done)
    assert all(e["status"] == "active" for e in ed.edits())
    for r in done:
        a = ed.ask(r["prompt"])
        assert (a.text, a.edit_id) == (r["target"], r["id"])
    loaded = store.Store(fast_ws).load(writable=False)
    assert [rec["seq"] for rec in loaded.records] == list(range(1, len(done) + 1))
    blocks = [e["block"] for e in ed.edits()]
    assert len(set(blocks)) == len(blocks) == len(list((fast_ws / "blocks").iterdir()))
    ed.close()
    report = MeloEditor.repair(fast_ws, backbone=backbone)
    assert report["set_aside"] is None and report["journal_records_kept"] == len(done)
    assert report["edits"] == len(done)
    print(f"{len(done)} edits committed, {len(refused)} refused in one line")
