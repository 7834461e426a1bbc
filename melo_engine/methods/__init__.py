"""Editing methods under one interface (base.py), found by name in registry.METHODS, so
one benchmark loop measures them all alike: MELO (melo.py), plain LoRA (lora.py) and
GRACE (grace.py). A new method is one file here plus one line in registry.py."""
from __future__ import annotations

from pathlib import Path

from ..registry import METHODS
from .base import EditingMethod
from .grace import GraceConfig, GraceEntry, GraceMethod
from .lora import LoRAMethod
from .melo import MeloMethod


def build(name: str, backbone, workspace: Path, settings: dict | None = None, chat: bool = True,
          ends: bool = True) -> EditingMethod:
    """A method by name; `settings` are its own options (MeloConfig fields for MELO, e.g.
    key_source). `chat=False`: prompts are plain text the model continues; `ends=False`: a
    target is a sentence the text goes on from (the hallucination task)."""
    return METHODS.get(name).create(backbone, workspace, settings, chat, ends)


__all__ = ["EditingMethod", "GraceConfig", "GraceEntry", "GraceMethod", "LoRAMethod", "MeloMethod", "build"]
