"""Bad input gets a clear error and changes nothing on disk; a crash mid-edit loses nothing."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from melo_engine import MeloEditor
from conftest import ROOT, tree_digest


@pytest.fixture()
def one_edit(backbone, example_edits, tmp_path):
    ed = MeloEditor.open(tmp_path / "ws", backbone=backbone)
    ed.edit(example_edits[0]["prompt"], example_edits[0]["target"])
    return ed


@pytest.mark.parametrize("prompt,target,message", [
    ("", "Jupiter.", "prompt is empty"),
    ("   \n\t", "Jupiter.", "prompt is empty"),
    ("What is the largest planet?", "  ", "target is empty"),
    ("x" * 501, "Jupiter.", "limit is 500"),
    ("What is the largest planet?", "y" * 501, "limit is 500"),
])
def test_bad_edit_input_is_refused_and_changes_nothing(one_edit, prompt, target, message):
    before = tree_digest(one_edit.workspace)
    with pytest.raises(ValueError, match=message):
        one_edit.edit(prompt, target)
    assert tree_digest(one_edit.workspace) == before
    assert len(one_edit.edits()) == 1


def test_bad_questions_and_ids_are_refused(one_edit):
    before = tree_digest(one_edit.workspace)
    for q in ("", "   ", "z" * 501):
        with pytest.raises(ValueError):
            one_edit.ask(q)
    with pytest.raises(ValueError, match="question 1 is empty"):
        one_edit.probe(["", "  "])
    with pytest.raises(ValueError, match="no questions"):
        one_edit.probe([])
    with pytest.raises(ValueError, match="unknown edit id"):
        one_edit.delete("deadbeef")
    with pytest.raises(ValueError, match="cannot change"):
        one_edit.update_settings(key_layer=3)
    with pytest.raises(ValueError, match="lr must be positive"):
        one_edit.update_settings(lr=-1.0)
    assert tree_digest(one_edit.workspace) == before


def test_workspace_of_another_model_is_refused(one_edit, backbone):
    log_path = one_edit.workspace / "workspace.json"
    log = json.loads(log_path.read_text())
    log["fingerprint"]["embed_sum"] += 1.0          # as if another fine-tune had made it
    log_path.write_text(json.dumps(log))
    before = tree_digest(one_edit.workspace)
    with pytest.raises(ValueError, match="another model"):
        MeloEditor.open(one_edit.workspace, backbone=backbone)
    with pytest.raises(ValueError, match="was made with model"):
        MeloEditor.open(one_edit.workspace, model="some-org/another-model", backbone=backbone)
    assert tree_digest(one_edit.workspace) == before


def test_corrupt_or_foreign_export_is_refused(one_edit, tmp_path):
    bad_files = {
        "garbage.melo": b"\x00\x01 this is not safetensors",
        "empty.melo": b"",
        "json.melo": json.dumps({"edits": []}).encode(),
    }
    good = one_edit.export(tmp_path / "good.melo")
    truncated = good.read_bytes()[: good.stat().st_size // 2]
    bad_files["truncated.melo"] = truncated
    before = tree_digest(one_edit.workspace)
    for name, data in bad_files.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(ValueError, match="not a MELO Studio export"):
            one_edit.import_(p)
    with pytest.raises(ValueError, match="no such file"):
        one_edit.import_(tmp_path / "missing.melo")
    assert tree_digest(one_edit.workspace) == before


def test_export_import_round_trip(one_edit, backbone, example_edits, tmp_path):
    path = one_edit.export(tmp_path / "edits.melo")
    other = MeloEditor.open(tmp_path / "ws2", backbone=backbone)
    new_ids = other.import_(path)
    assert len(new_ids) == 1
    a = other.ask(example_edits[0]["prompt"])
    assert a.text == example_edits[0]["target"] and a.edit_id == new_ids[0]


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "melo_engine", "-w", str(tmp_path / "ws"), "edit", " ", "x"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: the prompt is empty"]


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from melo_engine import MeloEditor
    ed = MeloEditor.open(sys.argv[1])
    def progress(step, loss):
        print("step", step, flush=True)
        time.sleep(30)          # hold still mid-training until the test kills us
    ed.edit("Who composed the Four Seasons?", "Antonio Vivaldi composed The Four Seasons.", progress=progress)
""")


