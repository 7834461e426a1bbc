"""The MELO engine on the real default model: edits, retention,
locality, undo, persistence and isolation."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from melo_engine import MeloEditor
from conftest import ROOT


def run_cli(*args, check=True):
    """The command line, in a new process (so nothing is shared with this one)."""
    return subprocess.run([sys.executable, "-m", "melo_engine", *args], cwd=ROOT, capture_output=True,
                          text=True, check=check, timeout=600)


@pytest.fixture(scope="module")
def base_answers(backbone, example_edits, unrelated_questions):
    """The unedited model's answers, before any edit exists."""
    qs = [e["prompt"] for e in example_edits] + unrelated_questions
    return {q: backbone.generate(q, None, 48) for q in qs}


@pytest.fixture(scope="module")
def edited(tmp_path_factory, backbone, example_edits):
    """One workspace with all ten example edits, made in order; results kept for the tests."""
    ed = MeloEditor.open(tmp_path_factory.mktemp("ws") / "main", backbone=backbone)
    results = [ed.edit(e["prompt"], e["target"]) for e in example_edits]
    return ed, results


def test_examples_are_real_wrong_answers(base_answers, example_edits):
    assert len(example_edits) == 10
    for e in example_edits:
        assert base_answers[e["prompt"]] != e["target"]


def test_each_edit_reproduces_its_target_right_away(backbone, example_edits, tmp_path):
    ed = MeloEditor.open(tmp_path / "ws", backbone=backbone)
    for e in example_edits:
        r = ed.edit(e["prompt"], e["target"])
        assert r.token_accuracy == 1.0 and r.steps <= ed.config.max_iters
        a = ed.ask(e["prompt"])
        assert a.text == e["target"], (e, a)
        assert a.block == r.block and a.distance == pytest.approx(0.0, abs=1e-4)


def test_every_edit_retained_after_all_ten(edited, example_edits):
    ed, results = edited
    assert len({r.block for r in results}) == 10          # every edit has its own block
    for e, r in zip(example_edits, results):
        a = ed.ask(e["prompt"])
        assert a.text == e["target"] and a.block == r.block


def test_unrelated_prompts_see_exactly_the_base_model(edited, base_answers, unrelated_questions):
    ed, _ = edited
    assert len(unrelated_questions) == 10
    for q in unrelated_questions:
        a = ed.ask(q, compare_base=True)
        assert a.block is None, (q, a)
        assert a.text == base_answers[q] == a.base_text
        assert a.distance is not None and a.distance > a.radius


def test_paraphrase_routes_to_the_edit(backbone, example_edits, tmp_path):
    # Generality is a measured rate (docs/BENCHMARKS.md); test_routing.py holds more cases.
    ed = MeloEditor.open(tmp_path / "ws", backbone=backbone)
    e = example_edits[0]
    r = ed.edit(e["prompt"], e["target"])
    a = ed.ask(e["paraphrase"], compare_base=True)
    assert a.block == r.block and a.distance <= a.radius
    assert e["target"].split()[0] in a.text          # the fix carries over (first word of the target)
    assert a.base_text != a.text


def test_delete_restores_the_base_answer(backbone, example_edits, base_answers, tmp_path):
    ed = MeloEditor.open(tmp_path / "ws", backbone=backbone)
    e = example_edits[1]
    r = ed.edit(e["prompt"], e["target"])
    assert ed.ask(e["prompt"]).text == e["target"]
    ed.delete(r.edit_id)
    a = ed.ask(e["prompt"])
    assert a.block is None and a.text == base_answers[e["prompt"]]
    assert ed.edits() == [] and len(ed.bank) == 0 and not ed.state.clusters
    with pytest.raises(ValueError, match="unknown edit id"):
        ed.delete(r.edit_id)


def test_reopened_workspace_answers_the_same_in_a_new_process(edited, example_edits):
    ed, results = edited
    out = run_cli("--workspace", str(ed.workspace), "--json", "ask", example_edits[2]["prompt"])
    answer = json.loads(out.stdout)
    assert answer["text"] == example_edits[2]["target"] and answer["block"] == results[2].block
    listed = json.loads(run_cli("--workspace", str(ed.workspace), "--json", "list").stdout)
    assert [e["id"] for e in listed] == [r.edit_id for r in results]


def test_two_workspaces_in_one_process_are_isolated(backbone, example_edits, base_answers, tmp_path):
    a = MeloEditor.open(tmp_path / "a", backbone=backbone)
    b = MeloEditor.open(tmp_path / "b", backbone=backbone)
    e = example_edits[3]
    a.edit(e["prompt"], e["target"])
    assert a.ask(e["prompt"]).text == e["target"]
    ans = b.ask(e["prompt"])
    assert ans.block is None and ans.text == base_answers[e["prompt"]]
    assert b.edits() == []
    assert not b.state.clusters and len(a.state.clusters) == 1


