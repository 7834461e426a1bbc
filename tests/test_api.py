"""Every API endpoint through gradio_client against the running app."""
from __future__ import annotations

from pathlib import Path

import pytest
from gradio_client import Client


# Text that shows nothing, by kind (issue 21): each is refused wherever text goes in.
INVISIBLE = {
    "right-to-left overrides": "\u202e\u2066\u2069\u202c",
    "combining marks alone": "\u0301\u034f\u0308",
    "Hangul filler": "\u3164\u115f\u1160",
    "invisible operators": "\u2061\u2062\u2063\u2064",
    "Mongolian vowel separator": "\u180e\u180e",
    "soft hyphen": "\u00ad\u00ad",
    "variation selectors": "\ufe0f\ufe0e\U000e0100",
    "tag characters": "\U000e0041\U000e0042\U000e007f",
    "Braille blank": "\u2800\u2800 \u2800",
}


@pytest.fixture(scope="module")
def client(app_server):
    url, _ = app_server
    return Client(url, verbose=False)


def test_api_endpoints_are_listed(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/ask", "/edit", "/correct", "/probe", "/delete", "/edits", "/model", "/classify"} <= names


def test_api_edit_ask_probe_delete(client, example_edits):
    e = example_edits[7]
    before = client.predict(e["prompt"], api_name="/ask")
    assert before["block"] is None and before["text"] != e["target"]

    r = client.predict(e["prompt"], e["target"], api_name="/edit")
    assert r["action"] == "new" and r["token_accuracy"] == 1.0 and r["steps"] >= 1
    after = client.predict(e["prompt"], api_name="/ask")
    assert after["text"] == e["target"] and after["block"] == r["block"] and after["edit_id"] == r["edit_id"]
    assert after["base_text"] == before["text"]

    answers = client.predict(f"{e['prompt']}\nWho invented the telephone?", api_name="/probe")
    assert [a["block"] for a in answers] == [r["block"], None]
    assert answers[1]["text"] == answers[1]["base_text"]

    listed = client.predict(api_name="/edits")
    assert [x["id"] for x in listed] == [r["edit_id"]]
    assert client.predict(r["edit_id"], api_name="/delete") == {"deleted": r["edit_id"]}
    assert client.predict(api_name="/edits") == []
    assert client.predict(e["prompt"], api_name="/ask")["text"] == before["text"]


def test_api_corrects_one_sentence_and_keeps_the_one_before(app_server):
    from melo_engine.sentences import split_sentences

    url, _ = app_server
    c = Client(url, verbose=False)
    q, fix = "How many legs does a spider have?", "A spider has eight legs, in four pairs."
    first = split_sentences(c.predict(q, api_name="/ask")["text"])[0]
    for number, message in [(9, "no sentence 9"), (0, "whole number from 1"), (2.5, "whole number")]:
        with pytest.raises(Exception, match=message):
            c.predict(q, number, fix, api_name="/correct")
    assert c.predict(api_name="/edits") == []
    r = c.predict(q, 2, fix, api_name="/correct")
    after = c.predict(q, api_name="/ask")
    assert after["block"] == r["block"] and after["text"].startswith(f"{first} {fix}")
    [entry] = c.predict(api_name="/edits")
    assert entry["prefix"] == first + " " and entry["target"] == fix


def test_api_bad_input_is_a_clear_error(client):
    with pytest.raises(Exception, match="the prompt is empty"):
        client.predict("   ", "x", api_name="/edit")
    with pytest.raises(Exception, match="unknown edit id"):
        client.predict("nope", api_name="/delete")


@pytest.mark.parametrize("value", [None, 12345, [1, 2], {"a": 1}])
def test_api_input_of_the_wrong_type_is_a_clear_error(client, value):
    for api, args, message in [("/ask", [value], "must be text"), ("/edit", [value, "x"], "must be text"),
                               ("/probe", [value], "must be text"), ("/delete", [value], "must be text")]:
        with pytest.raises(Exception, match=message):
            client.predict(*args, api_name=api)


def test_api_does_not_echo_a_huge_id(client):
    with pytest.raises(Exception) as err:
        client.predict("x" * 100_000, api_name="/delete")
    assert "unknown edit id" in str(err.value) and len(str(err.value)) < 500


def test_api_clients_have_separate_workspaces(app_server, client, example_edits):
    other = Client(app_server[0], verbose=False)
    e = example_edits[5]
    client.predict(e["prompt"], e["target"], api_name="/edit")
    assert other.predict(e["prompt"], api_name="/ask")["block"] is None
    assert other.predict(api_name="/edits") == []


def test_concurrent_edits_are_queued_and_asks_still_answered(app_server, example_edits):
    """Two clients edit at once and a third asks meanwhile: all are served, none mixed up."""
    url = app_server[0]
    c1, c2, c3 = (Client(url, verbose=False) for _ in range(3))
    e1, e2 = example_edits[3], example_edits[4]
    j1 = c1.submit(e1["prompt"], e1["target"], api_name="/edit")
    j2 = c2.submit(e2["prompt"], e2["target"], api_name="/edit")
    j3 = c3.submit("Who invented the telephone?", api_name="/ask")
    r1, r2, a3 = j1.result(timeout=600), j2.result(timeout=600), j3.result(timeout=600)
    assert r1["token_accuracy"] == 1.0 and r2["token_accuracy"] == 1.0
    assert a3["block"] is None
    assert [e["prompt"] for e in c1.predict(api_name="/edits")] == [e1["prompt"]]
    assert [e["prompt"] for e in c2.predict(api_name="/edits")] == [e2["prompt"]]
    assert c1.predict(e1["prompt"], api_name="/ask")["text"] == e1["target"]
    assert c2.predict(e1["prompt"], api_name="/ask")["block"] is None


def test_api_classifier_workspace_classifies_edits_a_label_and_refuses_a_bad_one(app_server):
    from conftest import tree_digest

    from melo_engine.config import DEFAULT_MODEL

    url, root = app_server
    c = Client(url, verbose=False)
    text = "a drink credited with magical power"
    with pytest.raises(Exception, match="this workspace answers questions: a classifier workspace is chosen"):
        c.predict(text, api_name="/classify")
    with pytest.raises(Exception, match=r"model 'no-such' is not offered here \(offered: .*minilm-wordnet"):
        c.predict("no-such", api_name="/model")
    info = c.predict("minilm-wordnet", api_name="/model")
    assert info["model"] == "minilm-wordnet" and "food" in info["labels"]
    before = c.predict(text, api_name="/classify")
    assert before["block"] is None and set(before["probabilities"]) == set(info["labels"])
    target = "food" if before["label"] != "food" else "plant"

    r = c.predict(text, target, api_name="/edit")
    after = c.predict(text, api_name="/classify")
    assert after["label"] == target and after["block"] == r["block"] and after["base_label"] == before["label"]
    other, edited = c.predict(f"a building where a king lives\n{text}", api_name="/probe")
    assert other["block"] is None and other["label"] == other["base_label"] and edited["label"] == target

    # A bad label: one line naming the labels, and nothing written in any workspace.
    workspaces = lambda: {k: v for k, v in tree_digest(root).items() if "/ws/" in k}    # noqa: E731
    snapshot = workspaces()
    with pytest.raises(Exception, match=r"unknown label 'vegetable' \(labels: act, animal, .*substance\)") as err:
        c.predict(text, "vegetable", api_name="/edit")
    assert "\n" not in str(err.value)
    assert workspaces() == snapshot
    assert [e["target"] for e in c.predict(api_name="/edits")] == [target]
    with pytest.raises(Exception, match="only while the workspace has no edits"):
        c.predict(DEFAULT_MODEL, api_name="/model")


# ---- who reaches a workspace ------------------------------------------------------------
def _event(config: dict, elem_id: str, trigger: str) -> int:
    """The fn_index of the page's `trigger` event on the component with `elem_id`."""
    comp = next(c["id"] for c in config["components"] if c["props"].get("elem_id") == elem_id)
    return next(i for i, d in enumerate(config["dependencies"]) if [comp, trigger] in d["targets"])


def _call_event(url: str, fn_index: int, data: list) -> dict:
    """Call one of the page's private events the way a hand-made client would (gradio's queue
    protocol: join, then read the session's event stream)."""
    import json
    import uuid

    import httpx

    session = uuid.uuid4().hex
    base = url.rstrip("/") + "/gradio_api/queue"
    httpx.post(f"{base}/join", json={"data": data, "fn_index": fn_index, "session_hash": session,
                                     "event_data": None, "trigger_id": None}).raise_for_status()
    with httpx.stream("GET", f"{base}/data", params={"session_hash": session}, timeout=120) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed":
                    return msg
    raise AssertionError("no reply")


def test_a_client_cannot_reach_a_workspace_by_another_session_identity(app_server, example_edits):
    url, _ = app_server
    owner = Client(url, verbose=False)
    e = example_edits[6]
    made = owner.predict(e["prompt"], e["target"], api_name="/edit")["edit_id"]
    token = owner.cookies["melo_workspace"]

    # The same session hash is not the same workspace: the hash is the client's to pick.
    stranger = Client(url, verbose=False)
    stranger.session_hash = owner.session_hash
    assert stranger.predict(api_name="/edits") == []
    assert stranger.predict(e["prompt"], api_name="/ask")["block"] is None

    # Tokens the server did not issue are refused: invented, truncated, altered, the old form.
    random_part, mac = token.split(".")
    forged = [f"{'A' * 32}.{'B' * 22}", token[:-1], f"{random_part}.{mac[::-1]}", random_part,
              "api-" + owner.session_hash, token + "x"]
    for bad in forged:
        c = Client(url, verbose=False, httpx_kwargs={"cookies": {"melo_workspace": bad}})
        with pytest.raises(Exception, match="not issued by this server"):
            c.predict(api_name="/edits")
        # ... and so are the page's own events, called by hand with the same tokens.
        reset = _call_event(url, _event(owner.config, "reset-btn", "click"), [bad, True])
        assert reset["success"] is False and "not issued by this server" in str(reset["output"])
    assert [x["id"] for x in owner.predict(api_name="/edits")] == [made]

    # The owner keeps the workspace across connections by sending its cookie again.
    again = Client(url, verbose=False, httpx_kwargs={"cookies": {"melo_workspace": token}})
    assert [x["id"] for x in again.predict(api_name="/edits")] == [made]
    assert again.predict(e["prompt"], api_name="/ask")["text"] == e["target"]


def test_a_request_without_a_workspace_cookie_or_to_an_unknown_name_is_refused_in_one_line(app_server):
    import httpx

    url, _ = app_server
    r = httpx.post(url + "gradio_api/call/edits", json={"data": []})
    event = r.json()["event_id"]
    body = httpx.get(url + f"gradio_api/call/edits/{event}", timeout=60).text
    assert "no workspace" in body and "Traceback" not in body
    r = httpx.post(url + "gradio_api/call/no-such-name", json={"data": []})
    assert r.status_code == 404 and "no such API endpoint" in r.json()["error"] and "/ask" in r.text


def test_an_edit_whose_client_gave_up_is_not_applied(app_server, example_edits):
    """A client that queues an edit behind another and is killed before its edit is written:
    the edit is trained but never committed (nobody would see it happen)."""
    import subprocess
    import sys

    url, _ = app_server
    first = Client(url, verbose=False)
    e, other = example_edits[2], example_edits[8]
    job = first.submit(e["prompt"], e["target"], api_name="/edit")
    code = (f"import time\nfrom gradio_client import Client\nc = Client({url!r}, verbose=False)\n"
            f"print(c.cookies['melo_workspace'], flush=True)\n"
            f"j = c.submit({other['prompt']!r}, {other['target']!r}, api_name='/edit')\n"
            f"time.sleep(0.5)\nprint(j.status().code, flush=True)\ntime.sleep(600)\n")
    quitter = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    token = quitter.stdout.readline().strip()
    status = quitter.stdout.readline().strip()
    quitter.kill()                      # gives up: queued behind the first edit, or training
    quitter.wait()
    assert status in ("Status.IN_QUEUE", "Status.PROCESSING", "Status.STARTING")
    assert job.result(timeout=600)["token_accuracy"] == 1.0
    # Edits take turns in one queue: once this later one is done, the quitter's has run.
    later = example_edits[4]
    assert first.predict(later["prompt"], later["target"], api_name="/edit")["token_accuracy"] == 1.0
    back = Client(url, verbose=False, httpx_kwargs={"cookies": {"melo_workspace": token}})
    assert back.predict(api_name="/edits") == []
    assert back.predict(other["prompt"], api_name="/ask")["block"] is None


def test_fuzz_through_the_api_and_the_command_line(app_server):
    """Generated bad inputs through every API endpoint and the command line: each is refused
    with one plain line (never gradio's "upstream ... exception", never a traceback or a
    server path), and the app's log gains no traceback."""
    import random
    import subprocess
    import sys

    from conftest import ROOT, tree_digest
    from test_robustness import _fuzz_texts

    from webapp.tokens import WorkspaceTokens

    url, root = app_server
    log = root.parent / "app.log"
    tracebacks_before = log.read_text(errors="replace").count("Traceback")
    rng = random.Random(11)
    client = Client(url, verbose=False)
    client.predict("What is 2 + 2?", api_name="/ask")          # its workspace now exists
    folder = root / WorkspaceTokens(root).folder(client.cookies["melo_workspace"])

    def files():
        return {k: v for k, v in tree_digest(folder).items() if k != "last_used"}   # the idle clock
    before = files()
    tried = 0
    values = _fuzz_texts(rng) + list(INVISIBLE.values()) + [True, -1, 0.0, [], {}, [None, 1],
                                                          {"text": "What is 2 + 2?"}]
    for i, value in enumerate(values):
        slots = [("/ask", [value]), ("/edit", [value, "Jupiter."]),
                 ("/edit", ["What is the largest planet?", value]), ("/probe", [value]),
                 ("/delete", [value]), ("/correct", [value, 2, "A spider has eight legs."]),
                 ("/correct", ["How many legs does a spider have?", value, "Eight."]),
                 ("/correct", ["How many legs does a spider have?", 2, value])]
        # Each value in three of the eight places, in turn, so every place sees three values in
        # eight (every value in every place took a minute and a half of the suite's thirty).
        for api, args in [slots[(3 * i + k) % len(slots)] for k in range(3)]:
            tried += 1
            with pytest.raises(Exception) as err:
                client.predict(*args, api_name=api)
            message = str(err.value)
            assert message and "\n" not in message.strip() and "upstream" not in message, (api, value, message)
            assert "Traceback" not in message and str(root) not in message
    assert client.predict(api_name="/edits") == [] and files() == before

    def cli(*args: bytes):
        return subprocess.run([sys.executable, "-m", "melo_engine", *args], cwd=ROOT, capture_output=True,
                              timeout=600)

    ws = str(root.parent / "cli-fuzz").encode()
    cases = []
    texts = [t for t in _fuzz_texts(rng) if isinstance(t, str) and "\x00" not in t and len(t) < 2000]
    for text in rng.sample(texts, 2):       # each call starts python (seconds): a sample
        arg = text.encode("utf-8", "surrogateescape") if not any(0xD800 <= ord(c) < 0xE000 for c in text) \
            else b"\xff\xfe"
        cases += [[b"-w", ws, b"edit", arg, b"x"], [b"-w", ws, b"edit", b"q?", arg], [b"-w", ws, b"ask", arg]]
    cases += [[b"-w", ws, b"frobnicate"], [b"list"], [b"-w", ws, b"edit", b"only-one"],
              [b"-w", ws, b"--key-source", b"nope", b"list"], [b"-w", ws, b"delete", b"\xe2\x80\x8b"]]
    for args in cases:
        tried += 1
        out = cli(*args)
        lines = out.stderr.decode(errors="replace").strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, out.stderr[-500:])
    assert not Path(ws.decode()).exists()          # nothing was created for a refused command
    assert log.read_text(errors="replace").count("Traceback") == tracebacks_before
    assert tried >= 100
