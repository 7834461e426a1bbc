"""Dynamic LoRA: a wrapper around one frozen projection that adds, per example, the LoRA
block that example was routed to, and the function that injects it by module name.

The projection is an nn.Linear, or GPT-2's Conv1D (transformers.pytorch_utils), which
computes the same x W + b but stores its weight transposed, [in, out] instead of [out, in].
The LoRA path never touches the base weight, only its shape: `FEATURES` says, per module
type, how to read (in_features, out_features), so the transposed layout cannot slip into
the block shapes (A [rank, in], B [out, rank] for both).

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
from typing import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

# (in_features, out_features) of each projection type the blocks can wrap.
FEATURES: dict[type, Callable[[nn.Module], tuple[int, int]]] = {
    nn.Linear: lambda m: (m.in_features, m.out_features),
    Conv1D: lambda m: (m.weight.shape[0], m.weight.shape[1]),     # weight stored [in, out]
}


def features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a projection the blocks can wrap, else None."""
    for kind, read in FEATURES.items():
        if isinstance(module, kind):
            return read(module)
    return None


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

    def to(self, device) -> "ActiveBlocks":
        return ActiveBlocks(self.a.to(device), self.b.to(device), self.keep.to(device))


def stack(pairs: list[tuple[torch.Tensor, torch.Tensor] | None]) -> ActiveBlocks:
    """One module's ActiveBlocks for a batch, example i with pair i (A [rank, in], B [out, rank])
    or None (no block: that example gets exactly y = Wx). At least one pair must be given.
    Lower-rank blocks are padded with zero rows, which add nothing; blocks stored at half
    precision are computed in float32."""
    given = [p for p in pairs if p is not None]
    rank = max(p[0].shape[0] for p in given)
    a = torch.zeros(len(pairs), rank, given[0][0].shape[1])
    b = torch.zeros(len(pairs), given[0][1].shape[0], rank)
    for i, p in enumerate(pairs):
        if p is not None:
            a[i, : p[0].shape[0]] = p[0]
            b[i, :, : p[1].shape[1]] = p[1]
    return ActiveBlocks(a=a, b=b, keep=torch.tensor([p is not None for p in pairs]))


class BlockLoRALinear(nn.Module):
    """y = W x, plus B_e A_e x for the block e each example was routed to (W: an nn.Linear
    or a Conv1D; see FEATURES)."""

    def __init__(self, base: nn.Module, name: str):
        super().__init__()
        shape = features(base)
        if shape is None:
            raise ValueError(f"{name} is a {type(base).__name__}, not an nn.Linear or Conv1D")
        self.base = base
        self.name = name
        self._in, self._out = shape
        self._local = threading.local()

    @property
    def active(self) -> ActiveBlocks | None:
        """The blocks this thread's current forward applies (None: the original layer)."""
        return getattr(self._local, "active", None)

    @active.setter
    def active(self, value: ActiveBlocks | None) -> None:
        self._local.active = value

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped projection's weight, for models that read it around the call (T5's
        FFN casts its input to the dtype of `wo.weight`)."""
        return self.base.weight

    @property
    def in_features(self) -> int:
        return self._in

    @property
    def out_features(self) -> int:
        return self._out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        act = self.active
        if act is None:
            return y
        # x: [batch, seq, in]. One einsum per factor keeps the whole batch in one forward,
        # each example with its own block.
        h = torch.einsum("bti,bri->btr", x, act.a.to(x.dtype))
        delta = torch.einsum("btr,bor->bto", h, act.b.to(x.dtype))
        if bool(act.keep.all()):
            return y + delta
        # Examples routed nowhere must see the base output exactly, not y + 0.0 * something.
        return torch.where(act.keep[:, None, None], y + delta, y)


def inject_block_lora(model: nn.Module, module_names: list[str]) -> dict[str, BlockLoRALinear]:
    """Replace each named nn.Linear (or Conv1D) of `model` by a BlockLoRALinear around it
    (idempotent)."""
    injected = {}
    for name in module_names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        if isinstance(module, BlockLoRALinear):
            injected[name] = module
            continue
        wrapped = BlockLoRALinear(module, name)
        setattr(parent, child, wrapped)
        injected[name] = wrapped
    return injected
