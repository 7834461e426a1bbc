"""The probe bank: the user's questions in chroma, searched exactly. On the real model's key
setting (the whitened sentence encoder) and a real persistent chroma; brute force over the
bank's own keys is the answer every search must give."""
from __future__ import annotations

import json
import time

import pytest
import torch

from melo_engine.bench.probebank import bundled_questions
from melo_engine.index import ClusterState
from melo_engine.placement import add
from melo_engine.neighbours import side_effects
from melo_engine.probebank import START_K, ProbeBank, bank_side_effects, client_for, collection_name
from melo_engine.questionfile import MAX_CHARS, read_questions_file

QUESTIONS = 300


@pytest.fixture(scope="module")
def keyer(backbone):
    from melo_engine.config import MeloConfig
    from melo_engine.keys import Keyer

    return Keyer(backbone, MeloConfig().resolved(backbone.num_layers))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, keyer):
    """A bank of the first 300 bundled questions (zsRE questions and their paraphrases, so
    some lie close together), loaded from a .txt file; with brute force's view of it."""
    root = tmp_path_factory.mktemp("bank")
    qfile = root / "questions.txt"
    qfile.write_text("\n".join(bundled_questions(QUESTIONS)) + "\n")
    bank = ProbeBank.open(keyer, root / "probes")
    added, skipped = bank.add_file(qfile)
    assert (added, skipped) == (QUESTIONS, 0)
    questions, keys = bank.everything()
    yield bank, qfile, questions, keys
    bank.close()


def _brute(keys, questions, center, radius):
    d = torch.cdist(center.float()[None], keys, compute_mode="donot_use_mm_for_euclid_dist")[0]
    return {questions[i] for i in (d <= radius).nonzero().flatten().tolist()}, d


def test_within_finds_exactly_what_brute_force_finds(loaded, keyer):
    bank, _, questions, keys = loaded
    centers = torch.cat([keys[[0, 7, 150]], keyer.keys(["Which river flows through Vienna?"])])
    grew = False
    for center in centers:
        for radius in (0.3, 0.8, 1.0, 1.2, 1.4):
            truth, d = _brute(keys, questions, center, radius)
            got = bank.within(center, radius)
            assert {q for q, _ in got} == truth, (radius, len(got), len(truth))
            assert [x for _, x in got] == sorted(x for _, x in got)
            for q, x in got:
                assert abs(x - float(d[questions.index(q)])) < 1e-5
            grew |= len(truth) > START_K
    assert grew, "no search needed more than chroma's first batch: the doubling went untested"
    # at_least: the nearest ones come with it even outside the radius.
    near = bank.within(centers[3], 0.0, at_least=5)
    _, d = _brute(keys, questions, centers[3], 0.0)
    assert [round(x, 5) for _, x in near] == [round(float(x), 5) for x in torch.sort(d).values[:5]]


def test_adding_the_same_file_twice_adds_nothing(loaded):
    bank, qfile, _, _ = loaded
    before = bank.count()
    assert bank.add_file(qfile) == (0, QUESTIONS)
    assert bank.count() == before
    assert bank.sources() == {"questions.txt": QUESTIONS}


@pytest.mark.parametrize("name,body,says", [
    ("long.txt", "What is the capital of France?\n" + "x" * (MAX_CHARS + 1) + "?\n", "line 2"),
    ("control.txt", "Fine question?\nBad \x07 bell?\n", "line 2"),
    ("invisible.txt", "Fine question?\n\u200b\u200b\n", "no visible text"),
    ("dict.json", json.dumps({"question": "Not a list?"}), "list"),
    ("noquestion.json", json.dumps([{"answer": "Paris"}]), "item 1"),
    ("numbers.json", json.dumps(["Fine?", 3]), "item 2"),
    ("broken.json", '["Fine?", ', "not valid JSON"),
    ("empty.txt", "\n\n  \n", "no questions"),
    ("questions.pdf", "What?", ".txt"),
])
def test_a_bad_file_is_refused_in_one_line_and_adds_nothing(loaded, tmp_path, name, body, says):
    bank, _, _, _ = loaded
    before = bank.count()
    path = tmp_path / name
    path.write_text(body)
    with pytest.raises(ValueError) as err:
        bank.add_file(path)
    msg = str(err.value)
    assert "\n" not in msg and name in msg and says in msg, msg
    assert bank.count() == before


