"""MELO as a benchmarked method: a MeloEditor (one LoRA block per edit, routed by the
cluster index) in a workspace of its own."""
from __future__ import annotations

import contextlib
from pathlib import Path

from .. import answering
from ..backbone import Backbone
from ..config import MeloConfig
from ..editor import MeloEditor
from .base import EditingMethod


class MeloMethod(EditingMethod):
    name = "melo"

    def __init__(self, backbone: Backbone, workspace: Path, config: MeloConfig | None = None, ends: bool = True):
        self.editor = MeloEditor.open(workspace, model=backbone.name, config=config, backbone=backbone)
        self.backbone = backbone
        self.ends = ends

    @classmethod
    def create(cls, backbone, workspace, settings=None, chat=True, ends=True) -> "MeloMethod":
        # `settings` are MeloConfig fields (e.g. key_source); plain-text prompts are the
        # workspace's completion mode.
        settings = dict(settings or {}, **({} if chat else {"prompt_mode": "completion"}))
        return cls(backbone, workspace, MeloConfig(**settings), ends)

    def edit(self, prompt: str, target: str) -> dict:
        # ends=False: the target is a sentence of a passage that goes on (prefix "": the
        # prompt already holds the passage so far).
        r = self.editor.edit(prompt, target, prefix=None if self.ends else "")
        return {"seconds": r.seconds, "params": r.params, "action": r.action, "forgotten": len(r.forgotten),
                "superseded": len(r.superseded)}

    @contextlib.contextmanager
    def applied(self, prompts: list[str], last: list[int]):
        ed = self.editor
        blocks = [r.block for r in answering.routes(ed, prompts)]
        with self.backbone.lora(ed.bank.gather(blocks, ed.modules)):
            yield

    def summary(self) -> dict:
        s = self.editor.stats()
        edits = self.editor.edits()
        return {"clusters": s["clusters"], "conflicts": sum(e.get("action") == "conflict" for e in edits),
                "forgotten": sum(e["status"] == "forgotten" for e in edits),
                "superseded": sum(e["status"] == "superseded" for e in edits),
                "settings": self.editor.config.to_json()}

    def close(self) -> None:
        # The workspace's index and journal stay open until the editor closes.
        self.editor.close()
