"""The editing literature's measures (MELO_SPEC section 4), for any method of methods.py.

- token accuracy: teacher-forced, the share of target tokens that are the argmax;
- exact match: greedy decoding reproduces every target token (and the end of the turn);
- agreement: greedy tokens of the edited model equal to the unedited model's, position by
  position (locality).
"""
from __future__ import annotations

import torch

from .backbone import Backbone
from .train import target_positions


@torch.no_grad()
def token_accuracy(backbone: Backbone, method, prompt: str, target: str) -> float:
    enc = backbone.encode([prompt], [target])
    positions, targets = target_positions(enc)
    with method.applied(prompt):
        logits = backbone.full_logits(enc, positions)[0]
    return (logits.argmax(-1) == targets).float().mean().item()


@torch.no_grad()
def greedy_ids(backbone: Backbone, method, prompt: str, n_tokens: int) -> list[int]:
    """The first n_tokens greedy tokens (shorter if the model ends its turn)."""
    enc = backbone.encode([prompt])
    with method.applied(prompt) if method is not None else backbone.lora(None):
        out = backbone.model.generate(input_ids=enc.ids, attention_mask=enc.mask, max_new_tokens=n_tokens,
                                      do_sample=False, pad_token_id=backbone.tokenizer.pad_token_id)
    return out[0, enc.ids.shape[1]:].tolist()


def exact_match(backbone: Backbone, method, prompt: str, target: str) -> float:
    want = backbone.target_ids(target)
    return float(greedy_ids(backbone, method, prompt, len(want)) == want)


def agreement(base: list[int], edited: list[int]) -> float:
    """Share of the base model's tokens that the edited model reproduces at the same place."""
    if not base:
        return float(edited == base)
    return sum(1 for i, t in enumerate(base) if i < len(edited) and edited[i] == t) / len(base)
