"""MELO on every decoder family of the architecture table, each a tiny randomly initialised
model made from its config here (no hub, no download) with a tokenizer trained here: an
edit's own prompt gives its target, an unrelated prompt keeps its exact answer, undo
restores it, export/import and reopening keep the edit. GPT-2 is the family whose FFN
output is a Conv1D (weight stored transposed): its blocks and GRACE's codebook are checked
against the unedited model, and the chosen device (devices.py) is refused in one line when
it is not there. T5 is the encoder-decoder (seq2seq.py): the question is the encoder's
input, the key comes from the encoder, the blocks sit in the decoder, and `--model` opens a
saved T5 folder."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from melo_engine import MeloConfig, MeloEditor
from melo_engine.architectures import ARCHITECTURES
from melo_engine.backbone import Backbone

FAMILIES = ["gpt2", "llama", "qwen2", "gemma3_text", "t5"]
TARGET = "Jupiter."
# How a question reaches each family's tiny model (none has a chat template).
PROMPT_FORMS = {"t5": "question to the encoder"}


@pytest.fixture(scope="module")
def tokenizer(example_edits, unrelated_questions):
    """A small byte-level BPE tokenizer trained on the suite's own questions and answers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [e[k] for e in example_edits for k in ("prompt", "target", "paraphrase")] + unrelated_questions
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>", "<unk>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<eos>")


