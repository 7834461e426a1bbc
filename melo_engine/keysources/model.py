"""The "model" key source: the paper's neuron index. A layer of the edited model itself,
reduced over the user's question (Backbone.keys_of). Free at ask time: a hook takes it
inside the prefill forward (Backbone.generate_routed), so no extra forward runs.
"""
from __future__ import annotations

import torch

from ..keys import KeySource


class ModelKey(KeySource):
    name = "model"
    title = "The model's own hidden state (the paper's key)"
    summary = "the model's own hidden state"
    why = ("Averaged over your question, this is the paper's neuron index: free to compute, but it groups "
           "questions by template more than by subject, so fewer paraphrases reach their edit.")
    in_prefill = True

    def dim(self, backbone) -> int:
        return int(backbone.fingerprint["hidden_size"])

    def raw(self, backbone, cfg, questions: list[str]) -> torch.Tensor:
        return backbone.keys_of(questions, cfg.key_layer, cfg.key_reduction, cfg.distance,
                                chat=cfg.prompt_mode == "chat")

    def space(self, cfg) -> str:
        return f"model-L{cfg.key_layer}-{cfg.key_reduction}-{cfg.distance}"

    def mode_suffix(self, cfg) -> str:
        # The model's own key sees the prompt as formatted: another mode, another key space.
        return "-completion" if cfg.prompt_mode == "completion" else ""
