"""A second, verifying stage for routing: does a query ask the *same question* as an edit?

Why. The routing key (all-MiniLM-L6-v2, mean-pooled, whitened) places "Which element has
the atomic number 6?" and "... 7?" a hair apart: a question differs from its *sibling* (the
same template about another subject, number, ordinal, superlative or unit) in one slot,
and the mean over a dozen tokens dilutes that slot. The radius is calibrated on how far
paraphrases spread, so it covers siblings too. A paraphrase rewords the question but keeps
its slots; a sibling keeps the wording and changes a slot. So the edits within the radius
are checked a second time, word by word (router.py calls it):

1. Slots that must agree exactly (a lexical check, the same words in both texts):
   numbers (digits and number words), ordinals ("first", "3rd", "last"), superlatives
   ("largest"; "biggest" counts as the same word, see SYNONYMS) and names (capitalised
   words that are not the first word): a name of either text must occur in the other.
2. Every other content word of the edit's question must be in the query (by a crude stem)
   or find a close match among its words (late interaction, as in ColBERT's MaxSim):
   cosine of the encoder's contextual word vectors (last hidden state, word pieces
   averaged) at least `align_noun` for a noun of an edit without a name ("a *spider*",
   "the largest *planet*": the thing asked about), `align` for any other word. Both are
   fitted (bench/siblings.py): zsRE's rewordings ("architect" / "who was responsible for
   the planning") score as low as siblings' substituted words, so verbs and relation
   words get no bar.

What it catches and what still gets through, by kind, is in docs/BENCHMARKS.md
("Siblings"): numbers, names, ordinals and superlatives reliably; the same thing in another
unit, another event of one named subject and a close common noun ("heptagon" / "hexagon")
not always.

The study that chose this (and the thresholds) is melo_engine/bench/siblings.py; the
figures are in docs/results/siblings-routing.json. Words of an edit's question are
computed once per edit (`features`; the router keeps them); checking a handful of
candidates for one query then costs the query's words, which `encode` takes from the same
encoder pass as its sentence key, plus a few small matrix products.
"""
from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass

import torch

from .sentences import sentence_spans

# Function words: never slots, never required to match.
STOPWORDS = frozenset("""
a an the of in on at to for from by with about as into onto over under than then and or but nor
is are was were be been being am do does did done has have had having will would shall should can could
may might must what which who whom whose when where why how many much name tell me give list
this that these those it its it's there their they them he she his her him i you your we our us
one's someone something anyone anything same called known also some any all each other another
please kind type sort part piece way
""".split())

# "one" is left out: "one metre", "which one" say nothing about a slot.
NUMBER_WORDS = frozenset("""zero two three four five six seven eight nine ten eleven twelve thirteen
fourteen fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty
ninety hundred thousand million billion trillion dozen half""".split())
ORDINAL_WORDS = frozenset("""first second third fourth fifth sixth seventh eighth ninth tenth eleventh
twelfth thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth
thirtieth fortieth fiftieth hundredth thousandth last penultimate""".split())
# Superlatives without the -est ending, and -est words that are not superlatives.
SUPERLATIVE_WORDS = frozenset("best worst most least furthest farthest".split())
NOT_SUPERLATIVE = frozenset("""interest forest contest test honest request guest chest nest rest quest
harvest protest suggest digest invest arrest manifest modest everest west east midwest northwest
southwest northeast southeast priest conquest behest bequest earnest budapest bucharest celest
arbalest pest lest zest vest crest inquest tempest infest molest attest detest protest unrest
""".split())
# Words that mean the same slot value (each maps to one spelling).
SYNONYMS = {"biggest": "largest", "greatest": "largest", "tallest": "highest", "tiniest": "smallest",
            "1st": "first", "2nd": "second", "3rd": "third", "4th": "fourth", "5th": "fifth",
            "earth": "world", "final": "last"}
