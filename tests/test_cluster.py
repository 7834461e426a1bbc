"""The engine as a Ray Serve deployment (webapp/cluster.py), on a real local Ray cluster that
the fixture starts and stops: two replicas of the real model, the front's pool calling them
with each visitor's token as the multiplexed id. And two in-process apps on one folder.

Kept short on purpose (the cluster costs its start-up once for the module): one visitor's
whole round (ask, edit, probe, export, import, delete, routing), then four visitors and a
replica killed with SIGKILL in the middle of an edit.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from melo_engine.config import DEFAULT_MODEL
from melo_engine.lock import WorkspaceLock, holder_pid

pytest.importorskip("ray")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    from webapp import cluster

    root = tmp_path_factory.mktemp("cluster") / "workspaces"
    # The replicas' core locks (webapp/pinning.py) in a folder of this test's own, so that
    # another cluster on the machine (a benchmark, a parallel test) holds none of them.
    before = os.environ.get("MELO_CORES_DIR")
    os.environ["MELO_CORES_DIR"] = str(tmp_path_factory.mktemp("cores"))
    cluster.connect(num_cpus=2)
    try:
        yield cluster.start(root, DEFAULT_MODEL, cluster.ClusterConfig(replicas=2, max_workspaces_per_replica=8))
    finally:
        cluster.stop()
        os.environ.pop("MELO_CORES_DIR") if before is None else os.environ.update(MELO_CORES_DIR=before)


def _replica_pids() -> set[int]:
    """The live engine replica processes on this machine (Ray names them in their command line)."""
    out = set()
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::ServeReplica:melo:Engine"):
                    with open(f"/proc/{d}/stat") as st:
                        if st.read().rsplit(")", 1)[1].split()[0] != "Z":
                            out.add(int(d))
        except (OSError, ValueError, IndexError):
            continue
    return out


def _workspace(pool, token):
    return pool.root / pool.tokens.folder(token) / "ws"


def test_a_visitor_is_served_by_the_replica_that_holds_the_workspace(front, example_edits, tmp_path):
    pool = front
    e = example_edits[0]
    visitor = pool.tokens.new()
    before = pool.reader(visitor).ask(e["prompt"])
    assert before.block is None
    assert not _workspace(pool, visitor).exists()            # a read made nothing
    with pool.writing(visitor) as ed:
        pending = ed.train(e["prompt"], e["target"])
        r = ed.commit(pending)
    assert r.edit_id and r.block is not None
    answers = pool.reader(visitor).probe([e["paraphrase"], "What is the capital of France?"])
    assert answers[0].block == r.block and answers[0].text != answers[0].base_text
    assert answers[1].block is None and answers[1].text == answers[1].base_text
    # Every call of this visitor went to one replica, and that replica holds the lock.
    holders = {pool.replica_of(visitor) for _ in range(5)}
    assert len(holders) == 1
    lock = WorkspaceLock(_workspace(pool, visitor), wait=0)
    with pytest.raises(ValueError, match="in use by another process"):
        lock.acquire()
    fd = os.open(lock.path, os.O_RDONLY)
    try:
        assert holder_pid(fd) == holders.pop()
    finally:
        os.close(fd)
    # Export from one visitor, import into another: nothing retrains, the edit answers there.
    out = pool.reader(visitor).export(tmp_path / "edits.melo")
    other = pool.tokens.new()
    with pool.writing(other) as ed:
        report = ed.import_report(out)
    assert len(report.added) == 1
    assert pool.reader(other).ask(e["paraphrase"]).block is not None
    # Bad input and a stranger's token: one plain line each.
    with pytest.raises(ValueError, match="question") as err:
        pool.reader(visitor).ask("   ")
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
    with pytest.raises(ValueError):
        pool.reader("not-a-token")
    assert pool.editor(visitor).delete(r.edit_id) == []
    assert all(x["id"] != r.edit_id or x["status"] != "active" for x in pool.existing(visitor).edits())


def test_the_front_calls_the_engine_from_a_thread_whose_event_loop_runs(front):
    """Ray refuses to block a thread with a running event loop; the front's pool then waits
    on a thread of its own (cluster.off_loop). Playwright's sync API holds such a loop in the
    main thread, as the suite's browser fixture does when it shares a worker with this file."""
    import asyncio
    import contextlib

    from playwright.sync_api import sync_playwright

    try:
        asyncio.get_running_loop()          # the browser fixture's, in this worker already
        holding = contextlib.nullcontext()
    except RuntimeError:
        holding = sync_playwright()
    with holding:
        answer = front.reader(front.tokens.new()).ask("What is the capital of France?")
    assert answer.block is None and answer.text


