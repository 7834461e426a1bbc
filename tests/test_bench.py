"""A short run of the sequential-editing benchmark: the shape of its result, and MELO's
locality above plain LoRA's (the point of routing)."""
from __future__ import annotations

from melo_engine.bench import edits_benchmark, load_records, routing_study

FLOATS = ("edit_success", "retention", "generality", "locality", "seconds_per_edit",
          "edit_success_exact_match", "retention_exact_match", "generality_exact_match")


def test_records_skip_edits_without_a_target():
    zsre = load_records("zsre", 2000)
    assert len(zsre) == 1123 and all(r["target"].strip() for r in zsre)
    assert len(load_records("counterfact", 2000)) == 161


def test_short_benchmark_shape_and_melo_beats_lora_on_locality(backbone):
    res = edits_benchmark("zsre", 3, ["melo", "grace", "lora"], backbone=backbone, show_progress=False)
    assert res["n"] == 3 and set(res["methods"]) == {"melo", "grace", "lora"}
    for name, m in res["methods"].items():
        for f in FLOATS:
            assert isinstance(m[f], float) and m[f] >= 0, (name, f)
            if f != "seconds_per_edit":
                assert m[f] <= 1.0, (name, f)
        assert isinstance(m["params_per_edit"], int) and m["params_per_edit"] > 0
        assert m["retention_curve"][-1]["edits"] == 3
    melo, lora = res["methods"]["melo"], res["methods"]["lora"]
    assert melo["locality"] > lora["locality"]
    assert melo["edit_success"] == 1.0 and melo["retention"] == 1.0
    assert melo["clusters"] >= 1 and "settings" in melo


def test_routing_study_sends_each_prompt_to_its_own_block(backbone):
    res = routing_study("zsre", 12, backbone=backbone)
    assert res["n"] == 12 and 1 <= res["clusters"] <= 12 and res["init_radius"] > 0
    for name in ("prompts", "paraphrases"):
        r = res[name]
        assert abs(r["own_block"] + r["other_block"] + r["no_block"] - 1.0) < 1e-9
        assert r["chroma_differs_from_exact"] == 0
    # An edit's own prompt is its key: it routes to its own block unless a conflict moved it.
    assert res["prompts"]["own_block"] >= 0.9
