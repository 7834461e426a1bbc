"""The classification task (melo_engine/classifier): the real all-MiniLM-L6-v2 encoder with
its head trained on the shipped WordNet sample, edited by MELO in a real workspace."""
from __future__ import annotations

import pytest

from tests.conftest import tree_digest


@pytest.fixture(scope="module")
def classifier():
    from melo_engine.classifier.backbone import ClassifierBackbone

    return ClassifierBackbone.load()


@pytest.fixture(scope="module")
def rows():
    from melo_engine.classifier.backbone import load_rows

    return load_rows()


def test_sample_ships_with_its_licence(rows):
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "assets" / "data" / "README.md").read_text()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in readme
    splits = {r["split"] for r in rows}
    assert splits == {"train", "test", "edit"}
    # The shift is by branch of the hierarchy: no branch is on both sides.
    up = {(r["label"], r["branch_offset"]) for r in rows if r["split"] != "edit"}
    assert not up & {(r["label"], r["branch_offset"]) for r in rows if r["split"] == "edit"}


def test_three_edits_leave_unrelated_texts_exactly_and_undo_restores(classifier, rows, tmp_path):
    from melo_engine.classifier.editor import ClassifierEditor

    ed = ClassifierEditor.open(tmp_path / "ws", backbone=classifier)
    try:
        shifted = [r for r in rows if r["split"] == "edit"][:60]
        read = ed.classify_many([r["text"] for r in shifted])
        wrong = [r for r, c in zip(shifted, read) if c.label != r["label"]][:3]
        assert len(wrong) == 3
        unrelated = [r["text"] for r in rows if r["split"] == "test"][:10]
        before = [c.probabilities for c in ed.classify_many(unrelated)]
        before_first = ed.classify(wrong[0]["text"]).probabilities

        ids = []
        for r in wrong:
            res = ed.edit(r["text"], r["label"])
            ids.append(res.edit_id)
            got = ed.classify(r["text"])
            assert got.label == r["label"] and got.block == res.block      # right after, by its own block
        after = ed.classify_many(unrelated)
        assert all(c.block is None for c in after)
        assert [c.probabilities for c in after] == before                  # to the float
        assert all(ed.classify(r["text"]).label == r["label"] for r in wrong)   # none forgotten

        ed.delete(ids[0])
        back = ed.classify(wrong[0]["text"])
        assert back.block is None and back.probabilities == before_first
        assert ed.classify(wrong[1]["text"]).label == wrong[1]["label"]

        # A bad label: one line naming the labels, nothing written.
        snapshot = tree_digest(tmp_path / "ws")
        with pytest.raises(ValueError, match=r"unknown label 'vegetable' \(labels: act, animal, .*substance\)") as err:
            ed.edit(wrong[0]["text"], "vegetable")
        assert "\n" not in str(err.value)
        assert tree_digest(tmp_path / "ws") == snapshot
        assert len(ed.edits()) == 2
    finally:
        ed.close()


def test_export_import_carries_classifier_edits(classifier, rows, tmp_path):
    from melo_engine.classifier.editor import ClassifierEditor

    r = next(r for r in rows if r["split"] == "edit" and r["label"] == "plant")
    other = next(lab for lab in classifier.labels if lab != r["label"])
    a = ClassifierEditor.open(tmp_path / "a", backbone=classifier)
    try:
        a.edit(r["text"], other)                  # any label can be taught, not only the true one
        a.export(tmp_path / "edits.safetensors")
    finally:
        a.close()
    b = ClassifierEditor.open(tmp_path / "b", backbone=classifier)
    try:
        assert len(b.import_(tmp_path / "edits.safetensors")) == 1
        assert b.classify(r["text"]).label == other
    finally:
        b.close()


def test_benchmark_short_stream(classifier):
    from melo_engine.bench.classify import classification_benchmark

    res = classification_benchmark(3, ["melo", "grace", "lora"], backbone=classifier, show_progress=False,
                                   test_texts=40, whole_split=False)
    assert res["n"] == 3 and 0 < res["base"]["trr"] <= 1
    for name in ("melo", "grace", "lora"):
        m = res["methods"][name]
        assert {"edit_success", "trr", "err", "curve"} <= set(m)
        assert [p["edits"] for p in m["curve"]] == [1, 2, 3]
    melo = res["methods"]["melo"]
    assert melo["edit_success"] == 1.0 and melo["err"] == 1.0
    assert melo["trr"] == res["base"]["trr"]        # routed nowhere: the test texts see the unedited model


