"""Dynamic LoRA: a wrapper around one frozen nn.Linear that adds, per example, the LoRA
block that example was routed to, and the function that injects it by module name.

The layer owns no weights. Before a forward, the caller (see `Backbone.lora`) sets
`layer.active` to the gathered block matrices of the batch; after it, back to None. With
None the layer is the original Linear, bit for bit, which is how an input routed to no
block sees exactly the unedited model. Keeping the weights outside lets many workspaces
(visitors of the web app) share one frozen model, each with its own bank of blocks.
`active` is per thread: visitors' forwards run at the same time, each with its own blocks.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ActiveBlocks:
    """The LoRA matrices one module applies in one forward.

    a: [batch, rank, in_features], b: [batch, out_features, rank] (b already scaled by alpha / rank),
    both gathered for each example's block (zeros for an example routed nowhere).
    keep: [batch] bool, the examples that have a block; the others get exactly y = Wx.
    """

    a: torch.Tensor
    b: torch.Tensor
    keep: torch.Tensor


class BlockLoRALinear(nn.Module):
    """y = W x, plus B_e A_e x for the block e each example was routed to."""

    def __init__(self, base: nn.Linear, name: str):
        super().__init__()
        self.base = base
        self.name = name
        self._local = threading.local()

    @property
    def active(self) -> ActiveBlocks | None:
        """The blocks this thread's current forward applies (None: the original layer)."""
        return getattr(self._local, "active", None)

    @active.setter
    def active(self, value: ActiveBlocks | None) -> None:
        self._local.active = value

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        act = self.active
        if act is None:
            return y
        # x: [batch, seq, in]. One einsum per factor keeps the whole batch in one forward,
        # each example with its own block.
        h = torch.einsum("bti,bri->btr", x, act.a)
        delta = torch.einsum("btr,bor->bto", h, act.b)
        if bool(act.keep.all()):
            return y + delta
        # Examples routed nowhere must see the base output exactly, not y + 0.0 * something.
        return torch.where(act.keep[:, None, None], y + delta, y)


def inject_block_lora(model: nn.Module, module_names: list[str]) -> dict[str, BlockLoRALinear]:
    """Replace each named nn.Linear of `model` by a BlockLoRALinear around it (idempotent)."""
    injected = {}
    for name in module_names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        if isinstance(module, BlockLoRALinear):
            injected[name] = module
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name} is a {type(module).__name__}, not an nn.Linear")
        wrapped = BlockLoRALinear(module, name)
        setattr(parent, child, wrapped)
        injected[name] = wrapped
    return injected
