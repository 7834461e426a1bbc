"""The paper's "LoRA" row: one adapter of the same size as one MELO block, trained on each
edit in turn and always on, with no routing."""
from __future__ import annotations

import contextlib
import time

import torch

from ..backbone import Backbone
from ..config import MeloConfig
from ..lora import ActiveBlocks
from ..train import train_block
from .base import EditingMethod


class LoRAMethod(EditingMethod):
    name = "lora"

    def __init__(self, backbone: Backbone, config: MeloConfig | None = None, chat: bool = True, ends: bool = True):
        self.backbone = backbone
        self.config = (config or MeloConfig()).for_backbone(backbone)
        self.modules = backbone.ensure_lora(self.config.lora_layers, self.config.lora_modules)
        self.block: dict | None = None
        self.chat, self.ends = chat, ends

    @classmethod
    def create(cls, backbone, workspace, settings=None, chat=True, ends=True) -> "LoRAMethod":
        # Nothing goes to disk; `settings` are MeloConfig fields (the adapter's size, training).
        return cls(backbone, MeloConfig(**settings) if settings else None, chat=chat, ends=ends)

    def edit(self, prompt: str, target: str) -> dict:
        t0 = time.perf_counter()
        enc = self.backbone.encode([prompt], [target], chat=self.chat, ends=self.ends)
        trained = train_block(self.backbone, enc, self.modules, self.config, start_from=self.block)
        self.block = trained.matrices
        return {"seconds": time.perf_counter() - t0, "params": trained.params}

    @contextlib.contextmanager
    def applied(self, prompts: list[str], last: list[int]):
        active, n = None, len(prompts)
        if self.block is not None:
            keep = torch.ones(n, dtype=torch.bool)
            active = {m: ActiveBlocks(a=a[None].expand(n, -1, -1), b=b[None].expand(n, -1, -1), keep=keep)
                      for m, (a, b) in self.block.items()}
        with self.backbone.lora(active):
            yield

    def summary(self) -> dict:
        return {"settings": self.config.to_json()}