def test_files_in_each_format(tmp_path):
    (tmp_path / "a.txt").write_text("  Who  wrote Hamlet?\n\nWho wrote Hamlet?\nWhat is 2+2?\n")
    assert read_questions_file(tmp_path / "a.txt") == ["Who wrote Hamlet?", "What is 2+2?"]
    (tmp_path / "b.json").write_text(json.dumps(["A?", {"question": "B?"}, {"src": "C?"}, {"prompt": "D is"}, ""]))
    assert read_questions_file(tmp_path / "b.json") == ["A?", "B?", "C?", "D is"]
    (tmp_path / "c.csv").write_text("id,question\n1,\"Where is Lyon, exactly?\"\n2,Why?\n")
    assert read_questions_file(tmp_path / "c.csv") == ["Where is Lyon, exactly?", "Why?"]
    (tmp_path / "d.csv").write_text("Who painted Guernica?,x\nWho painted the Mona Lisa?,y\n")
    assert read_questions_file(tmp_path / "d.csv") == ["Who painted Guernica?", "Who painted the Mona Lisa?"]


def test_bank_side_effects_agree_with_brute_force_routing(loaded, keyer):
    bank, _, questions, keys = loaded
    state = ClusterState()
    radius = 0.8
    # Edits on bank questions (their paraphrases are in the bank too) and one outside it.
    prompts = [questions[i] for i in (0, 3, 9, 30, 60)] + ["Who composed the Moonlight Sonata?"]
    for i, k in enumerate(keyer.keys(prompts)):
        add(state, f"e{i}", k, i, f"answer {i}", radius)
    fired_any = 0
    for eid in state.points:
        got = bank_side_effects(state, eid, bank, n=8)
        want = side_effects(state, eid, questions, keys, n=8)       # brute force over every key
        assert sorted(r.question for r in got if r.fires) == sorted(r.question for r in want if r.fires)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert abs(a.distance - b.distance) < 1e-5 and a.radius == b.radius
        for r in got:          # each row routed as brute force routes it
            assert r.fired_edit == state.route(keys[questions.index(r.question)]).edit_id
        fired_any += sum(r.fires for r in got)
    assert fired_any >= 5


def test_sources_can_be_removed(keyer, tmp_path):
    bank = ProbeBank.open(keyer, tmp_path)
    assert bank.add(["Who wrote Hamlet?", "Who wrote Macbeth?"], "plays") == (2, 0)
    assert bank.add(["Who wrote Macbeth?", "What is the capital of Peru?"], "mixed") == (1, 1)
    assert bank.sources() == {"plays": 2, "mixed": 1}
    assert bank.remove_source("plays") == 2
    assert bank.sources() == {"mixed": 1} and bank.count() == 1
    assert bank.within(keyer.keys(["Who wrote Hamlet?"])[0], 0.5) == []
    bank.close()


def test_without_a_server_the_bank_is_a_persistent_client_under_root(keyer, tmp_path, monkeypatch):
    monkeypatch.delenv("MELO_CHROMA_URL", raising=False)
    bank = ProbeBank.open(keyer, tmp_path / "here")
    bank.add(["Who wrote Hamlet?"])
    name = bank.name
    assert (tmp_path / "here" / "chroma.sqlite3").is_file()
    bank.close()
    again = ProbeBank.open(keyer, tmp_path / "here")      # the same bank, reopened
    assert again.name == name and again.count() == 1
    again.close()
    # One collection per key space, named within chroma's limits.
    assert 3 <= len(name) <= 63 and name.startswith("probes-") and keyer.cfg.key_name()[:8] in name


def test_a_server_url_picks_the_http_client(monkeypatch):
    import chromadb

    seen = {}
    monkeypatch.setattr(chromadb, "HttpClient", lambda **kw: seen.update(kw) or "client")
    monkeypatch.setenv("MELO_CHROMA_URL", "https://chroma.lab.example:9443")
    assert client_for() == "client" and (seen["host"], seen["port"], seen["ssl"]) == ("chroma.lab.example", 9443, True)
    monkeypatch.setenv("MELO_CHROMA_URL", "chroma:8000")
    client_for()
    assert (seen["host"], seen["port"], seen["ssl"]) == ("chroma", 8000, False)
    monkeypatch.setenv("MELO_CHROMA_URL", "ftp://chroma")
    with pytest.raises(ValueError, match="MELO_CHROMA_URL"):
        client_for()


def test_collection_names_stay_within_chromas_rules():
    from types import SimpleNamespace

    class Cfg:
        model = "some-org/a-very-long-model-name-that-goes-on-and-on-v2.5"

        def key_name(self):
            return "model-L12-mean_user-euclidean-whitened-completion"

    keyer = SimpleNamespace(cfg=Cfg(), backbone=SimpleNamespace(fingerprint={"hidden_size": 576}))
    name = collection_name(keyer)
    assert 3 <= len(name) <= 63 and name[0].isalnum() and name[-1].isalnum()
    assert all(c.isalnum() or c in "._-" for c in name) and ".." not in name