def test_cli_refuses_a_bad_label_in_one_line_and_leaves_no_workspace(tmp_path, capsys):
    from melo_engine.__main__ import main

    ws = tmp_path / "cls"
    rc = main(["-w", str(ws), "--model", "minilm-wordnet", "edit", "a small furry animal", "--label", "vegetable"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "unknown label 'vegetable' (labels: act, animal, artifact," in err
    assert not ws.exists()
    assert main(["-w", str(ws), "edit", "a question?"]) == 2          # neither a target nor a label
    assert "TEXT --label LABEL" in capsys.readouterr().err


def test_the_sentence_key_routes_a_classifier_too(classifier, rows, tmp_path):
    from melo_engine.classifier.editor import ClassifierEditor, classifier_config

    ed = ClassifierEditor.open(tmp_path / "s", config=classifier_config(key_source="sentence"), backbone=classifier)
    try:
        r = next(r for r in rows if r["split"] == "edit" and r["label"] == "animal")
        other = "food"
        res = ed.edit(r["text"], other)
        got = ed.classify(r["text"], compare_base=True)
        assert got.label == other and got.block == res.block and got.base_label != other
        unrelated = next(x["text"] for x in rows if x["split"] == "test" and x["label"] == "location")
        assert ed.classify(unrelated).block is None
    finally:
        ed.close()


def test_the_benchmark_is_reached_from_the_edits_command_and_by_its_own_name():
    from melo_engine.bench.__main__ import build_parser

    p = build_parser()
    args = p.parse_args(["edits", "--dataset", "classification", "--n", "7", "--methods", "melo,lora"])
    assert (args.dataset, args.n, args.methods) == ("classification", 7, "melo,lora")
    assert p.parse_args(["classify", "--key-source", "sentence"]).key_source == "sentence"


def test_examples_are_texts_it_gets_wrong_and_side_effects_run_over_its_test_texts(classifier, rows, tmp_path):
    from melo_engine.classifier.editor import ClassifierEditor

    ed = ClassifierEditor.open(tmp_path / "ex", backbone=classifier)
    try:
        examples = ed.examples()
        assert len(examples) >= 5 and len({e["label"] for e in examples}) == len(examples)    # one per label
        for e, c in zip(examples, ed.classify_many([e["text"] for e in examples])):
            assert c.label == e["predicted"] != e["label"]          # wrong now: worth an edit
        assert ed.examples(2) == examples[:2]
        r = ed.edit(examples[0]["text"], examples[0]["label"])
        test_texts = {x["text"] for x in rows if x["split"] == "test"}
        near = ed.side_effects(r.edit_id)
        assert near and all(n.question in test_texts for n in near)
        assert ed.model_info()["prompt_form"] == "classification"
        assert ed.default_settings()["lr"] == ed.config.lr          # the classifier's own defaults
    finally:
        ed.close()


def test_the_label_chart_pairs_the_bars_only_where_a_block_fired():
    from melo_engine.classifier.editor import Classified
    from webapp import plots, render

    probs = {"animal": 0.7, "food": 0.2, "plant": 0.1}
    base = {"animal": 0.1, "food": 0.3, "plant": 0.6}
    plain = plots.label_bars(Classified("t", "animal", probs, None, None, None, None, "animal", probs))
    assert len(plain.data) == 1 and list(plain.data[0].x) == [0.1, 0.2, 0.7]      # labels top to bottom
    fired = plots.label_bars(Classified("t", "animal", probs, 3, "e1", 0.1, 0.4, "plant", base))
    assert [t.name for t in fired.data] == ["original classifier: plant", "with your edits: animal"]
    assert fired.layout.meta["pairs"] and "block 3 fired" in fired.layout.title.text
    html = render.label_before_after_html(Classified("t", "animal", probs, 3, "e1", 0.1, 0.4, "plant", base))
    assert "plant" in html and "animal" in html and "fix applied (block 3)" in html
