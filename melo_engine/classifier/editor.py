"""A classifier workspace: a MeloEditor whose edits are (text, correct label).

Everything but the forward is the question workspace's: the key goes into the same index
(a label is the edit's "answer", so same-label edits join a cluster and a conflicting one
supersedes or splits by the same rules), the block is committed by the same journal, undo,
export/import and the side-effect check work unchanged. What differs is what a block
learns (the label's cross-entropy through the upper layers and the head) and what an
input gets back (a label with the probability of each, and the block that fired).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .. import answering, editing, settings
from ..config import EDIT_SETTINGS, MeloConfig
from ..editor import MeloEditor
from ..records import EditResult, TrainedEdit
from ..train import Trained, fit_block
from .backbone import CLASSIFIERS, ClassifierBackbone, is_classifier, load_rows


def is_classifier_workspace(workspace, model: str | None = None) -> bool:
    """Whether `workspace` is (or, new, will be with `model`) a classifier workspace: its
    saved settings name a classifier as the model."""
    import json
    from pathlib import Path

    from .. import store

    saved = Path(workspace).expanduser() / store.CONFIG
    if saved.is_file():
        try:
            return is_classifier(json.loads(saved.read_text()).get("model"))
        except (OSError, ValueError, AttributeError):
            return False            # MeloEditor.open says what is wrong with it
    return is_classifier(model)


def classifier_config(model: str = "minilm-wordnet", **changes) -> MeloConfig:
    """A classifier workspace's defaults: the paper's BERT recipe scaled to 6 layers (key:
    layer 2's output, the paper's layer 4 of 12; blocks on the FFN output of the top two
    layers, the paper's 9-11 of 12), the neuron index unwhitened, lr and steps as the paper.
    The prompt mode means nothing to a classifier; it stays "chat" so that the radius is
    calibrated by the question rule (calibrate.py), not by the passage rule of completion mode."""
    base = dict(model=model, key_source="model", key_whitening=False, key_layer=2, key_reduction="mean",
                lora_layers=(4, 5), lora_modules=("output.dense",), lr=1e-2, max_iters=50, stop_loss=0.1)
    return MeloConfig(**dict(base, **changes))


@dataclass
class Classified:
    """What a classifier workspace says about one text."""

    text: str
    label: str
    probabilities: dict[str, float]
    block: int | None
    edit_id: str | None
    distance: float | None
    radius: float | None
    base_label: str | None = None
    base_probabilities: dict[str, float] | None = None
    cluster: str | None = None
    seconds: float = 0.0
    key: list[float] | None = None      # the text's routing key (probe: for the index map)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def train_label_block(bb: ClassifierBackbone, text: str, label: int, modules: list[str], cfg: MeloConfig,
                      seed: int = 0, progress: Callable[[int, float], None] | None = None,
                      start_from: dict | None = None) -> Trained:
    """Fit a block so that `text` gets `label`: cross-entropy through the upper layers and
    the head, the frozen lower layers computed once. `start_from` continues a block (as
    stored: B scaled), for the plain-LoRA baseline."""
    first = min(cfg.lora_layers)
    batch = bb.encode([text])
    with torch.no_grad():
        hidden = bb.lower(batch, first)
    target = torch.tensor([label])

    def loss_of(active):
        with bb.lora(active):
            logits = bb.upper(hidden, batch, first)
        return F.cross_entropy(logits, target), float(logits.argmax(-1).item() == label)

    return fit_block(bb, modules, cfg, loss_of, seed, progress, start_from)


class ClassifierEditor(MeloEditor):
    """Classify, edit (text -> label), undo, export: MELO on a classifier."""

    @classmethod
    def open(cls, workspace, model: str | None = None, config: MeloConfig | None = None,
             backbone: ClassifierBackbone | None = None, read_only: bool = False,
             device: str | None = None) -> "ClassifierEditor":
        if device not in (None, "auto", "cpu"):
            raise ValueError("a classifier workspace runs on the CPU (its encoder is small): leave --device out")
        name = model or (config.model if config else None) or "minilm-wordnet"
        if not is_classifier(name):
            raise ValueError(f"{name!r} is not a classifier")
        backbone = backbone or ClassifierBackbone.load(name)
        return super().open(workspace, model=model, config=config or classifier_config(name), backbone=backbone,
                            read_only=read_only)

    @property
    def labels(self) -> list[str]:
        return list(self.backbone.labels)

    def check_label(self, label) -> int:
        """The label's index; anything else is refused in one line that lists the labels."""
        if isinstance(label, str) and label.strip().lower() in self.backbone.labels:
            return self.backbone.labels.index(label.strip().lower())
        raise ValueError(f"unknown label {label!r} (labels: {', '.join(self.backbone.labels)})")

    def model_info(self) -> dict:
        """As MeloEditor's, for a classifier: the text reaches the encoder whole, no prompt."""
        from ..model import licence
        from .backbone import CLASSIFIERS

        entry = CLASSIFIERS.get(self.config.model)
        return {"model": self.config.model, "prompt_form": "classification", "device": "cpu",
                "licence": entry.licence if entry else licence(self.config.model)}

    def default_settings(self) -> dict:
        """The settings a new classifier workspace starts with (classifier_config's)."""
        fresh = classifier_config(self.config.model)
        return dict(settings.default_settings(self), **{k: getattr(fresh, k) for k in EDIT_SETTINGS if k != "init_radius"})

    def reference_texts(self) -> list[str]:
        """The side-effect check's texts: the upstream test split (the benchmark's TRR texts,
        which an edit should leave alone; keyed once, then cached on disk)."""
        return self.backbone.companion("reference texts", lambda: [
            r["text"] for r in load_rows(CLASSIFIERS[self.config.model].data) if r["split"] == "test"])

    def examples(self, n: int | None = None) -> list[dict]:
        """Texts worth editing, {text, label, predicted}: from the edit split (the shifted
        topics), ones the unedited classifier labels wrong, one per true label in label
        order (the first `n`, default all), so the examples show several kinds of mistake.
        Computed once per loaded classifier."""
        def find():
            rows = [r for r in load_rows(CLASSIFIERS[self.config.model].data) if r["split"] == "edit"]
            out, seen = [], set()
            for i in range(0, len(rows), 64):
                chunk = [r for r in rows[i:i + 64] if r["label"] not in seen]
                if not chunk:
                    continue
                got = self.backbone.logits([r["text"] for r in chunk]).argmax(-1).tolist()
                for r, g in zip(chunk, got):
                    predicted = self.backbone.labels[g]
                    if predicted != r["label"] and r["label"] not in seen:
                        seen.add(r["label"])
                        out.append({"text": r["text"], "label": r["label"], "predicted": predicted})
                if len(seen) == len(self.backbone.labels):
                    break
            return sorted(out, key=lambda e: e["label"])

        return self.backbone.companion("classifier examples", find)[:n]

    # ---- classifying ---------------------------------------------------------------------
    def _read(self, texts: list[str], compare_base: bool, with_keys: bool = False) -> list[Classified]:
        t0 = time.perf_counter()
        keys, words = answering.keyed(self, texts)
        with self.ws.state_lock:
            routes = [answering.decide(self, k, t, w) for k, t, w in zip(keys, texts, words)]
            active = self.ws.bank.gather([r.block for r in routes], self.modules)
        probs = torch.softmax(self.backbone.logits(texts, active), -1)
        fired = [i for i, r in enumerate(routes) if r.block is not None]
        base = probs.clone()
        if compare_base and fired:
            # A text routed to no block *is* the unedited model; only the fired ones rerun.
            base[fired] = torch.softmax(self.backbone.logits([texts[i] for i in fired]), -1)
        labels = self.backbone.labels
        out = []
        for i, (t, r) in enumerate(zip(texts, routes)):
            p = dict(zip(labels, probs[i].tolist()))
            c = Classified(t, labels[int(probs[i].argmax())], p, r.block, r.edit_id, r.distance, r.radius,
                           cluster=r.cluster)
            if compare_base:
                c.base_label = labels[int(base[i].argmax())]
                c.base_probabilities = dict(zip(labels, base[i].tolist()))
            if with_keys:
                c.key = keys[i].float().tolist()
            out.append(c)
        seconds = (time.perf_counter() - t0) / len(out)
        for c in out:
            c.seconds = seconds
        return out

    def classify(self, text: str, compare_base: bool = False) -> Classified:
        """The label the edited classifier gives `text`, each label's probability and the
        block that fired (if any); with `compare_base` the unedited classifier's beside it."""
        return self._read([self._check(text, "the text")], compare_base)[0]

    def classify_many(self, texts: list[str]) -> list[Classified]:
        """Probe: many texts, each with the unedited label beside it and its key (for the map)."""
        if not isinstance(texts, (list, tuple)) or not texts:
            raise ValueError("no texts to classify")
        return self._read([self._check(t, f"text {i + 1}") for i, t in enumerate(texts)], True, with_keys=True)

    def ask(self, question: str, compare_base: bool = False):
        raise ValueError("a classifier workspace classifies texts: use classify")

    def probe(self, questions, workers=None):
        raise ValueError("a classifier workspace classifies texts: use classify_many")

    # ---- editing -------------------------------------------------------------------------
    def train(self, prompt: str, target: str, progress: Callable[[int, float], None] | None = None,
              prefix: str | None = None, end: bool = False) -> TrainedEdit:
        """Train the block that gives `prompt` (a text) the label `target`; nothing written."""
        self.ws.writable()
        if prefix is not None:
            raise ValueError("a classifier edit is a text and a label; there are no sentences to correct")
        text = self._check(prompt, "the text")
        label = self.check_label(target)
        with self.ws.lock:
            t0 = time.perf_counter()
            key = self.keyer.keys([text])[0]
            trained = train_label_block(self.backbone, text, label, self.modules, self.config,
                                        seed=len(self.ws.entries), progress=progress)
        return TrainedEdit(text, self.backbone.labels[label], key, trained, t0)

    def commit(self, pending: TrainedEdit) -> EditResult:
        self.ws.writable()
        return editing.commit(self, pending)

    def correct(self, *args, **kwargs):
        raise ValueError("a classifier edit is a text and a label; there are no sentences to correct")
