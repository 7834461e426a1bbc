"""Which device the model runs on: `--device` (or MELO_DEVICE) cpu, cuda, mps or auto.

"auto", the default, takes a GPU when torch sees one (CUDA, then Apple's MPS), else the
CPU, so a researcher with a GPU does not edit on the CPU without knowing. A device asked
for by name that is not there is refused in one line, never quietly replaced by the CPU:
timings taken on the wrong device would mislead. The model, the blocks while they apply,
routing keys while they are computed and the sentence encoder run on the device; what is
kept (blocks in the bank, keys in the index) stays in CPU memory, as before.
"""
from __future__ import annotations

import os

# The choices, importable without torch (the command line lists them before loading anything).
DEVICES = ("auto", "cpu", "cuda", "mps")


def _available(kind: str) -> bool:
    import torch

    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    return kind == "cpu"


def resolve_device(name: str | None = None):
    """The torch.device for `name` (None: $MELO_DEVICE, else "auto")."""
    import torch

    name = (name or os.environ.get("MELO_DEVICE") or "auto").strip().lower()
    kind = name.partition(":")[0]
    if kind not in DEVICES:
        raise ValueError(f"unknown device {name!r} ({', '.join(DEVICES)})")
    if kind == "auto":
        return torch.device(next(k for k in ("cuda", "mps", "cpu") if _available(k)))
    if not _available(kind):
        raise ValueError(f"device {name!r} is not available here (torch {torch.__version__} sees no {kind}); "
                         f"use --device cpu or auto")
    return torch.device(name)
