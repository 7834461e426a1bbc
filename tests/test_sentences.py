"""Correcting one sentence of a long answer (the paper's hallucination task, in the engine):
the split, the correction itself on the real model, completion mode, export, the command line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from melo_engine import MeloConfig, MeloEditor
from melo_engine.sentences import joined, sentence_spans, split_sentences, text_before

# The default model's answer here has three sentences, the second one wrong (it never says
# how many legs); checked by test_the_question_has_a_three_sentence_answer.
SPIDER = "How many legs does a spider have?"
FIX = "A spider has eight legs, in four pairs."


def test_split_keeps_abbreviations_initials_and_numbers_inside_a_sentence():
    text = 'Dr. Smith met J. R. R. Tolkien in 1950. Pi is 3.14 exactly! Was it "hot?" Yes.\nNew line'
    assert split_sentences(text) == ["Dr. Smith met J. R. R. Tolkien in 1950.", "Pi is 3.14 exactly!",
                                     'Was it "hot?"', "Yes.", "New line"]
    for a, b in sentence_spans(text):          # spans index the text as shown
        assert text[a:b] == text[a:b].strip() and text[a:b]
    assert text_before(text, 0) == ""
    assert text_before(text, 2) == "Dr. Smith met J. R. R. Tolkien in 1950. Pi is 3.14 exactly! "
    with pytest.raises(ValueError, match="has 5 sentence"):
        text_before(text, 5)
    assert joined("One.", " Two. ") == "One. Two." and joined("One.\n", "Two.") == "One.\nTwo."
    assert joined("", "Two.") == "Two."


@pytest.fixture(scope="module")
def base_spider(backbone):
    return backbone.generate(SPIDER, None, 48)


def test_the_question_has_a_three_sentence_answer(base_spider):
    sentences = split_sentences(base_spider)
    assert len(sentences) == 3 and "eight" not in sentences[1]


def test_correcting_the_second_sentence_keeps_the_first_byte_for_byte(backbone, base_spider, unrelated_questions,
                                                                      tmp_path):
    others = unrelated_questions[:5]
    base = {q: backbone.generate(q, None, 48) for q in others}
    ed = MeloEditor.open(tmp_path / "ws", backbone=backbone)
    assert ed.ask(SPIDER).text == base_spider
    r = ed.correct(SPIDER, 2, FIX, answer=base_spider)
    kept = text_before(base_spider, 1)
    assert kept == split_sentences(base_spider)[0] + " "
    after = ed.ask(SPIDER, compare_base=True)
    assert after.block == r.block and after.base_text.startswith(base_spider)
    assert after.text.startswith(kept + FIX), after.text       # before it: identical; then the fix
    assert split_sentences(after.text)[1] == FIX
    assert base_spider not in after.text                       # the wrong sentence is gone
    # The block is held for what it was taught, then the original model goes on: the fixed
    # sentence is said once, not repeated to the end of the budget.
    assert after.text.count(FIX) == 1, after.text
    # The same question about an insect is a sibling: the block does not fire.
    insect = ed.ask("How many legs does an insect have?")
    assert insect.block is None, insect
    entry = ed.record(r.edit_id)
    assert entry["prefix"] == kept and entry["target"] == FIX and entry["taught_tokens"] > 0
    # Unrelated questions keep their exact answers.
    for q, a in zip(others, ed.probe(others)):
        assert a.block is None and a.text == base[q], q
    # A correction of the corrected answer's third sentence supersedes this one and keeps both fixes.
    third = "Spiders are arachnids, not insects."
    r2 = ed.correct(SPIDER, 3, third)
    assert r2.superseded == [r.edit_id]
    again = ed.ask(SPIDER).text
    assert again.startswith(kept + FIX + " " + third), again


def test_a_correction_can_end_the_answer_after_its_sentence(backbone, base_spider, tmp_path):
    ed = MeloEditor.open(tmp_path / "ws", backbone=backbone)
    ed.correct(SPIDER, 2, FIX, answer=base_spider, end=True)
    assert ed.ask(SPIDER).text == text_before(base_spider, 1) + FIX


def test_ending_the_answer_on_a_sentence_corrected_before_ends_it(backbone, base_spider, tmp_path):
    """The same sentence corrected again, now ending the answer there: the newer edit
    teaches another text, so it replaces the older one (which had joined it and kept firing)."""
    ed = MeloEditor.open(tmp_path / "ws", backbone=backbone)
    first = ed.correct(SPIDER, 2, FIX, answer=base_spider)
    second = ed.correct(SPIDER, 2, FIX, answer=base_spider, end=True)
    assert second.action == "superseded" and second.superseded == [first.edit_id]
    assert [e["status"] for e in ed.edits()] == ["superseded", "active"]
    assert ed.ask(SPIDER).text == text_before(base_spider, 1) + FIX
    ed.delete(second.edit_id)                                  # undo: the first correction is back
    assert ed.ask(SPIDER).block == first.block


def test_a_sentence_correction_survives_export_and_import(backbone, base_spider, tmp_path):
    ed = MeloEditor.open(tmp_path / "a", backbone=backbone)
    ed.correct(SPIDER, 2, FIX, answer=base_spider)
    want = ed.ask(SPIDER).text
    other = MeloEditor.open(tmp_path / "b", backbone=backbone)
    [eid] = other.import_(ed.export(tmp_path / "spider.melo"))
    assert other.record(eid)["prefix"] == ed.edits()[0]["prefix"]
    assert other.ask(SPIDER).text == want
    # A workspace in the other prompt mode refuses it: the block was trained on chat prompts.
    plain = MeloEditor.open(tmp_path / "c", backbone=backbone, config=MeloConfig(prompt_mode="completion"))
    with pytest.raises(ValueError, match="chat mode"):
        plain.import_(tmp_path / "spider.melo")


def test_completion_mode_continues_plain_text_and_corrects_a_sentence_of_it(backbone, tmp_path):
    ed = MeloEditor.open(tmp_path / "ws", backbone=backbone, config=MeloConfig(prompt_mode="completion"))
    prompt = "This is a Wikipedia passage about Danielle Darrieux."
    raw = backbone.generate(prompt, None, 48, chat=False)
    assert ed.ask(prompt).text == raw
    assert raw != backbone.generate(prompt, None, 48)            # the chat template made a difference
    fix = "Danielle Darrieux was a French actress and singer."
    ed.correct(prompt, 1, fix, answer=raw)
    assert ed.ask(prompt).text.startswith(fix)
    with pytest.raises(ValueError, match="only while the workspace has no edits"):
        ed.set_prompt_mode("chat")
    ed.reset(default_settings=True)
    assert ed.config.prompt_mode == "chat"


def test_bad_sentence_corrections_are_refused_and_change_nothing(backbone, base_spider, tmp_path):
    from conftest import tree_digest

    ed = MeloEditor.open(tmp_path / "ws", backbone=backbone)
    ed.edit("What is the capital of Italy?", "Rome")
    before = tree_digest(tmp_path / "ws")
    for number, sentence, message in [(4, FIX, "has 3 sentence"), (0, FIX, "whole number from 1"),
                                      (2, "   ", "is empty"), (2.5, FIX, "whole number"),
                                      (2, "x" * 600, "the limit is 500")]:
        with pytest.raises(ValueError, match=message):
            ed.correct(SPIDER, number, sentence, answer=base_spider)
    with pytest.raises(ValueError, match="NUL"):
        ed.edit(SPIDER, FIX, prefix="a\x00b")
    with pytest.raises(ValueError, match="must be text"):
        ed.edit(SPIDER, FIX, prefix=3)
    assert tree_digest(tmp_path / "ws") == before and len(ed.entries) == 1


def test_command_line_numbers_the_sentences_and_corrects_one(base_spider, tmp_path):
    ws = str(tmp_path / "ws")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "melo_engine", "-w", ws, "--json", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)

    shown = cli("ask", SPIDER, "--sentences")
    assert shown.returncode == 0, shown.stderr
    numbered = json.loads(shown.stdout)
    assert numbered["answer"] == base_spider and numbered["2"] == split_sentences(base_spider)[1]
    done = cli("correct", SPIDER, "2", FIX)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["steps"] >= 1
    listed = json.loads(cli("list").stdout)
    assert listed[0]["prefix"] == text_before(base_spider, 1)
    bad = cli("correct", SPIDER, "9", FIX)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no sentence 9" in bad.stderr
