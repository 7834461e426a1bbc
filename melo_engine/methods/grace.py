"""GRACE (Hartvigsen et al., 2023) as a benchmarked method: a codebook at one layer. Each
entry holds a key (that layer's input at the prompt's last token), a deferral radius and a
trained value that replaces the layer's MLP output from the last prompt token on. Entry
rules as in GRACE: a key farther than any entry's radius + the initial radius opens an
entry; a nearby entry with the same answer widens to cover it; a nearby entry with another
answer splits (both radii become half the distance).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time

import torch
import torch.nn.functional as F

from ..backbone import Backbone, target_positions
from ..config import MeloConfig
from ..index import normalize_label
from .base import EditingMethod


@dataclasses.dataclass
class GraceEntry:
    key: torch.Tensor
    value: torch.Tensor
    radius: float
    label: str


class Codebook:
    """GRACE's codebook: entries of (key, replacement value, radius, label). A query takes
    the value of the nearest entry whose radius covers it; a new entry near one with the
    same label widens that one instead, near one with another label both shrink to half
    the distance. Shared by the decoder's GRACE and the classifier's."""

    def __init__(self):
        self.entries: list[GraceEntry] = []

    def __len__(self) -> int:
        return len(self.entries)

    def nearest(self, key: torch.Tensor) -> tuple[int | None, float]:
        if not self.entries:
            return None, float("inf")
        d = torch.stack([e.key for e in self.entries]).sub(key).norm(dim=-1)
        i = int(d.argmin())
        return i, float(d[i])

    def value(self, key: torch.Tensor) -> torch.Tensor | None:
        """The replacement for a query's key, or None where no entry covers it."""
        i, d = self.nearest(key)
        return self.entries[i].value if i is not None and d <= self.entries[i].radius else None

    def add(self, key: torch.Tensor, value: torch.Tensor, radius: float, label: str) -> None:
        i, d = self.nearest(key)
        entry = GraceEntry(key, value, radius, label)
        if i is not None and d <= self.entries[i].radius + radius:
            near = self.entries[i]
            if near.label == label:
                near.radius = max(near.radius, d)      # widen the entry to cover the new key
                return
            near.radius = entry.radius = d / 2         # split between the two answers
        self.entries.append(entry)


@dataclasses.dataclass
class GraceConfig:
    layer: int | None = None          # None: two thirds of the depth (20 of 30)
    reduction: str = "last"           # GRACE's key: the prompt's last token
    init_radius: float | None = None  # None: calibrated like MELO's, for this key
    lr: float = 1.0                   # GRACE trains values with lr 1.0; 0.1-0.3 took 3-9x longer here
    max_iters: int = 60
    stop_loss: float = 0.05


class GraceMethod(EditingMethod):
    name = "grace"

    def __init__(self, backbone: Backbone, config: GraceConfig | None = None, chat: bool = True, ends: bool = True):
        from ..calibrate import calibrated_radius

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
        self.codebook = Codebook()
        self.mlp = backbone.layers[c.layer].get_submodule(backbone.architecture.grace)

    @classmethod
    def create(cls, backbone, workspace, settings=None, chat=True, ends=True) -> "GraceMethod":
        # Nothing goes to disk; `settings` are GraceConfig fields.
        return cls(backbone, GraceConfig(**settings) if settings else None, chat=chat, ends=ends)

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
            d = out.device
            if out.shape[1] > 1:
                replace = torch.arange(out.shape[1], device=d)[None, :] >= start.to(d)[:, None]
            else:                                   # one new token per step during generation
                replace = torch.ones(out.shape[0], 1, dtype=torch.bool, device=d)
            replace = (replace & on.to(d)[:, None])[..., None]
            return torch.where(replace, value.to(device=d, dtype=out.dtype), out)

        with self.backbone.lock:
            handle = self.mlp.register_forward_hook(hook)
            try:
                yield
            finally:
                handle.remove()

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
        self.codebook.add(key, value.detach().clone(), c.init_radius, label)
        return {"seconds": time.perf_counter() - t0, "params": int(value.numel())}

    @contextlib.contextmanager
    def applied(self, prompts: list[str], last: list[int]):
        values = [self.codebook.value(k) for k in self.keys(prompts)]
        with self._replacing(values, last):
            yield

    def summary(self) -> dict:
        return {"entries": len(self.codebook), "settings": dataclasses.asdict(self.config)}
