"""Measured figures the page shows, read from the results files (docs/results/*.json), never
typed into its text: a finished benchmark's table, and how often each key source brings a
paraphrase to its edit. A missing or unreadable file leaves the figure out."""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
COLUMNS = ["method", "edit success", "retention", "generality", "locality", "s / edit", "params / edit"]
# All four scores are teacher-forced token accuracy: the share of answer tokens the model
# predicts right given the tokens before them (the paper's measure), from 0 to 1.
DATASETS = {"zsre": "zsRE", "counterfact": "CounterFact"}


def read(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def table_rows(res: dict) -> list[list]:
    """One row per method of an edits benchmark (`melo_engine.bench edits`), in COLUMNS order."""
    return [[name, round(m["edit_success"], 3), round(m["retention"], 3), round(m["generality"], 3),
             round(m["locality"], 3), round(m["seconds_per_edit"], 2), m["params_per_edit"]]
            for name, m in res["methods"].items()]


def _is_edits_run(res: dict | None) -> bool:
    methods = res.get("methods") if res else None
    return isinstance(methods, dict) and bool(methods) and all(
        isinstance(m, dict) and {"edit_success", "retention", "retention_curve"} <= set(m) for m in methods.values())


def benchmark_runs(folder: Path = RESULTS) -> list[str]:
    """The results files that hold an edits benchmark (names without .json), the largest runs
    first, MELO's first among runs of one size."""
    runs = [(p.stem, res.get("n") or 0, "melo" not in res["methods"]) for p in sorted(folder.glob("*.json"))
            if _is_edits_run(res := read(p))]
    return [name for name, *_ in sorted(runs, key=lambda r: (-int(r[1]) if isinstance(r[1], int) else 0, r[2]))]


def benchmark_run(name: str, folder: Path = RESULTS) -> dict:
    """One published run; ValueError for a name that is not one (the menu offers only those)."""
    if not isinstance(name, str) or name not in benchmark_runs(folder):
        raise ValueError("choose one of the published runs")
    return read(folder / f"{name}.json")


def caption(name: str, res: dict) -> str:
    """Where a published run's figures come from, in one line (Markdown)."""
    what = [DATASETS.get(res.get("dataset"), res.get("dataset")), res.get("protocol") and f"{res['protocol']} protocol",
            res.get("n") and f"{res['n']} edits", res.get("model"), res.get("date"), res.get("machine")]
    return f"**{name}.json** (docs/results): " + ", ".join(str(w) for w in what if w) + "."


def key_figures(source: str, whitened: bool, folder: Path = RESULTS) -> str:
    """How many held-out paraphrases reach their edit with this key at its calibrated radius,
    per dataset, from the key study (docs/results/keys.json); "" when it is not there."""
    res = read(folder / "keys.json")
    whitening = "zsre-half" if whitened else "none"      # the engine's whitening, as the study names it
    rows = [r for r in (res or {}).get("rows", []) if isinstance(r, dict) and r.get("source") == source
            and r.get("whitening") == whitening and isinstance(r.get("generality_at_calibrated"), (int, float))]
    if not rows:
        return ""
    shares = " and ".join(f"{100 * r['generality_at_calibrated']:.0f} % of {DATASETS.get(r['dataset'], r['dataset'])}'s"
                          for r in rows)
    return f"In the key study (docs/results/keys.json), {shares} held-out paraphrases reach their edit at this key's calibrated radius."
