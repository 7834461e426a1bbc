"""Every API endpoint through gradio_client against the running app."""
from __future__ import annotations

import pytest
from gradio_client import Client


@pytest.fixture(scope="module")
def client(app_server):
    url, _ = app_server
    return Client(url, verbose=False)


def test_api_endpoints_are_listed(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/ask", "/edit", "/probe", "/delete", "/edits"} <= names


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
