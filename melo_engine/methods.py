"""Editing methods under one interface, so one benchmark loop measures them all alike.

A method makes edits and, for a batch of prompts, makes the shared Backbone behave as the
edited model, each prompt routed on its own (`applied(prompts, last)`, a context manager;
`last[i]` is where prompt i's last token sits in the batch). Three methods:

- MELO: a MeloEditor (one LoRA block per edit, routed by the cluster index).
- LoRA: the paper's "LoRA" row: one adapter of the same size as one MELO block, trained on
  each edit in turn and always on, with no routing.
- GRACE (Hartvigsen et al., 2023): a codebook at one layer. Each entry holds a key (that
  layer's input at the prompt's last token), a deferral radius and a trained value that
  replaces the layer's MLP output from the last prompt token on. Entry rules as in GRACE:
  a key farther than any entry's radius + the initial radius opens an entry; a nearby entry
  with the same answer widens to cover it; a nearby entry with another answer splits (both
  radii become half the distance).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .backbone import Backbone
from .config import MeloConfig
from .editor import MeloEditor
from .index import normalize_label
from .lora import ActiveBlocks
from .train import target_positions, train_block


class MeloMethod:
    name = "melo"

    def __init__(self, backbone: Backbone, workspace: Path, config: MeloConfig | None = None, ends: bool = True):
        self.editor = MeloEditor.open(workspace, config=config, backbone=backbone)
        self.backbone = backbone
        self.ends = ends

    def edit(self, prompt: str, target: str) -> dict:
        # ends=False: the target is a sentence of a passage that goes on (prefix "": the
        # prompt already holds the passage so far).
        r = self.editor.edit(prompt, target, prefix=None if self.ends else "")
        return {"seconds": r.seconds, "params": r.params, "action": r.action, "forgotten": len(r.forgotten),
                "superseded": len(r.superseded)}

    @contextlib.contextmanager
    def applied(self, prompts: list[str], last: list[int]):
        ed = self.editor
        keys = ed.keyer.keys(prompts)
        with ed.ws.state_lock:
            blocks = [ed.state.route(k).block for k in keys]
        with self.backbone.lora(ed.bank.gather(blocks, ed.modules)):
            yield

    def summary(self) -> dict:
        s = self.editor.stats()
        edits = self.editor.edits()
        return {"clusters": s["clusters"], "conflicts": sum(e.get("action") == "conflict" for e in edits),
                "forgotten": sum(e["status"] == "forgotten" for e in edits),
                "superseded": sum(e["status"] == "superseded" for e in edits),
                "settings": self.editor.config.to_json()}


class LoRAMethod:
    name = "lora"

    def __init__(self, backbone: Backbone, config: MeloConfig | None = None, chat: bool = True, ends: bool = True):
        self.backbone = backbone
        self.config = (config or MeloConfig()).resolved(backbone.num_layers)
        self.modules = backbone.ensure_lora(self.config.lora_layers, self.config.lora_modules)
        self.block: dict | None = None
        self.chat, self.ends = chat, ends

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


@dataclasses.dataclass
class GraceEntry:
    key: torch.Tensor
    value: torch.Tensor
    radius: float
    label: str


@dataclasses.dataclass
class GraceConfig:
    layer: int | None = None          # None: two thirds of the depth (20 of 30)
    reduction: str = "last"           # GRACE's key: the prompt's last token
    init_radius: float | None = None  # None: calibrated like MELO's, for this key
    lr: float = 1.0                   # GRACE trains values with lr 1.0; 0.1-0.3 took 3-9x longer here
    max_iters: int = 60
    stop_loss: float = 0.05


class GraceMethod:
    name = "grace"

    def __init__(self, backbone: Backbone, config: GraceConfig | None = None, chat: bool = True, ends: bool = True):
        from .calibrate import calibrated_radius

        self.backbone = backbone
        self.chat, self.ends = chat, ends
        c = dataclasses.replace(config or GraceConfig())
        if c.layer is None:
            c.layer = round(2 * backbone.num_layers / 3)
        if c.init_radius is None:
            probe = MeloConfig(key_source="model", key_layer=c.layer - 1, key_reduction=c.reduction,
                               distance="l2", lora_layers=(backbone.num_layers - 1,),
                               prompt_mode="chat" if chat else "completion")
            c.init_radius = calibrated_radius(backbone, probe)
        self.config = c
        self.entries: list[GraceEntry] = []
        self.mlp = backbone.layers[c.layer].mlp

    def keys(self, prompts: list[str]) -> torch.Tensor:
        # The input of the edited layer = the output of the layer below it.
        return self.backbone.keys(self.backbone.encode(prompts, chat=self.chat), self.config.layer - 1,
                                  self.config.reduction, "l2")

    def key(self, prompt: str) -> torch.Tensor:
        return self.keys([prompt])[0]

    @contextlib.contextmanager
    def _replacing(self, values: list[torch.Tensor | None], starts: list[int]):
        """Replace the edited layer's MLP output of example i from position starts[i] on, and
        on every new token, by values[i] (None: leave example i alone)."""
        if all(v is None for v in values):
            yield
            return
        on = torch.tensor([v is not None for v in values])
        ref = next(v for v in values if v is not None)
        value = torch.stack([v if v is not None else torch.zeros_like(ref) for v in values])[:, None, :]
        start = torch.tensor(starts)

        def hook(_module, _args, out):
            if out.shape[1] > 1:
                replace = torch.arange(out.shape[1])[None, :] >= start[:, None]
            else:                                   # one new token per step during generation
                replace = torch.ones(out.shape[0], 1, dtype=torch.bool)
            replace = (replace & on[:, None])[..., None]
            return torch.where(replace, value.to(out.dtype), out)

        with self.backbone.lock:
            handle = self.mlp.register_forward_hook(hook)
            try:
                yield
            finally:
                handle.remove()

    def _nearest(self, key: torch.Tensor) -> tuple[int | None, float]:
        if not self.entries:
            return None, float("inf")
        d = torch.stack([e.key for e in self.entries]).sub(key).norm(dim=-1)
        i = int(d.argmin())
        return i, float(d[i])

    def edit(self, prompt: str, target: str) -> dict:
        t0 = time.perf_counter()
        c, bb = self.config, self.backbone
        key = self.key(prompt)
        label = normalize_label(target)
        enc = bb.encode([prompt], [target], chat=self.chat, ends=self.ends)
        positions, targets = target_positions(enc)
        n_prompt = int(positions[0, 0]) + 1
        hidden = bb.lower(enc, c.layer)
        with torch.no_grad():                     # start from the original activation
            captured = {}
            h = self.mlp.register_forward_hook(lambda _m, _a, out: captured.setdefault("out", out))
            with bb.lock:
                try:
                    bb.upper_logits(hidden, enc, c.layer, positions)
                finally:
                    h.remove()
        value = captured["out"][0, n_prompt - 1].clone().requires_grad_()
        opt = torch.optim.Adam([value], lr=c.lr)
        for _ in range(c.max_iters):
            with self._replacing([value], [n_prompt - 1]):
                logits = bb.upper_logits(hidden, enc, c.layer, positions)[0]
            loss = F.cross_entropy(logits, targets)
            if bool((logits.argmax(-1) == targets).all()) and loss.item() < c.stop_loss:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
        i, d = self._nearest(key)
        entry = GraceEntry(key, value.detach().clone(), c.init_radius, label)
        if i is not None and d <= self.entries[i].radius + c.init_radius:
            near = self.entries[i]
            if near.label == label:
                near.radius = max(near.radius, d)      # widen the entry to cover the new key
                entry = None
            else:
                near.radius = entry.radius = d / 2     # split between the two answers
        if entry is not None:
            self.entries.append(entry)
        return {"seconds": time.perf_counter() - t0, "params": int(value.numel())}

    @contextlib.contextmanager
    def applied(self, prompts: list[str], last: list[int]):
        values = []
        for k in self.keys(prompts):
            i, d = self._nearest(k)
            values.append(self.entries[i].value if i is not None and d <= self.entries[i].radius else None)
        with self._replacing(values, last):
            yield

    def summary(self) -> dict:
        return {"entries": len(self.entries), "settings": dataclasses.asdict(self.config)}


def build(name: str, backbone: Backbone, workspace: Path, settings: dict | None = None, chat: bool = True,
          ends: bool = True):
    """A method by name; `settings` are MeloConfig fields for MELO (e.g. key_source).
    `chat=False`: prompts are plain text the model continues; `ends=False`: a target is a
    sentence the text goes on from (the hallucination task)."""
    if name == "melo":
        settings = dict(settings or {}, **({} if chat else {"prompt_mode": "completion"}))
        return MeloMethod(backbone, workspace, MeloConfig(**settings), ends)
    if name == "lora":
        return LoRAMethod(backbone, chat=chat, ends=ends)
    if name == "grace":
        return GraceMethod(backbone, chat=chat, ends=ends)
    raise ValueError(f"unknown method {name!r} (melo, grace, lora)")