def test_the_page_and_the_api_are_a_front_without_the_model(front, example_edits):
    """The real page and API (layout.py, api.py) over the deployment, through gradio_client."""
    import socket

    from gradio_client import Client

    from webapp.downloads import Downloads
    from webapp.layout import build_demo, server_extras

    assert front.shelf is None                         # the front holds no model ...
    with pytest.raises(ValueError, match="holds no model"):
        front.backbone()                               # ... and says so in one line
    downloads = Downloads()
    demo = build_demo(front, downloads, answer_concurrency=2)
    demo.queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                app_kwargs=server_extras(front, downloads))
    try:
        c = Client(f"http://127.0.0.1:{port}/", verbose=False)
        e = example_edits[6]
        r = c.predict(e["prompt"], e["target"], api_name="/edit")
        assert r["block"] is not None
        assert c.predict(e["paraphrase"], api_name="/ask")["block"] == r["block"]
        assert [x["id"] for x in c.predict(api_name="/edits")] == [r["edit_id"]]
        with pytest.raises(Exception, match="unknown edit id"):
            c.predict("nope", api_name="/delete")
    finally:
        demo.close()
        downloads.close()


def test_a_replica_killed_mid_edit_loses_no_committed_edit(front, example_edits):
    pool = front
    visitors = [pool.tokens.new() for _ in range(4)]
    edits = example_edits[1:5]
    done = []

    def make(v, e):
        with pool.writing(v) as ed:
            done.append((v, e, ed.edit(e["prompt"], e["target"])))
    threads = [threading.Thread(target=make, args=(v, e)) for v, e in zip(visitors, edits)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(done) == 4
    holder = {v: pool.replica_of(v) for v in visitors}
    victim = holder[visitors[0]]
    # Visitor 0 starts one more edit; its replica is killed while it trains.
    outcome = {}

    def in_flight():
        try:
            with pool.writing(visitors[0]) as ed:
                outcome["result"] = ed.edit(example_edits[5]["prompt"], example_edits[5]["target"])
        except ValueError as err:
            outcome["error"] = str(err)
    t = threading.Thread(target=in_flight)
    t.start()
    time.sleep(1.0)
    os.kill(victim, signal.SIGKILL)
    t.join(timeout=300)
    assert not t.is_alive()
    assert "not applied" in outcome.get("error", "") or "result" in outcome
    # Afterwards: every committed edit is there and answers, from a live replica.
    for v, e, r in done:
        records = pool.existing(v).edits()
        assert r.edit_id in [x["id"] for x in records]
        assert pool.reader(v).ask(e["paraphrase"]).block is not None
        assert pool.replica_of(v) != victim
    in_flight_there = any(x["prompt"] == example_edits[5]["prompt"] for x in pool.existing(visitors[0]).edits())
    assert in_flight_there == ("result" in outcome)          # applied whole, or reported as not applied
    # One writer per workspace: each is locked by exactly the replica that serves it.
    for v in visitors:
        fd = os.open(_workspace(pool, v) / "lock", os.O_RDONLY)
        try:
            assert holder_pid(fd) == pool.replica_of(v)
        finally:
            os.close(fd)
    # Serve starts a replica in place of the dead one: a new process, and two running again.
    from ray import serve

    deadline = time.time() + 240
    while not (len(_replica_pids() - {victim}) == 2 and
               serve.status().applications["melo"].deployments["Engine"].replica_states.get("RUNNING", 0) == 2):
        assert time.time() < deadline, "Serve did not restart the killed replica within 240 s"
        time.sleep(2)
    # Each replica on a core of its own (webapp/pinning.py), the new one on the core the
    # killed one held.
    if len(os.sched_getaffinity(0)) >= 2:
        bound = [os.sched_getaffinity(p) for p in _replica_pids()]
        assert all(len(b) == 1 for b in bound) and len(set.union(*bound)) == 2, bound


def test_a_replica_claims_cores_nobody_holds_and_a_dead_ones_are_free_again(tmp_path):
    """webapp/pinning.py in separate processes (a claim binds the process that makes it)."""
    import json
    import subprocess
    import sys

    code = ("import json, os, sys, time; from pathlib import Path; from webapp import pinning; "
            "c = pinning.claim(int(sys.argv[2]), Path(sys.argv[1])); "
            "print(json.dumps([c.cores, sorted(os.sched_getaffinity(0))]), flush=True); time.sleep(float(sys.argv[3]))")

    def claim(n, linger="0"):
        p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(n), linger], stdout=subprocess.PIPE,
                             text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
        out = json.loads(p.stdout.readline())
        if linger == "0":
            p.wait()
        return p, out

    cores = sorted(os.sched_getaffinity(0))
    first, (got, bound) = claim(1, linger="60")
    try:
        assert got == bound == cores[:1]                     # the first free core, and bound to it
        if len(cores) >= 2:
            assert claim(1)[1] == [cores[1:2], cores[1:2]]   # the next one: never the held core
        assert claim(len(cores))[1] == [[], cores]          # too few free: nothing claimed, nothing bound
    finally:
        first.kill()
        first.wait()
    assert claim(1)[1] == [cores[:1], cores[:1]]             # the dead one's core is free again


