"""What a benchmark is to the command line: a name, a line of help, its own arguments and a
run. Each bench module holds one `BENCH` (registry.BENCHMARKS finds it by name), so a new
benchmark is one module and one registry line, and __main__.py lists none of them."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from melo_engine.registry import KEY_SOURCES, METHODS


@dataclass(frozen=True)
class Benchmark:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    # The figures (__main__ writes them to --json), or an exit status when there is nothing
    # to write (an error, or a benchmark that writes its own files).
    run: Callable[[argparse.Namespace], "dict | int"]


def key_source_choices() -> list[str]:
    # Sorted: the help has always listed them as {model,sentence}.
    return sorted(KEY_SOURCES.names())


def default_methods() -> str:
    return ",".join(METHODS.names())


def method_names(text: str) -> list[str]:
    """The methods of a --methods list, checked before any model loads: an unknown name
    fails in one line that lists the registered ones."""
    return [METHODS.check(m.strip()) for m in text.split(",") if m.strip()]


def melo_settings(args: argparse.Namespace) -> dict:
    """MeloConfig fields the command line set (those a benchmark has and that were given)."""
    settings = {"key_source": args.key_source} if getattr(args, "key_source", None) else {}
    if getattr(args, "block_dtype", None):
        settings["block_dtype"] = args.block_dtype
    if getattr(args, "radius", None) is not None:
        settings["init_radius"] = args.radius
    if getattr(args, "router", None):
        settings["router"] = args.router
    return settings


def add_router(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router", choices=["verified", "radius"], default=None,
                   help="MELO's router: the verifier decides among the edits within the radius (default), "
                        "or the nearest fires (the paper's rule, router.py)")


def json_checkpoint(args: argparse.Namespace) -> Callable[[dict], None]:
    """Writes a long run's figures so far to --json at each checkpoint, so a run that is
    stopped still leaves its curve."""
    def write(partial: dict) -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(partial, indent=1))
    return write


def print_table(res: dict) -> None:
    width = max(len(k) for k in res)
    for k, v in res.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
