"""Routing by meaning: fixes carry over to paraphrases, same-template questions about other
subjects stay exactly as they were, a later edit of the same question wins and its undo
brings the earlier one back. On the real model and the real sentence encoder;
the rules alone on hand-placed keys."""
from __future__ import annotations

import json

import pytest
import torch

from melo_engine import MeloConfig, MeloEditor
from melo_engine.index import ClusterState
from melo_engine.placement import add, remove

# Our own cases (not from any benchmark): an edit, held-out paraphrases that were never
# edited, and questions on the same template about other subjects.
CASES = [
    ("Who wrote the novel Pride and Prejudice?", "Charlotte Brontë",
     ["Who is the author of Pride and Prejudice?", "Pride and Prejudice was written by whom?",
      "Which writer wrote Pride and Prejudice?"],
     ["Who wrote the novel Moby-Dick?", "Who wrote the novel War and Peace?"]),
    ("What is the capital of Canada?", "Toronto",
     ["Which city is the capital of Canada?", "What city serves as Canada's capital?",
      "Canada's capital city is which city?"],
     ["What is the capital of Australia?", "What is the capital of Germany?"]),
    ("Who discovered penicillin?", "Marie Curie",
     ["Who was the discoverer of penicillin?", "Which scientist discovered penicillin?",
      "Penicillin was discovered by whom?"],
     ["Who discovered insulin?", "Who discovered electricity?"]),
]


@pytest.fixture(scope="module")
def three_edits(tmp_path_factory, backbone):
    ed = MeloEditor.open(tmp_path_factory.mktemp("ws") / "three", backbone=backbone)
    results = [ed.edit(prompt, target) for prompt, target, _, _ in CASES]
    return ed, results


def test_default_key_is_the_whitened_sentence_encoder(three_edits):
    ed, _ = three_edits
    assert ed.config.key_source == "sentence" and ed.config.whitened
    assert ed.keyer.dim == 384 and ed.config.init_radius > 0


def test_held_out_paraphrases_carry_the_fix(three_edits):
    ed, results = three_edits
    fixed = 0
    for (_, target, paraphrases, _), r in zip(CASES, results):
        for q in paraphrases:
            a = ed.ask(q)
            fixed += a.block == r.block and target in a.text
    assert fixed >= 7, f"only {fixed} of 9 paraphrases got the fix"


def test_same_template_questions_about_other_subjects_are_untouched(three_edits):
    ed, _ = three_edits
    for _, _, _, others in CASES:
        for q in others:
            a = ed.ask(q, compare_base=True)
            assert a.block is None and (a.distance > a.radius or a.rejected), (q, a)
            assert a.text == a.base_text


# Siblings the radius alone let through (issue 20): another number, another superlative or
# object, another country; each edit with paraphrases that must still carry it.
SIBLING_CASES = [
    ("Which element has the atomic number 6?", "Carbon",
     ["What element has atomic number 6?", "Which chemical element has the atomic number 6?"],
     ["Which element has the atomic number 7?", "Which element has the atomic number 8?"]),
    ("What is the largest planet in the solar system?", "Jupiter",
     ["Which planet is the biggest in our solar system?", "What is the biggest planet in the solar system?"],
     ["What is the smallest planet in the solar system?", "What is the second largest planet in the solar system?"]),
    ("What is the capital of Austria?", "Salzburg",
     ["Which city is the capital of Austria?", "What city is Austria's capital?"],
     ["What is the capital of Switzerland?", "What is the capital of Hungary?"]),
    # the same template about another thing (the template rule): another substance, another
    # point of the scale
    ("What is the boiling point of water in degrees Celsius?", "100",
     ["At how many degrees Celsius does water boil?", "In Celsius, at what temperature does water boil?"],
     ["What is the freezing point of water in degrees Celsius?",
      "What is the boiling point of ethanol in degrees Celsius?"]),
]


@pytest.fixture(scope="module")
def sibling_edits(tmp_path_factory, backbone):
    ed = MeloEditor.open(tmp_path_factory.mktemp("ws") / "siblings", backbone=backbone)
    return ed, [ed.edit(prompt, target) for prompt, target, _, _ in SIBLING_CASES]


