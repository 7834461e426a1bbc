"""The benchmark streams: which prompts are edited, in which order, toward which answer,
and which prompts then measure generality and locality.

zsRE has two protocols because the bundled sample holds 1126 records but only 596 facts
(one subject each), and records of one fact carry *different* `alt` targets:

- `paper` (MELO's and GRACE's code): every phrasing of a fact (`src` and `rephrase` of
  all its records, duplicates dropped) is labelled with the fact's true answer
  (`answers[0]`); the phrasings are pooled, shuffled with a fixed seed and cut in two
  halves. The first N phrasings of the first half are the edit stream; generality is
  measured on the phrasings of the second half whose fact was edited. Same-fact edits
  share their answer, so they may join one cluster, as the method intends.
- `counterfactual`: one record per fact (its first), edited toward its `alt` answer;
  generality on that record's `rephrase`. No two edits contradict each other.

The old stream (every record in order, toward its `alt`) made the benchmark contradict
itself: a paraphrase that reached a sibling edit of the same fact was scored wrong.
CounterFact is one edit per case (`target_new`), generality on `rephrase_prompt` and
locality on `locality_prompt` (another subject, same relation: the hard case).
"""
from __future__ import annotations

import collections
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
DATA = ROOT / "assets" / "data"
PROTOCOLS = {"zsre": ("paper", "counterfactual"), "counterfact": ("counterfact",), "hard": ("hard",)}
SEED = 0
BANK = ROOT / "assets" / "sibling_bank.json"
SIBLINGS_PER_EDIT = 3


@dataclass
class Probe:
    prompt: str
    target: str
    fact: str        # the subject the prompt asks about: edits of one fact share it
    about: str = ""  # a sibling: the subject it asks about instead (`fact` is the edited one)


@dataclass
class Stream:
    """What one benchmark run edits and measures."""

    dataset: str
    protocol: str
    target_field: str
    edits: list[Probe]
    generality: list[Probe]            # held-out phrasings of edited facts, with their targets
    locality: list[str]                # prompts whose answer must not change
    notes: dict = field(default_factory=dict)
    # The same question about another subject, number, ... (fact: the edited fact it is a
    # sibling of): it must not fire that edit, and its answer must not change.
    siblings: list[Probe] = field(default_factory=list)


def zsre_records() -> list[dict]:
    return json.loads((DATA / "zsre_mend_eval_head.json").read_text())


def counterfact_records() -> list[dict]:
    return json.loads((DATA / "counterfact_head.json").read_text())


# ---- siblings: the same template about another subject ---------------------------------------
@dataclass
class BankEdit:
    kind: str
    question: str
    answer: str
    paraphrases: list[str]
    siblings: list[str]
    half: str            # "fit" (even positions), "eval" (odd) or "holdout" (its `split`)


def hard_bank(half: str | None = None) -> list[BankEdit]:
    """The bank's edits. "holdout": written after the verifier's rules were frozen, so that
    neither the rules nor the thresholds saw them."""
    items = json.loads(BANK.read_text())["edits"]
    out = [BankEdit(it["kind"], it["question"], it["answer"], list(it["paraphrases"]), list(it["siblings"]),
                    it.get("split") or ("fit" if i % 2 == 0 else "eval")) for i, it in enumerate(items)]
    return [b for b in out if half is None or b.half == half]


def _template(question: str, subject: str) -> str | None:
    return question.replace(subject, "\x00", 1) if subject and subject in question else None


def _pick(others: list[str], k: int, salt: str) -> list[str]:
    """k of `others`, the same ones on every run (seeded by the question)."""
    seed = int(hashlib.sha256(salt.encode()).hexdigest()[:8], 16)
    others = sorted(others)
    random.Random(seed).shuffle(others)
    return others[:k]


def zsre_templates() -> dict[str, set[str]]:
    """Template (the question with its subject cut out) -> subjects of the zsRE sample with a
    phrasing of that template."""
    out: dict[str, set[str]] = collections.defaultdict(set)
    for r in zsre_records():
        for q in (r["src"], r["rephrase"]):
            t = _template(q, r["subject"])
            if t is not None:
                out[t].add(r["subject"])
    return out


def template_siblings(question: str, subject: str, templates: dict[str, set[str]], k: int = SIBLINGS_PER_EDIT,
                      skip: int = 0, with_subjects: bool = False) -> list:
    """`question` with its subject replaced by up to k other subjects of its template
    (`skip` leaves out the first ones of the seeded order: held aside for another use);
    with_subjects: (question, the subject it now asks about) pairs."""
    t = _template(question, subject)
    if t is None:
        return []
    others = [s for s in templates.get(t, ()) if s != subject and subject not in s and s not in subject]
    picked = _pick(others, skip + k, question)[skip:]
    return [(t.replace("\x00", s), s) if with_subjects else t.replace("\x00", s) for s in picked]


