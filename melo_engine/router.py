"""Which block fires for a question: the index proposes, the verifier decides.

The index (index.py) finds the edits whose cluster radius covers the question's key. The
radius is calibrated on how far paraphrases spread, and a question about another subject
in the same template (a *sibling*: atomic number 7 after an edit of atomic number 6) lies
as near as a paraphrase, since a pooled key dilutes the one slot that differs. So each
candidate, nearest first, is checked word by word against the edit's own question
(verify.py): the first the verifier accepts fires; the ones it turns down are reported with
the reason ("number differs: 7 / 6"), so the page can show the decision. With
`router="radius"` (MeloConfig) the first candidate fires, as before the verifier existed.

An edit's words are computed once (one encoder pass) and kept; a query's words only when
some edit lies within the radius, which most questions never reach.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

import torch

from .index import ClusterState, Route

CANDIDATES = 8           # edits tried per question, nearest first
KEPT_WORDS = 4096        # edit questions whose words are kept (a few kB each)


class Router:
    """Routes keys through the index and, when it has a verifier, checks each candidate."""

    def __init__(self, verifier=None):
        self.verifier = verifier
        self._words: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()        # editors of many workspaces share the cache

    def words(self, text: str):
        """The verifier's view of an edit's question, computed once."""
        with self._lock:
            w = self._words.get(text)
            if w is not None:
                self._words.move_to_end(text)
                return w
        w = self.verifier.features([text])[0]
        with self._lock:
            self._words[text] = w
            if len(self._words) > KEPT_WORDS:
                self._words.popitem(last=False)
        return w

    def same_question(self, a: str, b: str) -> bool:
        """Whether two questions ask the same thing (always, without a verifier)."""
        return self.verifier is None or self.verifier.check(self.words(a), self.words(b))[0]

    def keys(self, keyer, questions: list[str]) -> tuple[torch.Tensor, list]:
        """The routing keys of `questions` and, where the key source is the verifier's own
        encoder, their words from the same encoder pass (made when first needed; else None:
        computed by a pass of their own when needed)."""
        if self.verifier is None or keyer.source.name != "sentence":
            return keyer.keys(questions), [None] * len(questions)
        raw, words = self.verifier.encode(questions, lazy=True)
        return keyer.finish(raw), words

    def route(self, state: ClusterState, key: torch.Tensor, question: str,
              prompt_of: Callable[[str], str], words=None) -> Route:
        """The route of one question: `prompt_of(edit_id)` gives an edit's own question,
        `words` the question's words when the caller has them. Call with the state's lock
        held."""
        if self.verifier is None:
            return state.route(key)
        candidates, miss = state.candidates(key, CANDIDATES)
        if not candidates:
            return miss
        if words is None:
            query = self.verifier.features([question])[0]
        else:
            query = words() if callable(words) else words
        rejected = []
        for edit_id, center_distance in candidates:
            ok, why = self.verifier.check(query, self.words(prompt_of(edit_id)))
            if ok:
                return state.route_to(edit_id, center_distance, rejected)
            rejected.append((edit_id, why))
        miss.rejected = rejected
        return miss


def router_for(backbone, name: str) -> Router:
    """The router a workspace's setting names ("verified" or "radius"), shared by every
    editor on the backbone (its cache of edit questions' words too)."""
    if name == "radius":
        return Router()

    def make():
        from .keysources.sentence import SentenceKey
        from .verify import SameQuestion

        return Router(SameQuestion(SentenceKey.encoder(backbone)))
    return backbone.companion("router:verified", make)
