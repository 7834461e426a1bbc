"""MELO, GRACE and plain LoRA on a classifier, under one small interface (edit a text to a
label; predict labels), so the classification benchmark measures them alike.

- MELO: a ClassifierEditor in a workspace of its own (one block per edit, routed by the index).
- LoRA: one adapter the size of one MELO block, trained on each edit in turn, always on.
- GRACE: a codebook at one layer. Key: that layer's input averaged over the text; value: a
  vector that replaces the layer's output at every token when the key is within an entry's
  radius. Entries grow, widen and split by GRACE's rules (as methods/grace.py for questions).
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..lora import ActiveBlocks
from ..methods.grace import Codebook
from .backbone import ClassifierBackbone
from .editor import ClassifierEditor, classifier_config, train_label_block


class ClassifierMethod:
    name = ""

    def edit(self, text: str, label: str) -> dict:
        """Make one edit; {"seconds", "params"} of it."""
        raise NotImplementedError

    def predict(self, texts: list[str]) -> list[str]:
        raise NotImplementedError

    def summary(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class MeloClassifier(ClassifierMethod):
    name = "melo"

    def __init__(self, bb: ClassifierBackbone, workspace: Path, settings: dict | None = None):
        self.editor = ClassifierEditor.open(workspace, config=classifier_config(bb.name, **(settings or {})),
                                            backbone=bb)

    def edit(self, text, label):
        r = self.editor.edit(text, label)
        return {"seconds": r.seconds, "params": r.params, "action": r.action}

    def predict(self, texts):
        return [c.label for c in self.editor._read(texts, False)]

    def summary(self):
        edits = self.editor.edits()
        return {"clusters": self.editor.stats()["clusters"],
                "superseded": sum(e["status"] == "superseded" for e in edits),
                "settings": self.editor.config.to_json()}

    def close(self):
        self.editor.close()


class LoRAClassifier(ClassifierMethod):
    name = "lora"

    def __init__(self, bb: ClassifierBackbone, workspace: Path | None = None, settings: dict | None = None):
        self.bb = bb
        self.config = classifier_config(bb.name, **(settings or {})).resolved(bb.num_layers)
        self.modules = bb.ensure_lora(self.config.lora_layers, self.config.lora_modules)
        self.block = None

    def edit(self, text, label):
        t0 = time.perf_counter()
        trained = train_label_block(self.bb, text, self.bb.labels.index(label), self.modules, self.config,
                                    start_from=self.block)
        self.block = trained.matrices
        return {"seconds": time.perf_counter() - t0, "params": trained.params}

    def predict(self, texts):
        active = None
        if self.block is not None:
            n = len(texts)
            active = {m: ActiveBlocks(a[None].expand(n, -1, -1), b[None].expand(n, -1, -1), torch.ones(n, dtype=torch.bool))
                      for m, (a, b) in self.block.items()}
        return [self.bb.labels[i] for i in self.bb.logits(texts, active).argmax(-1).tolist()]


class GraceClassifier(ClassifierMethod):
    name = "grace"

    def __init__(self, bb: ClassifierBackbone, workspace: Path | None = None, settings: dict | None = None):
        from ..calibrate import calibrated_radius

        s = dict(layer=4, lr=1.0, max_iters=60, stop_loss=0.1, init_radius=None, **(settings or {}))
        self.bb, self.layer = bb, int(s["layer"])
        self.lr, self.max_iters, self.stop_loss = float(s["lr"]), int(s["max_iters"]), float(s["stop_loss"])
        # The radius by the same rule as MELO's neuron index, in GRACE's own key space.
        probe = classifier_config(bb.name, key_layer=self.layer - 1, distance="l2",
                                  lora_layers=(bb.num_layers - 1,))
        self.init_radius = s["init_radius"] or calibrated_radius(bb, probe)
        self.codebook = Codebook()

    def keys(self, texts):
        return self.bb.keys_of(texts, self.layer - 1, "mean", "l2")

    @contextlib.contextmanager
    def _replacing(self, values: list[torch.Tensor | None]):
        if all(v is None for v in values):
            yield
            return
        on = torch.tensor([v is not None for v in values])[:, None, None]
        ref = next(v for v in values if v is not None)
        value = torch.stack([v if v is not None else torch.zeros_like(ref) for v in values])[:, None, :]

        def hook(_module, _args, out):
            h = out[0] if isinstance(out, tuple) else out
            h = torch.where(on, value.expand_as(h), h)
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = self.bb.layers[self.layer].register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def edit(self, text, label):
        t0 = time.perf_counter()
        bb = self.bb
        batch = bb.encode([text])
        key = self.keys([text])[0]
        with torch.no_grad():
            hidden = bb.lower(batch, self.layer)
            start = bb.lower(batch, self.layer + 1)[0].mean(0)     # start from the layer's own output
        value = start.clone().requires_grad_()
        opt = torch.optim.Adam([value], lr=self.lr)
        target = torch.tensor([bb.labels.index(label)])
        for _ in range(self.max_iters):
            with self._replacing([value]):
                logits = bb.upper(hidden, batch, self.layer)
            loss = F.cross_entropy(logits, target)
            if int(logits.argmax()) == int(target) and loss.item() < self.stop_loss:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.codebook.add(key, value.detach().clone(), self.init_radius, label)
        return {"seconds": time.perf_counter() - t0, "params": int(value.numel())}

    def predict(self, texts):
        values = [self.codebook.value(k) for k in self.keys(texts)]
        with self._replacing(values):
            logits = self.bb.logits(texts)
        return [self.bb.labels[i] for i in logits.argmax(-1).tolist()]

    def summary(self):
        return {"entries": len(self.codebook), "init_radius": self.init_radius, "layer": self.layer}


# The classification benchmark's methods by name (the same names as registry.METHODS).
CLASSIFIER_METHODS = {"melo": MeloClassifier, "grace": GraceClassifier, "lora": LoRAClassifier}
