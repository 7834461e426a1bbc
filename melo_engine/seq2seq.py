"""An encoder-decoder (T5, the paper's zsRE backbone) seen the way MELO needs it: the
encoder reads the question, the decoder writes the answer, and the blocks sit on the
decoder's FFN output.

What differs from a decoder-only model (backbone.py), all of it here:
- the prompt is the question itself, the encoder's input (no chat template and no "Q:/A:"
  form: what the decoder writes is the answer);
- the model's own key is the encoder's hidden states at the key layer, reduced over the
  question (the paper reads T5-small's at encoder block 4). The encoder runs once, before
  any decoder layer, so the block is chosen before it could act, and one decision holds
  for every token the decoder writes;
- an edit's target is the decoder's labels: training runs the frozen encoder once, then the
  decoder with the held block on the target (teacher-forced) as often as the block needs;
- answers come from the model's own `generate`.

The split forward of a decoder (lower layers once, upper layers per step: GRACE's
training) has no meaning here and is refused in one line.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Backbone, Encoded


@dataclass
class Seq2SeqEncoded(Encoded):
    """The encoder's input (ids, masks: the question alone) and, for training, the target as
    the decoder's labels [batch, n] (-100 after each row's end)."""

    labels: torch.Tensor | None = None

    def target_count(self, row: int = 0) -> int:
        return 0 if self.labels is None else int((self.labels[row] != -100).sum())


class Seq2SeqBackbone(Backbone):
    """A frozen encoder-decoder with dynamic-LoRA layers in its decoder."""

    kind = "seq2seq"
    joins_running_batches = False          # the decoder's cache sits beside the encoder's output
    auto_class = "AutoModelForSeq2SeqLM"

    def __init__(self, model: nn.Module, tokenizer, name: str, layers_path: str | None = None,
                 lora_modules: tuple[str, ...] | None = None):
        super().__init__(model, tokenizer, name, layers_path, lora_modules)
        encoder = self.architecture.encoder_layers
        self._encoder_layers = model.get_submodule(encoder) if encoder else None
        if not isinstance(self._encoder_layers, nn.ModuleList):
            raise ValueError(f"{type(model).__name__} has no list of encoder layers at {encoder}")
        # Layer numbers count the decoder's layers (where the blocks go); the key layer is
        # an encoder layer, checked against the encoder's depth.
        self.num_layers = len(self.layers)
        self.start_token = int(model.config.decoder_start_token_id)

    @property
    def key_layers(self) -> nn.ModuleList:
        return self._encoder_layers

    # ---- prompts -----------------------------------------------------------------------
    def uses_chat(self, chat: bool = True) -> bool:
        return False

    def prompt_form(self, chat: bool = True) -> str:
        return "question to the encoder"

    def format_prompt(self, question: str, chat: bool = True) -> tuple[str, tuple[int, int]]:
        return question, (0, len(question))

    def target_ids(self, target: str, chat: bool = True, ends: bool = True) -> list[int]:
        """The decoder's tokens for an answer (it starts the decoder's text: no space before)."""
        ids = list(self.tokenizer(target.strip(), add_special_tokens=False)["input_ids"])
        return ids + [self.tokenizer.eos_token_id] if ends else ids

    def encode(self, questions: list[str], targets: list[str] | None = None, chat: bool = True,
               ends: bool = True) -> Seq2SeqEncoded:
        """The questions as the encoder's input, right-padded (the tokenizer's own special
        tokens, e.g. T5's </s>, outside the user's text), and the targets as labels."""
        enc = super().encode(questions, chat=False)          # format_prompt: the question alone
        labels = None
        if targets is not None:
            rows = [self.target_ids(t, chat, ends) for t in targets]
            labels = torch.full((len(rows), max(len(r) for r in rows)), -100, dtype=torch.long)
            for i, r in enumerate(rows):
                labels[i, :len(r)] = torch.tensor(r)
            labels = labels.to(self.device)
        return Seq2SeqEncoded(enc.ids, enc.mask, enc.prompt_mask, enc.user_mask, labels)

    # ---- keys --------------------------------------------------------------------------
    @torch.no_grad()
    def lower(self, enc: Encoded, stop: int) -> torch.Tensor:
        """The output of encoder layer stop-1, read by a hook as generate_routed reads it
        (the encoder's last hidden state would carry its final norm)."""
        me, seen = threading.get_ident(), {}

        def keep(_module, _args, output):
            if threading.get_ident() == me:         # the hook sees every thread's forwards
                seen.setdefault("h", output[0] if isinstance(output, tuple) else output)

        handle = self.key_layers[stop - 1].register_forward_hook(keep)
        try:
            self.model.get_encoder()(input_ids=enc.ids, attention_mask=enc.mask)
        finally:
            handle.remove()
        return seen["h"]

    # ---- training ----------------------------------------------------------------------
    def teacher(self, enc: Seq2SeqEncoded, first: int):
        """The loss of the target as the decoder's labels, with the blocks held. The encoder
        carries no blocks: it runs once."""
        labels = enc.labels[:1]
        real = labels[0] != -100
        targets = labels[0][real]
        decoder_ids = self.model.prepare_decoder_input_ids_from_labels(labels=labels)
        with torch.no_grad():
            encoded = self.model.get_encoder()(input_ids=enc.ids[:1], attention_mask=enc.mask[:1])

        def loss_of(active):
            with self.lora(active):
                logits = self.model(encoder_outputs=encoded, attention_mask=enc.mask[:1], decoder_input_ids=decoder_ids,
                                    use_cache=False).logits[0][real]
            return F.cross_entropy(logits, targets), (logits.argmax(-1) == targets).float().mean().item()

        return loss_of

    def _refused(self, *args, **kwargs):
        raise ValueError("an encoder-decoder has no split of its prompt and answer into lower and upper layers "
                         "(GRACE runs on decoder-only models here)")

    split_is_exact = upper_logits = full_logits = _refused

    # ---- generation --------------------------------------------------------------------
    def _new_tokens(self, enc: Encoded, chat: bool, **generation) -> torch.Tensor:
        out = self.model.generate(input_ids=enc.ids, attention_mask=enc.mask, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id, **generation)
        return out[:, 1:]                                    # after the decoder's start token

    def _continued(self, enc: Encoded, new: torch.Tensor, chat: bool, **generation) -> torch.Tensor:
        start = torch.tensor([[self.start_token]], device=enc.ids.device)
        decoder_ids = torch.cat([start, new[None].to(enc.ids.device)], 1)
        out = self.model.generate(input_ids=enc.ids[:1], attention_mask=enc.mask[:1], decoder_input_ids=decoder_ids,
                                  do_sample=False, pad_token_id=self.tokenizer.pad_token_id, **generation)
        return out[:, 1:]