def test_process_killed_mid_edit_leaves_workspace_as_before(one_edit, backbone, example_edits):
    ws = one_edit.workspace
    one_edit.close()
    before = tree_digest(ws)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(ws)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("step"), line
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert tree_digest(ws) == before
    ed = MeloEditor.open(ws, backbone=backbone)
    assert [e["prompt"] for e in ed.edits()] == [example_edits[0]["prompt"]]
    assert ed.ask(example_edits[0]["prompt"]).text == example_edits[0]["target"]


@pytest.mark.parametrize("settings", [{"key_source": "model"}, {"key_source": "sentence", "key_whitening": False}])
def test_export_with_other_key_settings_is_refused(one_edit, backbone, tmp_path, settings):
    from melo_engine import MeloConfig

    path = one_edit.export(tmp_path / "edits.melo")
    other = MeloEditor.open(tmp_path / "ws-other", config=MeloConfig(**settings), backbone=backbone)
    before = tree_digest(other.workspace)
    with pytest.raises(ValueError, match="keys would not compare"):
        other.import_(path)
    assert tree_digest(other.workspace) == before and other.edits() == []


def _doctored_export(good, tmp_path, name, change):
    """A copy of the export `good` with `change(meta, tensors)` applied."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(good), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    change(meta, tensors)
    out = tmp_path / f"{name}.melo"
    save_file(tensors, str(out), metadata=meta)
    return out


def _set_edits(meta, value):
    meta["edits"] = json.dumps(value)


def _first(tensors, kind):
    return next(k for k in tensors if k.startswith(kind))


BAD_IMPORTS = {
    "NaN key": (lambda m, t: t[_first(t, "key.")].fill_(float("nan")), "NaN, infinite or zero"),
    "infinite key": (lambda m, t: t[_first(t, "key.")].fill_(float("inf")), "NaN, infinite or zero"),
    "zero key": (lambda m, t: t[_first(t, "key.")].zero_(), "NaN, infinite or zero"),
    "int64 key": (lambda m, t: t.update({_first(t, "key."): t[_first(t, "key.")].long()}), "float32 numbers"),
    "float16 block": (lambda m, t: t.update({_first(t, "edit."): t[_first(t, "edit.")].half()}), "does not fit"),
    "A of 7 x 1541": (lambda m, t: t.update({_first(t, "edit."): torch.zeros(7, 1541)}), "does not fit"),
    "NaN in a block": (lambda m, t: t[_first(t, "edit.")].fill_(float("nan")), "NaN or infinite"),
    "format 99": (lambda m, t: m.update(format="99"), "format '99'"),
    "edits an object": (lambda m, t: _set_edits(m, {"id": "x"}), "unreadable edit list"),
    "edits a number": (lambda m, t: _set_edits(m, 5), "unreadable edit list"),
    "edits a list of ints": (lambda m, t: _set_edits(m, [1, 2]), "unreadable edit list"),
    "edit without id": (lambda m, t: _set_edits(m, [{"prompt": "a", "target": "b"}]), "not a plain name"),
    "id ../../etc/passwd": (lambda m, t: _set_edits(m, [dict(json.loads(m["edits"])[0], id="../../etc/passwd")]),
                            "not a plain name"),
    "duplicate id": (lambda m, t: _set_edits(m, json.loads(m["edits"]) * 2), "twice"),
    "radius NaN": (lambda m, t: _set_edits(m, [dict(json.loads(m["edits"])[0], radius=float("nan"))]),
                   "impossible radius"),
    "created negative": (lambda m, t: _set_edits(m, [dict(json.loads(m["edits"])[0], created=-5)]),
                         "impossible created"),
    "steps a text": (lambda m, t: _set_edits(m, [dict(json.loads(m["edits"])[0], steps="many")]), "impossible steps"),
    "target a number": (lambda m, t: _set_edits(m, [dict(json.loads(m["edits"])[0], target=12345)]), "no target"),
}


@pytest.mark.parametrize("case", list(BAD_IMPORTS))
def test_an_import_that_fails_any_check_is_refused_before_anything_is_written(one_edit, tmp_path, case):
    change, message = BAD_IMPORTS[case]
    bad = _doctored_export(one_edit.export(tmp_path / "good.melo"), tmp_path, "bad", change)
    before, listed = tree_digest(one_edit.workspace), one_edit.edits()
    with pytest.raises(ValueError, match=message) as err:
        one_edit.import_(bad)
    assert "\n" not in str(err.value) and str(tmp_path) not in str(err.value)
    assert tree_digest(one_edit.workspace) == before and one_edit.edits() == listed


def test_export_refuses_the_workspace_itself_folders_and_missing_folders(one_edit, tmp_path):
    before = tree_digest(one_edit.workspace)
    for target, message in [(one_edit.workspace / "workspace.json", "inside the workspace"),
                            (one_edit.workspace / "blocks" / "x.melo", "inside the workspace"),
                            (tmp_path, "is a folder"), (tmp_path / "missing" / "x.melo", "no folder")]:
        with pytest.raises(ValueError, match=message):
            one_edit.export(target)
    assert tree_digest(one_edit.workspace) == before


@pytest.mark.parametrize("text", ["\x00\x00", "\u200b\u200c\u200d", "\ufeff", " \u2060 \t"])
def test_text_that_shows_nothing_counts_as_empty(one_edit, text):
    before = tree_digest(one_edit.workspace)
    with pytest.raises(ValueError, match="is empty"):
        one_edit.edit(text, "Jupiter.")
    with pytest.raises(ValueError, match="is empty"):
        one_edit.ask(text)
    assert tree_digest(one_edit.workspace) == before


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "melo_engine", *args], cwd=ROOT, capture_output=True,
                          timeout=600)


def test_cli_refuses_damaged_or_misplaced_workspaces_in_one_line(one_edit, tmp_path):
    """Each case: exit 2, one line on stderr, no traceback, no server path, files unchanged."""
    ws = one_edit.workspace
    one_edit.close()
    a_file = tmp_path / "plain.txt"
    a_file.write_text("not a workspace")
    damaged = tmp_path / "damaged"
    shutil.copytree(ws, damaged)
    cases = [
        ([b"-w", str(a_file).encode(), b"list"], None, "is a file"),
        ([b"-w", str(a_file / "ws").encode(), b"list"], None, "inside a file"),
        ([b"-w", str(ws).encode(), b"edit", b"\xff\xfe bad bytes", b"x"], None, "not valid UTF-8 text"),
        ([b"-w", str(damaged).encode(), b"list"], ("workspace.json", b"[1, 2]"), "workspace.json is damaged"),
        ([b"-w", str(damaged).encode(), b"list"], ("workspace.json", b"{}"), "workspace.json is damaged"),
        ([b"-w", str(damaged).encode(), b"list"], ("config.json", b"{not json"), "config.json is missing or damaged"),
        ([b"-w", str(damaged).encode(), b"list"], ("snapshot-0.json", b"\x00garbage"), "snapshot-0 is damaged"),
        ([b"-w", str(tmp_path / "new").encode(), b"--model", b"/etc", b"list"], None, "not a model folder"),
        ([b"-w", str(tmp_path / "new").encode(), b"--model", b"nobody/no-such-model", b"list"], None,
         "the hub is off"),
    ]
    for args, spoil, message in cases:
        if spoil:
            shutil.rmtree(damaged)
            shutil.copytree(ws, damaged)
            (damaged / spoil[0]).write_bytes(spoil[1])
        before = tree_digest(tmp_path)
        out = _cli(*args)
        err = out.stderr.decode(errors="replace").strip().splitlines()
        assert out.returncode == 2 and len(err) == 1 and message in err[0], (args, out.stderr[-800:])
        assert str(tmp_path) not in err[0]
        assert tree_digest(tmp_path) == before


def _fuzz_texts(rng):
    """Generated bad texts: nothing visible, bad code points, too long, wrong types."""
    invisible = ["\x00", "\u200b", "\u200c", "\u200d", "\ufeff", "\u2060", " ", "\t", "\n", "\x7f"]
    out = []
    for _ in range(20):
        out.append("".join(rng.choice(invisible) for _ in range(rng.randint(1, 12))))
    for _ in range(10):
        out.append("x" * rng.randint(501, 5000))
    for _ in range(6):
        out.append("ok \udcff" + chr(rng.randint(0xD800, 0xDFFF)))     # lone surrogates: not UTF-8
    out += [None, 12345, 3.5, ["a"], {"q": 1}, b"bytes"]
    return out


def _fuzz_imports(rng, meta, tensors):
    """Generated bad export files: one random defect each, from (meta, tensors) of a good one."""
    eid = json.loads(meta["edits"])[0]["id"]
    key, blocks = f"key.{eid}", [k for k in tensors if k.startswith("edit.")]
    defects = [
        lambda m, t: t[key].fill_(rng.choice([float("nan"), float("inf"), -float("inf")])),
        lambda m, t: t.update({key: t[key][: rng.randint(1, 383)].clone()}),
        lambda m, t: t.update({key: t[key].to(rng.choice([torch.float16, torch.float64, torch.int32]))}),
        lambda m, t: t.update({rng.choice(blocks): torch.zeros(rng.randint(1, 9), rng.randint(1, 2000))}),
        lambda m, t: t.update({(b := rng.choice(blocks)): t[b].to(torch.float16)}),
        lambda m, t: t[rng.choice(blocks)].view(-1)[rng.randint(0, 100)].fill_(float("nan")),
        lambda m, t: t.pop(rng.choice(blocks + [key])),
        lambda m, t: m.update(format=str(rng.randint(2, 10 ** 6))),
        lambda m, t: m.update(edits=json.dumps(rng.choice([{}, 7, "x", [1], [None], [[]], [{"id": 5}]]))),
        lambda m, t: m.update(edits=json.dumps([dict(json.loads(m["edits"])[0], id=rng.choice(
            ["", "../x", "a/b", "x" * 65, "é", "a b", ".."]))])),
        lambda m, t: m.update(edits=json.dumps([dict(json.loads(m["edits"])[0], prompt=rng.choice(["", "\u200b", 5, None]))])),
        lambda m, t: m.update(fingerprint=rng.choice(["{}", "[]", "\"x\""])),
        lambda m, t: m.update(settings=rng.choice(["[]", "5", "{\"key_source\": \"nope\"}"])),
        lambda m, t: m.pop(rng.choice(["magic", "edits", "fingerprint"])),
    ]
    return [rng.choice(defects) for _ in range(60)]


def test_fuzz_bad_inputs_are_refused_in_one_line_and_change_nothing(one_edit, tmp_path):
    """Over 100 generated bad inputs (texts for edit, ask and probe; defective export
    files): each is refused with one ValueError line, no other exception, and the workspace
    files stay byte for byte."""
    import random

    from safetensors import safe_open

    rng = random.Random(7)
    good = one_edit.export(tmp_path / "good.melo")
    with safe_open(str(good), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    before, tried = tree_digest(one_edit.workspace), 0

    def refused(call):
        nonlocal tried
        tried += 1
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) and "\n" not in str(err.value) and str(tmp_path) not in str(err.value)

    for text in _fuzz_texts(rng):
        refused(lambda: one_edit.edit(text, "Jupiter."))
        refused(lambda: one_edit.edit("What is the largest planet?", text))
        refused(lambda: one_edit.ask(text))
    for i, defect in enumerate(_fuzz_imports(rng, meta, tensors)):
        m, t = dict(meta), {k: v.clone() for k, v in tensors.items()}
        defect(m, t)
        path = _doctored_export(good, tmp_path, f"fuzz{i}", lambda mm, tt: (mm.clear(), mm.update(m),
                                                                              tt.clear(), tt.update(t)))
        refused(lambda: one_edit.import_(path))
    assert tried >= 100
    assert tree_digest(one_edit.workspace) == before and len(one_edit.edits()) == 1
