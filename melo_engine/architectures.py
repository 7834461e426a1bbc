"""Where MELO's parts sit inside a model, by the model's `config.model_type`.

Models name their decoder layers and feed-forward modules differently; one row per
model_type says where, instead of probing attribute names (which could pick the wrong list
silently). A model_type missing here is refused in one line that names the overrides,
`--layers-path` and `--lora-modules`, with which such a model still runs.

A row's `kind` picks the one path through the engine for its models (registry.BACKBONES):
"causal", a decoder that continues the prompt (backbone.py), or "seq2seq", an
encoder-decoder whose encoder reads the question and whose decoder writes the answer
(seq2seq.py). Nothing else in the engine asks which kind a model is.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .registry import BACKBONES


@dataclass(frozen=True)
class Architecture:
    layers: str                        # dotted path from the model to the decoder's ModuleList, e.g. "model.layers"
    ffn_out: str                       # module inside a layer that carries the LoRA blocks, e.g. "mlp.down_proj"
    grace: str                         # module inside a layer whose output GRACE replaces, e.g. "mlp"
    key_layer_fraction: float = 1 / 3  # the model's own key: this share of the depth (10 of 30 measured best)
    prompt: str = "chat"               # "chat", or "completion" for base models without a chat template
    final_norm: str = "norm"           # the decoder's last norm, left out when only the lower layers run
    # Learned absolute positions the decoder adds to inputs_embeds inside its forward (GPT-2's
    # wpe): a view that starts mid-stack must not add them a second time. None: rotary, nothing added.
    position_embedding: str | None = None
    kind: str = "causal"               # the engine's path for the model: a name in registry.BACKBONES
    # seq2seq: the encoder's layer list; the model's own key is taken at its key layer (the
    # encoder has read the whole question before the decoder, and its blocks, run).
    encoder_layers: str | None = None
    # The layers that carry blocks by default, as shares [from, to) of the depth (None: the
    # top 20%, which the layer study measured on SmolLM2).
    lora_span: tuple[float, float] | None = None

    def __post_init__(self):
        BACKBONES.check(self.kind)
        if self.kind == "seq2seq" and not self.encoder_layers:
            raise ValueError("a seq2seq architecture names its encoder's layer list (encoder_layers)")
        if self.lora_span is not None and not 0 <= self.lora_span[0] < self.lora_span[1] <= 1:
            raise ValueError(f"lora_span {self.lora_span} is not a range of shares of the depth")

    @property
    def key_in_encoder(self) -> bool:
        """The model's own key comes from an encoder that runs before every decoder layer,
        so any key layer sits below the blocks."""
        return self.encoder_layers is not None

    def default_lora_layers(self, num_layers: int) -> tuple[int, ...]:
        """The layers that carry blocks when a workspace does not say."""
        if self.lora_span is None:
            return tuple(range(num_layers - max(1, round(0.2 * num_layers)), num_layers))
        first = int(self.lora_span[0] * num_layers)
        return tuple(range(first, max(first + 1, int(self.lora_span[1] * num_layers))))


# Llama-style decoders: a ModuleList `model.layers`, each with an MLP ending in `down_proj`.
_LLAMA_LIKE = Architecture(layers="model.layers", ffn_out="mlp.down_proj", grace="mlp")

# Each row checked on a tiny model of its type (tests/test_registries.py).
ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA_LIKE,              # SmolLM2 (the bundled default) reports "llama"
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    # Gemma 3 with its vision tower: the text decoder sits one level down.
    "gemma3": replace(_LLAMA_LIKE, layers="model.language_model.layers"),
    "phi3": _LLAMA_LIKE,
    "smollm3": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    # GPT-2's c_proj is a Conv1D, not an nn.Linear (its weight is stored transposed; lora.py
    # reads its shape accordingly). A base model: no chat template.
    "gpt2": Architecture(layers="transformer.h", ffn_out="mlp.c_proj", grace="mlp", prompt="completion",
                         final_norm="ln_f", position_embedding="wpe"),
    # BERT-style encoders (the classifier: all-MiniLM-L6-v2 loaded as a bare BertModel, so
    # the layers sit at encoder.layer; `output.dense` is each layer's FFN output, an nn.Linear).
    "bert": Architecture(layers="encoder.layer", ffn_out="output.dense", grace="output", prompt="completion"),
    # T5, the paper's zsRE backbone (T5-small as google/t5-small-ssm-nq: 8 encoder and 8
    # decoder blocks). The encoder reads the question, the decoder writes the answer; the
    # blocks sit on the decoder's FFN output (layer.2 of a decoder block is its FFN, after
    # self- and cross-attention), GRACE wraps that FFN. Paper settings (MELO_SPEC section 2):
    # the key from encoder block 4 of 8 (a half of the depth; the paper reads that block's
    # FFN `wo` output, we the block's output, as for every family), blocks on decoder
    # blocks 5-6 of 8 (the paper puts them on both `wi` and `wo`; here `wo`, the FFN output,
    # as for every family). No chat template: the question itself is the encoder's input.
    "t5": Architecture(layers="decoder.block", ffn_out="layer.2.DenseReluDense.wo", grace="layer.2.DenseReluDense",
                       key_layer_fraction=4 / 8, prompt="completion", final_norm="final_layer_norm",
                       kind="seq2seq", encoder_layers="encoder.block", lora_span=(5 / 8, 7 / 8)),
}


def architecture_for(model, layers_path: str | None = None, lora_modules=None) -> Architecture:
    """The row for `model`'s model_type, with the overrides given: `layers_path` (the dotted
    path to the decoder's ModuleList) and `lora_modules` (module names inside a layer that
    carry the blocks; the first is `ffn_out`, and its parent module is what GRACE wraps when
    the type has no row). An unknown type needs both."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if isinstance(lora_modules, str):
        lora_modules = (lora_modules,)
    arch = ARCHITECTURES.get(kind)
    if arch is None:
        if not layers_path or not lora_modules:
            raise ValueError(f"no architecture known for model_type {kind!r}: give --layers-path (the decoder's "
                             f"layer list, e.g. model.layers) and --lora-modules (e.g. mlp.down_proj)")
        first = lora_modules[0]
        return Architecture(layers=layers_path, ffn_out=first, grace=first.rpartition(".")[0] or first)
    if layers_path:
        arch = replace(arch, layers=layers_path)
    if lora_modules:
        arch = replace(arch, ffn_out=lora_modules[0])
    return arch
