"""Question lists from a file: what the probe bank takes in, checked before anything is kept.

A list comes from a person (an eval set, a class's questions) as .txt, .json or .csv, and
from a stranger on a public server. Every question is cleaned the one way the bank compares
them, and a file with one bad line is refused whole, in one line that names the line, so
nothing of it reaches the bank.
"""
from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
from pathlib import Path

from .text import shows_nothing

MAX_CHARS = 500          # one question; a passage is not a probe


def clean_question(text, where: str = "") -> str:
    """A question as the bank keeps it: whitespace runs made one space, ends stripped.
    ValueError (one line, naming `where`) unless it is visible text of at most MAX_CHARS."""
    at = f"{where}: " if where else ""
    if not isinstance(text, str):
        raise ValueError(f"{at}a question must be text, not {type(text).__name__}")
    q = re.sub(r"\s+", " ", text).strip()
    bad = [c for c in q if unicodedata.category(c) in ("Cc", "Cs", "Co", "Cn")]
    if bad:
        raise ValueError(f"{at}a question holds a control or unassigned character ({ascii(bad[0])})")
    if shows_nothing(q):                     # the one definition (text.py) every door uses
        raise ValueError(f"{at}a question holds no visible text")
    if len(q) > MAX_CHARS:
        raise ValueError(f"{at}a question is {len(q)} characters long (at most {MAX_CHARS})")
    return q


def _json_items(data, name: str) -> list[tuple[str, object]]:
    if not isinstance(data, list):
        raise ValueError(f"{name}: a JSON file must hold a list of questions")
    out = []
    for i, item in enumerate(data):
        where = f"{name}: item {i + 1}"
        if isinstance(item, dict):
            field = next((f for f in ("question", "src", "prompt") if f in item), None)
            if field is None:
                raise ValueError(f"{where}: an object needs a \"question\", \"src\" or \"prompt\" field")
            item = item[field]
        out.append((where, item))
    return out


def read_questions_file(path) -> list[str]:
    """The questions in a .txt (one a line), .json (a list of strings, or of objects with a
    "question", "src" or "prompt" field) or .csv (a "question" column, else the first column)
    file: cleaned, blank ones dropped, duplicates dropped (first kept). ValueError in one line
    on anything else, so nothing of a bad file reaches the bank."""
    path = Path(path)
    name = path.name
    ext = path.suffix.lower()
    if ext not in (".txt", ".json", ".csv"):
        raise ValueError(f"{name}: questions come as .txt (one a line), .json or .csv, not {ext or 'no extension'}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{name}: not UTF-8 text") from None
    except OSError as err:
        raise ValueError(f"{name}: cannot be read ({err.strerror or type(err).__name__})") from None
    if ext == ".txt":
        items = [(f"{name}: line {i + 1}", line) for i, line in enumerate(re.split(r"\r\n|\r|\n", text))]
    elif ext == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{name}: not valid JSON (line {err.lineno}: {err.msg})") from None
        items = _json_items(data, name)
    else:
        try:
            rows = list(csv.reader(io.StringIO(text)))
        except csv.Error as err:
            raise ValueError(f"{name}: not valid CSV ({err})") from None
        rows = [r for r in rows if any(c.strip() for c in r)]
        header = [c.strip().lower() for c in rows[0]] if rows else []
        col, start = (header.index("question"), 1) if "question" in header else (0, 0)
        items = [(f"{name}: row {i + 1}", r[col] if col < len(r) else "") for i, r in enumerate(rows) if i >= start]
    out, seen = [], set()
    for where, item in items:
        if isinstance(item, str) and not item.strip():
            continue
        q = clean_question(item, where)
        if q not in seen:
            seen.add(q)
            out.append(q)
    if not out:
        raise ValueError(f"{name}: no questions in it")
    return out