def counterfact_templates() -> dict[str, set[str]]:
    out: dict[str, set[str]] = collections.defaultdict(set)
    for r in counterfact_records():
        t = _template(r["prompt"], r["subject"])
        if t is not None:
            out[t].add(r["subject"])
    return out



def zsre_phrasings() -> list[Probe]:
    """Every distinct phrasing of every zsRE fact, labelled with the fact's true answer."""
    seen, out = set(), []
    for r in zsre_records():
        for q in (r["src"], r["rephrase"]):
            if (r["subject"], q) not in seen:
                seen.add((r["subject"], q))
                out.append(Probe(q, r["answers"][0], r["subject"]))
    return out


def zsre_paper(n: int, seed: int = SEED) -> Stream:
    pool = zsre_phrasings()
    random.Random(seed).shuffle(pool)
    half = len(pool) // 2
    if n > half:
        raise ValueError(f"the paper protocol edits at most {half} phrasings of this sample (half of {len(pool)})")
    edits = pool[:n]
    edited = {p.fact for p in edits}
    held = [p for p in pool[half:] if p.fact in edited]
    loc_of = {r["subject"]: r["loc"] for r in zsre_records()}
    templates = zsre_templates()
    return Stream("zsre", "paper", "answers[0]", edits, held, [loc_of[p.fact] for p in edits],
                  {"phrasings": len(pool), "edit_half": half, "facts_edited": len(edited), "seed": seed},
                  _siblings(edits, templates))


def zsre_counterfactual(n: int) -> Stream:
    seen, edits, gen, loc = set(), [], [], []
    for r in zsre_records():
        if r["subject"] in seen or not r["alt"].strip():
            continue
        seen.add(r["subject"])
        edits.append(Probe(r["src"], r["alt"], r["subject"]))
        gen.append(Probe(r["rephrase"], r["alt"], r["subject"]))
        loc.append(r["loc"])
    return Stream("zsre", "counterfactual", "alt", edits[:n], gen[:n], loc[:n], {"facts_available": len(edits)},
                  _siblings(edits[:n], zsre_templates()))


def counterfact(n: int) -> Stream:
    recs = counterfact_records()[:n]
    edits = [Probe(r["prompt"], r["target_new"], r["subject"]) for r in recs]
    return Stream("counterfact", "counterfact", "target_new", edits,
                  [Probe(r["rephrase_prompt"], r["target_new"], r["subject"]) for r in recs],
                  [r["locality_prompt"] for r in recs], {}, _siblings(edits, counterfact_templates()))


def hard(n: int) -> Stream:
    """The project's hard bank: each edit's paraphrases are its generality, its siblings
    (another number, ordinal, superlative, unit, event, work) the siblings; zsRE's NQ
    questions the locality (the bundled everyday questions ask some of the bank's facts)."""
    bank = hard_bank()[:n]
    edits = [Probe(b.question, b.answer, b.question) for b in bank]
    unrelated = [r["loc"] for r in zsre_records()[:len(bank)]]
    return Stream("hard", "hard", "answer", edits,
                  [Probe(q, b.answer, b.question) for b in bank for q in b.paraphrases], unrelated,
                  {"kinds": dict(collections.Counter(b.kind for b in bank))},
                  [Probe(q, "", b.question, q) for b in bank for q in b.siblings])


def _siblings(edits: list[Probe], templates: dict[str, set[str]]) -> list[Probe]:
    """Template siblings of each edited fact's first edited phrasing (`about`: the subject
    the sibling asks about, which the stream may edit too)."""
    out, seen = [], set()
    for p in edits:
        if p.fact in seen:
            continue
        seen.add(p.fact)
        out += [Probe(q, "", p.fact, about) for q, about in
                template_siblings(p.prompt, p.fact, templates, with_subjects=True)]
    return out


def unedited_siblings(stream: Stream) -> list[Probe]:
    """The siblings whose answer must not change: about a subject the stream does not edit,
    and not one of its edited or held-out phrasings (those rightly get an edit's answer)."""
    facts = {p.fact for p in stream.edits}
    asked = {p.prompt for p in stream.edits} | {p.prompt for p in stream.generality}
    return [x for x in stream.siblings if x.about not in facts and x.prompt not in asked]


def load_stream(dataset: str, n: int, protocol: str | None = None) -> Stream:
    """The stream of `dataset` under `protocol` (zsRE: "paper" by default)."""
    if dataset not in PROTOCOLS:
        raise ValueError(f"unknown dataset {dataset!r} ({', '.join(PROTOCOLS)})")
    protocol = protocol or PROTOCOLS[dataset][0]
    if protocol not in PROTOCOLS[dataset]:
        raise ValueError(f"{dataset} has no protocol {protocol!r} ({', '.join(PROTOCOLS[dataset])})")
    if dataset == "counterfact":
        return counterfact(n)
    if dataset == "hard":
        return hard(n)
    return zsre_paper(n) if protocol == "paper" else zsre_counterfactual(n)
