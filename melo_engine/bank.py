"""BlockBank: the LoRA blocks of one workspace, one block per edit.

A block is, for every LoRA module, a pair A [rank, in] and B [out, rank]. B is stored
already multiplied by alpha / rank, so blocks trained with different settings mix in one
batch. Block ids are small integers; a deleted edit's block is dropped and its id reused.

Blocks live in files (see store.py) and are read when a query is routed to them, through a
small cache: a workspace of 100,000 edits holds 10 GB of blocks, and a query needs one.
Blocks without a file (benchmarks, a block being committed) stay in memory.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Callable

import torch

from .lora import ActiveBlocks, stack

Matrices = dict[str, tuple[torch.Tensor, torch.Tensor]]


class BlockBank:
    def __init__(self, reader: Callable[[str, int], Matrices] | None = None, cache_blocks: int = 256):
        self.files: dict[int, str | None] = {}     # block id -> the file holding it (None: memory only)
        self._memory: dict[int, Matrices] = {}     # blocks without a file
        self._cache: OrderedDict[int, Matrices] = OrderedDict()
        self._cache_blocks = cache_blocks
        self._reader = reader
        self._holes: list[int] = []                # freed ids below _next (a heap)
        self._next = 0

    def __len__(self) -> int:
        return len(self.files)

    def __contains__(self, block) -> bool:
        return block in self.files

    def allocate(self) -> int:
        """The smallest free block id (not reserved until `put`)."""
        while self._holes and self._holes[0] in self.files:
            heapq.heappop(self._holes)
        return self._holes[0] if self._holes else self._next

    def allocate_many(self, n: int) -> list[int]:
        """The n smallest free block ids, ascending (none reserved until `put`)."""
        ids, b = [], self.allocate()
        while len(ids) < n:
            if b not in self.files:
                ids.append(b)
            b += 1
        return ids

    def put(self, block: int, matrices: Matrices | None = None, file: str | None = None) -> None:
        """A block kept in `file` (read when needed), or held in memory (no file)."""
        if file is None and matrices is None:
            raise ValueError("a block needs its matrices or its file")
        self.files[block] = file
        self._cache.pop(block, None)
        if file is None:
            self._memory[block] = {m: (a.detach().clone(), b.detach().clone()) for m, (a, b) in matrices.items()}
        else:
            self._memory.pop(block, None)
            if matrices is not None:
                self._remember(block, matrices)
        if block >= self._next:
            for hole in range(self._next, block):
                heapq.heappush(self._holes, hole)
            self._next = block + 1

    def free(self, block: int) -> str | None:
        """Drop a block; returns the file it was kept in."""
        if block not in self.files:
            return None
        file = self.files.pop(block)
        self._memory.pop(block, None)
        self._cache.pop(block, None)
        heapq.heappush(self._holes, block)
        return file

    def clear(self) -> None:
        self.__init__(self._reader, self._cache_blocks)

    def _remember(self, block: int, matrices: Matrices) -> None:
        self._cache[block] = matrices
        self._cache.move_to_end(block)
        while len(self._cache) > self._cache_blocks:
            self._cache.popitem(last=False)

    def matrices(self, block: int) -> Matrices:
        if block in self._memory:
            return self._memory[block]
        if block in self._cache:
            self._cache.move_to_end(block)
            return self._cache[block]
        file = self.files[block]
        mats = self._reader(file, block)
        self._remember(block, mats)
        return mats

    def gather(self, block_ids: list[int | None], modules: list[str]) -> dict[str, ActiveBlocks] | None:
        """Per-module matrices for a batch, example i using block block_ids[i] (None: no LoRA).

        Returns None when no example has a block, so the model runs untouched.
        """
        # A block freed by a concurrent delete counts as no block.
        block_ids = [b if b in self.files else None for b in block_ids]
        if all(b is None for b in block_ids):
            return None
        held = {b: self.matrices(b) for b in set(block_ids) if b is not None}
        out = {}
        for m in modules:
            out[m] = stack([held[b].get(m) if b is not None else None for b in block_ids])
        return out
