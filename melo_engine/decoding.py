"""Continuous batching: one greedy generation that rows join and leave between tokens.

Why. A whole-batch generation (Backbone.generate_batch) starts its rows together and hands
their texts back together. A question that arrives one token after a batch began waits for
all of it, then for a batch of its own: two batch times where one ask alone takes one. In
the classroom benchmark (docs/BENCHMARKS.md, "A class on one server") four asks that start
within three seconds of each other set the p95 that way. Here a row joins the running
generation at its next token and leaves it at its own last one: its caller gets the text
then, not when the batch's longest row ends.

How. The batch holds the model's key/value cache for all its rows, left-padded to one
length (every row ends at the last column, so a new token follows all of them alike), the
mask of real positions, and each row's last token. Joining rows run through their prompts
on their own, with their own blocks (a prefill); then the shorter cache, theirs or the
running one, is padded on the left to the other's length and the two are stacked. Each
step feeds every row's last token at its own position (its count of real tokens) with its
own block (lora.ActiveBlocks, one per row). A row that ends leaves the cache, and columns
that no remaining row uses are cut off, so the cache stays as long as its oldest row.

What a row gets: greedy tokens until its own budget, an end-of-sequence token or, in the
question-answer form, its first line break (Backbone._stops): what generate_batch gives
it, up to the last-bit rounding of padded rows that batching.py describes. Decoder-only
models only (`supports`): an encoder-decoder (seq2seq.py) keeps whole batches. A model with
sliding-window layers (Gemma 3) forgets keys older than its window, so a row joins only
while the batch's cache stays inside the window until its rows end (`join` refuses it
otherwise, and it waits for a fresh batch).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .lora import ActiveBlocks, stack


def supports(backbone) -> bool:
    """Whether rows may join a running generation of this backbone (its class says:
    decoder-only models)."""
    return getattr(backbone, "joins_running_batches", False)


def gathered(blocks: list[dict | None]) -> dict[str, ActiveBlocks] | None:
    """The LoRA layers' matrices for rows whose blocks are `blocks` (a dict of module ->
    (A, B) per row, or None: the original model); None when no row has a block."""
    modules = sorted({m for b in blocks if b for m in b})
    if not modules:
        return None
    return {m: stack([b.get(m) if b else None for b in blocks]) for m in modules}


@dataclass
class _Member:
    owner: object                  # the caller's handle for the row (batching.Row)
    blocks: dict | None
    limit: int
    tokens: list[int]


class RunningBatch:
    """Rows of one prompt form generated together, joining and leaving between tokens."""

    def __init__(self, backbone, chat: bool):
        self.backbone, self.chat = backbone, chat
        self.model = backbone.model
        eos = self.model.generation_config.eos_token_id
        self.eos = {e for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
        self.one_line = backbone.prompt_form(chat) == "question-answer"
        text_config = self.model.config.get_text_config(decoder=True)
        kinds = getattr(text_config, "layer_types", None) or []
        sliding = getattr(text_config, "sliding_window", None)
        self.window = sliding if sliding and (not kinds or "sliding_attention" in kinds) else None
        accepts = inspect.signature(self.model.forward).parameters
        # Logits of the last position only: a prompt's other positions are never read. The
        # cache's argument was renamed in transformers 5 (`cache`, `past_key_values` before).
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
        self._cache_arg = "cache" if "cache" in accepts else "past_key_values"
        self.members: list[_Member] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None      # [rows, length]: 1 where a row has a real token
        self.last: torch.Tensor | None = None      # [rows]: each row's newest token, not yet in the cache
        self.active = None                         # the rows' blocks, stacked (gathered)
        self._restack = False                      # rows joined or left since they were stacked

    def __len__(self) -> int:
        return len(self.members)

    @property
    def owners(self) -> list:
        return [m.owner for m in self.members]

    @torch.no_grad()
    def join(self, rows: list[tuple[str, dict | None, int, object]]) -> tuple[list[tuple[object, str]], list]:
        """Add (question, blocks, token budget, owner) rows at the next token. Returns the rows
        that ended at their first token, as (owner, text), and the owners refused because
        the cache would outgrow a sliding window before the batch's rows end."""
        enc = self.backbone.encode([q for q, *_ in rows], chat=self.chat)
        ids, mask = self.backbone.left_padded(enc)
        width = max(ids.shape[1], self.mask.shape[1] if self.mask is not None else 0)
        longest = max([m.limit - len(m.tokens) for m in self.members] + [limit for _, _, limit, _ in rows])
        if self.window is not None and width + longest >= self.window - 1:
            return [], [owner for *_, owner in rows]
        new = [_Member(owner, blocks, limit, []) for _, blocks, limit, owner in rows]
        positions = mask.long().cumsum(-1) - 1
        positions.masked_fill_(mask == 0, 1)      # padding: any position, it is masked out
        cache = DynamicCache(config=self.model.config)
        first = self._next(ids, mask, positions, cache, gathered([m.blocks for m in new]))
        if self.cache is None:
            self.cache, self.mask, self.last = cache, mask, first
        else:
            self.cache, self.mask = self._stacked(self.cache, self.mask, cache, mask)
            self.last = torch.cat([self.last, first])
        start = len(self.members)
        self.members += new
        self._restack = True
        return self._advance(range(start, len(self.members)), first), []

    @torch.no_grad()
    def step(self) -> list[tuple[object, str]]:
        """One new token for every row; returns the rows that ended with it, as (owner, text)."""
        mask = F.pad(self.mask, (0, 1), value=1)
        positions = self.mask.long().sum(1, keepdim=True)     # each row's count of real tokens so far
        self.mask = mask
        tokens = self._next(self.last[:, None], mask, positions, self.cache, self.active)
        self.last = tokens
        return self._advance(range(len(self.members)), tokens)

    def _next(self, ids, mask, positions, cache, active) -> torch.Tensor:
        d = self.backbone.device
        with self.backbone.lora(active):
            out = self.model(input_ids=ids.to(d), attention_mask=mask.to(d), position_ids=positions.to(d),
                             use_cache=True, **{self._cache_arg: cache}, **self._last_only)
        return out.logits[:, -1].argmax(-1).cpu()

    def _advance(self, rows, tokens: torch.Tensor) -> list[tuple[object, str]]:
        """Record each row's new token; drop the rows that ended and return their texts."""
        ended = []
        for i, t in zip(rows, tokens.tolist()):
            m = self.members[i]
            m.tokens.append(t)
            if t in self.eos or len(m.tokens) >= m.limit or (self.one_line and self.backbone.line_ended(m.tokens)):
                ended.append(i)
        done = [(self.members[i].owner, self.backbone.decoded_answer(self.members[i].tokens, self.chat))
                for i in ended]
        if ended:
            self._drop(set(ended))
        if self._restack:
            # Moved where the model runs once here, not at every token.
            self.active = self.backbone.on_device(gathered([m.blocks for m in self.members]))
            self._restack = False
        return done

    def _drop(self, ended: set[int]) -> None:
        keep = [i for i in range(len(self.members)) if i not in ended]
        self.members = [self.members[i] for i in keep]
        self._restack = True
        if not keep:
            self.cache = self.mask = self.last = self.active = None
            return
        index = torch.tensor(keep)
        self.cache.batch_select_indices(index.to(self.backbone.device))
        self.mask, self.last = self.mask[index], self.last[index]
        unused = int(self.mask.any(0).long().argmax())     # leading columns no row uses
        if unused:
            self.cache = self._rebuilt([(k[:, :, unused:], v[:, :, unused:]) for k, v in self._layers(self.cache)])
            self.mask = self.mask[:, unused:]

    def _stacked(self, a: DynamicCache, a_mask, b: DynamicCache, b_mask):
        """Caches `a` over `b` (rows), the shorter padded on the left to the longer's length."""
        width = max(a_mask.shape[1], b_mask.shape[1])

        def left(t, n):                       # pad the sequence axis (-2) of [rows, heads, n, dim]
            return F.pad(t, (0, 0, width - n, 0))

        la, lb = a_mask.shape[1], b_mask.shape[1]
        layers = [(torch.cat([left(ka, la), left(kb, lb)]), torch.cat([left(va, la), left(vb, lb)]))
                  for (ka, va), (kb, vb) in zip(self._layers(a), self._layers(b))]
        mask = torch.cat([F.pad(a_mask, (width - la, 0)), F.pad(b_mask, (width - lb, 0))])
        return self._rebuilt(layers), mask

    @staticmethod
    def _layers(cache: DynamicCache):
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _rebuilt(self, layers) -> DynamicCache:
        return DynamicCache(ddp_cache_data=layers, config=self.model.config)