# Words that frame what kind of answer is wanted ("in which year" / "when"): a paraphrase
# swaps them freely, so they need no match.
FRAMING = frozenset("""year years date day time place city country person people thing number
happen happened occur occurred take took located location world""".split())
# Roman numerals after a name ("World War II", "Louis XIV") are numbers.
ROMAN = re.compile(r"(?=[ivxlc])(c{0,3})(xc|xl|l?x{0,3})(ix|iv|v?i{0,3})")
UNIT_BEFORE_SECOND = frozenset("per a one each every".split())
# Capitalised words that name a unit, not the thing asked about: "the boiling point of
# mercury in degrees *Celsius*" asks about mercury, so its noun needs the noun's bar.
UNIT_NAMES = frozenset("celsius fahrenheit kelvin".split())
# A word right after one of these (or after an adjective that follows one) is taken for a
# noun: the thing asked about ("the largest *planet*", "how many *seconds*", "of *water*").
# Its substitute is a sibling unless the two are near-synonyms (`align_noun`); other words
# (mostly verbs: "sink" / "go down") only need `align`. No tagger is installed.
NOUN_MARKERS = frozenset("""the a an of many much per in on for from at by with than this that these
those its his her their our your every each""".split())

# Two words swapped in one template are the same slot when their contextual vectors are at
# least this close ("begin" / "start" 0.92); the bank's siblings reach 0.78
# ("centimetres" / "millimetres"). Chosen on the fit half (bench/siblings.py).
SYNONYM = 0.8

# A modifier added before a noun makes another question when the noun's contextual vector
# moves: "black keys" / "keys" 0.94, "bass guitar" 0.93; "chemical element" / "element"
# 0.98, "official currency" 0.99, "chemical symbol" 0.97 (ten pairs written for the rule).
MODIFIER_SAME = 0.96

_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'’.\-]*[A-Za-z0-9]|[A-Za-z0-9]")


def _norm(word: str) -> str:
    w = word.lower().replace("’", "'")
    if w.endswith("'s"):
        w = w[:-2]
    return w.strip("'.-")