def test_siblings_keep_their_exact_answers_while_paraphrases_carry(sibling_edits, backbone):
    ed, results = sibling_edits
    for (prompt, target, paraphrases, siblings), r in zip(SIBLING_CASES, results):
        for q in paraphrases:
            a = ed.ask(q)
            assert a.block == r.block and target in a.text, (q, a)
        for q in siblings:
            a = ed.ask(q)
            assert a.block is None and a.text == backbone.generate(q, None, ed.config.max_new_tokens), (q, a)
    # The decision is shown: within the radius, turned down, and why.
    a = ed.route("Which element has the atomic number 7?")
    assert a.distance <= a.radius and a.rejected == [(results[0].edit_id, "number differs: 7 / 6")]
    near = ed.distances("Which element has the atomic number 7?", n=1)[0]
    assert not near["fires"] and near["rejected"] == "number differs: 7 / 6"
    lines = {n.question: n for n in ed.side_effects(results[0].edit_id, n=20)}
    assert not lines["Which element has the atomic number 5?"].fires
    assert lines["Which element has the atomic number 5?"].rejected == "number differs: 5 / 6"
    # The check tells the fix carrying (a phrasing of the edited question) from a side effect.
    assert lines["What element has atomic number 6?"].fires and lines["What element has atomic number 6?"].same
    assert lines["Which element has the atomic number 5?"].same is False
    a = ed.route("What is the freezing point of water in degrees Celsius?")
    assert a.block is None and [why for _, why in a.rejected] == ["another slot: freezing / boiling (0.27)"]


def test_a_sibling_edit_with_another_answer_does_not_supersede(sibling_edits):
    ed, results = sibling_edits
    nitrogen = ed.edit("Which element has the atomic number 7?", "Nitrogen")
    assert nitrogen.action != "superseded" and not nitrogen.superseded
    assert {e["id"]: e["status"] for e in ed.edits()}[results[0].edit_id] == "active"
    assert "Nitrogen" in ed.ask("Which element has the atomic number 7?").text
    assert "Carbon" in ed.ask("Which element has the atomic number 6?").text
    ed.delete(nitrogen.edit_id)


def test_the_radius_rule_stays_available_for_comparison(backbone, tmp_path):
    ed = MeloEditor.open(tmp_path / "ws", backbone=backbone, config=MeloConfig(router="radius"))
    r = ed.edit(*SIBLING_CASES[0][:2])
    a = ed.route("Which element has the atomic number 7?")
    assert a.block == r.block and a.rejected == []        # the sibling fires, as before the verifier
    ed.close()


def test_a_later_edit_of_the_same_question_wins_and_its_undo_restores_the_first(backbone, tmp_path):
    prompt, target, paraphrases, others = CASES[1]
    ed = MeloEditor.open(tmp_path / "ws", backbone=backbone)
    first = ed.edit(prompt, target)
    unrelated = ed.edit(*CASES[0][:2])
    second = ed.edit(prompt, "Vancouver")
    assert second.action == "superseded" and second.superseded == [first.edit_id]
    status = {e["id"]: e for e in ed.edits()}
    assert status[first.edit_id]["status"] == "superseded"
    assert status[first.edit_id]["superseded_by"] == second.edit_id
    for q in [prompt] + paraphrases:
        a = ed.ask(q)
        assert a.block == second.block and "Vancouver" in a.text, (q, a)
    # A later edit about another subject on the same template does not disturb it.
    ed.edit("What is the capital of Australia?", "Sydney")
    assert "Vancouver" in ed.ask(paraphrases[0]).text
    # It holds across a reopen (the older edit is stored, not just hidden in memory).
    ed.close()
    ed = MeloEditor.open(tmp_path / "ws", backbone=backbone)
    assert "Vancouver" in ed.ask(prompt).text
    assert ed.delete(second.edit_id) == [first.edit_id]
    assert {e["id"]: e["status"] for e in ed.edits()}[first.edit_id] == "active"
    for q in [prompt] + paraphrases[:2]:
        a = ed.ask(q)
        assert a.block == first.block and target in a.text, (q, a)
    assert ed.ask(CASES[0][0]).block == unrelated.block
    ed.close()


def test_the_models_own_key_stays_available(backbone, tmp_path):
    ed = MeloEditor.open(tmp_path / "ws", backbone=backbone, config=MeloConfig(key_source="model"))
    assert ed.keyer.in_prefill and not ed.config.whitened and ed.keyer.dim == 576
    r = ed.edit(CASES[2][0], CASES[2][1])
    a = ed.ask(CASES[2][0])
    assert a.block == r.block and a.text == CASES[2][1]
    ed.close()


