"""Which model a visitor's workspace runs on.

Why a room of its own. The pool (sessions.py) decides who has which workspace open, and
when one is made, closed or removed; that is a matter of its lock. Which model a workspace
is on is another question, answered from the server's shelf (models.py: the names offered,
each backbone loaded once) and from the workspace's own header (the model it was made
with), never from the pool's bookkeeping. The pool asks it on every opening; this room
answers it, and keeps the two things that follow from it:

- each model's shared, read-only empty workspace: what a visitor without a workspace of
  their own reads (a crowd that only looks fills no folder), one per model because a
  workspace is tied to the model it was made with;
- the settings a workspace keeps when it is remade on another model (the pool's
  `set_model`): everything but what belongs to one model's layers and key distances.

A front of the Ray engine (cluster.RayPool) holds no model: it offers the one its engine
runs ($MELO_MODEL, else the default) and refuses to load any.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from pathlib import Path

from melo_engine import MeloEditor
from melo_engine.config import DEFAULT_MODEL, MeloConfig
from melo_engine.store import CONFIG, read_header

from .models import ModelShelf
from .workers import SharedWork


class WorkspaceModels:
    """The models of the workspaces under `root`, on `shelf` (None: a front that holds no
    model), their answering and training shared through `work`."""

    # Settings that belong to one model's layers and key distances: a workspace remade on
    # another model takes that model's own (layers from its architecture row, radius calibrated).
    BOUND = ("key_layer", "lora_layers", "lora_modules", "layers_path", "init_radius")

    def __init__(self, shelf: ModelShelf | None, root: Path, work: SharedWork):
        self.shelf, self.root, self.work = shelf, Path(root), work
        self._blanks: dict[str, MeloEditor] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        """The names of the models a workspace can be made with, the default first."""
        if self.shelf is None:
            return [os.environ.get("MELO_MODEL") or DEFAULT_MODEL]
        return self.shelf.names

    @property
    def default(self) -> str:
        return self.names[0]

    def backbone(self, name: str | None = None):
        """The named model's backbone (default: the default model's), loaded on first use
        and shared by every workspace of that model. Unknown names: one line."""
        if self.shelf is None:
            raise ValueError("this server's engine runs elsewhere: it holds no model")
        return self.shelf.get(name)

    def opener(self, name: str) -> type:
        """The class that opens a workspace of the named model (MeloEditor, or a classifier's)."""
        return self.shelf.editor(name)

    def answers_questions(self, name: str) -> bool:
        """Whether the named model generates answers (a classifier does not)."""
        return self.shelf is not None and self.opener(name) is MeloEditor

    def recorded(self, folder: str) -> str:
        """The model a workspace folder was made with (its header), the default for none."""
        try:
            header = read_header(self.root / folder / "ws")
        except ValueError:
            header = None                # opening it says what is wrong, in one line
        return (header or {}).get("model") or self.default

    def open(self, ws: Path, name: str, config: MeloConfig | None = None):
        """A workspace opened (or made) on model `name`, answering and training with every
        other workspace of that model."""
        backbone = self.backbone(name)
        return self.work.join(self.opener(name).open(ws, model=name, config=config, backbone=backbone),
                              name, backbone)

    def blank(self, name: str | None = None) -> MeloEditor:
        """The named model's shared empty workspace (default: the default model's), opened
        read-only: what a visitor without a workspace reads."""
        name = self.default if name is None else name
        backbone = self.backbone(name)
        with self._lock:
            if name not in self._blanks:
                mark = hashlib.sha256(json.dumps(backbone.fingerprint, sort_keys=True).encode()).hexdigest()
                blank = self.root / f".blank-{mark[:16]}" / "ws"
                opener = self.opener(name)
                if not blank.is_dir():
                    opener.open(blank, model=name, backbone=backbone).close()
                self._blanks[name] = self.work.join(opener.open(blank, backbone=backbone, read_only=True),
                                                    name, backbone)
            return self._blanks[name]

    def carried(self, ws: Path, old, current: str, name: str) -> MeloConfig | None:
        """The settings a workspace on model `current` keeps when remade on `name`: all but
        the model-bound ones, where both models open with the same editor class; None (the
        new model's defaults) otherwise, or where there are none or they cannot be read.
        `old` is its open editor, if any (its settings are the live ones)."""
        if not ws.is_dir() or self.opener(name) is not self.opener(current):
            return None
        try:
            kept = old.config if old is not None else MeloConfig.load(ws / CONFIG)
            return dataclasses.replace(kept, model=name, **{k: None for k in self.BOUND})
        except (OSError, ValueError, TypeError):
            return None                  # a damaged config: the new model's defaults
