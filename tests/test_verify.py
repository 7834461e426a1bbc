"""The verifying stage (melo_engine/verify.py) on the bundled sentence encoder: siblings of
an edit (another number, another country, another superlative, another object) are told
apart from it, paraphrases are not, and the reason says which slot differs."""
from __future__ import annotations

import time

import pytest
import torch


@pytest.fixture(scope="module")
def same():
    from melo_engine.keysources.sentence import SentenceEncoder
    from melo_engine.verify import SameQuestion

    return SameQuestion(SentenceEncoder.load())


def test_another_atomic_number_is_rejected_with_a_readable_reason(same):
    ok, why = same.check("Which element has the atomic number 7?", "Which element has the atomic number 6?")
    assert not ok
    assert why == "number differs: 7 / 6"


def test_a_number_both_questions_say_agrees_wherever_it_stands(same):
    """A number in a name, or at the head of one question and inside the other, is the same
    number (CounterFact's "Three Drives is incredible at" / "What does Three Drives play?"
    were turned down as "number differs: three / -")."""
    assert same.check("Three Drives is incredible at", "What does Three Drives play? They play")[0]
    assert same.check("When Charles IV of Spain was killed, the locals held a", "Charles IV of Spain's life ended in")[0]
    ok, why = same.check("Where did Charles III of Spain die?", "Where did Charles IV of Spain die?")
    assert not ok and why == "number differs: iii / iv"


def test_another_country_is_rejected(same):
    ok, why = same.check("What is the capital of Germany?", "What is the capital of France?")
    assert not ok
    assert why == "name differs: germany / france"
    # near-homonyms are other subjects too
    assert not same.check("What is the capital of Austria?", "What is the capital of Australia?")[0]


def test_another_superlative_ordinal_or_object_is_rejected(same):
    ok, why = same.check("What is the smallest planet in the Solar System?",
                         "What is the largest planet in the Solar System?")
    assert (ok, why) == (False, "superlative differs: smallest / largest")
    ok, why = same.check("Who was the second person to walk on the Moon?", "Who was the first person to walk on the Moon?")
    assert (ok, why) == (False, "ordinal differs: second / first")
    ok, why = same.check("How many sides does a pentagon have?", "How many sides does a hexagon have?")
    assert not ok and why.startswith("another slot: pentagon / hexagon")
    assert not same.check("What is the chemical symbol for iron?", "What is the chemical symbol for gold?")[0]


def test_the_same_template_about_another_thing_is_rejected(same):
    """One noun swapped (or a modifier added) and every other word kept: a sibling, even
    where the two words are close in the encoder's space ("heptagon" / "hexagon")."""
    for query, edit, shown in [
            ("What is the freezing point of water in degrees Celsius?",
             "What is the boiling point of water in degrees Celsius?", "freezing / boiling"),
            ("How many sides does a heptagon have?", "How many sides does a hexagon have?", "heptagon / hexagon"),
            ("How many millimetres are in a metre?", "How many centimetres are in a metre?",
             "millimetres / centimetres"),
            ("What is the largest moon in the Solar System?", "What is the largest planet in the Solar System?",
             "moon / planet"),
            ("How many black keys does a standard piano have?", "How many keys does a standard piano have?",
             "black added")]:
        ok, why = same.check(query, edit)
        assert not ok and why.startswith("another slot: " + shown), (query, why)
    # A near-synonym in the same place is the same question; so is a reworded one.
    assert same.check("In what year did World War I start?", "In which year did World War I begin?") == (True, "")
    assert same.check("Which city is the capital of France?", "What is the capital of France?") == (True, "")
    assert same.check("How much is 7 multiplied by 8?", "What is 7 times 8?") == (True, "")