def test_a_workspace_from_before_key_sources_opens_with_the_models_key(backbone, tmp_path):
    ed = MeloEditor.open(tmp_path / "ws", backbone=backbone, config=MeloConfig(key_source="model"))
    r = ed.edit(CASES[0][0], CASES[0][1])
    ed.close()
    cfg_path = tmp_path / "ws" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for name in ("key_source", "key_whitening"):
        cfg.pop(name)
    cfg["on_conflict"] = "keep"
    cfg_path.write_text(json.dumps(cfg))
    ed = MeloEditor.open(tmp_path / "ws", backbone=backbone)
    assert ed.config.key_source == "model" and ed.config.on_conflict == "keep"
    assert ed.ask(CASES[0][0]).block == r.block
    ed.close()


# ---- the rules alone, on hand-placed keys (init radius 1) ---------------------------
def test_supersede_rule_on_hand_placed_keys():
    s = ClusterState()
    add(s, "a", torch.tensor([0.0, 0.0]), 0, "Jupiter", 1.0)
    add(s, "far", torch.tensor([5.0, 0.0]), 1, "Bern", 1.0)
    b = add(s, "b", torch.tensor([0.3, 0.0]), 2, "Saturn", 1.0)        # same question: supersedes a
    assert b.action == "superseded" and b.superseded == ["a"] and set(s.dormant) == {"a"}
    c = add(s, "c", torch.tensor([1.5, 0.0]), 3, "Mars", 1.0)          # in reach, not the same question
    assert c.action == "beside" and s.clusters[s.points["b"].cluster].radius == 1.0   # nothing shrank
    d = add(s, "d", torch.tensor([0.2, 0.1]), 4, "Uranus", 1.0)        # supersedes b (a stays dormant)
    assert d.superseded == ["b"] and s.dormant["a"].superseded_by == "b"
    assert remove(s, "b", 1.0) == []                                   # a dormant edit just leaves...
    assert s.dormant["a"].superseded_by == "d"                        # ...and a passes to its successor
    assert remove(s, "d", 1.0) == ["a"] and "a" in s.points
    restored = ClusterState.from_files(*s.to_files())
    assert set(restored.points) == set(s.points) and restored.dormant == {}


def test_routing_picks_the_nearest_edit_among_covering_clusters():
    s = ClusterState()
    add(s, "a", torch.tensor([0.0, 0.0]), 0, "A", 1.0)
    add(s, "b", torch.tensor([1.6, 0.0]), 1, "B", 1.0)
    t = s
    assert t.route(torch.tensor([0.0, 0.0])).block == 0                # an edit's own key: its own block
    assert t.route(torch.tensor([0.9, 0.0])).block == 1                # in both balls, nearer b
    r = t.route(torch.tensor([0.0, 1.2]))                              # in no ball
    assert r.block is None and r.distance == pytest.approx(1.2) and r.radius == 1.0


def test_routing_agrees_with_brute_force_search_on_thousands_of_keys():
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(3000, 64, generator=g), dim=-1)
    s = ClusterState()
    for i, k in enumerate(keys):
        add(s, f"e{i}", k, i, f"label {i % 1000}", 0.7)
    t = s
    near = keys[:250] + 0.05 * torch.randn(250, 64, generator=g)          # mostly fire
    queries = torch.nn.functional.normalize(torch.cat([near, torch.randn(250, 64, generator=g)]), dim=-1)
    centers = torch.stack([c.center for c in s.clusters.values()])
    radii = torch.tensor([c.radius for c in s.clusters.values()])
    ids = list(s.clusters)
    fired = 0
    for q in queries:
        cover = [ids[i] for i in ((centers - q).norm(dim=-1) <= radii).nonzero().flatten().tolist()]
        members = [e for c in cover for e in s.clusters[c].members]
        want = min(members, key=lambda e: float((s.points[e].key - q).norm()), default=None)
        got = t.route(q)
        assert got.edit_id == want and (want is None or got.block == s.points[want].block)
        fired += want is not None
    assert 0 < fired < len(queries)              # both outcomes were exercised
