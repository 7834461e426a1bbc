"""python -m melo_engine.bench NAME [...] (the names: registry.BENCHMARKS): prints a table and, with
--json OUT, writes the figures. Each subcommand is a benchmark of registry.BENCHMARKS, which
adds its own arguments (bench/base.py)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

from melo_engine.model import quiet_env
from melo_engine.registry import BENCHMARKS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m melo_engine.bench")
    sub = p.add_subparsers(dest="what", required=True)
    for name, bench in BENCHMARKS.items():
        bench.add_arguments(sub.add_parser(name, help=bench.help))
    return p


def die_with_parent() -> None:
    """With MELO_PARENT_PID set (the web app's benchmark lane sets it), exit as soon as that
    process is gone: a run is nobody's once the app that showed it has died."""
    parent = os.environ.get("MELO_PARENT_PID")
    if not parent:
        return

    def watch():
        while os.getppid() == int(parent):
            time.sleep(1)
        os._exit(3)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv=None) -> int:
    quiet_env(offline=True)
    die_with_parent()
    args = build_parser().parse_args(argv)
    res = BENCHMARKS.get(args.what).run(args)
    if isinstance(res, int):          # an error, or a benchmark that wrote its own files
        return res
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
