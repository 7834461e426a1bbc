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

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
DATA = ROOT / "assets" / "data"
PROTOCOLS = {"zsre": ("paper", "counterfactual"), "counterfact": ("counterfact",)}
SEED = 0


@dataclass
class Probe:
    prompt: str
    target: str
    fact: str        # the subject the prompt asks about: edits of one fact share it


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


def zsre_records() -> list[dict]:
    return json.loads((DATA / "zsre_mend_eval_head.json").read_text())


def counterfact_records() -> list[dict]:
    return json.loads((DATA / "counterfact_head.json").read_text())


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
    return Stream("zsre", "paper", "answers[0]", edits, held, [loc_of[p.fact] for p in edits],
                  {"phrasings": len(pool), "edit_half": half, "facts_edited": len(edited), "seed": seed})


def zsre_counterfactual(n: int) -> Stream:
    seen, edits, gen, loc = set(), [], [], []
    for r in zsre_records():
        if r["subject"] in seen or not r["alt"].strip():
            continue
        seen.add(r["subject"])
        edits.append(Probe(r["src"], r["alt"], r["subject"]))
        gen.append(Probe(r["rephrase"], r["alt"], r["subject"]))
        loc.append(r["loc"])
    return Stream("zsre", "counterfactual", "alt", edits[:n], gen[:n], loc[:n], {"facts_available": len(edits)})


def counterfact(n: int) -> Stream:
    recs = counterfact_records()[:n]
    return Stream("counterfact", "counterfact", "target_new",
                  [Probe(r["prompt"], r["target_new"], r["subject"]) for r in recs],
                  [Probe(r["rephrase_prompt"], r["target_new"], r["subject"]) for r in recs],
                  [r["locality_prompt"] for r in recs])


def load_stream(dataset: str, n: int, protocol: str | None = None) -> Stream:
    """The stream of `dataset` under `protocol` (zsRE: "paper" by default)."""
    if dataset not in PROTOCOLS:
        raise ValueError(f"unknown dataset {dataset!r} ({', '.join(PROTOCOLS)})")
    protocol = protocol or PROTOCOLS[dataset][0]
    if protocol not in PROTOCOLS[dataset]:
        raise ValueError(f"{dataset} has no protocol {protocol!r} ({', '.join(PROTOCOLS[dataset])})")
    if dataset == "counterfact":
        return counterfact(n)
    return zsre_paper(n) if protocol == "paper" else zsre_counterfactual(n)
