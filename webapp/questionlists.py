"""A visitor's own question list, seen from its workspace folder.

Settings loads a file of questions into the probe bank as the visitor's own list
(melo_engine/probebank.py: their side-effect checks see it beside the shared list, nobody
else's do). The list lives in chroma, outside the folder, so the folder carries a mark:
the sweep keeps a marked workspace like one with edits (idle.py), and removing it takes
the list out of the bank too. The pool does the locking; this is what a list means to a
folder.
"""
from __future__ import annotations

from pathlib import Path

from melo_engine import probebank
from melo_engine.questionfile import read_questions_file

MARK = "questions"


def load(pool, token: str, path) -> tuple[int, int, int]:
    """Load a file into the token's own list: (added, skipped, how many its checks now run
    over). A write: the workspace is made if there is none, and goes again if the load
    fails. A refused file is refused before anything is marked; the mark comes before the
    load, so a load that fails part way, or a workspace removed meanwhile, still takes
    what was loaded out of the bank with it."""
    read_questions_file(path)
    folder = pool.root / pool.tokens.folder(token)
    with pool.writing(token) as ed:
        folder.mkdir(parents=True, exist_ok=True)        # an engine replica makes the workspace
        (folder / MARK).write_text("")
        bank = ed.probe_bank()
        added, skipped = bank.add_file(path, source=Path(path).name)
        return added, skipped, bank.count()


def marked(folder: Path) -> bool:
    """Whether the workspace in `folder` holds a list of its own."""
    return (folder / MARK).is_file()


def forget(folder: Path) -> None:
    """The removed workspace's list leaves the bank with it; a bank that cannot be reached
    now keeps it (nobody else sees it) and the removal stands."""
    try:
        probebank.forget(probebank.owner_of(folder / "ws"))
    except Exception as err:  # noqa: BLE001 - the workspace is gone either way
        print(f"workspace {folder.name} removed; its questions stay in the probe bank ({err})", flush=True)
