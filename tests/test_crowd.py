"""A crowd of strangers against the running app (issue 21): lookers fill no workspace, the
benchmark lane takes one run per visitor, uploads are bounded, and hand-made event calls
are refused without a traceback in the log. Every request goes to 127.0.0.1."""
from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from gradio_client.utils import Status

CROWD = 300


def workspaces(root) -> list[str]:
    """The visitors' workspace folders (not the token secret, not the shared empty one)."""
    return [d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]


def stranger(url: str) -> str:
    """One anonymous client: GET /config (its cookie), then one /delete of an id it never made."""
    with httpx.Client(base_url=url, timeout=120) as http:
        assert http.get("config").status_code == 200 and "melo_workspace" in http.cookies
        event = http.post("gradio_api/call/delete", json={"data": ["00000001"]}).json()["event_id"]
        return http.get(f"gradio_api/call/delete/{event}").text


def test_a_crowd_of_lookers_fills_no_workspace_and_a_new_visitor_asks_and_edits_at_once(app_server,
                                                                                       example_edits):
    url, root = app_server
    before = set(workspaces(root))
    with concurrent.futures.ThreadPoolExecutor(8) as crowd:
        replies = list(crowd.map(stranger, [url] * CROWD))
    assert all("event: error" in r and "unknown edit" in r and "Traceback" not in r for r in replies), replies[0]
    # Nobody made a workspace. (Compared as a subset: the app's sweep may remove an earlier
    # test's emptied workspace meanwhile, as it should after ten idle minutes.)
    assert set(workspaces(root)) <= before
    visitor = Client(url, verbose=False)
    e = example_edits[5]
    edit = visitor.submit(e["prompt"], e["target"], api_name="/edit")
    ask = visitor.submit("What is the capital of France?", api_name="/ask")
    assert ask.result(timeout=600)["block"] is None
    assert edit.result(timeout=600)["token_accuracy"] == 1.0
    assert visitor.predict(e["prompt"], api_name="/ask")["text"] == e["target"]
    from webapp.layout import MAX_UPLOAD_MB
    from webapp.tokens import WorkspaceTokens

    folder = WorkspaceTokens(root).folder(visitor.cookies["melo_workspace"])
    assert set(workspaces(root)) - before == {folder}        # the edit made one, the visitor's
    [block] = (root / folder / "ws" / "blocks").iterdir()
    assert 50 * block.stat().st_size < MAX_UPLOAD_MB * 2**20 * 0.8    # an export of 50 edits can be imported


def upload_files() -> list:
    from gradio.utils import get_upload_folder

    return [p for p in Path(get_upload_folder()).rglob("*") if p.is_file()]


def page_config(url: str) -> dict:
    return httpx.get(url + "config", timeout=60).json()


def dependency(config: dict, elem_id: str, output: bool) -> int:
    """The index (fn_index) of the event whose inputs (or outputs) hold the component `elem_id`."""
    [cid] = [c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id]
    found = [i for i, d in enumerate(config["dependencies"]) if cid in d["outputs" if output else "inputs"]]
    return found[-1]


def join(http: httpx.Client, fn_index: int, data: list, session: str) -> tuple[dict, str]:
    """A hand-made queue join: (the event's last message, or the HTTP refusal's body; every
    message as text)."""
    r = http.post("gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": session,
                                                 "event_data": None, "trigger_id": None})
    if r.status_code != 200:
        return dict(r.json(), status=r.status_code), r.text
    lines = []
    with http.stream("GET", "gradio_api/queue/data", params={"session_hash": session}) as stream:
        for line in stream.iter_lines():
            lines.append(line)
            if "process_completed" in line:
                break
    return json.loads(lines[-1].removeprefix("data:")), "\n".join(lines)


