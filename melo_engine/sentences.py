"""Splitting an answer into sentences, so that one wrong sentence can be corrected in place.

A sentence correction keeps the answer's text before the sentence byte for byte (the
edit teaches the model to say it again, then the corrected sentence), so the split works
on character spans of the text as shown, never on a re-joined copy. The rule is plain
punctuation: a sentence ends at . ! ? (and any closing quotes or brackets) followed by
white space, unless the word before the stop is a known abbreviation or a single
initial ("J. R. R. Tolkien", "Dr. Smith", "e.g. this"); a line break always ends one.
"""
from __future__ import annotations

import re

# Words whose trailing stop does not end a sentence (compared in lower case, without the stop).
ABBREVIATIONS = frozenset("""mr mrs ms dr prof sr jr st mt vs etc e.g i.e approx no fig jan feb mar apr jun jul
aug sep sept oct nov dec u.s u.k a.m p.m ca inc ltd co corp""".split())

_END = re.compile(r"""[.!?]+["'”’)\]]*(?=\s)|\n+""")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every sentence in `text`, in order, without surrounding white space."""
    spans, start = [], 0
    for m in _END.finditer(text):
        if m.group().startswith("."):
            word = re.search(r"(\S+)\.+$", text[start:m.start() + 1])
            w = word.group(1).lower().lstrip("(\"'") if word else ""
            if w in ABBREVIATIONS or (len(w) == 1 and w.isalpha()):
                continue
        end = m.end() if not m.group().startswith("\n") else m.start()
        if text[start:end].strip():
            spans.append(_trimmed(text, start, end))
        start = end
    if text[start:].strip():
        spans.append(_trimmed(text, start, len(text)))
    return spans


def _trimmed(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def split_sentences(text: str) -> list[str]:
    return [text[a:b] for a, b in sentence_spans(text)]


def text_before(text: str, index: int) -> str:
    """What an answer says before its sentence `index` (0-based), exactly as shown: the
    prefix a correction of that sentence keeps."""
    spans = sentence_spans(text)
    if not 0 <= index < len(spans):
        raise ValueError(f"the answer has {len(spans)} sentence(s); there is no sentence {index + 1}")
    return text[:spans[index][0]]


def joined(prefix: str, sentence: str) -> str:
    """The text a sentence correction teaches: the kept prefix, then the corrected sentence
    (after a space when the prefix does not already end in white space)."""
    sentence = sentence.strip()
    if not prefix:
        return sentence
    return prefix + sentence if prefix[-1].isspace() else f"{prefix} {sentence}"
