"""The files of a workspace, and the one way they change: a commit that is all or nothing.

    ws/
      workspace.json        edit log, cluster metadata, the model's fingerprint, generation n
      config.json           MeloConfig
      state-<n>.safetensors LoRA blocks, edit keys and cluster centers of generation n
      index/                chromadb (a mirror of the above; rebuilt if it lags behind)

A commit writes state-<n+1>.safetensors, then replaces workspace.json (os.replace is
atomic), then deletes state-<n>. A process killed before the replace leaves generation n
whole; a stray state file of a newer generation is removed when the workspace is opened.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LOG = "workspace.json"
CONFIG = "config.json"
INDEX_DIR = "index"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


def state_file(ws: Path, gen: int) -> Path:
    return Path(ws) / f"state-{gen}.safetensors"


def read_log(ws: Path) -> dict | None:
    p = Path(ws) / LOG
    return json.loads(p.read_text()) if p.is_file() else None


def read_tensors(ws: Path, gen: int) -> dict[str, torch.Tensor]:
    p = state_file(ws, gen)
    return load_file(str(p)) if p.is_file() else {}


def commit(ws: Path, log: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Make (log, tensors) the workspace's state as generation log["gen"] (= old gen + 1)."""
    ws = Path(ws)
    gen = int(log["gen"])
    fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".safetensors", dir=ws)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, state_file(ws, gen))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    atomic_write_json(ws / LOG, log)
    remove_stale(ws, gen)


def remove_stale(ws: Path, gen: int) -> None:
    """Delete state files and temporaries that are not generation `gen`."""
    for p in Path(ws).iterdir():
        stale_state = p.name.startswith("state-") and p.name != state_file(ws, gen).name
        if stale_state or (p.name.startswith(".") and p.is_file()):
            p.unlink(missing_ok=True)
