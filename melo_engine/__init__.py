"""MELO engine: neuron-indexed dynamic LoRA editing of a frozen causal language model."""
from .config import DEFAULT_MODEL, MeloConfig
from .editor import Answer, EditResult, MeloEditor

__all__ = ["MeloEditor", "MeloConfig", "Answer", "EditResult", "DEFAULT_MODEL"]