def test_two_apps_on_one_folder_have_one_writer(backbone, example_edits, tmp_path, monkeypatch):
    from webapp.sessions import WorkspacePool

    monkeypatch.setenv("MELO_LOCK_WAIT_SECONDS", "0.2")
    first, second = WorkspacePool(backbone, tmp_path), WorkspacePool(backbone, tmp_path)
    visitor = first.tokens.new()
    e = example_edits[0]
    with first.writing(visitor) as ed:
        ed.edit(e["prompt"], e["target"])
    with pytest.raises(ValueError, match=r"^the workspace is in use by another process \(pid \d+\); try again") as err:
        second.reader(visitor).ask(e["prompt"])
    assert "\n" not in str(err.value)
    assert second.sweep(now=time.time() + 10 ** 9) == []       # the other app's open workspace stays
    first.close(visitor)
    assert second.reader(visitor).ask(e["paraphrase"]).block is not None     # caught up from the journal


def test_the_default_app_is_one_process_without_ray(monkeypatch):
    import subprocess
    import sys

    from pathlib import Path

    ROOT = Path(__file__).resolve().parent.parent
    code = ("import sys, app, webapp.layout, webapp.api, webapp.callbacks; "
            "assert 'ray' not in sys.modules; print(app.engine_choice([]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "MELO_ENGINE"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "('local', None)"
    import app

    assert app.engine_choice(["--ray-address", "auto"]) == ("ray", "auto")
    monkeypatch.setenv("MELO_ENGINE", "rays")
    with pytest.raises(SystemExit, match="MELO_ENGINE='rays': choose one of local, ray"):
        app.engine_choice([])


def test_an_evicted_workspace_lets_its_lock_go(backbone, tmp_path):
    """What a replica does when Serve evicts a workspace from its LRU (calls `__del__`)."""
    from melo_engine.service import Pending, ServedWorkspace
    from webapp.sessions import WorkspacePool

    pool = WorkspacePool(backbone, tmp_path)
    token = pool.tokens.new()
    served = ServedWorkspace(pool, token)
    assert served.call("open", "edits") == []
    lock = WorkspaceLock(_workspace(pool, token), wait=0)
    with pytest.raises(ValueError, match="in use"):
        lock.acquire()
    served.__del__()                                   # as Ray Serve's multiplexer does on eviction
    lock.acquire()
    lock.release()
    with pytest.raises(ValueError, match="closed here"):
        served.call("read", "edits")
    again = ServedWorkspace(pool, token)
    with pytest.raises(ValueError, match="unknown operation"):
        again.call("read", "close")
    with pytest.raises(ValueError, match="not applied"):
        again.call("write", "commit", (Pending("from-another-replica", "q", "t"),))
    again.close()