def tiny_model(kind: str, tokenizer):
    """Four layers of `kind`, width 32, weights drawn wide enough (initializer_range; T5's
    initializer_factor, which also gives its random decoder words to say) that a rank-4
    block can move the logits past the final norm."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    common = dict(vocab_size=len(tokenizer), initializer_range=0.3, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    auto = AutoModelForCausalLM
    if kind == "gpt2":
        config = AutoConfig.for_model(kind, n_embd=32, n_layer=4, n_head=2, n_positions=128, **common)
    elif kind == "t5":
        config = AutoConfig.for_model(kind, d_model=32, d_kv=16, d_ff=64, num_layers=4, num_heads=2,
                                      initializer_factor=3.0, decoder_start_token_id=0, **common)
        auto = AutoModelForSeq2SeqLM
    else:
        config = AutoConfig.for_model(kind, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                      max_position_embeddings=128, **common)
    torch.manual_seed(0)
    return auto.from_config(config).eval().requires_grad_(False)


def tiny_backbone(kind: str, tokenizer) -> Backbone:
    # wrap: the Backbone of the kind the row names (T5: seq2seq.py's).
    return Backbone.wrap(tiny_model(kind, tokenizer), tokenizer, f"tiny-{kind}")


def settings(kind: str) -> MeloConfig:
    # The model's own key (no sentence encoder to load for a tiny model), the radius router,
    # and blocks on the top two layers at a rate a random model learns a short answer at
    # (Gemma's norm after the FFN leaves one layer's block too little reach); the modules
    # come from the row.
    # At most 200 steps: an edit stops once its answer is learnt, and a tiny T5 took more than
    # 80 with two torch threads (the suite's default), fewer with one.
    return MeloConfig(model=f"tiny-{kind}", key_source="model", router="radius", lr=5e-2, max_iters=200,
                      lora_layers=(2, 3), rank_per_block=8)


@pytest.mark.parametrize("kind", FAMILIES)
def test_an_edit_on_a_tiny_model_of_each_family(kind, tokenizer, example_edits, unrelated_questions, tmp_path):
    bb = tiny_backbone(kind, tokenizer)
    assert bb.model.config.model_type == kind and bb.device.type == "cpu"
    assert bb.prompt_form() == PROMPT_FORMS.get(kind, "question-answer")   # no chat template: the Q/A form
    ws = tmp_path / "ws"
    ed = MeloEditor.open(ws, config=settings(kind), backbone=bb)
    row = ARCHITECTURES[kind]
    # Where the blocks go comes from the table, and is saved with the workspace.
    assert ed.config.lora_modules == (row.ffn_out,) and ed.config.key_layer == round(4 * row.key_layer_fraction)
    assert json.loads((ws / "config.json").read_text())["lora_modules"] == [row.ffn_out]
    assert all(type(bb.loras[m].base).__name__ == ("Conv1D" if kind == "gpt2" else "Linear") for m in ed.modules)

    prompt, other = example_edits[0]["prompt"], unrelated_questions[0]
    before, other_before = ed.ask(prompt).text, ed.ask(other).text
    assert before != TARGET
    r = ed.edit(prompt, TARGET)
    assert r.token_accuracy == 1.0
    assert ed.ask(prompt).text == TARGET
    after = ed.ask(other)
    assert after.block is None and after.text == other_before

    exported = ed.export(tmp_path / "edits.safetensors")
    ed.delete(r.edit_id)
    assert ed.ask(prompt).text == before                 # undo: the original answer, exactly
    assert len(ed.import_(exported)) == 1
    assert ed.ask(prompt).text == TARGET
    ed.close()

    again = MeloEditor.open(ws, backbone=bb)
    try:
        assert again.ask(prompt).text == TARGET and again.ask(other).text == other_before
    finally:
        again.close()


def test_gpt2_blocks_respect_the_transposed_conv1d_weight(tokenizer):
    """A block on a Conv1D adds B A x to x W + b, where W is stored [in, out]: the same
    output as an nn.Linear holding W transposed, with the same block."""
    from torch import nn

    from melo_engine.lora import ActiveBlocks, inject_block_lora

    bb = tiny_backbone("gpt2", tokenizer)
    name = bb.module_name(3, "mlp.c_proj")
    conv = bb.model.get_submodule(name)
    linear = nn.Linear(conv.weight.shape[0], conv.weight.shape[1])
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    wrapped = inject_block_lora(bb.model, [name])[name]
    assert (wrapped.in_features, wrapped.out_features) == (128, 32)
    holder = nn.Module()
    holder.lin = linear
    as_linear = inject_block_lora(holder, ["lin"])["lin"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 128, generator=g)
    blocks = ActiveBlocks(a=torch.randn(2, 4, 128, generator=g), b=torch.randn(2, 32, 4, generator=g),
                          keep=torch.tensor([True, False]))
    for layer in (wrapped, as_linear):
        layer.active = blocks
    y_conv, y_lin = wrapped(x), as_linear(x)
    assert torch.allclose(y_conv, y_lin, atol=1e-5)
    # The example routed nowhere gets the Conv1D's own output, bit for bit.
    wrapped.active = None
    assert torch.equal(y_conv[1], wrapped(x)[1])


def test_grace_edits_gpt2(tokenizer, example_edits, unrelated_questions, tmp_path):
    from melo_engine.evaluate import greedy_ids, token_accuracy
    from melo_engine.registry import METHODS

    bb = tiny_backbone("gpt2", tokenizer)
    assert bb.split_is_exact(2)               # the upper view adds GPT-2's positions only once
    # GRACE replaces the MLP's output with one vector from the prompt's last token on: a
    # random model this small answers one word with it (the word, then the end), not a phrase.
    grace = METHODS.get("grace").create(bb, tmp_path, {"max_iters": 300}, chat=True, ends=True)
    prompt, other, word = example_edits[1]["prompt"], unrelated_questions[1], "the"
    base_other = greedy_ids(bb, None, other, 12)
    assert token_accuracy(bb, grace, prompt, word) < 1.0
    grace.edit(prompt, word)
    assert token_accuracy(bb, grace, prompt, word) == 1.0
    assert greedy_ids(bb, grace, prompt, 4) == bb.target_ids(word)
    assert greedy_ids(bb, grace, other, 12) == base_other


def test_the_device_is_chosen_or_refused_in_one_line(monkeypatch):
    from melo_engine.devices import resolve_device

    monkeypatch.delenv("MELO_DEVICE", raising=False)
    want = "cuda" if torch.cuda.is_available() else None
    assert resolve_device().type == (want or resolve_device("auto").type)
    assert resolve_device("cpu").type == "cpu"
    monkeypatch.setenv("MELO_DEVICE", "cpu")
    assert resolve_device().type == "cpu"
    for bad in ("tpu", "cuda" if not torch.cuda.is_available() else "tpu0"):
        with pytest.raises(ValueError) as err:
            resolve_device(bad)
        assert "\n" not in str(err.value) and bad in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: --device cuda is not refused here")
def test_the_command_line_refuses_a_missing_device_before_loading_anything(tmp_path, capsys):
    from melo_engine.__main__ import main

    ws = tmp_path / "ws"
    assert main(["--workspace", str(ws), "--device", "cuda", "ask", "Who painted the Mona Lisa?"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "device 'cuda' is not available" in err
    assert not ws.exists()


def test_saved_settings_keep_their_modules_and_new_ones_take_the_row():
    old = MeloConfig.from_json({"model": "m", "lora_modules": ["mlp.down_proj"], "lora_layers": [10, 11]})
    assert old.resolved(12, ARCHITECTURES["gpt2"]).lora_modules == ("mlp.down_proj",)
    new = MeloConfig.from_json({"model": "m"}).resolved(12, ARCHITECTURES["gpt2"])
    assert new.lora_modules == ("mlp.c_proj",) and new.key_layer == 4 and new.lora_layers == (10, 11)
    assert MeloConfig().resolved(30).lora_modules == ("mlp.down_proj",)     # no row given: Llama-style


def tiny_mixed_gemma(tokenizer, window: int) -> Backbone:
    """Four Gemma 3 layers that alternate sliding (a window of `window` tokens) and full attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gemma3_text", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                  sliding_window=window, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                                  layer_types=["sliding_attention", "full_attention"] * 2)
    torch.manual_seed(0)
    return Backbone(AutoModelForCausalLM.from_config(config).eval().requires_grad_(False), tokenizer,
                    f"tiny-mixed-{window}")


