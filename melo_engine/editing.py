"""The write path of an edit: train a block (nothing written), commit it (its block file,
then one journal record that places its key), delete it (undo).

Training holds the workspace's change lock so two edits of one workspace never train at
once, but not its state lock: visitors' questions go on being answered while a block
trains, and only the commit holds them, for milliseconds.
"""
from __future__ import annotations

import secrets
import time
from typing import Callable

import torch

from . import placement
from .records import EditRecord, EditResult, TrainedEdit, answer_text
from .sentences import joined
from .train import train_block


def block_dtype(ed) -> torch.dtype:
    return getattr(torch, ed.config.block_dtype)


def new_id(taken, nbytes: int = 4) -> str:
    """A fresh random edit id, none of `taken`."""
    eid = secrets.token_hex(nbytes)
    while eid in taken:
        eid = secrets.token_hex(nbytes)
    return eid


def asks_the_same(ed, prompt: str):
    """For the supersede rule: whether an earlier edit asks the same question as `prompt`
    (the router's verifier; a sibling within the radius is not replaced)."""
    entries = ed.ws.entries
    return lambda edit_id: ed.router.same_question(prompt, entries[edit_id].prompt)


def train(ed, prompt: str, target: str, progress: Callable[[int, float], None] | None = None,
          prefix: str | None = None, end: bool = False) -> TrainedEdit:
    """Train the block for prompt -> target (checked texts), write nothing. With `prefix`
    the block learns to say the kept text, then `target`, and to go on (or, with `end`,
    to stop there)."""
    taught = joined(prefix, target) if prefix is not None else target
    with ed.ws.lock:
        t0 = time.perf_counter()
        key = ed.keyer.keys([prompt])[0]
        enc = ed.backbone.encode([prompt], [taught], chat=ed.chat, ends=prefix is None or bool(end))
        seed = len(ed.ws.entries)
        # In the model's training process where the app has one (trainproc.py), else here.
        trained = ed.trainer.train(enc, ed.config, seed, progress) if ed.trainer is not None else None
        if trained is None:
            trained = train_block(ed.backbone, enc, ed.modules, ed.config, seed=seed, progress=progress)
    return TrainedEdit(prompt, target, key, trained, t0, prefix,
                       enc.target_count(), prefix is not None and bool(end))


def commit(ed, pending: TrainedEdit) -> EditResult:
    """Write the trained block and place its key in the index: one commit."""
    ws, c = ed.ws, ed.config
    with ws.lock:
        edit_id = new_id(ws.entries)
        block = ws.bank.allocate()
        trained = pending.trained
        dtype = block_dtype(ed)
        matrices = {m: (a.to(dtype), b.to(dtype)) for m, (a, b) in trained.matrices.items()}
        file = ws.store.write_blocks({block: matrices}, dtype)
        with ws.change("edit") as ch:
            answer = answer_text(pending.target, pending.prefix, pending.ends_answer)
            placed = placement.add(ws.state, edit_id, pending.key, block, answer, c.init_radius, c.on_conflict,
                                   same_question=asks_the_same(ed, pending.prompt))
            ch.add_block(block, file, matrices)
            ch.placed(placed, edit_id)
            seconds = time.perf_counter() - pending.started
            ch.set(edit_id, EditRecord(
                edit_id, pending.prompt, pending.target, block, placed.cluster, placed.action, time.time(),
                steps=len(trained.losses), seconds=round(seconds, 3), final_loss=trained.losses[-1],
                token_accuracy=trained.token_accuracy, prefix=pending.prefix,
                taught_tokens=pending.taught_tokens if pending.prefix is not None else 0,
                ends_answer=pending.ends_answer))
        return EditResult(edit_id, block, placed.cluster, placed.action, len(trained.losses),
                          trained.losses, seconds, placed.forgotten, list(placed.moved),
                          trained.token_accuracy, trained.params, list(placed.superseded))


def delete(ed, edit_id: str) -> list[str]:
    """Undo one edit: its point leaves the index and its block is dropped. Edits it had
    superseded become active again; returns their ids."""
    ws = ed.ws
    with ws.lock:
        entry = ws.entry(str(edit_id))
        state = ws.state
        with ws.change("delete") as ch:
            back = []
            if entry.id in state.points or entry.id in state.dormant:
                back = placement.remove(state, entry.id, ed.config.init_radius)
                ch.blocks[entry.block] = None
            ch.set(entry.id, None)
            for e in back:
                ch.set(e, ws.entries[e].replace(status="active", cluster=state.points[e].cluster,
                                                superseded_by=None))
            for e, p in state.dormant.items():     # a chain of supersedes passes on
                if ws.entries[e].superseded_by != p.superseded_by:
                    ch.update(e, superseded_by=p.superseded_by)
        return back