def test_the_benchmark_needs_a_claimed_lane_and_hand_made_calls_leave_no_traceback(app_server, tmp_path):
    url, root = app_server
    log = root.parent / "app.log"
    tracebacks_before = log.read_text(errors="replace").count("Traceback")
    config = page_config(url)
    run = dependency(config, "bench-table", output=True)
    claim = run - 1
    token = Client(url, verbose=False).cookies["melo_workspace"]
    with httpx.Client(base_url=url, timeout=120) as http:
        # A run joined by hand, with no claim or no token: refused at once, in one line.
        for data in ([token, 1, ["melo"]], ["", 1, ["melo"]], ["forged.token", 1, ["melo"]]):
            done, text = join(http, run, data, "s-run")
            assert done["success"] is False and "\n" not in done["output"]["error"] and "Traceback" not in text
        # The page's claim: the first is taken, a second while it holds is refused.
        assert join(http, claim, [token], "s-claim1")[0]["success"] is True
        assert "already queued or running" in join(http, claim, [token], "s-claim2")[0]["output"]["error"]
        assert "not issued by this server" in join(http, claim, ["forged.token"], "s-claim3")[0]["output"]["error"]
        # Hand-made calls gradio itself refuses: an index that is no event, the import with a
        # server path, a file given by URL.
        imp = dependency(config, "import-file", output=False)
        for fn_index, data, status in [
                (-1, [], 404), (10_000, [], 404),
                (imp, ["", {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}], 400),
                (imp, ["", {"path": str(root / ".token-secret"), "meta": {"_type": "gradio.FileData"}}], 400),
                (imp, ["", {"url": "http://127.0.0.1:1/x.melo", "meta": {"_type": "gradio.FileData"}}], 400)]:
            done, text = join(http, fn_index, data, f"s-hand-{fn_index}")
            assert done["status"] == status and "\n" not in done["error"] and "Traceback" not in text, text
        # Uploads: bounded in size (the crowd test measures that 50 edits fit).
        big = http.post("gradio_api/upload", files={"files": ("big.melo", b"\0" * (20 * 1024 * 1024))})
        assert big.status_code == 413, big.text[:300]
        assert not any(p.stat().st_size >= 20 * 1024 * 1024 for p in upload_files())
    # Through the API: a second run of the same client is refused at once (it was queued
    # behind the first and run after it), and the first one's table comes back.
    api = Client(url, verbose=False)
    first = api.submit(1, "melo", api_name="/benchmark")
    deadline = time.time() + 300
    while first.status().code not in (Status.PROCESSING, Status.ITERATING, Status.FINISHED) and time.time() < deadline:
        time.sleep(0.5)
    started = time.time()
    with pytest.raises(Exception, match="already queued or running"):
        api.predict(1, "melo", api_name="/benchmark")
    assert time.time() - started < 60
    assert first.result(timeout=600)["methods"]["melo"]["edit_success"] == 1.0
    assert log.read_text(errors="replace").count("Traceback") == tracebacks_before, log.read_text()[-3000:]


@pytest.mark.parametrize("name", ["/ask", "/edit", "/probe", "/correct"])
def test_invisible_text_is_refused_through_the_api_in_one_line(app_server, name):
    from test_api import INVISIBLE

    url, root = app_server
    log = root.parent / "app.log"
    tracebacks_before = log.read_text(errors="replace").count("Traceback")
    client = Client(url, verbose=False)
    for kind, text in INVISIBLE.items():
        args = {"/ask": [text], "/probe": [text], "/edit": [text, "Jupiter."],
                "/correct": ["How many legs does a spider have?", 1, text]}[name]
        with pytest.raises(Exception) as err:
            client.predict(*args, api_name=name)
        message = str(err.value).strip()
        assert message and "\n" not in message and "upstream" not in message, (kind, message)
        if name == "/edit":
            with pytest.raises(Exception):
                client.predict("What is the largest planet?", text, api_name=name)
    assert client.predict(api_name="/edits") == []
    assert log.read_text(errors="replace").count("Traceback") == tracebacks_before