def test_a_reworded_question_about_another_thing_is_rejected(same):
    """A sibling that also rewords ("... of water in Celsius?" beside an edit of "... of mercury
    in degrees Celsius?") fired the edit in the app: a unit is no subject, and the swapped
    noun in a kept context is a sibling even where the rest is reworded."""
    edit = "What is the boiling point of mercury in degrees Celsius?"
    ok, why = same.check("What is the boiling point of water in Celsius?", edit)
    assert not ok and why.startswith("another slot: water / mercury"), why
    for q in ("At how many degrees Celsius does iron boil?", "In Celsius, what is the boiling point of ethanol?"):
        ok, why = same.check(q, edit)
        assert not ok and "mercury" in why, (q, why)
    for q in ("At what temperature in Celsius does mercury boil?", "What is the boiling point of mercury in Celsius?",
              "Mercury boils at how many degrees Celsius?"):
        assert same.check(q, edit) == (True, ""), q
    # a relation noun with nothing else asked about is the question itself
    assert not same.check("What is the cube of 12?", "What is the square of 12?")[0]


def test_paraphrases_are_accepted(same):
    edit = "Which element has the atomic number 6?"
    for q in ("What element has atomic number 6?", "Name the chemical element whose atomic number is 6."):
        assert same.check(q, edit) == (True, "")
    assert same.check("Which is the Solar System's biggest planet?",
                      "What is the largest planet in the Solar System?") == (True, "")
    assert same.check("In 1990, who was the US president?",
                      "Who was the President of the United States in 1990?") == (True, "")
    assert same.check("What university did Watts Humphrey take part in?",
                      "What university did Watts Humphrey attend?") == (True, "")
    # A capitalised framing word is no name ("the Earth" asks what "there" asks).
    assert same.check("How many continents does the Earth have?", "How many continents are there?") == (True, "")


def test_edit_words_are_computed_once_and_reused(same):
    """An edit's Words are data to keep with the edit; a query's come from the same encoder
    pass as its key, and checking a handful of candidates is fast."""
    from melo_engine.verify import Words

    keys, words = same.encode(["Which element has the atomic number 6?", "What is the capital of France?"])
    assert keys.shape[0] == 2 and isinstance(words[0], Words)
    assert torch.allclose(keys, same.encoder.encode(["Which element has the atomic number 6?",
                                                     "What is the capital of France?"]), atol=1e-5)
    q = "Which element has the atomic number 7?"
    enc = same.encoder
    t = enc.tokenizer([q], return_tensors="pt", truncation=True, max_length=128)
    with torch.no_grad():
        states = enc.model(**t).last_hidden_state[0]
    qw = same.features_from_states(q, states)
    assert same.check(qw, words[0]) == (False, "number differs: 7 / 6")
    t0 = time.perf_counter()
    for _ in range(20):
        w = same.features_from_states(q, states)
        for e in words * 3:
            same.check(w, e)
    assert (time.perf_counter() - t0) / 20 < 0.05     # generous: ~1 ms on a quiet core


def test_sibling_yardstick_loaders():
    """The bank has its halves and enough of the hard kinds; zsRE and CounterFact siblings
    keep the template and change the subject."""
    from melo_engine.bench.data import counterfact_templates, hard_bank, template_siblings, zsre_templates

    bank = hard_bank()
    assert len(bank) >= 40 and {b.half for b in bank} == {"fit", "eval", "holdout", "reworded"}
    assert all(len(b.siblings) == 3 and 2 <= len(b.paraphrases) <= 3 and b.answer.endswith(".") for b in bank)
    sibs = template_siblings("In which state is Qaleh Lan located?", "Qaleh Lan", zsre_templates())
    assert len(sibs) == 3 and all(s.startswith("In which state is ") and "Qaleh Lan" not in s for s in sibs)
    assert sibs == template_siblings("In which state is Qaleh Lan located?", "Qaleh Lan",
                                     zsre_templates())     # the same ones on every run
    cf = template_siblings("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", counterfact_templates())
    assert cf and all(s.startswith("The mother tongue of ") and "Darrieux" not in s for s in cf)
