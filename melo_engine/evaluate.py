"""The editing literature's measures (MELO_SPEC section 4), for any method of methods/.

- token accuracy: teacher-forced, the share of target tokens that are the argmax;
- exact match: greedy decoding reproduces every target token (and the end of the turn);
- agreement: greedy tokens of the edited model equal to the unedited model's, position by
  position (locality).

Prompts are measured in batches (a benchmark of 1000 edits asks about 10,000 questions),
each example routed on its own: `method.applied(prompts, last)` makes the backbone behave
as the edited model for the batch, where `last[i]` is the position of prompt i's last
token in the batch's layout. `method=None` is the unedited model.
"""
from __future__ import annotations

import torch

from .backbone import Backbone

BATCH = 16


def _applied(backbone: Backbone, method, prompts: list[str], last: list[int]):
    return method.applied(prompts, last) if method is not None else backbone.lora(None)


@torch.no_grad()
def _target_logits(backbone: Backbone, method, prompts: list[str], targets: list[str], chat: bool = True,
                   ends: bool = True):
    """For each example, in order: (the logits that predict its target tokens, those tokens),
    teacher-forced, the method routed from the prompt and applied from its last token on."""
    for i in range(0, len(prompts), BATCH):
        ps, ts = prompts[i:i + BATCH], targets[i:i + BATCH]
        enc = backbone.encode(ps, ts, chat=chat, ends=ends)   # right-padded: pads after every real token
        n_prompt = enc.prompt_mask.sum(1).tolist()
        n_total = enc.mask.sum(1).tolist()
        with _applied(backbone, method, ps, [n - 1 for n in n_prompt]):
            logits = backbone.model(input_ids=enc.ids, attention_mask=enc.mask, use_cache=False).logits
        for r, (a, b) in enumerate(zip(n_prompt, n_total)):
            # The logit at t predicts token t + 1.
            yield logits[r, a - 1:b - 1], enc.ids[r, a:b]


def token_accuracies(backbone: Backbone, method, prompts: list[str], targets: list[str]) -> list[float]:
    return [(logits.argmax(-1) == want).float().mean().item()
            for logits, want in _target_logits(backbone, method, prompts, targets)]


def token_accuracy(backbone: Backbone, method, prompt: str, target: str) -> float:
    return token_accuracies(backbone, method, [prompt], [target])[0]


@torch.no_grad()
def greedy_batch(backbone: Backbone, method, prompts: list[str], n_tokens: int) -> list[list[int]]:
    """The first n_tokens greedy tokens of each prompt (shorter where the model ends its turn)."""
    eos = backbone.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    out = []
    for i in range(0, len(prompts), BATCH):
        ps = prompts[i:i + BATCH]
        ids, mask = backbone.left_padded(backbone.encode(ps))
        width = ids.shape[1]
        with _applied(backbone, method, ps, [width - 1] * len(ps)):
            gen = backbone.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_tokens,
                                          do_sample=False, pad_token_id=backbone.tokenizer.pad_token_id)
        for row in gen[:, width:].tolist():
            cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
            out.append(row[:cut])
    return out


def greedy_ids(backbone: Backbone, method, prompt: str, n_tokens: int) -> list[int]:
    return greedy_batch(backbone, method, [prompt], n_tokens)[0]


def exact_matches(backbone: Backbone, method, prompts: list[str], targets: list[str]) -> list[float]:
    wants = [backbone.target_ids(t) for t in targets]
    got = greedy_batch(backbone, method, prompts, max(len(w) for w in wants))
    return [float(g[:len(w)] == w) for g, w in zip(got, wants)]


def exact_match(backbone: Backbone, method, prompt: str, target: str) -> float:
    return exact_matches(backbone, method, [prompt], [target])[0]


def agreement(base: list[int], edited: list[int]) -> float:
    """Share of the base model's tokens that the edited model reproduces at the same place."""
    if not base:
        return float(edited == base)
    return sum(1 for i, t in enumerate(base) if i < len(edited) and edited[i] == t) / len(base)


# ---- perplexity (the hallucination task) --------------------------------------------------
def perplexities(backbone: Backbone, method, prompts: list[str], targets: list[str], chat: bool = False) -> list[float]:
    """Per example: exp of the mean negative log-likelihood of the target's tokens given the
    prompt (prompt tokens masked, no end of turn after the target), with the method's edit
    routed from the prompt and applied from the prompt's last token on."""
    return [float(torch.exp(torch.nn.functional.cross_entropy(logits.float(), want)))
            for logits, want in _target_logits(backbone, method, prompts, targets, chat=chat, ends=False)]


@torch.no_grad()
def passage_perplexities(backbone: Backbone, method, texts: list[str], max_tokens: int = 256) -> list[float]:
    """Per passage: exp of the mean negative log-likelihood of every token after the first
    (the whole sequence, as for the locality set), the method routed from the passage and
    applied throughout. Passages are cut at `max_tokens` tokens."""
    out = []
    for i in range(0, len(texts), BATCH):
        ts = texts[i:i + BATCH]
        enc = backbone.encode(ts, chat=False)
        enc.ids, enc.mask = enc.ids[:, :max_tokens], enc.mask[:, :max_tokens]
        with _applied(backbone, method, ts, [0] * len(ts)):
            logits = backbone.model(input_ids=enc.ids, attention_mask=enc.mask, use_cache=False).logits
        for r, n in enumerate(enc.mask.sum(1).tolist()):
            nll = torch.nn.functional.cross_entropy(logits[r, :n - 1].float(), enc.ids[r, 1:n])
            out.append(float(torch.exp(nll)))
    return out
