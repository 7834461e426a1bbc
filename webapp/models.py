"""The models a server offers, by name, each loaded once per process and then shared.

The default model is loaded at start (app.py) and handed in already loaded; every other
installed model waits until a visitor's workspace first needs it, is loaded then, under a
lock of its own (so a second visitor asking for it waits for the same load instead of
starting another, while visitors of other models never wait), and is kept for the life of
the process. A workspace is tied to the model it was made with (its header records the
name and fingerprint), so the pool opens each workspace on the backbone named there.

A model is a `ModelChoice`: how to load its backbone, and which editor class opens a
workspace on it (MeloEditor for a generating model; melo_engine.classifier's
ClassifierEditor for a classifier, whose `load` would be ClassifierBackbone.load). Bundled
generating models that are installed here (melo_engine.model.installed_models) are offered
by default; `ModelShelf.add` offers another.
"""
from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Callable

from melo_engine import MeloEditor


@dataclasses.dataclass(frozen=True)
class ModelChoice:
    """One model a workspace can be made with: `load()` returns its backbone (called at
    most once per process), `editor` opens a workspace on that backbone."""

    name: str
    load: Callable[[], object]
    editor: type = MeloEditor

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"a model needs a name, not {self.name!r}")
        if not callable(self.load):
            raise ValueError(f"model {self.name!r}: load must be callable")
        if not (isinstance(self.editor, type) and hasattr(self.editor, "open")):
            raise ValueError(f"model {self.name!r}: editor must be a class with open()")


def generating_model(name: str) -> ModelChoice:
    """A causal LM by name (a bundled short name, a hub id or a folder), loaded with the
    sentence encoder of the default key so its first question does not wait for it."""

    def load():
        from melo_engine.backbone import Backbone
        from melo_engine.keys import warm

        backbone = Backbone.load(name)
        warm(backbone)
        return backbone

    return ModelChoice(name, load)


def classifier_model(name: str) -> ModelChoice:
    """A bundled classifier (melo_engine.classifier) by name: its workspaces edit labels."""
    from melo_engine.classifier.backbone import ClassifierBackbone
    from melo_engine.classifier.editor import ClassifierEditor

    return ModelChoice(name, lambda: ClassifierBackbone.load(name), ClassifierEditor)


class ModelShelf:
    """Backbones by model name: `names` (the default first), `default`, `get(name)` (loads
    on first use), `loaded(name)`, `editor(name)` (the class that opens its workspaces) and
    `add(choice)`. An unknown name is refused in one line that lists the offered ones."""

    def __init__(self, default_backbone, choices: list[ModelChoice] = ()):
        self.default = default_backbone.name
        self._choices: dict[str, ModelChoice] = {}
        self._loaded: dict[str, object] = {self.default: default_backbone}
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self.add(ModelChoice(self.default, lambda: default_backbone))
        for choice in choices:
            self.add(choice)

    @classmethod
    def installed(cls, default_backbone) -> "ModelShelf":
        """The default backbone, every other bundled model installed here, and the bundled
        classifiers (their encoder is the default key's, always installed)."""
        from melo_engine.classifier.backbone import CLASSIFIERS
        from melo_engine.model import installed_models

        return cls(default_backbone, [generating_model(n) for n in installed_models() if n != default_backbone.name]
                   + [classifier_model(n) for n in CLASSIFIERS if n != default_backbone.name])

    def add(self, choice: ModelChoice) -> None:
        """Offer one more model (a name already offered keeps its first choice)."""
        with self._lock:
            self._choices.setdefault(choice.name, choice)
            self._loading.setdefault(choice.name, threading.Lock())

    @property
    def names(self) -> list[str]:
        with self._lock:
            return list(self._choices)

    def _choice(self, name: str) -> ModelChoice:
        with self._lock:
            choice = self._choices.get(name)
        if choice is None:
            raise ValueError(f"model {name!r} is not offered here (offered: {', '.join(self.names)})")
        return choice

    def loaded(self, name: str) -> bool:
        with self._lock:
            return name in self._loaded

    def get(self, name: str | None = None):
        """The named model's backbone (default: the default model's), loaded on first use."""
        name = self.default if name is None else name
        with self._lock:
            if name in self._loaded:
                return self._loaded[name]
        choice = self._choice(name)
        with self._loading[name]:                  # one load per model; others go on
            with self._lock:
                if name in self._loaded:
                    return self._loaded[name]
            backbone = choice.load()
            with self._lock:
                self._loaded[name] = backbone
            return backbone

    def editor(self, name: str | None = None) -> type:
        """The class that opens a workspace of the named model."""
        return self._choice(self.default if name is None else name).editor

    def footprint(self, name: str) -> "Footprint | None":
        """The named model's size: counted on its loaded weights, else read from the
        headers of its converted copy in the cache; None when neither is there yet."""
        with self._lock:
            backbone = self._loaded.get(name)
        return footprint(name, backbone)


@dataclasses.dataclass(frozen=True)
class Footprint:
    """A model's parameter count and the bytes its weights take in memory."""

    parameters: int
    weight_bytes: int


def footprint(name: str, backbone=None) -> Footprint | None:
    """A model's size: counted on `backbone`'s weights when it is loaded, else read from the
    headers of its converted copy in the cache; None when neither is there."""
    model = getattr(backbone, "model", None)
    if model is not None:
        params = list(model.parameters())
        return Footprint(sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params))
    from melo_engine.model import cache_dir

    return cached_footprint(cache_dir() / "models" / name)


def cached_footprint(folder: Path) -> Footprint | None:
    """Parameters and bytes of the safetensors files in `folder` (read from their headers,
    nothing loaded); None when there are none."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []
    if not files:
        return None
    params = size = 0
    try:
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    piece = st.get_slice(key)
                    n = 1
                    for d in piece.get_shape():
                        n *= int(d)
                    params += n
                    size += n * _BYTES.get(piece.get_dtype(), 4)
    except (OSError, ValueError, RuntimeError):
        return None
    return Footprint(params, size)


_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def licence(name: str) -> str:
    """The licence of a model the page offers: a classifier's (its encoder's and its data's)
    or a language model's (melo_engine.model.licence)."""
    from melo_engine.classifier.backbone import CLASSIFIERS
    from melo_engine.model import licence as model_licence

    return CLASSIFIERS[name].licence if name in CLASSIFIERS else model_licence(name)