def test_the_split_forward_is_exact_where_layers_mix_attention_kinds(tokenizer):
    """Gemma 3 looks each layer's attention kind (sliding or full, each with its own rotary
    base) up by its index: a view of the upper layers must keep their own kinds."""
    bb = tiny_mixed_gemma(tokenizer, window=4)
    assert all(bb.split_is_exact(start) for start in (1, 2, 3))


@pytest.mark.parametrize("kind", [k for k in FAMILIES if k != "t5"])
def test_rows_joining_a_running_generation_get_what_they_get_alone(kind, tokenizer, unrelated_questions):
    """Continuous batching (decoding.RunningBatch) on each decoder family: rows that join
    at different tokens, with prompts of different lengths and blocks of different ranks
    on different modules (or none), and leave at their own budgets or end-of-sequence, get
    the tokens each gets generated alone with its own block."""
    from melo_engine.decoding import RunningBatch, gathered

    bb = tiny_backbone(kind, tokenizer)
    first, last = bb.ensure_lora((1, 3), (ARCHITECTURES[kind].ffn_out,))

    def block(rank, modules, seed):
        g = torch.Generator().manual_seed(seed)
        return {m: (torch.randn(rank, bb.loras[m].in_features, generator=g),
                    torch.randn(bb.loras[m].out_features, rank, generator=g)) for m in modules}

    questions, limits = unrelated_questions[:5], [6, 12, 9, 15, 4]
    blocks = [None, block(2, [first], 1), block(4, [first, last], 2), None, block(3, [last], 3)]
    alone = [bb.generate(q, gathered([b]) if b else None, n) for q, b, n in zip(questions, blocks, limits)]
    assert any(alone[i] != bb.generate(questions[i], None, limits[i]) for i in (1, 2, 4))    # the blocks count
    running, got = RunningBatch(bb, chat=True), {}
    schedule = {0: [0, 1], 2: [2], 5: [3, 4]}          # step -> rows that join before it
    for step in range(40):
        if step in schedule:
            ended, refused = running.join([(questions[i], blocks[i], limits[i], i) for i in schedule[step]])
            assert refused == []
            got.update(ended)
        if len(running):
            got.update(running.step())
    assert len(running) == 0 and [got[i] for i in range(5)] == alone


def test_a_row_that_would_outgrow_a_sliding_window_waits_for_a_whole_batch(tokenizer, unrelated_questions):
    """Gemma 3's sliding layers keep only their window of keys: a running generation refuses
    a row whose text would outgrow it, and the answering threads generate it as a whole batch
    instead (Backbone.generate_batch), with the text it gets alone."""
    from melo_engine.batching import AnswerBatcher, Row
    from melo_engine.decoding import RunningBatch

    bb = tiny_mixed_gemma(tokenizer, window=24)
    question = unrelated_questions[0]
    assert RunningBatch(bb, chat=True).join([(question, None, 30, "long")]) == ([], ["long"])
    batcher = AnswerBatcher(bb, slots=1)
    try:
        assert batcher.generate([Row(question, None, 30, True)]) == [bb.generate(question, None, 30)]
    finally:
        batcher.close()
        batcher._threads[0].join(timeout=10)


