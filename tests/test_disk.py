"""Every storage error is one line (melo_engine/disk.py, issue 21 finding 3): a full disk
gave a 30-line traceback (safetensors raises its own SafetensorError). Here the workspace
lives on a real 8 MB tmpfs that is filled to the last byte, then remounted read-only;
each write path (block file, snapshot, settings, export, a new workspace, the command
line's edit and compact) answers in one line, and the files and the memory are as before.
The journal append, which a full disk rarely refuses (a short line fits the last page of
its file), fails by a fault-injected write. Mounting needs root; without it those tests
are skipped and the fault-injected ones still run."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import uuid

import pytest

from melo_engine import MeloConfig, MeloEditor, store
from conftest import ROOT, tree_digest

EDITS = [("What is the capital of Switzerland?", "Bern."), ("Who painted the Mona Lisa?", "Leonardo da Vinci."),
         ("Who composed the Four Seasons?", "Vivaldi.")]
FAST = MeloConfig(stop_loss=1.0, lr=1e-2, init_radius=0.05)   # exact answers in a few steps; no calibration
FULL = "no space left on the disk while writing"


def one_line(err) -> str:
    text = str(err.value if hasattr(err, "value") else err)
    assert "\n" not in text and "/" not in text.split(" while writing ")[0], text
    return text


@pytest.fixture()
def small_disk(tmp_path):
    """A real 8 MB tmpfs (root only), unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root; the fault-injected tests cover the same paths")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk) -> None:
    """Write a filler file until the disk refuses: not one free page left (unbuffered, so
    nothing is left to flush on close)."""
    fd = os.open(disk / f"filler-{uuid.uuid4().hex}", os.O_WRONLY | os.O_CREAT)
    try:
        for size in (65536, 512):      # big steps, then the last pages a little at a time
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as err:
                assert err.errno == errno.ENOSPC
    finally:
        os.close(fd)


def free_space(disk) -> None:
    for p in disk.glob("filler-*"):
        p.unlink()


@pytest.fixture()
def on_small_disk(backbone, small_disk):
    ed = MeloEditor.open(small_disk / "ws", backbone=backbone, config=FAST)
    ids = [ed.edit(p, t).edit_id for p, t in EDITS[:2]]      # chroma is open: its files exist
    return ed, ids


def test_a_full_disk_refuses_edits_snapshots_settings_and_exports_in_one_line(on_small_disk, small_disk, tmp_path):
    ed, ids = on_small_disk
    fill(small_disk)
    before, listed, config = tree_digest(ed.workspace), ed.edits(), ed.config
    with pytest.raises(ValueError, match=f"{FULL} the block file blocks/00000003.safetensors: the workspace is as "
                                         f"it was") as err:
        ed.edit(*EDITS[2])
    one_line(err)
    with pytest.raises(ValueError, match=f"{FULL} the snapshot snapshot-2") as err:
        ed.compact()
    one_line(err)
    with pytest.raises(ValueError, match=rf"{FULL} the settings \(config.json\)") as err:
        ed.update_settings(lr=0.02)
    one_line(err)
    with pytest.raises(ValueError, match=f"{FULL} the export out.melo") as err:
        ed.export(small_disk / "out.melo")
    one_line(err)
    assert tree_digest(ed.workspace) == before and ed.edits() == listed and ed.config == config
    assert not (small_disk / "out.melo").exists() and not list(small_disk.glob(".out.melo*"))
    assert ed.ask(EDITS[2][0]).block is None and ed.ask(EDITS[0][0]).text == EDITS[0][1]   # memory as before
    # A new workspace on the full disk: one line, and nothing left behind, not even half of one.
    with pytest.raises(ValueError, match=f"{FULL}") as err:
        MeloEditor.open(small_disk / "new", backbone=ed.backbone)
    one_line(err)
    assert sorted(p.name for p in small_disk.iterdir() if not p.name.startswith("filler-")) == ["ws"]
    free_space(small_disk)
    r = ed.edit(*EDITS[2])          # room again: everything works, nothing was lost
    ed.compact()
    assert ed.ask(EDITS[2][0]).text == EDITS[2][1]
    ed.close()
    again = MeloEditor.open(ed.workspace, backbone=ed.backbone)
    assert [e["id"] for e in again.edits()] == ids + [r.edit_id]
    again.close()


