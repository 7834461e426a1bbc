"""What grows is registered by name: methods and benchmarks added at run time reach the
benchmark command line, unknown names fail in one line, and every architecture row points
at real modules of a model of its type."""
from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import pytest
from torch import nn

from melo_engine.architectures import ARCHITECTURES, architecture_for
from melo_engine.backbone import Backbone
from melo_engine.bench.__main__ import build_parser, main
from melo_engine.bench.base import Benchmark
from melo_engine.methods import EditingMethod
from melo_engine.registry import BENCHMARKS, METHODS


class TinyUnknown(nn.Module):
    """A two-layer model of a type no row knows, its layers where no probing would look."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(model_type="tinything", hidden_size=8, num_hidden_layers=2, vocab_size=16)
        self.embed = nn.Embedding(16, 8)
        self.body = nn.Module()
        self.body.blocks = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.ff = nn.Module()
            block.ff.out = nn.Linear(8, 8)
            self.body.blocks.append(block)
        self.requires_grad_(False)        # frozen, as load_model leaves a model

    def get_input_embeddings(self):
        return self.embed


def test_an_unknown_model_type_is_refused_in_one_line_naming_both_overrides():
    for make in (lambda: architecture_for(TinyUnknown()), lambda: Backbone(TinyUnknown(), None, "tiny")):
        with pytest.raises(ValueError) as err:
            make()
        msg = str(err.value)
        assert "\n" not in msg and "'tinything'" in msg and "--layers-path" in msg and "--lora-modules" in msg


def test_the_overrides_place_an_unknown_model():
    model = TinyUnknown()
    bb = Backbone(model, None, "tiny", layers_path="body.blocks", lora_modules=("ff.out",))
    assert bb.layers is model.body.blocks and bb.architecture.grace == "ff"
    assert bb.ensure_lora((1,), ("ff.out",)) == ["body.blocks.1.ff.out"]
    with pytest.raises(ValueError, match="body.layers") as err:
        Backbone(TinyUnknown(), None, "tiny", layers_path="body.layers", lora_modules=("ff.out",))
    assert "\n" not in str(err.value)


def _tiny_config(kind: str):
    from transformers import AutoConfig

    if kind == "gpt2":
        return AutoConfig.for_model(kind, vocab_size=128, n_embd=16, n_layer=2, n_head=2)
    if kind == "t5":
        return AutoConfig.for_model(kind, vocab_size=128, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)
    text = dict(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, pad_token_id=0)
    if kind == "gemma3":
        return AutoConfig.for_model(kind, text_config=text, vision_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
            patch_size=16))
    return AutoConfig.for_model(kind, **text)


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_each_architecture_row_names_real_modules(kind):
    from transformers import AutoModel

    from melo_engine.model import auto_class

    # An encoder is used bare (the classifier loads a BertModel); the others as their row's
    # kind loads them (decoders as causal LMs, T5 as a seq2seq LM).
    config = _tiny_config(kind)
    model = (AutoModel if kind == "bert" else auto_class(config)).from_config(config)
    arch = architecture_for(model)
    if arch.encoder_layers:
        assert len(model.get_submodule(arch.encoder_layers)) == 2
    assert arch is ARCHITECTURES[kind]
    layers = model.get_submodule(arch.layers)
    assert isinstance(layers, nn.ModuleList) and len(layers) == 2
    out = layers[0].get_submodule(arch.ffn_out)
    # GPT-2 keeps its FFN output in a Conv1D (weight stored transposed; lora.py wraps both).
    assert type(out).__name__ == ("Conv1D" if kind == "gpt2" else "Linear")
    assert out in set(layers[0].get_submodule(arch.grace).modules())


def test_the_bundled_model_is_a_llama(backbone):
    assert backbone.model.config.model_type == "llama"
    assert backbone.architecture == ARCHITECTURES["llama"]


class DoNothing(EditingMethod):
    """A method that edits nothing: the unedited model, under the shared interface."""

    name = "nothing"

    @classmethod
    def create(cls, backbone, workspace, settings=None, chat=True, ends=True):
        return cls()

    def edit(self, prompt, target):
        return {"seconds": 0.0, "params": 1}

    @contextlib.contextmanager
    def applied(self, prompts, last):
        yield

    def summary(self):
        return {"settings": {}}


@pytest.fixture
def registered():
    """Register (name, entry) pairs for one test; removed again after it."""
    added = []

    def add(table, name, entry):
        table.register(name, entry)
        added.append((table, name))
    yield add
    for table, name in added:
        table.unregister(name)


def test_a_method_registered_at_run_time_runs_in_the_edits_benchmark(backbone, monkeypatch, registered,
                                                                     tmp_path, capsys):
    monkeypatch.setattr(Backbone, "load", classmethod(lambda cls, name, *a, **k: backbone))
    assert main(["edits", "--n", "1", "--methods", "nothing"]) == 2       # not registered yet
    assert capsys.readouterr().err == "error: unknown method 'nothing' (melo, grace, lora)\n"
    registered(METHODS, "nothing", DoNothing)
    assert build_parser().parse_args(["edits"]).methods == "melo,grace,lora,nothing"
    out = tmp_path / "res.json"
    assert main(["edits", "--n", "1", "--methods", "nothing", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert list(res["methods"]) == ["nothing"] and res["methods"]["nothing"]["params_per_edit"] == 1


def test_a_benchmark_registered_at_run_time_is_a_subcommand(registered, tmp_path, capsys):
    def add_arguments(p):
        p.add_argument("--times", type=int, default=2)
        p.add_argument("--json", default=None)

    registered(BENCHMARKS, "twice", Benchmark("twice", "doubles a number", add_arguments,
                                              lambda args: {"result": 2 * args.times}))
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "doubles a number" in capsys.readouterr().out
    out = tmp_path / "twice.json"
    assert main(["twice", "--times", "21", "--json", str(out)]) == 0
    assert json.loads(out.read_text()) == {"result": 42}


def test_an_unknown_name_fails_in_one_line_listing_the_known_ones():
    with pytest.raises(ValueError) as err:
        METHODS.get("nope")
    assert str(err.value) == "unknown method 'nope' (melo, grace, lora)"


class CharacterKey:
    """A key source as a new file would hold it: letters counted, no model at all."""

    name = "characters"
    title = "Letter counts (a test's key source)"
    summary = "how often each letter occurs"
    why = "A key source registered at run time, to show what adding one touches."
    in_prefill = False
    default_whitened = False

    def dim(self, backbone) -> int:
        return 26

    def raw(self, backbone, cfg, questions):
        import torch

        counts = torch.tensor([[q.lower().count(chr(97 + i)) for i in range(26)] for q in questions], dtype=torch.float32)
        return torch.nn.functional.normalize(counts + 1e-6, dim=-1)

    def space(self, cfg) -> str:
        return "characters"

    def mode_suffix(self, cfg) -> str:
        return ""


def test_a_key_source_registered_at_run_time_reaches_the_cli_the_settings_and_the_keys(backbone):
    """One class (a new file's worth) and one registry line: the command line offers it, a
    workspace's settings accept it and name its key space, and a Keyer computes its keys."""
    from melo_engine.__main__ import build_parser as cli
    from melo_engine.config import MeloConfig
    from melo_engine.keys import Keyer
    from melo_engine.registry import KEY_SOURCES

    KEY_SOURCES.register("characters", CharacterKey)
    try:
        assert "characters" in cli()._actions[[a.dest for a in cli()._actions].index("key_source")].choices
        cfg = MeloConfig(key_source="characters").resolved(backbone.num_layers)
        cfg.validate()
        assert cfg.key_name() == "characters" and not cfg.whitened
        keys = Keyer(backbone, cfg).keys(["Which element has atomic number 6?", "abc"])
        assert keys.shape == (2, 26) and abs(float(keys[1].norm()) - 1) < 1e-5
    finally:
        KEY_SOURCES.unregister("characters")
    with pytest.raises(ValueError, match="unknown key source 'characters'"):
        MeloConfig(key_source="characters").validate()