def test_t5_is_keyed_by_its_encoder_and_edited_in_its_decoder(tokenizer, example_edits):
    """The model's own key of a question is the mean of the encoder's hidden states at the
    key layer (over the question's tokens); the blocks are in the decoder's FFN output; the
    row's default layers are the paper's for T5-small (key: encoder block 4 of 8; blocks on
    decoder blocks 5-6 of 8)."""
    from melo_engine.seq2seq import Seq2SeqBackbone

    bb = tiny_backbone("t5", tokenizer)
    assert isinstance(bb, Seq2SeqBackbone) and bb.key_layers is bb.model.encoder.block
    q = example_edits[0]["prompt"]
    enc = bb.encode([q])
    states = bb.model.encoder(input_ids=enc.ids, attention_mask=enc.mask, output_hidden_states=True).hidden_states
    mask = enc.user_mask[0].bool()
    want = states[3][0][mask].mean(0)                     # after encoder block 2
    assert torch.allclose(bb.keys_of([q], 2, "mean_user", "l2")[0], want, atol=1e-5)
    paper = MeloConfig(model="t5-small").resolved(8, ARCHITECTURES["t5"])
    assert paper.key_layer == 4 and paper.lora_layers == (5, 6)
    assert paper.lora_modules == ("layer.2.DenseReluDense.wo",)
    # The key layer is checked against the encoder's depth, the blocks against the decoder's.
    assert MeloConfig(key_layer=5).resolved(4, ARCHITECTURES["t5"], key_layers=6).key_layer == 5
    with pytest.raises(ValueError, match="key layer must lie in 0..3"):
        MeloConfig(key_layer=5).resolved(8, ARCHITECTURES["t5"], key_layers=4)
    assert bb.ensure_lora((3,), paper.lora_modules) == ["decoder.block.3.layer.2.DenseReluDense.wo"]
    # GRACE's split of a prompt into lower and upper layers has no meaning here: one line.
    with pytest.raises(ValueError) as err:
        bb.split_is_exact(2)
    assert "\n" not in str(err.value)
    # Opened as a decoder-only model, it is refused in one line that names the way in.
    with pytest.raises(ValueError, match="Backbone.wrap") as err:
        Backbone(bb.model, tokenizer, "tiny-t5")
    assert "\n" not in str(err.value)


def test_the_command_line_opens_a_saved_t5_folder(tokenizer, example_edits, unrelated_questions, tmp_path, capsys):
    """`--model <folder>` loads a T5 through its row (AutoModelForSeq2SeqLM): a new workspace
    answers, and a workspace edited on that folder gives the edit's target from the shell."""
    from melo_engine.__main__ import main

    folder = tmp_path / "tiny-t5"
    tiny_model("t5", tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    prompt, other = example_edits[0]["prompt"], unrelated_questions[0]

    fresh = tmp_path / "fresh"
    assert main(["-w", str(fresh), "--model", str(folder), "--key-source", "model", "--json", "ask", other]) == 0
    assert json.loads(capsys.readouterr().out)["block"] is None
    assert json.loads((fresh / "config.json").read_text())["lora_modules"] == ["layer.2.DenseReluDense.wo"]

    # Routed by the sentence key, as any model can be (unwhitened, a radius given: no
    # calibration to wait for).
    ws = tmp_path / "ws"
    sentence = dataclasses.replace(settings("t5"), key_source="sentence", key_whitening=False, init_radius=0.3)
    ed = MeloEditor.open(ws, model=str(folder), config=sentence)
    assert type(ed.backbone).__name__ == "Seq2SeqBackbone"
    assert ed.edit(prompt, TARGET).token_accuracy == 1.0
    ed.close()
    assert main(["-w", str(ws), "--json", "ask", prompt]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == TARGET
    assert main(["-w", str(ws), "--json", "ask", other]) == 0
    assert json.loads(capsys.readouterr().out)["block"] is None
