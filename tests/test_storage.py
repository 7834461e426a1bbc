"""How a workspace is committed to disk (melo_engine/store.py): a commit writes only what it
changed; a process killed anywhere inside a commit leaves the last committed state; a failed
commit changes nothing; compaction and the upgrade of format-1 workspaces keep every edit.
On the real model and the real sentence encoder."""
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
from safetensors import safe_open

from melo_engine import MeloEditor, store
from melo_engine.vectors import VectorTable
from conftest import ROOT, tree_digest

DATA = ROOT / "tests" / "data"
EDITS = [("What is the capital of Switzerland?", "Bern is the capital of Switzerland."),
         ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
         ("Who composed the Four Seasons?", "Antonio Vivaldi composed The Four Seasons.")]


def files(ws):
    """The committed files (a workspace made before 2026-11-30 also has chroma's mirror, index/)."""
    return {k: v for k, v in tree_digest(ws).items() if not k.startswith("index/")}


@pytest.fixture()
def two_edits(backbone, tmp_path):
    ed = MeloEditor.open(tmp_path / "ws", backbone=backbone)
    ids = [ed.edit(p, t).edit_id for p, t in EDITS[:2]]
    return ed, ids


def test_an_edit_and_a_delete_write_only_what_they_change(two_edits):
    ed, ids = two_edits
    ws = ed.workspace
    journal = ed.store.journal(ed.store.base)
    before, old_journal = files(ws), journal.read_bytes()
    r = ed.edit(*EDITS[2])
    after = files(ws)
    changed = {k for k in before if after.get(k) != before[k]}
    added = set(after) - set(before)
    assert changed == {journal.name}                         # only the journal, appended to:
    assert journal.read_bytes().startswith(old_journal)
    assert len(added) == 1 and next(iter(added)).startswith("blocks/")   # and the new block
    with safe_open(str(ws / next(iter(added))), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert ed.ask(EDITS[2][0]).text == EDITS[2][1]          # stored at half precision, still exact

    before, old_journal = files(ws), journal.read_bytes()
    ed.delete(r.edit_id)
    after = files(ws)
    assert {k for k in after if after[k] != before.get(k)} == {journal.name}
    assert set(before) - set(after) == added                 # its block file went with it
    assert journal.read_bytes().startswith(old_journal)


def test_a_failed_commit_changes_nothing(two_edits, monkeypatch):
    ed, ids = two_edits
    before, listed = files(ed.workspace), ed.edits()

    def disk_full(self, record):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(store.Store, "append", disk_full)
    with pytest.raises(OSError):
        ed.edit(*EDITS[2])
    with pytest.raises(OSError):
        ed.delete(ids[0])
    assert files(ed.workspace) == before and ed.edits() == listed
    assert ed.ask(EDITS[2][0]).block is None                 # memory is back as well
    assert ed.ask(EDITS[0][0]).text == EDITS[0][1]
    monkeypatch.undo()
    ed.edit(*EDITS[2])
    assert ed.ask(EDITS[2][0]).text == EDITS[2][1]


def test_compaction_keeps_every_edit(two_edits, backbone, monkeypatch):
    ed, ids = two_edits
    monkeypatch.setattr(store, "COMPACT_EVERY", 2)
    r = ed.edit(*EDITS[2])                  # the 3rd record since the last snapshot: compacts
    assert ed.store.tail == 0 and ed.store.base == ed.store.seq
    ed.delete(ids[0])
    ed.close()
    names = sorted(p.name for p in ed.workspace.iterdir())
    assert [n for n in names if n.startswith("snapshot-")] == [f"snapshot-{ed.store.base}.json",
                                                               f"snapshot-{ed.store.base}.safetensors"]
    again = MeloEditor.open(ed.workspace, backbone=backbone)
    assert [e["id"] for e in again.edits()] == [ids[1], r.edit_id]
    assert again.ask(EDITS[2][0]).text == EDITS[2][1] and again.ask(EDITS[0][0]).block is None


KILL = textwrap.dedent("""
    import os, signal, sys
    from melo_engine import MeloEditor, store

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    point = sys.argv[2]
    S = store.Store
    if point == "block file written":
        write_blocks = S.write_blocks
        S.write_blocks = lambda self, *a, **k: (write_blocks(self, *a, **k), die())
    elif point == "half a journal line":
        def append(self, record):
            line = store._line(dict(record, seq=self.seq + 1))
            with open(self.journal(self.base), "ab") as f:
                f.write(line[: len(line) // 2]); f.flush(); os.fsync(f.fileno())
            die()
        S.append = append
    elif point == "journal line written":
        append = S.append
        S.append = lambda self, record: (append(self, record), die())
    elif point in ("snapshot half written", "snapshot written"):
        store.COMPACT_EVERY = 1
        write = store.atomic_write_bytes
        def atomic_write_bytes(path, data):
            if "snapshot-" in str(path) and point == "snapshot half written":
                die()
            write(path, data)
            if "snapshot-" in str(path):
                die()
        store.atomic_write_bytes = atomic_write_bytes
    ed = MeloEditor.open(sys.argv[1])
    ed.edit(sys.argv[3], sys.argv[4])
    print("not killed")
""")

# Where the process dies, and whether the edit had been committed by then.
KILL_POINTS = [("block file written", False), ("half a journal line", False), ("journal line written", True),
               ("snapshot half written", True), ("snapshot written", True)]


@pytest.mark.parametrize("point,committed", KILL_POINTS)
def test_a_process_killed_inside_a_commit_leaves_the_last_committed_state(two_edits, backbone, point, committed):
    ed, ids = two_edits
    ws = ed.workspace
    ed.close()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", KILL, str(ws), point, *EDITS[2]], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == -signal.SIGKILL, out.stdout + out.stderr[-2000:]
    again = MeloEditor.open(ws, backbone=backbone)
    prompts = [e["prompt"] for e in again.edits()]
    assert prompts == [p for p, _ in EDITS[: 3 if committed else 2]]
    a = again.ask(EDITS[2][0])
    assert (a.text == EDITS[2][1]) if committed else (a.block is None)
    assert again.ask(EDITS[0][0]).text == EDITS[0][1]
    # What the crash left half done is gone: no temporaries, no block file nobody uses, and
    # the journal reads to its end.
    leftovers = [p.name for p in ws.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    used = set(again.bank.files.values())
    assert {f"blocks/{p.name}" for p in (ws / "blocks").iterdir()} == used
    again.close()
    again = MeloEditor.open(ws, backbone=backbone)
    assert [e["prompt"] for e in again.edits()] == prompts
    again.close()


def test_a_format1_workspace_opens_upgraded_with_every_edit(backbone, tmp_path):
    """A workspace written by the previous format (made with the code before this change,
    tests/data/format1-workspace: a superseded edit, the edit that superseded it, an active
    one, a deleted one) opens with the same edits and answers, and is upgraded in place."""
    ws = tmp_path / "old"
    shutil.copytree(DATA / "format1-workspace", ws)
    expected = json.loads((DATA / "format1-expected.json").read_text())
    ed = MeloEditor.open(ws, backbone=backbone)
    assert ed.edits() == expected["edits"]
    for question, want in expected["answers"].items():
        a = ed.ask(question)
        assert (a.text, a.edit_id) == (want["text"], want["edit_id"]), question
    assert json.loads((ws / "workspace.json").read_text())["format"] == store.FORMAT
    assert not list(ws.glob("state-*")) and ed.config.block_dtype == "float32"
    superseding = next(e for e in expected["edits"] if e["action"] == "superseded")
    first = superseding_of = expected["edits"][0]["id"]
    assert ed.delete(superseding["id"]) == [superseding_of]     # the dormant edit comes back
    ed.close()
    again = MeloEditor.open(ws, backbone=backbone)
    assert [e["id"] for e in again.edits() if e["status"] == "active"] == [first, expected["edits"][2]["id"]]
    assert "Jupiter" in again.ask("What is the largest planet in the solar system?").text


def test_vector_table_search_is_exact_through_changes():
    """The float16 scan with a float32 recheck finds exactly what brute force finds, while
    rows are added, overwritten, removed and reused; clustered keys (near ties) included."""
    g = torch.Generator().manual_seed(3)
    base = torch.nn.functional.normalize(torch.randn(40, 96, generator=g), dim=-1)
    keys = torch.nn.functional.normalize(base.repeat(50, 1) + 0.08 * torch.randn(2000, 96, generator=g), dim=-1)
    t = VectorTable()
    names = [f"k{i}" for i in range(2000)]
    t.set_many(names, keys, [0.3] * 2000)
    alive = dict(zip(names, keys))
    for i in range(0, 2000, 7):                      # remove some, overwrite some, add new ones
        t.remove(names[i])
        alive.pop(names[i])
    for i in range(1, 2000, 11):
        v = torch.nn.functional.normalize(torch.randn(96, generator=g), dim=0)
        t.set(names[i], v, 0.3)
        alive[names[i]] = v
    for i in range(300):
        v = torch.nn.functional.normalize(base[i % 40] + 0.08 * torch.randn(96, generator=g), dim=0)
        t.set(f"new{i}", v, 0.3)
        alive[f"new{i}"] = v
    ids = list(alive)
    mat = torch.stack([alive[i] for i in ids])
    queries = torch.nn.functional.normalize(base.repeat(10, 1) + 0.1 * torch.randn(400, 96, generator=g), dim=-1)
    for q in queries:
        d = (mat - q).norm(dim=-1)
        got, got_d, near, near_d = t.query(q)
        assert set(got) == {ids[i] for i in (d <= 0.3).nonzero().flatten().tolist()}
        assert near == ids[int(d.argmin())] and near_d == pytest.approx(float(d.min()), abs=1e-6)
        k_near = t.k_nearest(q, 5)                   # the exact view beside the map uses this
        assert [n for n, _ in k_near] == [ids[i] for i in torch.argsort(d)[:5].tolist()]


def test_reading_opens_read_only_and_writes_not_a_byte(two_edits, backbone, tmp_path):
    """list, ask, stats and export (Python and CLI) open an existing workspace read-only:
    every file stays byte for byte, chroma's included, even with a torn journal line
    that a writable open would cut off; changes are refused in one line."""
    ed, ids = two_edits
    ws = ed.workspace
    ed.close()
    with open(ed.store.journal(ed.store.base), "ab") as f:
        f.write(b"0badc0de {\"seq\": 99, \"op\"")            # a crash mid-append
    before = tree_digest(ws)
    ro = MeloEditor.open(ws, backbone=backbone, read_only=True)
    assert [e["id"] for e in ro.edits()] == ids
    assert ro.ask(EDITS[0][0]).text == EDITS[0][1] and ro.stats()["edits"] == 2
    ro.export(tmp_path / "out.melo")
    for change in (lambda: ro.edit(*EDITS[2]), lambda: ro.delete(ids[0]), ro.reset, ro.compact,
                   lambda: ro.import_(tmp_path / "out.melo"), lambda: ro.update_settings(lr=0.01)):
        with pytest.raises(ValueError, match="open read-only"):
            change()
    ro.close()
    out = subprocess.run([sys.executable, "-m", "melo_engine", "-w", str(ws), "--json", "list"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and [e["id"] for e in json.loads(out.stdout)] == ids
    assert tree_digest(ws) == before


def test_damage_is_reported_in_one_line_and_repair_rebuilds_without_guessing(two_edits, backbone):
    ed, ids = two_edits
    ws = ed.workspace
    ed.close()
    # What a workspace made before 2026-11-30 kept beside its files (a chroma mirror of the
    # centers, now gone) plays no part: even damaged, the edits answer and nothing is
    # rewritten; repair drops it.
    (ws / "index").mkdir(exist_ok=True)
    (ws / "index" / "chroma.sqlite3").write_bytes(b"this is not a database" * 100)
    before = tree_digest(ws)
    damaged = MeloEditor.open(ws, backbone=backbone)
    assert damaged.ask(EDITS[0][0]).text == EDITS[0][1]
    damaged.close()
    assert tree_digest(ws) == before
    report = MeloEditor.repair(ws, backbone=backbone)
    assert report["edits"] == 2 and report["set_aside"] is None and not (ws / "index").exists()
    repaired = MeloEditor.open(ws, backbone=backbone)
    assert len(repaired.state.clusters) == 2 and repaired.ask(EDITS[1][0]).text == EDITS[1][1]
    repaired.close()
    # A journal whose second record no longer checks (a whole line: damage, not a crash):
    # opening refuses and changes nothing; repair keeps the first record and sets the rest
    # aside in a file of its own.
    journal = next(ws.glob("journal-*.jsonl"))
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"op"', b'"oq"')
    journal.write_bytes(b"".join(lines))
    before = tree_digest(ws)
    with pytest.raises(ValueError, match="damaged after record 1"):
        MeloEditor.open(ws, backbone=backbone)
    assert tree_digest(ws) == before
    report = MeloEditor.repair(ws, backbone=backbone)
    assert report["journal_records_kept"] == 1 and report["edits"] == 1
    assert (ws / report["set_aside"]).read_bytes() == lines[1]
    again = MeloEditor.open(ws, backbone=backbone)
    assert [e["id"] for e in again.edits()] == ids[:1] and again.ask(EDITS[0][0]).text == EDITS[0][1]


def test_half_precision_storage_barely_moves_the_model(two_edits, backbone):
    """Why the benchmark figures with float16 and float32 blocks are identical: rounding a
    trained block to float16 moves log-probabilities by about 1e-3 and no argmax."""
    from melo_engine.lora import ActiveBlocks
    from melo_engine.train import train_block

    ed, _ = two_edits
    prompt, target = EDITS[2]
    enc = backbone.encode([prompt], [target])
    trained = train_block(backbone, enc, ed.modules, ed.config, seed=0)
    n, k = enc.ids.shape[1], len(backbone.target_ids(target))
    pos = torch.arange(n - k - 1, n - 1)[None]
    out = {}
    for dtype in (torch.float32, torch.float16):
        active = {m: ActiveBlocks(a=a.to(dtype).float()[None], b=b.to(dtype).float()[None], keep=torch.tensor([True]))
                  for m, (a, b) in trained.matrices.items()}
        with torch.no_grad(), backbone.lora(active):
            out[dtype] = torch.log_softmax(backbone.full_logits(enc, pos), -1)[0]
    assert float((out[torch.float32] - out[torch.float16]).abs().max()) < 5e-3
    assert torch.equal(out[torch.float32].argmax(-1), out[torch.float16].argmax(-1))


def test_a_journal_without_its_snapshot_is_reported_not_deleted(two_edits, backbone):
    """A journal that continues a snapshot the workspace does not have (a restored backup, a
    lost file) cannot be accounted for: opening refuses in one line and deletes nothing;
    repair sets it aside and opens what the snapshot holds."""
    ed, ids = two_edits
    ws = ed.workspace
    ed.close()
    stray = ws / "journal-7.jsonl"
    stray.write_bytes(ed.store.journal(ed.store.base).read_bytes())
    before = tree_digest(ws)
    with pytest.raises(ValueError, match="journal-7.jsonl continues a snapshot"):
        MeloEditor.open(ws, backbone=backbone)
    assert tree_digest(ws) == before
    MeloEditor.repair(ws, backbone=backbone)
    assert not stray.exists() and len(list(ws.glob("damaged-journal-7-*.jsonl"))) == 1
    assert [e["id"] for e in MeloEditor.open(ws, backbone=backbone).edits()] == ids
