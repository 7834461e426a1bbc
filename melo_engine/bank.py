"""BlockBank: the LoRA blocks of one workspace, one block per edit.

A block is, for every LoRA module, a pair A [rank, in] and B [out, rank]. B is stored
already multiplied by alpha / rank, so blocks trained with different settings mix in one
batch. Block ids are small integers; a deleted edit's block is dropped and its id reused.
"""
from __future__ import annotations

import torch

from .lora import ActiveBlocks


class BlockBank:
    def __init__(self):
        self.blocks: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    def __len__(self) -> int:
        return len(self.blocks)

    def allocate(self) -> int:
        """The smallest free block id (not reserved until `put`)."""
        b = 0
        while b in self.blocks:
            b += 1
        return b

    def put(self, block: int, matrices: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.blocks[block] = {m: (a.detach().clone(), b.detach().clone()) for m, (a, b) in matrices.items()}

    def free(self, block: int) -> None:
        self.blocks.pop(block, None)

    def gather(self, block_ids: list[int | None], modules: list[str]) -> dict[str, ActiveBlocks] | None:
        """Per-module matrices for a batch, example i using block block_ids[i] (None: no LoRA).

        Returns None when no example has a block, so the model runs untouched.
        """
        # A block freed by a concurrent delete counts as no block.
        block_ids = [b if b in self.blocks else None for b in block_ids]
        if all(b is None for b in block_ids):
            return None
        out = {}
        for m in modules:
            pairs = [self.blocks[b][m] if b is not None and m in self.blocks[b] else None for b in block_ids]
            rank = max(p[0].shape[0] for p in pairs if p is not None)
            ref = next(p for p in pairs if p is not None)
            a = torch.zeros(len(pairs), rank, ref[0].shape[1])
            bb = torch.zeros(len(pairs), ref[1].shape[0], rank)
            for i, p in enumerate(pairs):
                if p is not None:
                    # Lower-rank blocks are padded with zero rows, which add nothing.
                    a[i, : p[0].shape[0]] = p[0]
                    bb[i, :, : p[1].shape[1]] = p[1]
            keep = torch.tensor([b is not None for b in block_ids])
            out[m] = ActiveBlocks(a=a, b=bb, keep=keep)
        return out

    def params_per_block(self, block: int) -> int:
        return sum(a.numel() + b.numel() for a, b in self.blocks[block].values())

    # ---- safetensors -------------------------------------------------------------------
    def to_tensors(self) -> dict[str, torch.Tensor]:
        t = {}
        for blk, mats in self.blocks.items():
            for m, (a, b) in mats.items():
                t[f"block.{blk}.{m}.A"] = a.contiguous()
                t[f"block.{blk}.{m}.B"] = b.contiguous()
        return t

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "BlockBank":
        bank = cls()
        for name, value in tensors.items():
            if not name.startswith("block."):
                continue
            _, blk, rest = name.split(".", 2)
            module, which = rest.rsplit(".", 1)
            mats = bank.blocks.setdefault(int(blk), {})
            a, b = mats.get(module, (None, None))
            mats[module] = (value, b) if which == "A" else (a, value)
        return bank
