"""Benchmarks, one module a part:

- `base`: what a benchmark is to the command line (a name, its arguments, a run);
- `data`: the streams (which prompts are edited toward what, and what measures them);
- `edits`: sequential editing, MELO against GRACE and plain LoRA;
- `hallucination`: the paper's third task, wrong sentences of passages corrected in place,
  measured by perplexity (and the stand-in passages it runs on here);
- `classify`: the paper's first task, a BERT classifier edited on a shifted split (also
  `edits --dataset classification`);
- `keys`: which key source routes paraphrases best at a fixed locality;
- `routing`: where the index of N edits sends prompts and held-out phrasings, no training;
- `speed`: cost of editing and routing on this machine.

`python -m melo_engine.bench {speed,keys,edits,routing,scale,layers,standin}` runs them (see __main__.py),
as registered in registry.BENCHMARKS.
Numbers are measured, never asserted: docs/BENCHMARKS.md records them with machine and date.
"""
from .data import Stream, load_stream
from .edits import edits_benchmark
from .hallucination import hallucination_benchmark
from .machine import machine
from .routing import routing_study

__all__ = ["Stream", "load_stream", "edits_benchmark", "hallucination_benchmark", "machine", "routing_study"]
