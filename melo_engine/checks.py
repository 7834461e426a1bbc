"""Input checks, one set for every door: the editor, import, the command line and the app
all refuse the same bad input with the same one-line message, before anything is written
or generated.
"""
from __future__ import annotations

from pathlib import Path

from .text import shows_nothing


def clean_text(text: str, what: str, limit: int) -> str:
    """A text the user typed, stripped; refused when it shows nothing, is not valid text or
    is too long."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be text, not {type(text).__name__}")
    if shows_nothing(text):
        raise ValueError(f"{what} is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid UTF-8 text") from None
    text = text.strip()
    if len(text) > limit:
        raise ValueError(f"{what} is {len(text)} characters long; the limit is {limit}")
    return text


def clean_prefix(prefix: str, limit: int) -> str:
    """The kept text before a corrected sentence: any text (empty for the first sentence),
    valid UTF-8, at most `limit` characters; kept as given but for white space at its start
    (answers never begin with any)."""
    if not isinstance(prefix, str):
        raise ValueError(f"the text before the sentence must be text, not {type(prefix).__name__}")
    try:
        prefix.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text before the sentence is not valid UTF-8 text") from None
    if "\x00" in prefix:
        raise ValueError("the text before the sentence contains a NUL character")
    if len(prefix) > limit:
        raise ValueError(f"the text before the sentence is {len(prefix)} characters long; the limit is {limit}")
    return prefix.lstrip()


def sentence_number(number) -> int:
    """Which sentence to correct: a whole number from 1 (JSON clients send 2.0 for 2)."""
    if isinstance(number, float) and number.is_integer():
        number = int(number)
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ValueError("the sentence number must be a whole number from 1")
    return number


def flag(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false")
    return value


def export_path(path, workspace: Path) -> Path:
    """Where an export may be written: a file name in an existing folder, outside the
    workspace it comes from."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{path.name or path} is a folder: give a file name to export to")
    if not path.parent.is_dir():
        raise ValueError(f"there is no folder {path.parent.name!r} to export into")
    if path.resolve().is_relative_to(workspace.resolve()):
        raise ValueError("an export cannot go inside the workspace it comes from")
    return path


def workspace_folder(workspace) -> Path:
    """A path that can hold a workspace: a folder, or nothing yet, never inside a file."""
    ws = Path(workspace).expanduser()
    if ws.exists() and not ws.is_dir():
        raise ValueError(f"{ws.name} is a file, not a workspace folder")
    if any(p.exists() and not p.is_dir() for p in ws.parents):
        raise ValueError(f"{ws.name} would be inside a file, not a folder")
    return ws