def _stem(word: str) -> str:
    """A crude stem (no stemmer is installed): common endings off, so "boiling" / "boil",
    "published" / "publish", "metres" / "metre" meet, and "centimetres" / "metres" do not."""
    for suffix in ("ing", "ed", "es", "er", "s", "ly"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            word = word[: -len(suffix)]
            break
    return word[:-1] if word.endswith("e") and len(word) > 4 else word


def _slot(word: str, before: str = "", in_name: bool = False) -> str | None:
    """'number', 'ordinal' or 'superlative' for a slot word, else None. `before`: the
    previous word (normalised); `in_name`: the previous word was a capitalised name."""
    w = _norm(word)
    if w == "second" and before in UNIT_BEFORE_SECOND:
        return None
    if in_name and re.sub(r"['’]s$", "", word).isupper() and ROMAN.fullmatch(w):
        return "number"
    w = SYNONYMS.get(w, w)
    if any(ch.isdigit() for ch in w):
        return "ordinal" if re.fullmatch(r"\d+(st|nd|rd|th)", w) else "number"
    if w in NUMBER_WORDS:
        return "number"
    if w in ORDINAL_WORDS:
        return "ordinal"
    if w in SUPERLATIVE_WORDS or (len(w) > 5 and w.endswith("est") and w not in NOT_SUPERLATIVE):
        return "superlative"
    return None


def _acronym(run: tuple[str, ...]) -> str:
    return "".join(w[0] for w in run) if len(run) > 1 else ""


@dataclass
class Words:
    """What the verifier needs of one text (computed once per edit, once per query)."""

    text: str
    words: frozenset                 # normalised words (synonyms mapped)
    stems: frozenset                 # their crude stems
    slots: dict[str, frozenset]      # number / ordinal / superlative -> normalised values
    runs: list[tuple[str, ...]]      # runs of capitalised words after the first word
    content: list[str]               # content words that must find a match (not slots, names, framing)
    nounish: list[bool]              # per content word: right after a determiner, preposition, ...
    vectors: torch.Tensor            # [len(content), dim] unit contextual vectors of `content`
    others: torch.Tensor             # [n, dim] unit vectors of every non-stopword (what a match may be)
    other_words: list[str]
    sequence: tuple = ()             # the question's (normalised word, taken for a noun) in order

    # Derived once per text (an edit's Words are kept by the router and checked often).
    @functools.cached_property
    def relations(self) -> frozenset:
        """The words right before "of" / "for" / ... in the question: nouns that name the
        relation ("the boiling *point* of mercury"), which paraphrases reword ("at what
        temperature"), not the thing asked about."""
        return frozenset(w for i, (w, _) in enumerate(self.sequence) if _names_relation(self.sequence, i + 1))

    @functools.cached_property
    def named(self) -> bool:
        """Whether the text names a subject (a name that is not only a unit): then the thing
        asked about is that name, checked word for word, not a common noun."""
        return any(not all(w in UNIT_NAMES for w in r) for r in self.runs)

    @functools.cached_property
    def _asked(self) -> tuple:
        nouns = [n and not self.named for n in self.nounish]
        # a relation noun is the thing asked about where no other noun is ("the *square* of 12")
        alone = not any(n and w not in self.relations for w, n in zip(self.content, nouns))
        return tuple(n and (w not in self.relations or alone) for w, n in zip(self.content, nouns))

    def asked_about(self, i: int) -> bool:
        """Whether content word i is the thing asked about, a common noun ("a *spider*", "the
        largest *planet*", "of *mercury*"), which needs `align_noun`: taken for a noun, in a
        question that names no subject, and not a relation noun beside another noun."""
        return self._asked[i]


class SameQuestion:
    """Decide whether a query asks the same question as an edit within the radius.

    `align`: the cosine a content word of the edit's question needs with some word of the
    query when neither text has the other's word (fitted on zsRE facts of the whitening half
    and half of the hard bank, see bench/siblings.py). `lexical` and `aligned` switch the
    two parts (for the study)."""

    def __init__(self, encoder, align: float = 0.0, align_noun: float = 0.5, lexical: bool = True,
                 aligned: bool = True, template: bool = True, synonym: float = SYNONYM):
        self.encoder = encoder
        self.align = float(align)
        self.align_noun = float(align_noun)
        self.lexical = lexical
        self.aligned = aligned
        self.template = template
        self.synonym = float(synonym)

    # ---- features -------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, texts: list[str], batch: int = 64, lazy: bool = False) -> tuple[torch.Tensor, list]:
        """One encoder pass per batch: the sentence key (mean-pooled, unit length: exactly
        SentenceEncoder.encode) and each text's Words. A caller that routes by the sentence
        key gets the verifier's data for free. `lazy`: each text's Words as a function that
        makes them from the pass's states when first needed (most questions never reach an
        edit's radius, and then never need them)."""
        keys: list[torch.Tensor] = []
        out: list[Words] = []
        enc = self.encoder
        with enc.lock:
            for i in range(0, len(texts), batch):
                chunk = texts[i:i + batch]
                t = enc.tokenizer(chunk, padding=True, truncation=True, max_length=128,
                                  return_tensors="pt", return_offsets_mapping=True)
                offsets = t.pop("offset_mapping")
                h = enc.hidden(t)
                m = t["attention_mask"][..., None].to(h.dtype)
                keys.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1))
                for j, text in enumerate(chunk):
                    args = (text, h[j], offsets[j], t["attention_mask"][j])
                    out.append(functools.partial(self._words, *args) if lazy else self._words(*args))
        return torch.cat(keys), out

    def features(self, texts: list[str]) -> list[Words]:
        """Each text's Words (for an edit: compute once, keep with the edit)."""
        return self.encode(texts)[1]

    def features_from_states(self, text: str, states: torch.Tensor) -> Words:
        """Words of `text` from the token states [seq, dim] of an encoder pass the caller
        already ran on it alone (same tokenizer settings as SentenceEncoder.encode)."""
        t = self.encoder.tokenizer(text, truncation=True, max_length=128, return_offsets_mapping=True,
                                   return_tensors="pt")
        return self._words(text, states, t["offset_mapping"][0], t["attention_mask"][0])

    def _words(self, text: str, states: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor) -> Words:
        spans = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(text)]
        # Slots, names and content words come from the last sentence (the question; a
        # prompt may open with context, as CounterFact's paraphrases do); any word of the
        # whole text may match the other text's.
        sentences = sentence_spans(text)
        question_start = sentences[-1][0] if sentences else 0
        first = next((k for k, (s, _, _) in enumerate(spans) if s >= question_start), 0)
        slots = {"number": set(), "ordinal": set(), "superlative": set()}
        words, runs, run, content, rows, others, other_words = set(), [], [], [], [], [], []
        nounish, seq, sequence = [], [], []   # seq: (normalised word, is it a name or slot) in order
        offs = offsets.tolist()
        before, in_name = "", False
        for k, (s, e, raw) in enumerate(spans):
            w = _norm(raw)
            if not w:
                continue
            w = SYNONYMS.get(w, w)
            words.add(w)
            if k < first:
                self._other(w, s, e, offs, mask, states, others, other_words)
                continue
            kind = _slot(raw, before, in_name)
            # an all-capital word is a name even where it spells a function word ("US")
            # ... but not a framing word that happens to be capitalised ("the Earth" / "the world")
            name = not kind and k > first and raw[0].isupper() and w not in FRAMING and (
                w not in STOPWORDS or len(raw) > 1 and raw.isupper())
            marked = bool(seq) and (seq[-1][0] in NOUN_MARKERS or seq[-1][1] == "slot" and kind is None
                                    and seq[-1][0] not in NUMBER_WORDS and not seq[-1][0].isdigit()
                                    or len(seq) > 1 and seq[-1][1] == "" and seq[-1][0] not in STOPWORDS
                                    and seq[-2][0] in NOUN_MARKERS)
            seq.append((w, "name" if name else "slot" if kind else ""))
            sequence.append((w, marked))
            before, in_name = w, name
            if name:
                run.append(w)
                if re.search(r"['’]s$", raw):      # "Orwell's Animal Farm": two names
                    runs.append(tuple(run))
                    run = []
            elif run:
                runs.append(tuple(run))
                run = []
            if kind:
                slots[kind].add(w)
                continue
            if w in STOPWORDS:
                continue
            v = self._other(w, s, e, offs, mask, states, others, other_words)
            if v is not None and not name and w not in FRAMING:
                content.append(w)
                nounish.append(marked)
                rows.append(v)
        if run:
            runs.append(tuple(run))
        dim = states.shape[-1]
        unit = lambda xs: torch.nn.functional.normalize(torch.stack(xs), dim=-1) if xs else torch.zeros(0, dim)
        return Words(text, frozenset(words), frozenset(_stem(w) for w in words),
                     {k: frozenset(v) for k, v in slots.items()}, runs, content, nounish, unit(rows), unit(others),
                     other_words, tuple(sequence))

    @staticmethod
    def _other(w, s, e, offs, mask, states, others, other_words):
        """Add a word's vector (the mean of its word pieces' states) to the words a match may be."""
        if w in STOPWORDS:
            return None
        pieces = [i for i, (a, b) in enumerate(offs) if b > a and a >= s and b <= e and mask[i]]
        if not pieces:
            return None
        v = states[pieces].mean(0)
        others.append(v)
        other_words.append(w)
        return v

    # ---- the decision ---------------------------------------------------------------------
    @staticmethod
    def _run_found(run: tuple[str, ...], other: Words) -> bool:
        """A name run of one text is found in the other: all its words are there, or a run
        there is a shortening of it ("Orwell" / "George Orwell"), or initials stand for it
        ("United States" / "US"). "José Toribio Medina" / "Juan José Medina" is not found."""
        if all(_stem(w) in other.stems or w in other.words for w in run):
            return True
        mine = {_stem(w) for w in run}
        if any(all(_stem(w) in mine for w in r) for r in other.runs):
            return True
        if _acronym(run) and _acronym(run) in other.words:
            return True
        return len(run) == 1 and any(_acronym(r) == run[0] for r in other.runs)

    def check(self, query: str | Words, edit_question: str | Words) -> tuple[bool, str]:
        """(same question?, a short reason when not: "number differs: 7 / 6", query's first)."""
        q = query if isinstance(query, Words) else self.features([query])[0]
        e = edit_question if isinstance(edit_question, Words) else self.features([edit_question])[0]
        if self.lexical:
            # Numbers must be the same; an ordinal or superlative only where both texts have
            # one ("the last year of X" / "the year X was dissolved" ask the same).
            for kind in ("number", "ordinal", "superlative"):
                # A value the other text says too, anywhere in it (in a name, at the head of
                # a sentence, in context before the question), agrees: "Three Drives is ..." /
                # "What does Three Drives play?". A value only one text says still differs.
                a, b = q.slots[kind] - e.words, e.slots[kind] - q.words
                # A rank before a superlative changes it: "second largest" is not "largest".
                ranked = kind == "ordinal" and (q.slots["superlative"] or e.slots["superlative"])
                if a != b and (kind == "number" or (a and b) or ranked):
                    return False, f"{kind} differs: {_show(a)} / {_show(b)}"
            q_extra = [" ".join(r) for r in q.runs if not self._run_found(r, e)]
            e_extra = [" ".join(r) for r in e.runs if not self._run_found(r, q)]
            if q_extra or e_extra:
                return False, f"name differs: {_show(q_extra)} / {_show(e_extra)}"
        if self.template:
            why = self._slot_swapped(q, e)
            if why:
                return False, why
        if self.aligned:
            worst, word, match, noun = self._worst(q, e)
            if worst < (self.align_noun if noun else self.align):
                return False, f"words differ: {match} / {word} ({worst:.2f})"
        return True, ""

    def _slot_swapped(self, q: Words, e: Words) -> str:
        """A reason when the query is the edit's question with one or two nouns swapped for
        words of another meaning ("boiling point" / "freezing point", "a hexagon" / "an
        octagon"), or with a modifier added ("black keys"), and every other word kept: the
        same template about another thing, a sibling. A paraphrase rewords more than one
        slot, or swaps a word for a near-synonym (cosine at least `synonym`: "biggest" /
        "largest"). Function words may differ ("did" / "was", "what" / "which")."""
        a, b = _template(e.sequence), _template(q.sequence)
        codes = difflib.SequenceMatcher(a=[w for w, _ in a], b=[w for w, _ in b], autojunk=False).get_opcodes()
        swaps, added, local, reworded = [], [], [], False
        for k, (tag, i1, i2, j1, j2) in enumerate(codes):
            if tag == "equal":
                continue
            mine, theirs = a[i1:i2], b[j1:j2]
            if all(w in STOPWORDS for w, _ in mine + theirs):
                continue                                  # function words only
            # a modifier right before a kept content word: "black keys", "bass guitar" (where
            # the edit names no subject: "Which *football* league is X in" asks what "Which
            # league is X in" asks)
            if (tag == "insert" and not e.named and len(theirs) == 1 and theirs[0][0] not in FRAMING
                    and j2 < len(b) and b[j2][0] not in STOPWORDS):
                # ... unless the noun means what it meant ("*chemical* element" / "element"):
                # its contextual vector barely moves when the modifier is implied by it
                if self._closest(q, [b[j2][0]], e, [b[j2][0]]) < MODIFIER_SAME:
                    added.append(theirs[0][0])
            # one or two content words for as many, where one side is taken for a noun (the
            # thing asked about: "of *water*" / "of *ethanol*"); verbs are left to the
            # alignment: "sold by" / "produced by" are one relation to CounterFact
            elif tag == "replace" and len(mine) == len(theirs) and any(noun for _, noun in mine + theirs):
                # "the *stadium* of X" / "the *venue* of X": a noun before "of" names the
                # relation, which paraphrases reword (zsRE's do); the thing asked about is X
                if _names_relation(a, i2) or _names_relation(b, j2):
                    return ""
                mine = [w for w, _ in mine if w not in STOPWORDS]
                theirs = [w for w, _ in theirs if w not in STOPWORDS]
                if not 0 < len(mine) == len(theirs) <= 2:
                    return ""
                swaps.append((mine, theirs))
                # kept on both sides, with a content word kept before it ("the boiling point
                # of *mercury* in" / "... of *water* in"): the thing asked about, even where
                # the rest of the question is reworded
                left = codes[k - 1] if k else None
                if (len(mine) == 1 and left and left[0] == "equal" and k + 1 < len(codes)
                        and codes[k + 1][0] == "equal"
                        and any(w not in STOPWORDS for w, _ in a[left[1]:left[2]])
                        and mine[0] not in q.words and theirs[0] not in e.words):
                    local.append((mine, theirs))
            else:
                reworded = True                           # not one template
        if reworded:
            # A reworded sibling ("What is the boiling point of water in Celsius?" after an
            # edit of "... of mercury in degrees Celsius?") still swaps the thing asked about
            # in a kept context; anything else reworded is left to the alignment.
            swaps, added = local, []
        if not swaps and not added or len(swaps) + len(added) > 2:
            return ""
        shown = []
        for mine, theirs in swaps:
            if {_stem(w) for w in mine} == {_stem(w) for w in theirs}:
                continue
            cos = self._closest(q, theirs, e, mine)
            if cos >= self.synonym:
                continue
            shown.append(f"{' '.join(theirs)} / {' '.join(mine)} ({cos:.2f})")
        shown += [f"{w} added" for w in added]
        return f"another slot: {', '.join(shown)}" if shown else ""

    @staticmethod
    def _closest(q: Words, theirs: list[str], e: Words, mine: list[str]) -> float:
        """The highest cosine between the query's swapped words and the edit's."""
        vq = [q.others[q.other_words.index(w)] for w in theirs if w in q.other_words]
        ve = [e.others[e.other_words.index(w)] for w in mine if w in e.other_words]
        if not vq or not ve:
            return -1.0
        return float((torch.stack(vq) @ torch.stack(ve).T).max())

    def _worst(self, q: Words, e: Words) -> tuple[float, str, str, bool]:
        """The edit's content word least matched in the query, measured against the bar it
        must pass: (cosine, word, its best match in the query, is it a noun). A word whose
        stem occurs in the query matches fully."""
        need = [i for i, w in enumerate(e.content) if _stem(w) not in q.stems]
        if not need:
            return 1.0, "", "", False
        if not len(q.others):
            i = need[0]
            return -1.0, e.content[i], "-", e.asked_about(i)
        best, where = (e.vectors[need] @ q.others.T).max(1)
        # A noun needs `align_noun` where the edit names no subject: then the thing asked about
        # is a common noun ("a spider", "the largest planet"); with a name it is the name,
        # checked word for word above, and every word needs only `align`.
        strict = [e.asked_about(i) for i in need]
        margin = [float(b) - (self.align_noun if st else self.align) for b, st in zip(best, strict)]
        j = min(range(len(need)), key=margin.__getitem__)
        i = need[j]
        return float(best[j]), e.content[i], q.other_words[int(where[j])], strict[j]

    def score(self, query: Words, edit: Words) -> float:
        """The alignment alone: the worst best-match cosine of the edit's content words."""
        return self._worst(query, edit)[0]


RELATION_AFTER = frozenset("of for at to with about behind".split())


def _names_relation(words: list, end: int) -> bool:
    """Whether the words before position `end` are followed by a preposition that makes them
    a relation ("the home stadium *of*", "the director *for*")."""
    return end < len(words) and words[end][0] in RELATION_AFTER


def _template(sequence: tuple) -> list[str]:
    """A question's words for comparing templates: "what" and "which" are one word, so are
    "a" and "an", and "one" ("which one") is no word."""
    same = {"what": "which", "an": "a"}
    return [(same.get(w, w), noun) for w, noun in sequence if w not in ("one", "ones")]


def _show(values) -> str:
    return " ".join(sorted(values)) or "-"
