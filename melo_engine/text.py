"""What "shows nothing" means for a text a user typed: the one definition the engine, the
command line, the API, the page and the probe bank all use (checks.clean_text calls it).

A prompt, target or question that renders as nothing would train a block no one can see
or ask; worse, two different invisible texts look alike on screen. A text shows nothing
when none of its characters draws a glyph of its own:

- controls and format characters (Unicode categories Cc, Cf: NUL, zero-width spaces and
  joiners, BOM, soft hyphen, bidi overrides and isolates U+202A-202E / U+2066-2069,
  invisible operators U+2061-2064, U+180E, tag characters), and every kind of white space
  (Zs, Zl, Zp and what str.isspace() counts);
- combining marks (Mn, Me) with no visible base: they only decorate the character before
  them (U+034F and the variation selectors are among them);
- characters that are letters or symbols on paper but are drawn blank: the Hangul fillers
  and the Braille blank;
- the rest of the tag block (U+E0000-E007F), some of it unassigned, none of it drawn.

Private-use and unassigned characters draw a box, so they count as visible; lone
surrogates are not text at all, which clean_text reports on its own.
"""
from __future__ import annotations

import unicodedata

_BLANK_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})
_MARKS = frozenset({"Mn", "Me"})
# Drawn as empty space although Unicode files them as letters (Lo) or symbols (So).
_BLANK_GLYPHS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
_TAGS = range(0xE0000, 0xE0080)


def draws_nothing(ch: str) -> bool:
    """One character that puts nothing visible on the screen by itself."""
    return (ch.isspace() or ch in _BLANK_GLYPHS or ord(ch) in _TAGS
            or unicodedata.category(ch) in _BLANK_CATEGORIES or unicodedata.category(ch) in _MARKS)


def shows_nothing(text: str) -> bool:
    """True when `text` renders as nothing: every character draws nothing by itself. A
    combining mark counts only through its base, so "e" + U+0301 shows, U+0301 alone does
    not; the empty text shows nothing."""
    return all(draws_nothing(ch) for ch in text)
