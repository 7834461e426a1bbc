"""Keys: what turns a question into the vector the cluster index routes by.

A key source (registry.KEY_SOURCES; one file each under keysources/) gives a raw vector of
unit length per question; the sources are first-class and researchers compare them:
"sentence" (a sentence encoder, the default) and "model" (the paper's neuron index).

Either can be *whitened*: multiplied by the inverse square root of the covariance of key
differences within paraphrase pairs (shrunk toward the identity), then normalised. That is
within-class covariance normalisation: directions in which paraphrases of one question
differ (wording, template) shrink, directions that tell subjects apart grow. The
transform is fitted once per model and source on reference paraphrase pairs (refdata.py)
and cached.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import cache_dir, cached_tensors
from .refdata import whitening_pairs
from .registry import KEY_SOURCES


class KeySource:
    """The interface of a key source. `title` labels it in the page, `summary` says what the
    key is and `why` when to use it (words only: measured figures live in docs/results)."""

    name = ""
    title = ""
    summary = ""
    why = ""
    in_prefill = False        # the key can be taken inside the generation's prefill forward
    default_whitened = False  # whitened unless the workspace says otherwise

    def dim(self, backbone) -> int:
        raise NotImplementedError

    def raw(self, backbone, cfg, questions: list[str]) -> torch.Tensor:
        """Unit vectors [len(questions), dim]."""
        raise NotImplementedError

    def space(self, cfg) -> str:
        """Names the raw key space: keys compare only within one."""
        raise NotImplementedError

    def mode_suffix(self, cfg) -> str:
        """Added after the whitening mark when the prompt mode changes the keys."""
        return ""


def source_of(cfg) -> KeySource:
    return KEY_SOURCES.get(cfg.key_source)()


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

    `raw` is the source's own vector (unit length), `finish` the whitening on top. A source
    that can take its raw key inside the prefill forward (`in_prefill`) only needs `finish`
    there; the others compute the key before generation.
    """

    def __init__(self, backbone, cfg):
        self.backbone = backbone
        self.cfg = cfg
        self.source = source_of(cfg)
        self.in_prefill = self.source.in_prefill
        self.whitening = whitening_for(self) if cfg.whitened else None

    @property
    def dim(self) -> int:
        return self.source.dim(self.backbone)

    def raw(self, questions: list[str]) -> torch.Tensor:
        return self.source.raw(self.backbone, self.cfg, questions)

    def finish(self, raw: torch.Tensor) -> torch.Tensor:
        return raw if self.whitening is None else self.whitening.apply(raw)

    def keys(self, questions: list[str]) -> torch.Tensor:
        return self.finish(self.raw(questions))


# Whitening shrinkage (the key study compared several: docs/BENCHMARKS.md).
WHITENING_SHRINK = 0.1


def whitening_for(keyer: Keyer) -> Whitening:
    """The cached whitening for this model and key setting (fitted on first use)."""
    cfg, bb = keyer.cfg, keyer.backbone

    def fit():
        a, b = whitening_pairs()
        w = Whitening.fit(keyer.raw(a), keyer.raw(b), WHITENING_SHRINK)
        return {"matrix": w.matrix}, {"pairs": str(w.pairs)}

    path = cache_dir() / "whitening" / f"{cfg.model}-{cfg.key_name()}-s{WHITENING_SHRINK}.safetensors"
    tensors, meta = cached_tensors(path, bb.fingerprint, fit)
    return Whitening(tensors["matrix"], int(meta["pairs"]), WHITENING_SHRINK)


def warm(backbone, cfg=None) -> Keyer:
    """A Keyer for `cfg` (default settings), built ahead of the first question: loads the key
    source's own model and the whitening, so a server's first visitor does not wait."""
    from .config import MeloConfig

    return Keyer(backbone, (cfg or MeloConfig()).for_backbone(backbone))
