"""Text that shows nothing is refused everywhere (melo_engine/text.py, issue 21 finding 7):
the nine invisible kinds the adversarial run got through `/ask`, and the edits it
committed, each alone and mixed; the same characters beside visible text are accepted."""
from __future__ import annotations

import subprocess
import sys

import pytest

from melo_engine import MeloEditor
from melo_engine.checks import clean_text
from melo_engine.text import shows_nothing
from conftest import ROOT, tree_digest

# The nine kinds, each with every character the run used or its range holds.
KINDS = {
    "bidi overrides and isolates": "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069",
    "combining marks with no base": "\u0300\u0301\u20dd\u0489",      # Mn and Me
    "Hangul fillers": "\u3164\u115f\u1160\uffa0",
    "invisible operators U+2061-2064": "\u2061\u2062\u2063\u2064",
    "Mongolian vowel separator": "\u180e",
    "soft hyphen and grapheme joiner": "\u00ad\u034f",
    "variation selectors": "\ufe00\ufe0f\U000e0100\U000e01ef\u180b",
    "tag characters": "\U000e0000\U000e0001\U000e0020\U000e0041\U000e007f",
    "Braille blank": "\u2800",
}
# What the run committed as prompt and target through the API.
COMMITTED = ["\u2063\u2062", "\u202e\u2066", "\u3164", "\u00ad\u034f"]
OTHER_BLANKS = ["", " \t\n", "\x00\x7f\x1f", "\u200b\u200c\u200d\ufeff\u2060", "\u00a0\u3000\u2028\u2029",
                "\x85\x1c"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_invisible_kind_alone_or_mixed_shows_nothing(kind):
    chars = KINDS[kind]
    assert shows_nothing(chars)
    for ch in chars:
        assert shows_nothing(ch), (kind, hex(ord(ch)))
    mixed = "".join(KINDS.values()) + "".join(OTHER_BLANKS)
    assert shows_nothing(mixed)
    with pytest.raises(ValueError, match="the prompt is empty"):
        clean_text(chars + " \u200b", "the prompt", limit=500)


@pytest.mark.parametrize("kind", list(KINDS))
def test_invisible_characters_beside_visible_text_are_accepted(kind):
    chars = KINDS[kind]
    text = f"What is{chars} the capital of France?"
    assert not shows_nothing(text)
    assert clean_text(text, "the prompt", limit=500) == text


@pytest.mark.parametrize("text,visible", [
    ("e\u0301", True), ("\u0301e", True), ("\u3164a", True), ("\u2800\u2801", True),   # a Braille dot shows
    ("\ue000", True), ("\u0378", True),          # private use and unassigned draw a box
    ("\u0903", True),                            # a spacing mark (Mc) takes room
    ("\U000e0002", False), ("\U000e01ef", False),
] + [(t, False) for t in OTHER_BLANKS])
def test_the_edges_of_the_definition(text, visible):
    assert shows_nothing(text) is not visible


def test_the_engine_and_the_cli_refuse_every_invisible_kind_and_change_nothing(backbone, tmp_path):
    ed = MeloEditor.open(tmp_path / "ws", backbone=backbone)
    ed.edit("What is the capital of Switzerland?", "Bern.")
    before, listed = tree_digest(ed.workspace), ed.edits()
    for text in list(KINDS.values()) + COMMITTED:
        for call, refusal in ((lambda: ed.edit(text, "Jupiter."), "is empty"),
                              (lambda: ed.edit("What is the largest planet?", text), "is empty"),
                              (lambda: ed.ask(text), "is empty"), (lambda: ed.probe([text]), "is empty"),
                              (lambda: ed.delete(text), "unknown edit id")):   # the engine looks ids up as given
            with pytest.raises(ValueError, match=refusal) as err:
                call()
            assert "\n" not in str(err.value)
    assert tree_digest(ed.workspace) == before and ed.edits() == listed
    ed.close()
    # The command line checks the same definition before it loads the model.
    for text in COMMITTED:
        out = subprocess.run([sys.executable, "-m", "melo_engine", "-w", str(tmp_path / "ws"), "edit", text, text],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert out.returncode == 2 and out.stderr.splitlines() == ["error: the prompt is empty"]
    assert tree_digest(tmp_path / "ws") == before