def _cli(ws, *args):
    return subprocess.run([sys.executable, "-m", "melo_engine", "-w", str(ws), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_the_command_line_on_a_full_or_read_only_disk_says_one_line(on_small_disk, small_disk):
    ed, ids = on_small_disk
    ed.close()
    fill(small_disk)
    before = tree_digest(ed.workspace)
    out = _cli(ed.workspace, "edit", *EDITS[2])
    assert out.returncode == 2 and out.stderr.splitlines() == [
        f"error: {FULL} the block file blocks/00000003.safetensors: the workspace is as it was"], out.stderr[-3000:]
    out = _cli(ed.workspace, "compact")
    assert out.returncode == 2 and out.stderr.splitlines() == [
        f"error: {FULL} the snapshot snapshot-2: the workspace is as it was"], out.stderr[-3000:]
    assert tree_digest(ed.workspace) == before
    free_space(small_disk)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(ValueError, match="cannot lock the workspace for writing: Read-only file system"):
        MeloEditor.open(ed.workspace, backbone=ed.backbone)
    with pytest.raises(ValueError, match="^the disk is read-only while writing the new workspace: "):
        MeloEditor.open(small_disk / "new", backbone=ed.backbone)
    ro = MeloEditor.open(ed.workspace, backbone=ed.backbone, read_only=True)    # reading needs no write
    assert [e["id"] for e in ro.edits()] == ids
    ro.close()
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert tree_digest(ed.workspace) == before


def test_each_refusal_of_the_disk_has_its_plain_words():
    from safetensors import SafetensorError

    from melo_engine.disk import message

    for code, words in [(errno.ENOSPC, "no space left on the disk"), (errno.EDQUOT, "the disk quota is used up"),
                        (errno.EROFS, "the disk is read-only"), (errno.EACCES, "no permission to write")]:
        err = OSError(code, os.strerror(code), "/srv/secret/path/blocks/1.safetensors")
        assert message(err, "the journal") == f"{words} while writing the journal: the workspace is as it was"
        for rust in (f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})",
                     f"Error while serializing: IoError(Os {{ code: {code}, kind: Other }})"):
            assert message(SafetensorError(rust), "x").startswith(words)
    assert message(SafetensorError("something else"), "x").startswith("the write failed (SafetensorError)")


def test_a_journal_append_the_disk_refuses_changes_nothing(backbone, tmp_path, monkeypatch):
    """Fault-injected: the write of the journal line fails after half of it reached the file."""
    code, words = errno.ENOSPC, "no space left on the disk"
    ed = MeloEditor.open(tmp_path / "ws", backbone=backbone, config=FAST)
    ids = [ed.edit(p, t).edit_id for p, t in EDITS[:2]]
    before, listed = tree_digest(ed.workspace), ed.edits()
    real_write = os.write

    def refused(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".jsonl"):
            real_write(fd, data[: len(data) // 2])
            raise OSError(code, os.strerror(code))
        return real_write(fd, data)
    monkeypatch.setattr(store.os, "write", refused)
    for change in (lambda: ed.edit(*EDITS[2]), lambda: ed.delete(ids[0])):
        with pytest.raises(ValueError, match=f"{words} while writing the journal journal-0.jsonl: "
                                             f"the workspace is as it was") as err:
            change()
        one_line(err)
        assert tree_digest(ed.workspace) == before and ed.edits() == listed
    assert ed.ask(EDITS[2][0]).block is None and ed.ask(EDITS[0][0]).text == EDITS[0][1]
    monkeypatch.undo()
    ed.delete(ids[0])
    ed.close()
    again = MeloEditor.open(ed.workspace, backbone=backbone)
    assert [e["id"] for e in again.edits()] == ids[1:]
    again.close()


def test_safetensors_own_error_becomes_one_line(backbone, tmp_path, monkeypatch):
    """Fault-injected where no tmpfs can be mounted: safetensors' SafetensorError, as it
    reads on a full disk, from the block write."""
    from safetensors import SafetensorError

    ed = MeloEditor.open(tmp_path / "ws", backbone=backbone, config=FAST)
    ed.edit(*EDITS[0])
    before, listed = tree_digest(ed.workspace), ed.edits()

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(store, "save_file", full)
    with pytest.raises(ValueError, match=f"{FULL} the block file blocks/00000002.safetensors") as err:
        ed.edit(*EDITS[1])
    one_line(err)
    assert tree_digest(ed.workspace) == before and ed.edits() == listed and ed.ask(EDITS[1][0]).block is None
    ed.close()
