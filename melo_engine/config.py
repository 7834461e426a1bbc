"""Every setting of a MELO workspace, in one dataclass saved beside the edits."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .disk import writing
from .registry import KEY_SOURCES
from .store import atomic_write_json     # a crash mid-save must not leave half a file

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class MeloConfig:
    """Settings for routing and training. Defaults were measured on SmolLM2-135M-Instruct
    (see docs/BENCHMARKS.md, "key study" and "speed"); other models get the same layer
    *fractions* and a radius calibrated from reference prompts."""

    model: str = DEFAULT_MODEL

    # Where keys come from: a name in registry.KEY_SOURCES (keys.py). "sentence": the bundled
    # sentence encoder, whitened, routes far more paraphrases to their edit than "model", the
    # paper's neuron index, a layer of the edited model (the settings below); the key study
    # in docs/BENCHMARKS.md has the figures. A workspace made before key sources existed is
    # "model".
    key_source: str = "sentence"
    key_whitening: bool | None = None    # None: the source's default (on for "sentence", off for "model")

    # The model source. The key is the key layer's output reduced over the user's question only
    # (not the chat template around it, which is the same for every query): "mean_user" at a
    # third of the depth with cosine routed far more paraphrases to their own edit than the
    # last prompt token of the reference code (docs/BENCHMARKS.md, layer study).
    key_layer: int | None = None          # None: the architecture's share of the depth (a third: 10 of 30)
    key_reduction: str = "mean_user"     # "mean_user" | "last_user" | "last" | "mean"
    distance: str = "cosine"             # "cosine" | "l2"
    init_radius: float | None = None     # None: calibrate from reference prompts
    # An edit with another answer than an edit already in reach (melo_engine/index.py).
    # "supersede": an edit within the init radius asks the same question, so the newer one
    # wins for every phrasing and the older goes dormant until the newer is undone; nothing
    # else shrinks. "keep" / "forget": the paper's split (both radii to half the distance),
    # keeping or forgetting members left outside. The paper's rule made contradicting edits
    # flip (two clusters of radius 0 at one point) and cost earlier edits their paraphrases.
    on_conflict: str = "supersede"       # "supersede" | "keep" | "forget"
    # Which edit within the radius fires (router.py). "verified": the nearest whose own
    # question the verifier finds to be the same question (numbers, names, the thing asked
    # about), so a fix stays off the same question about another subject; a supersede
    # needs the same check. "radius": the nearest, as the paper routes (for comparison).
    router: str = "verified"             # "verified" | "radius"

    # Dynamic LoRA: which modules carry blocks, and how big a block is.
    lora_layers: tuple[int, ...] | None = None   # None: the row's (architectures.py), the top 20% of the layers
    # None: the FFN output module of the model's row in architectures.py (mlp.down_proj on
    # Llama-style models, GPT-2's mlp.c_proj). A new workspace saves what it resolved to.
    lora_modules: tuple[str, ...] | None = None
    # Where the decoder's layer list sits, for a model type architectures.py has no row for
    # (None: the row's). Saved, so such a workspace reopens without saying it again.
    layers_path: str | None = None
    rank_per_block: int = 4
    lora_alpha: float = 8.0
    # How blocks are stored (and held in memory; they are computed in float32). float16 halves
    # the disk per edit with no measured loss in edit success or retention (docs/BENCHMARKS.md,
    # "scale"). Workspaces made before keep float32.
    block_dtype: str = "float16"         # "float16" | "float32"

    # Training one edit: Adam on the new block only, stop once the target is reproduced.
    lr: float = 5e-3
    max_iters: int = 40
    stop_loss: float = 0.05              # mean target-token loss that counts as learnt

    # How a prompt reaches the model. "chat": as a user turn of the model's chat template (an
    # answer ends the turn). "completion": plain text the model continues, as a base model
    # is used and as the paper's hallucination task prompts it (a passage's first sentences).
    prompt_mode: str = "chat"            # "chat" | "completion"

    # Limits and generation.
    max_text_chars: int = 500
    max_new_tokens: int = 48

    def for_backbone(self, backbone) -> "MeloConfig":
        """`resolved` for this backbone: its depth, its architecture row, the stack its own key
        is read from (a backbone without one, the classifier's: its layers)."""
        stack = getattr(backbone, "key_layers", None)
        return self.resolved(backbone.num_layers, backbone.architecture, None if stack is None else len(stack))

    def resolved(self, num_layers: int, architecture=None, key_layers: int | None = None) -> "MeloConfig":
        """Fill the per-model defaults (layer choices, LoRA modules) for a model with
        `num_layers` layers whose parts sit where `architecture` (architectures.py) says
        (None: a Llama-style model). `key_layers`: how many layers the model's own key is
        read from, where that is another stack (T5: the encoder's; default: num_layers)."""
        from .architectures import ARCHITECTURES

        arch = architecture or ARCHITECTURES["llama"]
        key_layers = num_layers if key_layers is None else key_layers
        key_layer = (self.key_layer if self.key_layer is not None
                     else max(1, round(key_layers * arch.key_layer_fraction)))
        lora_modules = tuple(self.lora_modules) if self.lora_modules else (arch.ffn_out,)
        lora_layers = self.lora_layers if self.lora_layers is not None else arch.default_lora_layers(num_layers)
        lora_layers = tuple(sorted(int(i) for i in lora_layers))
        if not lora_layers or (min(lora_layers) <= key_layer and not arch.key_in_encoder):
            raise ValueError(f"the key layer ({key_layer}) must sit below every LoRA layer {lora_layers}")
        if max(lora_layers) >= num_layers:
            raise ValueError(f"the LoRA layers must lie in 0..{num_layers - 1}")
        if not 0 <= key_layer < key_layers:
            raise ValueError(f"the key layer must lie in 0..{key_layers - 1}")
        return dataclasses.replace(self, key_layer=key_layer, lora_layers=lora_layers, lora_modules=lora_modules)

    @property
    def whitened(self) -> bool:
        if self.key_whitening is None:
            return KEY_SOURCES.get(self.key_source).default_whitened
        return bool(self.key_whitening)

    def key_name(self) -> str:
        """Names the key space: two workspaces' keys compare only when these are equal."""
        source = KEY_SOURCES.get(self.key_source)()
        return source.space(self) + ("-whitened" if self.whitened else "") + source.mode_suffix(self)

    def validate(self) -> None:
        KEY_SOURCES.check(self.key_source)
        if self.key_reduction not in ("mean_user", "last_user", "last", "mean"):
            raise ValueError(f"unknown key_reduction {self.key_reduction!r}")
        if self.on_conflict not in ("supersede", "keep", "forget"):
            raise ValueError(f"unknown on_conflict {self.on_conflict!r} (supersede, keep, forget)")
        if self.block_dtype not in ("float16", "float32"):
            raise ValueError(f"unknown block_dtype {self.block_dtype!r} (float16, float32)")
        if self.router not in ("verified", "radius"):
            raise ValueError(f"unknown router {self.router!r} (verified, radius)")
        if self.prompt_mode not in ("chat", "completion"):
            raise ValueError(f"unknown prompt_mode {self.prompt_mode!r} (chat, completion)")
        if self.distance not in ("l2", "cosine"):
            raise ValueError(f"unknown distance {self.distance!r}")
        for name in ("rank_per_block", "max_iters", "max_text_chars", "max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not self.lr > 0:
            raise ValueError("lr must be positive")
        if self.init_radius is not None and not self.init_radius > 0:
            raise ValueError("init_radius must be positive")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("lora_layers", "lora_modules"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_json(cls, d: dict) -> "MeloConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d.setdefault("key_source", "model")      # saved before key sources existed
        d.setdefault("on_conflict", "keep")      # saved before "supersede" existed
        d.setdefault("block_dtype", "float32")   # saved before blocks were stored at half precision
        for k in ("lora_layers", "lora_modules"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)

    def save(self, path: Path) -> None:
        with writing("the settings (config.json)"):     # a full disk: one line, the old file kept
            atomic_write_json(Path(path), self.to_json())

    @classmethod
    def load(cls, path: Path) -> "MeloConfig":
        return cls.from_json(json.loads(Path(path).read_text()))


# Settings a user may change on an existing workspace: they apply to new edits only.
EDIT_SETTINGS = ("init_radius", "rank_per_block", "lr", "max_iters", "stop_loss", "max_new_tokens")
