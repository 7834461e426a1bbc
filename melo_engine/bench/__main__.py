"""python -m melo_engine.bench NAME [...] (the names: registry.BENCHMARKS): prints a table and, with
--json OUT, writes the figures. Each subcommand is a benchmark of registry.BENCHMARKS, which
adds its own arguments (bench/base.py)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from melo_engine.model import quiet_env
from melo_engine.registry import BENCHMARKS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m melo_engine.bench")
    sub = p.add_subparsers(dest="what", required=True)
    for name, bench in BENCHMARKS.items():
        bench.add_arguments(sub.add_parser(name, help=bench.help))
    return p


def main(argv=None) -> int:
    quiet_env(offline=True)
    args = build_parser().parse_args(argv)
    res = BENCHMARKS.get(args.what).run(args)
    if isinstance(res, int):          # an error, or a benchmark that wrote its own files
        return res
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
