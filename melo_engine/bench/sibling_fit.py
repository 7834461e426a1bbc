"""Fitting the verifier's thresholds (verify.py) for the sibling study (siblings.py), on data
the evaluation does not use: pairs within the radius from the zsRE facts of the first half
(the whitening half) and the hard bank's fit half (even positions)."""
from __future__ import annotations

import torch

from .data import hard_bank, template_siblings, zsre_templates


def share(xs) -> float | None:
    xs = list(xs)
    return round(sum(xs) / len(xs), 4) if xs else None


def fit_pairs(study) -> dict:
    """Pairs within the radius from the *first* half of the zsRE facts (the whitening half;
    paraphrase pairs: every two phrasings of one fact; sibling pairs: each phrasing and its
    template siblings) and the fit half of the hard bank. Per pair, what the thresholds act
    on: the lexical verdict and the worst cosine of the edit's unmatched nouns and other
    words."""
    from melo_engine.refdata import facts as _facts

    facts = list(_facts().items())[: len(_facts()) // 2]
    templates = zsre_templates()
    groups = {"zsre": ([], []), "bank": ([], [])}
    for subject, phrasings in facts:
        for a in phrasings:
            for b in phrasings:
                if a != b:
                    groups["zsre"][0].append((b, a))
            for s in template_siblings(a, subject, templates):
                groups["zsre"][1].append((s, a))
    for b in hard_bank("fit"):
        groups["bank"][0].extend([(q, b.question) for q in b.paraphrases])
        groups["bank"][1].extend([(q, b.question) for q in b.siblings])
    from melo_engine.verify import SameQuestion

    lex = SameQuestion(study.encoder, lexical=True, aligned=False, template=False)
    out = {}
    for g, (pos, neg) in groups.items():
        rows = {}
        for label, pairs in (("paraphrase", pos), ("sibling", neg)):
            qk, qw = study.encode([q for q, _ in pairs])
            ek, ew = study.encode([e for _, e in pairs])
            inside = ((qk - ek).norm(dim=-1) <= study.radius).tolist()
            feats = []
            for a, b, ins in zip(qw, ew, inside):
                if not ins:
                    continue
                noun, other = _worst_by_kind(study.verifier, a, b)
                feats.append((lex.check(a, b)[0], noun, other))
            rows[label] = feats
            rows[label + "_pairs"] = len(pairs)
        out[g] = rows
    return out


def _worst_by_kind(v, q, e) -> tuple[float, float]:
    """The worst best-match cosine among the edit's unmatched nouns that need `align_noun`
    (the edit has no name), and among its other unmatched content words (1.0 when none)."""
    from melo_engine.verify import _stem

    noun, other = 1.0, 1.0
    need = [i for i, w in enumerate(e.content) if _stem(w) not in q.stems]
    if not need:
        return noun, other
    best = (e.vectors[need] @ q.others.T).max(1).values if len(q.others) else torch.full((len(need),), -1.0)
    for b, i in zip(best.tolist(), need):
        if e.asked_about(i):
            noun = min(noun, b)
        else:
            other = min(other, b)
    return noun, other


GRID_ALIGN = [round(0.05 * i, 2) for i in range(13)]               # 0 .. 0.60
GRID_NOUN = [round(0.05 * i, 2) for i in range(20)]                # 0 .. 0.95


def fit_thresholds(feats: dict, with_lexical: bool = True, keep_zsre: float = 0.98, min_bank: float = 0.9) -> dict:
    """The pair (align, align_noun) that rejects the most sibling pairs of the fit data while
    the alignment keeps at least `keep_zsre` of the zsRE paraphrase pairs that pass without
    it (the lexical part alone, or everything) and at least `min_bank` of the bank's fit
    paraphrases; among equals, the most lenient. (0.99 leaves the alignment no room at all:
    any positive bar for non-nouns costs zsRE rewordings more than 1 %. Pairs understate
    routing generality: a held-out phrasing needs only one of its fact's edits to accept.)"""
    def acc(rows, a, n):
        return share((lex or not with_lexical) and no >= n and ot >= a for lex, no, ot in rows) or 0.0

    base_z = acc(feats["zsre"]["paraphrase"], -2.0, -2.0)
    sib = feats["zsre"]["sibling"] + feats["bank"]["sibling"]
    best = None
    for a in GRID_ALIGN:
        for n in GRID_NOUN:
            pz, pb = acc(feats["zsre"]["paraphrase"], a, n), acc(feats["bank"]["paraphrase"], a, n)
            if pz < keep_zsre * base_z or pb < min_bank:
                continue
            rej = 1 - acc(sib, a, n)
            score = (round(rej, 4), -a, -n)
            if best is None or score > best[0]:
                best = (score, {"align": a, "align_noun": n, "fit_sibling_reject": round(rej, 4),
                                "fit_zsre_paraphrase_accept": pz, "fit_zsre_paraphrase_accept_without_alignment": base_z,
                                "fit_bank_paraphrase_accept": pb,
                                "rule": f"most sibling pairs rejected while keeping {keep_zsre} of the zsRE "
                                        f"paraphrase pairs that pass without the alignment and {min_bank} of the "
                                        f"bank's fit paraphrases"})
    return best[1] if best else {"align": min(GRID_ALIGN), "align_noun": min(GRID_NOUN), "note": "no pair met the bars"}


