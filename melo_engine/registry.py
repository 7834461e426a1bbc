"""Everything that grows, registered by name: key sources, editing methods, benchmarks.

Each table maps a name to "module:attribute", imported only when that entry is used, so
the command line and the page can list the choices without loading a model, and this
module imports nothing of the engine (no circle). Adding a key source, a method or a
benchmark is one new file plus one line here; `register` adds one at run time (a plugin,
a test). Per-architecture defaults live in their own table (architectures.py), keyed by
the model's `model_type`.
"""
from __future__ import annotations

import importlib


class Registry:
    """Named entries of one kind. `get` imports the entry on first use; an unknown name is
    refused in one line that lists the known ones."""

    def __init__(self, kind: str, entries: dict[str, str]):
        self.kind = kind
        self._where = dict(entries)        # name -> "module:attribute"
        self._loaded: dict[str, object] = {}

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name) -> bool:
        return name in self._where

    def check(self, name) -> str:
        if name not in self._where:
            raise ValueError(f"unknown {self.kind} {name!r} ({', '.join(self._where)})")
        return name

    def get(self, name):
        self.check(name)
        if name not in self._loaded:
            module, _, attr = self._where[name].partition(":")
            self._loaded[name] = getattr(importlib.import_module(module), attr)
        return self._loaded[name]

    def items(self):
        return [(n, self.get(n)) for n in self._where]

    def register(self, name: str, entry) -> None:
        """Add an entry (an object, or a "module:attribute" string); a name is taken once."""
        if name in self._where:
            raise ValueError(f"{self.kind} {name!r} is registered already")
        if isinstance(entry, str):
            self._where[name] = entry
        else:
            self._where[name] = f"{getattr(entry, '__module__', '')}:{getattr(entry, '__qualname__', name)}"
            self._loaded[name] = entry

    def unregister(self, name: str) -> None:
        self._where.pop(name, None)
        self._loaded.pop(name, None)


# What turns a question into a routing key (keys.py: the KeySource interface).
KEY_SOURCES = Registry("key source", {
    "sentence": "melo_engine.keysources.sentence:SentenceKey",
    "model": "melo_engine.keysources.model:ModelKey",
})

# Editing methods under one interface (methods/base.py), compared by the benchmarks.
METHODS = Registry("method", {
    "melo": "melo_engine.methods.melo:MeloMethod",
    "grace": "melo_engine.methods.grace:GraceMethod",
    "lora": "melo_engine.methods.lora:LoRAMethod",
})

# How the engine runs a model of each kind (architectures.py: a row's `kind`): the Backbone
# class that encodes, keys, trains and generates for it.
BACKBONES = Registry("model kind", {
    "causal": "melo_engine.backbone:Backbone",
    "seq2seq": "melo_engine.seq2seq:Seq2SeqBackbone",
})

# Benchmarks: each module names itself and adds its own arguments (bench/__main__.py).
BENCHMARKS = Registry("benchmark", {
    "speed": "melo_engine.bench.speed:BENCH",
    "keys": "melo_engine.bench.keys:BENCH",
    "layers": "melo_engine.bench.layers:BENCH",
    "edits": "melo_engine.bench.edits:BENCH",
    "routing": "melo_engine.bench.routing:BENCH",
    "standin": "melo_engine.bench.hallucination:STANDIN_BENCH",
    "scale": "melo_engine.bench.scale:BENCH",
    "probebank": "melo_engine.bench.probebank:BENCH",
    "siblings": "melo_engine.bench.siblings:BENCH",
    "classify": "melo_engine.bench.classify:BENCH",
    "burst": "melo_engine.bench.burst:BENCH",
})
