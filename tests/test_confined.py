"""Nothing outside a workspace is read, written or removed, and a refused command removes
only what it made (issue 21 findings 2 and 4): a symlinked blocks/ let the sweep of a
refused `delete` remove notes.txt and thesis.tex from the linked folder; a refused command
removed a workspace another process had just filled. On the real model and files."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from melo_engine import MeloConfig, MeloEditor, store
from melo_engine.__main__ import main
from conftest import ROOT, tree_digest

FAST = MeloConfig(stop_loss=1.0, lr=1e-2, init_radius=0.05)   # exact answers in a few steps; no calibration
EDIT = ("What is the capital of Switzerland?", "Bern.")


@pytest.fixture()
def outside(tmp_path):
    """Someone's folder next to the workspaces, with files that must survive."""
    d = tmp_path / "thesis"
    d.mkdir()
    (d / "notes.txt").write_text("three years of notes")
    (d / "thesis.tex").write_text("\\documentclass{book}")
    return d


@pytest.fixture()
def ws(backbone, tmp_path):
    ed = MeloEditor.open(tmp_path / "ws", backbone=backbone, config=FAST)
    ed.edit(*EDIT)
    ed.close()
    return tmp_path / "ws"


def _relink(ws, part, outside):
    """Replace part `part` of the workspace by a link to a copy of it in `outside` (index/,
    the chroma mirror of workspaces made before 2026-11-30, by a link to a folder there)."""
    target = outside / f"linked-{part.replace('/', '-')}"
    if (ws / part).exists():
        os.rename(ws / part, target)
    else:
        target.mkdir()
        (target / "chroma.sqlite3").write_bytes(b"someone else's database")
    os.symlink(target, ws / part)
    return target


@pytest.mark.parametrize("part", ["blocks", "index", "journal-0.jsonl", "snapshot-0.json", "config.json",
                                  "blocks/00000001.safetensors"])
def test_a_workspace_with_a_linked_part_is_refused_and_nothing_outside_is_touched(backbone, ws, outside, part):
    _relink(ws, part, outside)
    (outside / "stray.safetensors").write_bytes(b"not ours")    # what a sweep of blocks/ would remove
    before_out, before_ws = tree_digest(outside), tree_digest(ws)
    message = f"the workspace's {part} is a link to elsewhere; a workspace's parts must be its own files, so it is not opened"
    for read_only in (False, True):
        with pytest.raises(ValueError) as err:
            MeloEditor.open(ws, backbone=backbone, read_only=read_only)
        assert str(err.value) == message
    with pytest.raises(ValueError, match="is a link to elsewhere"):
        MeloEditor.repair(ws, backbone=backbone)
    assert tree_digest(outside) == before_out and tree_digest(ws) == before_ws
    assert (outside / "notes.txt").read_text() == "three years of notes"


def test_the_issues_refused_delete_on_a_linked_blocks_folder_deletes_nothing(ws, outside):
    """The issue's case through the command line: blocks/ replaced by a link to a folder
    holding notes.txt and thesis.tex, then `delete nonexistent-id`."""
    for p in (ws / "blocks").iterdir():
        p.unlink()
    (ws / "blocks").rmdir()
    os.symlink(outside, ws / "blocks")
    before = tree_digest(outside)
    for args in (["delete", "nonexistent-id"], ["repair"], ["list"]):
        out = subprocess.run([sys.executable, "-m", "melo_engine", "-w", str(ws), *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 2 and out.stderr.splitlines() == [
            "error: the workspace's blocks is a link to elsewhere; a workspace's parts must be its own files, "
            "so it is not opened"], out.stderr[-2000:]
    assert tree_digest(outside) == before and sorted(p.name for p in outside.iterdir()) == ["notes.txt", "thesis.tex"]


def test_a_refused_command_keeps_a_workspace_another_process_filled_meanwhile(backbone, tmp_path, monkeypatch, capsys):
    """The command starts when the folder does not exist; before it opens it, another
    writer creates it and commits an edit (the issue: an import one second earlier). The
    refusal then removes nothing. A refused command on a folder nobody filled leaves no
    trace, not even a half-made workspace beside it."""
    target = tmp_path / "shared"
    opened = MeloEditor.open.__func__

    def another_writer_first(cls, workspace, **kw):
        other = opened(cls, workspace, backbone=backbone, config=FAST)     # the other process's editor
        other.edit(*EDIT)
        other.close()
        return opened(cls, workspace, **dict(kw, backbone=backbone))
    monkeypatch.setattr(MeloEditor, "open", classmethod(another_writer_first))
    assert main(["-w", str(target), "delete", "nonexistent-id"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: unknown edit id 'nonexistent-id'"]
    monkeypatch.undo()
    ed = MeloEditor.open(target, backbone=backbone, read_only=True)
    assert [e["prompt"] for e in ed.edits()] == [EDIT[0]] and ed.ask(EDIT[0]).text == EDIT[1]
    ed.close()

    monkeypatch.setattr(MeloEditor, "open", classmethod(lambda cls, ws, **kw: opened(cls, ws, **dict(kw, backbone=backbone))))
    before = sorted(os.listdir(tmp_path))
    assert main(["-w", str(tmp_path / "mine"), "delete", "nonexistent-id"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: unknown edit id 'nonexistent-id'"]
    assert sorted(os.listdir(tmp_path)) == before


def test_a_new_workspace_appears_whole_or_not_at_all(backbone, tmp_path, monkeypatch):
    """Creation is written beside the final name and renamed into place: a failure at its
    last file (the header) leaves no folder under the name and no temporary beside it; an
    empty folder is taken over; a folder with files in it is refused."""
    write = store.atomic_write_json

    def header_fails(path, obj):
        if path.name == store.HEADER:
            raise OSError(28, "No space left on device")
        write(path, obj)
    monkeypatch.setattr(store, "atomic_write_json", header_fails)
    with pytest.raises(ValueError, match="no space left on the disk while writing the new workspace"):
        MeloEditor.open(tmp_path / "new", backbone=backbone)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    (tmp_path / "empty").mkdir()
    MeloEditor.open(tmp_path / "empty", backbone=backbone).close()
    assert (tmp_path / "empty" / store.HEADER).is_file()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="full is not empty and is not a MELO workspace"):
        MeloEditor.open(tmp_path / "full", backbone=backbone)
    assert os.listdir(tmp_path / "full") == ["mine.txt"]
    assert sorted(os.listdir(tmp_path)) == ["empty", "full"]
