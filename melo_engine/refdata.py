"""The reference data behind keys and radii, and nothing else: which bundled questions fit
the whitening, calibrate the radius and fill the side-effect bank.

All of it comes from files under assets/ (the zsRE sample: 596 facts, one subject each,
several phrasings). The split is fixed: the whitening is fitted on paraphrase pairs of the
*first* half of the facts and the radius calibrated on every phrasing of the *second* half,
so that fit and calibration never share a fact. Keeping the data apart from the code that
uses it lets keys.py (whitening) and calibrate.py (radii) both read it without importing
each other.
"""
from __future__ import annotations

import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# Questions for the unwhitened model key's radius (records 826-1125 of the sample).
REFERENCE_SLICE = slice(826, 1126)
# The side-effect bank: everyday questions in the templates a class is likely to edit, and
# the sibling bank's questions (the same question about another number, ordinal,
# superlative, unit, ...: what a fix must stay off).
SIDE_EFFECT_BANK = ASSETS / "reference_questions.json"
SIBLING_BANK = ASSETS / "sibling_bank.json"


def zsre_records() -> list[dict]:
    return json.loads((ASSETS / "data" / "zsre_mend_eval_head.json").read_text())


def reference_questions() -> tuple[list[str], list[str]]:
    """(questions, their subjects) for calibrating unwhitened model keys."""
    records = zsre_records()[REFERENCE_SLICE]
    return [r["src"] for r in records], [r["subject"] for r in records]


def facts() -> dict[str, list[str]]:
    """Every distinct phrasing of each zsRE fact, facts in the sample's order."""
    out: dict[str, list[str]] = {}
    for r in zsre_records():
        for q in (r["src"], r["rephrase"]):
            if q not in out.setdefault(r["subject"], []):
                out[r["subject"]].append(q)
    return out


def whitening_pairs() -> tuple[list[str], list[str]]:
    """Paraphrase pairs (each phrasing with its fact's first) of the first half of the facts."""
    phrasings = list(facts().values())
    a, b = [], []
    for qs in phrasings[: len(phrasings) // 2]:
        a += [qs[0]] * (len(qs) - 1)
        b += qs[1:]
    return a, b


def calibration_questions() -> tuple[list[str], list[str]]:
    """Every phrasing of the second half of the facts, with its subject."""
    items = list(facts().items())
    qs, subjects = [], []
    for subject, phrasings in items[len(items) // 2:]:
        qs += phrasings
        subjects += [subject] * len(phrasings)
    return qs, subjects


def passage_header(name: str) -> str:
    """How a passage about `name` begins (the paper's hallucination prompts; the calibration
    passages begin the same way)."""
    return f"This is a Wikipedia passage about {name}."


def continuation_points() -> list[tuple[str, str]]:
    """Consecutive continuation points (a, b) of the reference passages: the header and the
    header with the first sentence, that and the header with both sentences."""
    data = json.loads((ASSETS / "calibration_passages.json").read_text())
    out = []
    for p in data["passages"]:
        points = [passage_header(p["name"])]
        for sentence in p["sentences"]:
            points.append(f"{points[-1]} {sentence}")
        out += list(zip(points, points[1:]))
    return out


def reference_list() -> list[str]:
    """The everyday questions of the side-effect bank (without the sibling bank's)."""
    return list(json.loads(SIDE_EFFECT_BANK.read_text())["questions"])


def side_effect_questions() -> list[str]:
    out = reference_list()
    for e in json.loads(SIBLING_BANK.read_text())["edits"]:
        out += [e["question"], *e["paraphrases"], *e["siblings"]]
    return list(dict.fromkeys(out))


def same_question(text: str) -> str:
    """A question as the phrasing groups compare it: case, spacing and the final mark aside."""
    return " ".join(text.casefold().strip().rstrip("?.!").split())


def phrasing_groups() -> dict[str, int]:
    """Which questions of the side-effect bank ask the same thing: each question (as
    `same_question` writes it) -> its group's number. A sibling-bank question and its
    paraphrases are one group, and so are the reference list's 'phrasings'; every other
    question is a group of its own. Groups sharing a question are one."""
    groups = [[q] for q in reference_list()] + list(json.loads(SIDE_EFFECT_BANK.read_text())["phrasings"])
    for e in json.loads(SIBLING_BANK.read_text())["edits"]:
        groups += [[e["question"], *e["paraphrases"]], *([s] for s in e["siblings"])]
    out: dict[str, int] = {}
    for number, group in enumerate(groups):
        keys = [same_question(q) for q in group]
        joined = {out[k] for k in keys if k in out}
        for k, v in list(out.items()):      # merge every group this one touches into it
            if v in joined:
                out[k] = number
        out.update({k: number for k in keys})
    return out