def test_an_edits_side_effects_reach_the_users_own_questions(backbone, tmp_path, monkeypatch):
    """The CLI loads a class's question list into the bank of the workspace's key space;
    the editor's side-effect check then names the list's questions the edit fires for (a
    paraphrase) beside the bundled reference questions, and not the unrelated ones."""
    import subprocess
    import sys

    from melo_engine import MeloEditor

    monkeypatch.setenv("MELO_PROBE_BANK", str(tmp_path / "probes"))
    ws = tmp_path / "ws"
    q, target = "Which planet is the largest in the solar system?", "Jupiter is the largest planet."
    mine = ["What is the biggest planet of our solar system?", "Who painted the Mona Lisa?",
            "How many strings does a violin have?"]
    (tmp_path / "class.txt").write_text("\n".join(mine) + "\n")
    ed = MeloEditor.open(ws, backbone=backbone)
    r = ed.edit(q, target)
    before = {n.question for n in ed.side_effects(r.edit_id, n=50)}
    assert not before & set(mine)                 # nothing loaded yet: the bundled bank only
    cli = [sys.executable, "-m", "melo_engine", "-w", str(ws), "--json", "probes"]
    ed.close()
    out = subprocess.run(cli + ["load", str(tmp_path / "class.txt")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["added"] == 3
    again = subprocess.run(cli + ["load", str(tmp_path / "class.txt")], capture_output=True, text=True, timeout=600)
    assert json.loads(again.stdout)["added"] == 0
    bad = subprocess.run(cli + ["load", str(tmp_path / "missing.txt")], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error:")
    listed = json.loads(subprocess.run(cli + ["list"], capture_output=True, text=True, timeout=600).stdout)
    assert listed == {"questions": 3, "source class.txt": 3}
    ed = MeloEditor.open(ws, backbone=backbone)
    rows = {n.question: n for n in ed.side_effects(r.edit_id, n=50)}
    assert rows[mine[0]].fires and rows[mine[0]].fired_edit == r.edit_id
    assert all(not rows[m].fires for m in mine[1:] if m in rows)
    assert any(not x.fires for x in rows.values() if x.question not in mine)   # the bundled ones stay
    ed.close()


def test_a_workspaces_own_questions_are_seen_by_it_and_the_shared_list_by_all(keyer, tmp_path):
    """Owners: the shared list (the shell's) is in every workspace's checks; a workspace's
    own list (the page's) only in its own; removing a workspace's list leaves the others."""
    from melo_engine.probebank import forget

    shared = ProbeBank.open(keyer, tmp_path)
    mine, yours = shared.view("ws-mine"), shared.view("ws-yours")
    assert shared.add(["Who wrote Hamlet?"], "class.txt") == (1, 0)
    assert mine.add(["Who wrote Macbeth?", "Who wrote Hamlet?"], "mine.txt") == (1, 1)   # Hamlet: shared already
    assert yours.add(["Who wrote Macbeth?"], "yours.txt") == (1, 0)                      # not mine: its own row
    assert (shared.count(), mine.count(), yours.count()) == (1, 2, 2)
    macbeth = keyer.keys(["Who wrote Macbeth?"])[0]
    assert [q for q, _ in mine.within(macbeth, 0.05)] == ["Who wrote Macbeth?"]
    assert shared.within(macbeth, 0.05) == []                       # the shared list has no Macbeth
    assert mine.sources() == {"class.txt": 1, "mine.txt": 1} and shared.sources() == {"class.txt": 1}
    # A shared question a workspace also holds comes once in its searches and its view.
    assert shared.add(["Who wrote Macbeth?"], "later.txt") == (1, 0)
    assert [q for q, _ in mine.within(macbeth, 0.05)] == ["Who wrote Macbeth?"]
    assert mine.everything()[0].count("Who wrote Macbeth?") == 1
    # A workspace removes only its own rows; the shared list stays.
    assert mine.remove_source("class.txt") == 0 and shared.count() == 2
    # Its removal forgets its rows in every key space, and nobody else's.
    assert forget("ws-mine", tmp_path) == 1
    assert (mine.count(), yours.count(), shared.count()) == (2, 2, 2)   # yours: Macbeth in both, once
    assert mine.sources() == {"class.txt": 1, "later.txt": 1}
    with pytest.raises(ValueError, match="only a workspace"):
        forget("", tmp_path)
    shared.close()


def test_a_bank_from_before_own_lists_is_the_shared_list(keyer, tmp_path):
    """A collection written before workspaces had lists of their own is the shared list, as
    it stands: every workspace keeps checking against it, and nothing is rewritten."""
    import numpy as np

    from melo_engine.probebank import question_id, space_digest

    client = client_for(tmp_path)
    old = client.get_or_create_collection(collection_name(keyer), embedding_function=None,
                                          configuration={"hnsw": {"space": "l2"}},
                                          metadata={"model": str(keyer.cfg.model), "key": keyer.cfg.key_name(),
                                                    "space": space_digest(keyer)})
    qs = ["Who wrote Hamlet?", "What is the capital of Peru?"]
    old.add(ids=[question_id(q) for q in qs], embeddings=keyer.keys(qs).float().numpy().astype(np.float32),
            documents=qs, metadatas=[{"source": "old.txt", "question": q} for q in qs])
    client.close()
    bank = ProbeBank.open(keyer, tmp_path)
    assert bank.count() == 2 and bank.view("ws-a").count() == 2
    assert bank.collection.metadata["model"] == str(keyer.cfg.model)
    assert [q for q, _ in bank.view("ws-a").within(keyer.keys(["Who wrote Hamlet?"])[0], 0.05)] == ["Who wrote Hamlet?"]
    assert bank.add(qs, "again.txt") == (0, 2)                        # the same ids as before
    bank.close()


def test_a_visitors_list_joins_only_its_own_checks_and_goes_with_its_workspace(backbone, tmp_path, monkeypatch):
    """Through the web app's pool: visitor A loads a list (Settings); A's side-effect check
    names the list's paraphrase, B's check of the same edit does not; A's folder is kept by
    the sweep like one with edits; removing A's workspace takes its list out of the bank."""
    from melo_engine.probebank import owner_of
    from webapp.questionlists import MARK as QUESTIONS_MARK, load
    from webapp.sessions import WorkspacePool

    monkeypatch.setenv("MELO_PROBE_BANK", str(tmp_path / "probes"))
    pool = WorkspacePool(backbone, tmp_path / "pool")
    a, b = pool.tokens.new(), pool.tokens.new()
    q, target = "Which planet is the largest in the solar system?", "Jupiter is the largest planet."
    paraphrase = "What is the biggest planet of our solar system?"
    (tmp_path / "mine.txt").write_text(paraphrase + "\nWho painted the Mona Lisa?\n")
    assert load(pool, a, tmp_path / "mine.txt")[:2] == (2, 0)
    assert load(pool, a, tmp_path / "mine.txt")[:2] == (0, 2)
    with pytest.raises(ValueError, match="no questions"):                  # a refused file: B gets no workspace
        (tmp_path / "empty.txt").write_text("\n")
        load(pool, b, tmp_path / "empty.txt")
    assert pool.existing(b) is None
    edits = {}
    for t in (a, b):
        with pool.writing(t) as ed:
            edits[t] = ed.edit(q, target).edit_id
    seen = {t: {n.question: n for n in pool.existing(t).side_effects(edits[t], n=50)} for t in (a, b)}
    assert seen[a][paraphrase].fires and paraphrase not in seen[b]
    assert (pool.root / pool.tokens.folder(a) / QUESTIONS_MARK).is_file()
    # Visitor C only loads the list: an empty workspace, kept like one with edits.
    c = pool.tokens.new()
    assert load(pool, c, tmp_path / "mine.txt")[:2] == (2, 0)
    owners = {t: owner_of(pool.root / pool.tokens.folder(t) / "ws") for t in (a, c)}
    bank = pool.existing(b).probe_bank()
    assert pool.sweep(now=time.time() + 3600) == []
    assert pool.sweep(now=time.time() + 2 * 24 * 3600) == sorted(pool.tokens.folder(t) for t in (a, b, c))
    assert bank.view(owners[a]).count() == 0 and bank.view(owners[c]).count() == 0     # their lists went with them
    pool.stop()


def test_the_sweep_leaves_a_workspace_alone_while_its_list_loads(backbone, tmp_path, monkeypatch):
    """A long list loading into a new workspace (its write under way) is not swept as an
    empty workspace; a refused file marks nothing; the mark comes before the load, so a
    list that fails part way still leaves with its workspace."""
    from webapp.questionlists import MARK as QUESTIONS_MARK, load
    from webapp.sessions import WorkspacePool

    monkeypatch.setenv("MELO_PROBE_BANK", str(tmp_path / "probes"))
    pool = WorkspacePool(backbone, tmp_path / "pool")
    t = pool.tokens.new()
    folder = pool.tokens.folder(t)
    (tmp_path / "bad.txt").write_text("Who wrote Hamlet?\n" + "x" * 600 + "\n")
    with pool.writing(t) as ed:
        assert ed.probe_bank().count() == 0
        assert pool.sweep(now=time.time() + 2 * 24 * 3600) == []           # a write is under way
    with pytest.raises(ValueError, match="line 2"):
        load(pool, t, tmp_path / "bad.txt")
    assert not (pool.root / folder / QUESTIONS_MARK).exists()
    (tmp_path / "ok.txt").write_text("Who wrote Hamlet?\n")
    assert load(pool, t, tmp_path / "ok.txt")[:2] == (1, 0)
    assert pool.existing(t).probe_bank().count() == 1
    pool.stop()
