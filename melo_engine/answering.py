"""Answering with the edited model: route a question once from its key, hold that block
for every new token, and say how the decision was made (distance against radius).

Functions over an editor (`ed`: its workspace, backbone, keyer and settings). Queries take
the workspace's state lock only to route and gather their blocks, so they go on while an
edit trains, and see the workspace before or after a commit, whole.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from .index import Route
from .records import Answer
from .sentences import text_before

# An answer ending like this is whole, even when it reached the token budget.
_ENDS = (".", "!", "?", "…", '"', "”", ")")


def budget(ed, edit_id: str | None, limit: int | None = None) -> int:
    """New tokens to generate when edit `edit_id` fires (None: no edit): `limit` (default:
    the workspace's max_new_tokens). A sentence correction taught the whole answer up to its
    sentence, which may be longer: it gets room for that and a little of what follows."""
    limit = ed.config.max_new_tokens if limit is None else limit
    e = ed.ws.entries.get(edit_id) if edit_id is not None else None
    if e is None or not e.is_correction:
        return limit
    return max(limit, int(e.taught_tokens) + 16)


def held_for(ed, edit_id: str | None) -> int | None:
    """How many new tokens the block of `edit_id` is held for: a sentence correction that
    does not end the answer, for what it was taught (the original model then continues,
    Backbone.generate); any other edit, for all of them (None)."""
    e = ed.ws.entries.get(edit_id) if edit_id is not None else None
    if e is None or not e.is_correction or e.ends_answer or not e.taught_tokens:
        return None
    return int(e.taught_tokens)


def cut(ed, text: str | None, limit: int) -> bool:
    """Whether a generated answer ran to its token budget, so it stops mid-thought."""
    if not text or text.endswith(_ENDS):
        return False
    return len(ed.backbone.tokenizer.encode(text, add_special_tokens=False)) >= limit - 2


def decide(ed, key, question: str, words=None) -> Route:
    """The route of one question from its key: the index's candidates, checked by the
    workspace's router (router.py). Call with the state lock held."""
    entries = ed.ws.entries
    return ed.router.route(ed.ws.state, key, question, lambda eid: entries[eid].prompt, words)


def matrices(ed, block: int | None) -> dict | None:
    """The block's matrices for the workspace's modules (None: no block, or one a concurrent
    delete freed). Call with the state lock held, in the same hold as the route's decision:
    a freed block id may be given to the next edit."""
    bank = ed.ws.bank
    if block is None or block not in bank.files:
        return None
    held = bank.matrices(block)
    return {m: held[m] for m in ed.modules if m in held} or None


def keyed(ed, questions: list[str]):
    """(keys, words) of questions, one encoder pass where the router can share it."""
    return ed.router.keys(ed.keyer, questions)


def route(ed, question: str) -> Route:
    """Which block (if any) fires for this question, and why: distance versus radius, and
    the edits within the radius the verifier turned down."""
    return routes(ed, [question])[0]


def routes(ed, questions: list[str]) -> list[Route]:
    """The routes of many questions (their keys in one batch)."""
    keys, words = keyed(ed, questions)
    with ed.ws.state_lock:
        return [decide(ed, k, q, w) for k, q, w in zip(keys, questions, words)]


def generate(ed, question: str, max_new_tokens: int, min_new_tokens: int = 0,
             timer: Callable[[float], None] | None = None) -> tuple[str, Route]:
    """Greedy text from the edited model, routed once from the prompt: (text, route).
    `timer(seconds)` gets what deciding the block cost (key, lookup, gathering it)."""
    ws, c = ed.ws, ed.config

    def choose(key, started, words=None):
        with ws.state_lock:
            r = decide(ed, key, question, words)
            active = ws.bank.gather([r.block], ed.modules)
        if timer is not None:
            timer(time.perf_counter() - started)
        return active, r

    if ed.keyer.in_prefill and not any(e.is_correction for e in ws.entries.values()):
        # The model's own key, taken inside the prefill: no extra forward. (Not with
        # sentence corrections: their length budget must be known before generating.)
        return ed.backbone.generate_routed(
            question, c.key_layer, c.key_reduction, c.distance,
            lambda raw: choose(ed.keyer.finish(raw[None])[0], time.perf_counter()),
            max_new_tokens, min_new_tokens, chat=ed.chat)
    t0 = time.perf_counter()
    (key,), (words,) = keyed(ed, [question])
    active, r = choose(key, t0, words)
    # The caller's limit (bench speed compares 32 tokens plain and routed), unless the
    # fired edit is a sentence correction that needs more.
    limit = budget(ed, r.edit_id, max_new_tokens)
    return ed.backbone.generate(question, active, limit, min_new_tokens, chat=ed.chat,
                                hold=held_for(ed, r.edit_id)), r


def ask(ed, question: str, compare_base: bool = False) -> Answer:
    """Answer with the edited model: route once from the prompt, hold that block throughout
    (in a server's shared batches when the editor has them: batching.py)."""
    if ed.answers is not None:
        return ed.answers.ask(ed, question, compare_base)
    t0 = time.perf_counter()
    text, r = generate(ed, question, ed.config.max_new_tokens)
    limit = max(ed.config.max_new_tokens, budget(ed, r.edit_id))
    base = None
    if compare_base:
        # With no block fired, the edited model *is* the base model: no second run needed.
        base = text if r.block is None else ed.backbone.generate(question, None, limit, chat=ed.chat)
    return Answer(text, r.block, r.distance, r.radius, r.cluster, r.edit_id, base, time.perf_counter() - t0,
                  cut(ed, text, limit), cut(ed, base, limit), rejected=r.rejected)


def probe(ed, questions: list[str], workers: int | None = None) -> list[Answer]:
    """Ask many questions, each with the unedited answer beside it, answered together:
    every question is routed once, then the rows (the edited answers, and the unedited
    twins of those that fired a block) are generated as `workers` batches side by side,
    one per core by default (each on the calling thread's torch threads: the app gives a
    request one). docs/BENCHMARKS.md ("Probe") compares it with asking one at a time."""
    t0 = time.perf_counter()
    keys, words = keyed(ed, questions)
    with ed.ws.state_lock:
        decided = [decide(ed, k, q, w) for k, q, w in zip(keys, questions, words)]
        mats = [matrices(ed, r.block) for r in decided] if ed.answers is not None else None
    # (question, block, token budget, tokens the block is held for); the unedited twin of a
    # fired row gets its budget
    rows = [(q, r.block, budget(ed, r.edit_id), held_for(ed, r.edit_id)) for q, r in zip(questions, decided)]
    rows += [(q, None, budget(ed, r.edit_id), None) for q, r in zip(questions, decided) if r.block is not None]
    if ed.answers is not None:
        # A server's shared batches (batching.py): these rows join other visitors' rows,
        # with the matrices gathered in the same hold of the lock as the routes.
        blocks = mats + [None] * (len(rows) - len(mats))
        texts = ed.answers.texts(ed, [(q, m, limit, hold) for (q, _, limit, hold), m in zip(rows, blocks)])
    else:
        texts = _generate_rows(ed, rows, workers)
    base = iter(texts[len(questions):])
    seconds = (time.perf_counter() - t0) / len(questions)
    out = []
    for t, r, k, (_, _, limit, _) in zip(texts[:len(questions)], decided, keys, rows):
        b = next(base) if r.block is not None else t
        out.append(Answer(t, r.block, r.distance, r.radius, r.cluster, r.edit_id, b, seconds,
                          cut(ed, t, limit), cut(ed, b, limit), k.tolist(), r.rejected))
    return out


def _generate_rows(ed, rows, workers: int | None) -> list[str]:
    """Texts of (question, block, token budget, partial hold) rows, as `workers` batches side
    by side (each on the calling thread's torch threads: the app gives a request one)."""
    ws = ed.ws
    n = max(1, min(workers or os.cpu_count() or 1, len(rows)))
    parts = [rows[i::n] for i in range(n)]        # interleaved: long and short answers spread out

    def generate_part(part):
        # Rows whose block is held for part of the answer go one at a time (rare: sentence
        # corrections that continue); the rest in one batch.
        texts = [None] * len(part)
        batch = [i for i, (_, _, _, hold) in enumerate(part) if hold is None]
        with ws.state_lock:
            active = ws.bank.gather([part[i][1] for i in batch], ed.modules) if batch else None
            single = {i: ws.bank.gather([b], ed.modules) for i, (_, b, _, hold) in enumerate(part) if hold is not None}
        # Each thread holds its own blocks (the LoRA layers keep them per thread).
        if batch:
            done = ed.backbone.generate_batch([part[i][0] for i in batch], active, [part[i][2] for i in batch],
                                              chat=ed.chat)
            for i, t in zip(batch, done):
                texts[i] = t
        for i, blocks in single.items():
            q, _, limit, hold = part[i]
            texts[i] = ed.backbone.generate(q, blocks, limit, chat=ed.chat, hold=hold)
        return texts

    with ThreadPoolExecutor(n) as pool:
        done = list(pool.map(generate_part, parts))
    texts = [None] * len(rows)
    for i, part_texts in enumerate(done):
        texts[i::n] = part_texts
    return texts


def sentence_prefix(ed, question: str, number: int, answer: str | None = None) -> str:
    """The text before sentence `number` (1 for the first) of the answer to `question`
    (the answer given now, unless `answer` says what was shown): what a correction of
    that sentence keeps."""
    if answer is None:
        answer = ask(ed, question).text
    return text_before(answer, number - 1)
