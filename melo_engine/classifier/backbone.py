"""A frozen BERT classifier seen the way MELO needs it: the encoder's lower layers for keys
and for training, its upper layers (with the LoRA blocks) plus the head for the label.

The encoder is the bundled all-MiniLM-L6-v2 (a 6-layer BERT, `encoder.layer.N.output.dense`
is each layer's FFN output). The classification head is a linear layer over the mean of
the last layer's token states (unit length, as the encoder was trained to be used), trained
once on the upstream split with a fixed seed and cached beside the converted models: the
encoder stays frozen, so the head is a few seconds of work on cached features.

The forward is run layer by layer here (embeddings, then each BertLayer with an additive
mask), so `upper(lower(x, k), k)` *is* the full forward, bit for bit: training a block
computes the frozen lower layers once. It offers the parts of `Backbone` that a MeloEditor,
a key source and the router use (`ensure_lora`, `lora`, `keys_of`, `companion`, ...), so a
classifier workspace reuses the index, the journal, undo and export unchanged.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..architectures import architecture_for
from ..backbone import Backbone
from ..lora import ActiveBlocks, inject_block_lora
from ..model import cache_dir, cached_tensors, model_fingerprint

DATA = Path(__file__).resolve().parents[2] / "assets" / "data" / "wordnet_categories.jsonl.gz"


@dataclass(frozen=True)
class ClassifierSpec:
    """One bundled classifier: which encoder, which data, how its head is trained."""

    encoder: str          # a SentenceEncoder package's model (the only one: all-MiniLM-L6-v2)
    data: Path            # JSON lines with text, label, split (train / test / edit)
    licence: str = ""    # what the page names (About): the encoder's and the data's
    seed: int = 0
    steps: int = 400
    lr: float = 0.05
    weight_decay: float = 1e-3


# Classifier workspaces name one of these as their model (MeloConfig.model).
CLASSIFIERS: dict[str, ClassifierSpec] = {
    "minilm-wordnet": ClassifierSpec(encoder="all-MiniLM-L6-v2", data=DATA,
                                     licence="encoder Apache-2.0; data WordNet 3.0 licence (assets/data/README.md)"),
}


def is_classifier(name: str | None) -> bool:
    return name in CLASSIFIERS


def load_rows(path: Path = DATA) -> list[dict]:
    import gzip

    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass
class Batch:
    """Tokenized texts, right-padded: ids and mask, and the additive attention mask."""

    ids: torch.Tensor
    mask: torch.Tensor
    additive: torch.Tensor


class ClassifierBackbone:
    """A frozen encoder + linear head, with dynamic-LoRA layers injected by name."""

    def __init__(self, model: nn.Module, tokenizer, head: nn.Linear, labels: list[str], name: str,
                 head_info: dict | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.head = head
        self.labels = list(labels)
        self.name = name
        self.head_info = head_info or {}
        self.num_layers = int(model.config.num_hidden_layers)
        self.architecture = architecture_for(model)
        self.fingerprint = dict(model_fingerprint(model), labels=len(self.labels),
                                head_sum=round(float(head.weight.detach().double().sum()), 4))
        self.lock = threading.RLock()
        self.loras: dict = {}
        self._companions: dict[str, object] = {}
        self.device = torch.device("cpu")      # a small encoder: the CPU (editor.open says so)

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, name: str = "minilm-wordnet") -> "ClassifierBackbone":
        import transformers
        from transformers import AutoModel, AutoTokenizer

        from ..keysources.sentence import SentenceEncoder

        transformers.utils.logging.disable_progress_bar()     # a refused command prints one line
        spec = CLASSIFIERS.get(name)
        if spec is None:
            raise ValueError(f"unknown classifier {name!r} ({', '.join(CLASSIFIERS)})")
        where = SentenceEncoder.location()
        model = AutoModel.from_pretrained(str(where), dtype=torch.float32, attn_implementation="eager")
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(str(where))
        bb = cls(model, tokenizer, nn.Linear(model.config.hidden_size, 1), [], name)
        head, labels, info = bb._trained_head(spec)
        out = cls(model, tokenizer, head, labels, name, info)
        # The sentence key and the router's verifier use this same encoder (unedited: the
        # blocks are off outside `lora`), so it is not loaded twice.
        out._companions[SentenceEncoder.NAME] = SentenceEncoder(model, AutoTokenizer.from_pretrained(str(where)))
        return out

    def _trained_head(self, spec: ClassifierSpec) -> tuple[nn.Linear, list[str], dict]:
        """The head for `spec`, trained once (full batch, Adam, fixed seed) and cached: the
        cache file is remade when the encoder, the data or the recipe changes."""
        rows = load_rows(spec.data)
        labels = sorted({r["label"] for r in rows})
        train = [r for r in rows if r["split"] == "train"]
        data_sha = hashlib.sha256(spec.data.read_bytes()).hexdigest()[:16]
        fingerprint = {"encoder": model_fingerprint(self.model), "data": data_sha, "seed": spec.seed,
                       "steps": spec.steps, "lr": spec.lr, "weight_decay": spec.weight_decay}

        def make():
            feats = self.features([r["text"] for r in train])
            y = torch.tensor([labels.index(r["label"]) for r in train])
            torch.manual_seed(spec.seed)
            head = nn.Linear(feats.shape[1], len(labels))
            opt = torch.optim.Adam(head.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
            for _ in range(spec.steps):
                loss = F.cross_entropy(head(feats), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            acc = float((head(feats).argmax(-1) == y).float().mean())
            meta = {"labels": json.dumps(labels), "seed": str(spec.seed), "train_texts": str(len(train)),
                    "train_accuracy": f"{acc:.4f}", "data_sha256_16": data_sha,
                    "command": "ClassifierBackbone.load (melo_engine/classifier/backbone.py)"}
            return {"weight": head.weight.detach(), "bias": head.bias.detach()}, meta

        path = cache_dir() / "classifiers" / f"{self.name}-head.safetensors"
        tensors, meta = cached_tensors(path, fingerprint, make)
        head = nn.Linear(tensors["weight"].shape[1], tensors["weight"].shape[0])
        with torch.no_grad():
            head.weight.copy_(tensors["weight"])
            head.bias.copy_(tensors["bias"])
        for p in head.parameters():
            p.requires_grad_(False)
        labels = json.loads(meta["labels"])
        return head, labels, {k: v for k, v in meta.items() if k not in ("labels", "fingerprint")}

    # The same as the decoder's: they use only `lock`, `_companions`, `loras` and `device`.
    companion = Backbone.companion
    lora = Backbone.lora
    on_device = Backbone.on_device

    # ---- structure -----------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.architecture.layers)

    def module_name(self, layer: int, module: str) -> str:
        return f"{self.architecture.layers}.{layer}.{module}"

    def ensure_lora(self, layers: tuple[int, ...], modules: tuple[str, ...]) -> list[str]:
        names = [self.module_name(i, m) for i in layers for m in modules]
        with self.lock:
            self.loras.update(inject_block_lora(self.model, names))
        return names

    # ---- running parts of the encoder ----------------------------------------------------
    def encode(self, texts: list[str]) -> Batch:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
        mask = enc["attention_mask"]
        additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        return Batch(enc["input_ids"], mask, additive)

    def lower(self, batch: Batch, stop: int) -> torch.Tensor:
        """Token states entering layer `stop` (the embeddings for 0)."""
        h = self.model.embeddings(input_ids=batch.ids)
        for layer in list(self.layers)[:stop]:
            h = layer(h, attention_mask=batch.additive)
            h = h[0] if isinstance(h, tuple) else h
        return h

    def pooled(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        m = batch.mask[..., None].to(hidden.dtype)
        return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)

    def upper(self, hidden: torch.Tensor, batch: Batch, start: int) -> torch.Tensor:
        """Label logits from token states entering layer `start`."""
        h = hidden
        for layer in list(self.layers)[start:]:
            h = layer(h, attention_mask=batch.additive)
            h = h[0] if isinstance(h, tuple) else h
        return self.head(self.pooled(h, batch))

    @torch.no_grad()
    def features(self, texts: list[str], batch: int = 64) -> torch.Tensor:
        """The head's input (pooled last layer, no blocks) for many texts."""
        out = []
        for i in range(0, len(texts), batch):
            b = self.encode(texts[i:i + batch])
            out.append(self.pooled(self.lower(b, self.num_layers), b))
        return torch.cat(out)

    @torch.no_grad()
    def logits(self, texts: list[str], active: dict[str, ActiveBlocks] | None = None) -> torch.Tensor:
        """Label logits of `texts` with `active` blocks held (row i: text i's block)."""
        b = self.encode(texts)
        with self.lora(active):
            return self.upper(self.lower(b, 0), b, 0)

    @torch.no_grad()
    def keys_of(self, questions: list[str], layer: int, reduction: str, distance: str, batch: int = 64,
                chat: bool = True) -> torch.Tensor:
        """The neuron-index key: layer `layer`'s output averaged over each text's tokens
        (every reduction of a question means the whole text here; `chat` has no meaning)."""
        out = []
        for i in range(0, len(questions), batch):
            b = self.encode(questions[i:i + batch])
            h = self.lower(b, layer + 1)
            m = b.mask[..., None].to(h.dtype)
            k = (h * m).sum(1) / m.sum(1).clamp(min=1)
            out.append(F.normalize(k, dim=-1) if distance == "cosine" else k)
        return torch.cat(out)