@pytest.mark.parametrize("on_conflict", ["keep", "forget"])
def test_paper_split_forgets_or_rehomes_members_left_outside(on_conflict):
    """The paper's split rule (kept for comparison; the default supersedes, see
    test_routing.py), on hand-placed keys: two members of one answer, then a conflicting
    key close to both. "forget" drops them (the paper); "keep" gives each a cluster of its
    own that still holds its key and stops short of the new key."""
    import torch

    from melo_engine.index import ClusterState
    from melo_engine.placement import add

    s = ClusterState()
    r0 = 1.0
    add(s, "a", torch.tensor([0.0, 0.0]), 0, "Paris", r0, on_conflict)
    joined = add(s, "b", torch.tensor([0.8, 0.0]), 1, "paris.", r0, on_conflict)
    assert joined.action == "joined" and s.clusters[joined.cluster].members == ["a", "b"]
    placed = add(s, "c", torch.tensor([0.4, 0.5]), 2, "Rome", r0, on_conflict)
    assert placed.action == "conflict"
    new = s.clusters[placed.cluster]
    if on_conflict == "forget":
        assert sorted(placed.forgotten) == ["a", "b"] and not placed.moved
        assert set(s.points) == {"c"}
        return
    assert not placed.forgotten and sorted(placed.moved) == ["a", "b"]
    for e in ("a", "b"):
        home = s.clusters[s.points[e].cluster]
        assert home.members == [e] and torch.equal(home.center, s.points[e].key)
        assert home.radius < float((s.points[e].key - new.center).norm()) / 2
    # Every key is nearest to its own cluster's center, inside its radius.
    for e, p in s.points.items():
        c, d = s.nearest(p.key)
        assert c.id == p.cluster and d <= c.radius


def test_mixed_batch_uses_each_examples_block(edited, example_edits):
    """One batched forward, one example with a block and one without: the latter is exact."""
    import torch

    ed, results = edited
    bb = ed.backbone
    enc = bb.encode([example_edits[0]["prompt"], "What is the capital of Italy?"])
    with torch.no_grad():
        base = bb.model(input_ids=enc.ids, attention_mask=enc.mask).logits
        with bb.lora(ed.bank.gather([results[0].block, None], ed.modules)):
            mixed = bb.model(input_ids=enc.ids, attention_mask=enc.mask).logits
    assert torch.equal(mixed[1], base[1])
    assert not torch.allclose(mixed[0], base[0])


def test_speed_path_matches_the_full_model(backbone):
    """The split forward (lower layers once, upper layers per step) is the same model."""
    assert backbone.split_is_exact(24)


def test_index_snapshot_has_everything_to_plot(edited):
    ed, results = edited
    snap = ed.index_snapshot()
    assert {p["edit_id"] for p in snap["points"]} == {r.edit_id for r in results}
    dim = ed.keyer.dim
    assert all(len(p["key"]) == dim and p["prompt"] for p in snap["points"])
    assert all(c["radius"] > 0 and len(c["center"]) == dim for c in snap["clusters"])


def test_probe_answers_together_what_ask_answers_one_at_a_time(edited, example_edits, unrelated_questions):
    ed, results = edited
    qs = [example_edits[0]["paraphrase"], example_edits[6]["prompt"]] + unrelated_questions[:4]
    together = ed.probe(qs)
    for q, a in zip(qs, together):
        single = ed.ask(q, compare_base=True)
        assert (a.text, a.base_text, a.block, a.edit_id) == (single.text, single.base_text, single.block, single.edit_id)
    with pytest.raises(ValueError, match="question 2 is empty"):
        ed.probe(["What is 2 + 2?", "\u200b"])


def test_side_effects_and_distances_agree_with_routing(edited, example_edits):
    ed, results = edited
    r = results[3]                                   # "Which element has the atomic number 1?"
    found = ed.side_effects(r.edit_id)
    assert found[0].question == example_edits[3]["prompt"] and found[0].fires and found[0].distance < 1e-5
    assert [n.distance for n in found] == sorted(n.distance for n in found)
    for n in found:                                  # "fires" is what routing does with that question
        assert n.fires == (ed.route(n.question).edit_id == r.edit_id)
    # A same-template neighbour within the radius is listed, turned down by the verifier
    # with its reason (before the verifier it fired: the reason this check exists).
    sibling = next(n for n in found if "atomic number 2?" in n.question)
    assert sibling.distance <= sibling.radius and not sibling.fires and sibling.rejected == "number differs: 2 / 1"
    near = ed.distances(example_edits[3]["paraphrase"], n=3)
    route = ed.route(example_edits[3]["paraphrase"])
    assert near[0]["cluster"] == route.cluster and near[0]["distance"] == pytest.approx(route.distance, abs=1e-5)
    assert near[0]["fires"] == (route.block is not None) and len(near) == 3


def test_export_import_keeps_times_and_radii_and_reset_restores_defaults(backbone, example_edits, tmp_path):
    a = MeloEditor.open(tmp_path / "a", backbone=backbone)
    a.update_settings(init_radius=0.5)
    e = example_edits[5]
    a.edit(e["prompt"], e["target"])
    path = a.export(tmp_path / "x.melo")
    b = MeloEditor.open(tmp_path / "b", backbone=backbone)
    b.import_(path)
    (x,), (y,) = a.edits(), b.edits()
    for k in ("prompt", "target", "created", "seconds", "steps", "action"):
        assert x[k] == y[k], k
    assert b.state.clusters[y["cluster"]].radius == 0.5 != b.config.init_radius
    again = b.import_report(path)                  # the same file twice: nothing added twice
    assert again.added == [] and again.skipped == [x["id"]] and len(b.edits()) == 1
    assert a.import_report(path).skipped == [x["id"]] and len(a.edits()) == 1   # back where it came from
    defaults = a.default_settings()
    a.reset(default_settings=True)
    assert a.edits() == [] and a.config.init_radius == defaults["init_radius"] != 0.5
