"""Cost of editing and routing on this machine: seconds per edit, routing time, generation
overhead of routing against the plain model, sizes on disk, model load time."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .base import Benchmark, add_router, key_source_choices, melo_settings, print_table
from .data import ROOT
from .machine import machine


def _load_seconds(cache: str, model: str) -> float:
    """Time to load `model` in a fresh process with MELO_CACHE=cache."""
    code = ("import time; t=time.perf_counter(); from melo_engine.model import load_model; "
            f"load_model({model!r}); print(time.perf_counter()-t)")
    env = dict(os.environ, MELO_CACHE=cache, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def speed(n_edits: int = 10, gen_tokens: int = 32, settings: dict | None = None, model: str | None = None) -> dict:
    from melo_engine import MeloEditor
    from melo_engine.backbone import Backbone
    from melo_engine.config import DEFAULT_MODEL, MeloConfig

    model = model or DEFAULT_MODEL
    with tempfile.TemporaryDirectory() as tmp:
        cold = _load_seconds(tmp, model)   # converts the GGUF into the empty cache
        cached = _load_seconds(tmp, model)  # loads the safetensors written just before

    bb = Backbone.load(model)          # on $MELO_DEVICE, else a GPU if there is one
    edits = json.loads((ROOT / "assets" / "example_edits.json").read_text())[:n_edits]
    unrelated = json.loads((ROOT / "assets" / "unrelated_questions.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        ed = MeloEditor.open(Path(tmp) / "ws", model=model, backbone=bb, config=MeloConfig(**(settings or {})))
        empty = ed.store.disk_bytes()
        results = [ed.edit(e["prompt"], e["target"]) for e in edits]
        grown = (ed.store.disk_bytes() - empty) // len(results)
        per_edit = [r.seconds for r in results]
        steps = [r.steps for r in results]

        # Routing = what a query costs to decide its block: its key (the sentence encoder, or
        # for the model's key the reduction inside the prefill that generation runs anyway),
        # the exact lookup, gathering the block.
        route_t = []
        prompts = [e["prompt"] for e in edits] + [e["paraphrase"] for e in edits] + unrelated

        def plain(q):
            return bb.generate(q, None, gen_tokens, min_new_tokens=gen_tokens, chat=ed.chat)

        def routed(q):
            return ed.generate(q, gen_tokens, gen_tokens, timer=route_t.append)[0]

        def tokens(text):
            # In the question-answer form a row stops at its first line break whatever the
            # minimum, so an edited answer and the plain one may differ in length: the fair
            # comparison is per token (the line break itself counted).
            return len(bb.tokenizer(text, add_special_tokens=False).input_ids) + 1
        plain(prompts[0]); routed(prompts[0])          # warm-up
        route_t.clear()
        t_plain, t_routed, n_plain, n_routed = [], [], [], []
        for q in prompts:                              # interleaved, so drift hits both alike
            t0 = time.perf_counter(); a = plain(q); t1 = time.perf_counter(); b = routed(q); t2 = time.perf_counter()
            t_plain.append(t1 - t0)
            t_routed.append(t2 - t1)
            n_plain.append(tokens(a))
            n_routed.append(tokens(b))
        fired = sum(1 for q in prompts if ed.route(q).block is not None)
        key_t = []
        for q in prompts:
            t0 = time.perf_counter(); ed.key(q); key_t.append(time.perf_counter() - t0)
        stats = ed.stats()
        key_name = ed.config.key_name()
        ed.close()

    return {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "model": model,
        "device": str(bb.device),
        "prompt_form": bb.prompt_form(ed.chat),
        "key": key_name,
        "edits": len(per_edit),
        "median_seconds_per_edit": statistics.median(per_edit),
        "max_seconds_per_edit": max(per_edit),
        "median_steps_per_edit": statistics.median(steps),
        "median_route_ms": 1000 * statistics.median(route_t),
        "median_standalone_key_ms": 1000 * statistics.median(key_t),
        "prompts_timed": len(prompts),
        "prompts_with_a_block": fired,
        "generation_seconds_plain": sum(t_plain),
        "generation_seconds_routed": sum(t_routed),
        "generation_overhead_percent": 100 * (sum(t_routed) / sum(t_plain) - 1),
        "generated_tokens_per_prompt": gen_tokens,
        # Per token of the texts as returned (re-tokenized): the same as above where every
        # row generates gen_tokens (a chat template), the fair one where rows stop early.
        "generated_tokens_plain": sum(n_plain),
        "generated_tokens_routed": sum(n_routed),
        "generation_overhead_per_token_percent":
            100 * ((sum(t_routed) / sum(n_routed)) / (sum(t_plain) / sum(n_plain)) - 1),
        "trainable_params_per_edit": stats["trainable_params_per_edit"],
        "bytes_per_edit_on_disk": grown,      # what the edits added, every file (chroma's too)
        "load_seconds_cold": cold,
        "load_seconds_cached": cached,
    }


def _add_arguments(p) -> None:
    p.add_argument("--edits", type=int, default=10)
    add_router(p)
    p.add_argument("--key-source", choices=key_source_choices(), default=None)
    p.add_argument("--model", default=None, help="another model than the bundled default (e.g. gemma3-270m)")
    p.add_argument("--json", default=None, help="also write the figures to this file")


def _run(args) -> dict:
    res = speed(args.edits, settings=melo_settings(args), model=args.model)
    print_table(res)
    return res


BENCH = Benchmark("speed", "seconds per edit, routing time, generation overhead, sizes, load time",
                  _add_arguments, _run)
