"""Short runs of the benchmarks: the streams of each protocol, the shape of a result, MELO's
locality above plain LoRA's (the point of routing), and the routing study."""
from __future__ import annotations

import json

import pytest

from conftest import ROOT

from melo_engine.bench import edits_benchmark, load_stream, routing_study

FLOATS = ("edit_success", "retention", "generality", "locality", "seconds_per_edit",
          "edit_success_exact_match", "retention_exact_match", "generality_exact_match")


def test_paper_protocol_labels_every_phrasing_with_the_true_answer():
    s = load_stream("zsre", 1000, "paper")
    assert len(s.edits) == 1000 and s.target_field == "answers[0]"
    target_of = {}
    for p in s.edits + s.generality:          # one fact, one answer, however it is phrased
        assert target_of.setdefault(p.fact, p.target) == p.target
    edited = {(p.fact, p.prompt) for p in s.edits}
    assert not edited & {(p.fact, p.prompt) for p in s.generality}     # held out means held out
    assert {p.fact for p in s.generality} <= {p.fact for p in s.edits}
    assert load_stream("zsre", 1000, "paper").edits == s.edits          # a fixed seed
    with pytest.raises(ValueError, match="at most"):
        load_stream("zsre", 5000, "paper")


def test_counterfactual_protocol_edits_each_fact_once():
    s = load_stream("zsre", 5000, "counterfactual")
    assert len(s.edits) == len({p.fact for p in s.edits}) == 593 and s.target_field == "alt"
    assert all(p.target.strip() for p in s.edits)
    assert len(load_stream("counterfact", 5000).edits) == 161


def test_short_benchmark_shape_and_melo_beats_lora_on_locality(backbone):
    res = edits_benchmark("zsre", 2, ["melo", "grace", "lora"], backbone=backbone, show_progress=False)
    assert res["n"] == 2 and res["protocol"] == "paper" and set(res["methods"]) == {"melo", "grace", "lora"}
    for name, m in res["methods"].items():
        for f in FLOATS:
            assert isinstance(m[f], float) and m[f] >= 0, (name, f)
            if f != "seconds_per_edit":
                assert m[f] <= 1.0, (name, f)
        assert isinstance(m["params_per_edit"], int) and m["params_per_edit"] > 0
        assert m["retention_curve"][-1]["edits"] == 2
    melo, lora = res["methods"]["melo"], res["methods"]["lora"]
    assert melo["locality"] > lora["locality"]
    assert melo["edit_success"] == 1.0 and melo["retention"] == 1.0
    assert melo["clusters"] >= 1 and melo["settings"]["key_source"] == "sentence"
    assert sum(melo["actions"].values()) == 2


@pytest.mark.parametrize("key_source", ["sentence", "model"])
def test_routing_study_sends_each_prompt_to_its_own_block(backbone, key_source):
    res = routing_study("zsre", 40, backbone=backbone, settings={"key_source": key_source})
    assert res["n"] == 40 and 1 <= res["clusters"] <= 40 and res["init_radius"] > 0
    assert sum(res["actions"].values()) == 40
    g = res["generality"]
    assert abs(g["same_fact_block"] + g["other_fact_block"] + g["no_block"] - 1.0) < 1e-9
    # An edit's own prompt is its key: it reaches its own block unless a later edit superseded it.
    assert res["prompts"]["own_block"] >= 1 - res["superseded"] / 40
    if key_source == "sentence":
        assert g["same_fact_block"] >= 0.8 and res["locality"]["fired"] <= 0.05


def test_short_scale_benchmark_routes_exactly_and_stores_half_precision_blocks(tmp_path):
    """`bench scale` at 0 and 300 edits (the full run goes to 100,000): every figure the
    issue names is there, routing agrees with brute force, a workspace of 300 edits takes
    less than 110 kB per edit (float32 blocks alone would be 203 kB), reopening works."""
    from melo_engine.bench.scale import scale_benchmark

    res = scale_benchmark([0, 300], root=tmp_path)
    assert [r["edits"] for r in res["runs"]] == [0, 300]
    for r in res["runs"]:
        for k in ("edit_seconds", "ask_seconds", "route_ms", "delete_seconds", "reopen_seconds",
                  "bytes_per_edit", "peak_rss_mb"):
            assert r[k] > 0, k
        assert r["route_disagreements"] == 0
    big = res["runs"][1]
    assert big["route_fired"] >= 100 and big["bytes_per_edit"] < 110_000


def test_hallucination_sets_follow_the_papers_definitions():
    from melo_engine.bench.hallucination import from_selfcheck, header, standin

    task = from_selfcheck(ROOT / "tests" / "data" / "wikibio_format_sample.json")
    # Inaccurate sentence j: prompt = header + the passage's sentences before j (as written,
    # wrong ones too), target = sentence j of the Wikipedia text (the last when it is shorter).
    assert [(e.prompt, e.target) for e in task.edits] == [
        (header("Ada Lovelace"), "Ada Lovelace (10 December 1815 - 27 November 1852) was an English mathematician and writer."),
        (header("Ada Lovelace") + " Ada Lovelace was a French mathematician. She worked with Charles Babbage on the "
         "Analytical Engine.", "She died of uterine cancer in 1852 at the age of 36."),
        (header("Alan Mathison Turing") + " Alan Turing was a British mathematician.", "He was born in Maida Vale, London.")]
    assert [a.target for a in task.accurate] == ["She worked with Charles Babbage on the Analytical Engine.",
                                                 "Alan Turing was a British mathematician."]
    assert task.accurate[1].prompt == header("Alan Mathison Turing") and len(task.locality) >= 20
    s = standin()
    assert len(s.edits) > 200 and len(s.accurate) > 20 and s.notes["passages"] > 100
    assert all(e.prompt.startswith("This is a Wikipedia passage about ") for e in s.edits + s.accurate)


def test_short_hallucination_benchmark_has_three_perplexities_per_method(backbone, tmp_path):
    from melo_engine.bench import hallucination_benchmark

    res = hallucination_benchmark(3, ["melo", "grace", "lora"], backbone=backbone, show_progress=False, measured=6)
    json.dumps(res)                                   # what --json writes
    keys = ("edit_ppl", "arr_ppl", "locality_ppl")
    assert all(isinstance(res["base"][k], float) and res["base"][k] > 1.0 for k in keys)
    for name in ("melo", "grace", "lora"):
        m = res["methods"][name]
        assert all(isinstance(m[k], float) and m[k] >= 1.0 for k in keys), (name, m)
    melo, base = res["methods"]["melo"], res["base"]
    assert melo["edit_ppl"] < 1.5 < base["edit_ppl"]          # the corrections are learnt ...
    assert abs(melo["locality_ppl"] / base["locality_ppl"] - 1) < 0.01     # ... and unrelated text is untouched
    assert res["methods"]["lora"]["locality_ppl"] > melo["locality_ppl"]


def test_short_burst_benchmark_answers_every_question_both_ways():
    """bench burst (melo_engine/bench/burst.py), shortened: two questions, one round, eight
    tokens. Its figures are timings and are not asserted; what it measured is."""
    from melo_engine.bench.burst import burst

    res = burst(size=2, within=0.2, rounds=1, limit=8)
    for way in ("whole_batches", "joining"):
        (run,) = res[way]
        assert len(run["seconds"]) == 2 and all(s > 0 for s in run["seconds"]) and run["arrivals"][0] == 0.0
        assert res[f"{way}_slowest_over_alone"] > 0
    assert len(res["ask_alone_all"]) == 3 and res["token_budget"] == 8
