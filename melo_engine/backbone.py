"""The frozen model, seen the way MELO needs it: keys from the lower layers, the upper
layers alone for training, and generation with one LoRA block held per query.

One Backbone is shared by every editor in a process (the web app's visitors). It carries
no edits: an editor passes its own block matrices in for the duration of one call. Nothing
serialises forwards: the injected layers keep their `active` blocks per thread and the
parts of the stack used for training are views, so visitors' asks and edits run side by
side (the lock only guards making those views and loading the sentence encoder).

This class is the path for decoder-only ("causal") models; an encoder-decoder takes
seq2seq.py's subclass. `Backbone.wrap` picks the class by the model's architecture row
(architectures.py), so the rest of the engine calls the same methods on either.
"""
from __future__ import annotations

import contextlib
import copy
import threading
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from .architectures import Architecture, architecture_for
from .devices import resolve_device
from .lora import ActiveBlocks, BlockLoRALinear, inject_block_lora
from .model import load_model, model_fingerprint
from .registry import BACKBONES


@dataclass
class Encoded:
    """A right-padded batch of chat-formatted prompts.

    mask marks real tokens, prompt_mask the prompt's (without any target after it), and
    user_mask the user's own text, the part a key is reduced over by default (the chat
    template around it is the same for every query).
    """

    ids: torch.Tensor
    mask: torch.Tensor
    prompt_mask: torch.Tensor
    user_mask: torch.Tensor

    def target_count(self, row: int = 0) -> int:
        """How many target tokens row `row` carries after its prompt."""
        return int(self.mask[row].sum() - self.prompt_mask[row].sum())


def reduce_key(hidden: torch.Tensor, enc: Encoded, how: str) -> torch.Tensor:
    """One vector per prompt from hidden states [batch, seq, dim], over real tokens only."""
    if how in ("mean_user", "mean"):
        m = (enc.user_mask if how == "mean_user" else enc.prompt_mask).to(hidden.dtype)
        return (hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
    m = enc.user_mask if how == "last_user" else enc.prompt_mask
    # Index of the last marked token of each row.
    pos = torch.arange(m.shape[1], device=m.device)[None].expand_as(m)
    last = torch.where(m.bool(), pos, torch.full_like(pos, -1)).max(1).values.clamp(min=0)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]


def target_positions(enc: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
    """For one prompt followed by its target: the positions whose logits predict the target
    tokens ([1, n]; the logit at t predicts token t+1), and those target tokens ([n])."""
    n_prompt, n_total = int(enc.prompt_mask[0].sum()), int(enc.mask[0].sum())
    return torch.arange(n_prompt - 1, n_total - 1)[None], enc.ids[0, n_prompt:n_total]


class _NoPositions(nn.Module):
    """Stands in for a learned position embedding in a view that starts mid-stack: adds zeros."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.dim = embedding.embedding_dim

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*position_ids.shape, self.dim, device=position_ids.device)


class _LineEnd(StoppingCriteria):
    """Stops each row of a generation once its new tokens end a line (`ended`:
    Backbone.line_ended; a transformers StoppingCriteria: [batch] bools per step)."""

    def __init__(self, ended: Callable, width: int):
        self.ended, self.width = ended, width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.tensor([self.ended(row[self.width:]) for row in input_ids], device=input_ids.device)


class Backbone:
    """A frozen causal LM with dynamic-LoRA layers injected and helpers to run parts of it."""

    kind = "causal"                        # the architecture rows this class runs (registry.BACKBONES)
    joins_running_batches = True           # rows may join a running generation (decoding.py)
    auto_class = "AutoModelForCausalLM"    # how transformers loads such a model (model.py)

    def __init__(self, model: nn.Module, tokenizer, name: str, layers_path: str | None = None,
                 lora_modules: tuple[str, ...] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.fingerprint = model_fingerprint(model)
        self.num_layers = int(model.config.num_hidden_layers)
        # Where the model's weights are (Backbone.load moves them; devices.py): inputs,
        # blocks and keys go there for a forward and come back to the CPU to be kept.
        self.device = next(model.parameters()).device
        self.lock = threading.RLock()
        self.loaded_as: dict | None = None     # set by `load`: a model wrapped in memory has none
        self.architecture: Architecture = architecture_for(model, layers_path, lora_modules)
        if self.architecture.kind != self.kind:
            raise ValueError(f"a {self.architecture.kind} model ({model.config.model_type}) runs on "
                             f"{BACKBONES.get(self.architecture.kind).__name__}: open it with Backbone.wrap")
        self._inner, self._layers_attr = self._find_layers(model, self.architecture.layers)
        self.loras: dict[str, BlockLoRALinear] = {}
        self._upper_ok: dict[int, bool] = {}
        self._parts: dict[tuple, nn.Module] = {}
        self._companions: dict[str, object] = {}

    def companion(self, name: str, load: Callable[[], object]):
        """A model that works beside this one (a key source's encoder): loaded on first use,
        then shared by every editor that borrows this backbone, like the model itself."""
        with self.lock:
            if name not in self._companions:
                self._companions[name] = load()
            return self._companions[name]

    @classmethod
    def load(cls, name: str, layers_path: str | None = None,
             lora_modules: tuple[str, ...] | None = None, device: str | None = None) -> "Backbone":
        """`layers_path` / `lora_modules`: where the parts sit in a model whose type
        architectures.py does not know (or to override its row). `device`: cpu, cuda, mps
        or auto (None: $MELO_DEVICE, else auto; devices.py)."""
        where = resolve_device(device)        # refused before the model is read
        model, tokenizer = load_model(name)
        backbone = cls.wrap(model.to(where), tokenizer, name, layers_path, lora_modules)
        # How to load it again, in another process (trainproc.py).
        backbone.loaded_as = {"name": name, "layers_path": layers_path, "lora_modules": lora_modules,
                              "device": str(where)}
        return backbone

    @staticmethod
    def wrap(model: nn.Module, tokenizer, name: str, layers_path: str | None = None,
             lora_modules: tuple[str, ...] | None = None) -> "Backbone":
        """The Backbone of the kind the model's architecture row names (a decoder-only model:
        this class; an encoder-decoder: seq2seq.py's)."""
        kind = architecture_for(model, layers_path, lora_modules).kind
        return BACKBONES.get(kind)(model, tokenizer, name, layers_path, lora_modules)

    # ---- structure ---------------------------------------------------------------------
    @staticmethod
    def _find_layers(model: nn.Module, path: str):
        """The inner decoder (the module holding the list of layers) and the list's name,
        from the architecture's dotted path to the list."""
        parent, _, attr = path.rpartition(".")
        try:
            inner = model.get_submodule(parent)
        except AttributeError:
            inner = None
        if not isinstance(getattr(inner, attr, None), nn.ModuleList):
            raise ValueError(f"{type(model).__name__} has no list of decoder layers at {path} (see --layers-path)")
        return inner, attr

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self._inner, self._layers_attr)

    @property
    def key_layers(self) -> nn.ModuleList:
        """The layers the model's own key is read from (a decoder-only model: its layers)."""
        return self.layers

    def module_name(self, layer: int, module: str) -> str:
        prefix = [n for n, m in self.model.named_modules() if m is self._inner][0]
        return f"{prefix}.{self._layers_attr}.{layer}.{module}".lstrip(".")

    def ensure_lora(self, layers: tuple[int, ...], modules: tuple[str, ...]) -> list[str]:
        """Inject BlockLoRALinear into the given modules (once); return their names."""
        names = [self.module_name(i, m) for i in layers for m in modules]
        with self.lock:
            self.loras.update(inject_block_lora(self.model, names))
        return names

    # ---- prompts -----------------------------------------------------------------------
    # A question to a base model (no chat template) in chat mode: the form such a model
    # answers in (Gemma 3 270M babbles after a bare question or a Gemma chat turn, and
    # answers "Q: ...\nA:" in a sentence).
    QA_FORM = ("Q: ", "\nA:")

    def uses_chat(self, chat: bool = True) -> bool:
        """Whether prompts go through the chat template: asked for (a workspace in chat mode)
        and the model has one. Otherwise a prompt is plain text that the model continues."""
        return bool(chat and getattr(self.tokenizer, "chat_template", None))

    def prompt_form(self, chat: bool = True) -> str:
        """How a question reaches this model: "chat template", "question-answer" (chat mode
        on a model without a template: QA_FORM) or "plain text" (completion mode)."""
        return "chat template" if self.uses_chat(chat) else "question-answer" if chat else "plain text"

    def format_prompt(self, question: str, chat: bool = True) -> tuple[str, tuple[int, int]]:
        """The model's input text for a user question, and where the question sits in it."""
        if self.uses_chat(chat):
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
            start = text.rfind(question)
            return text, (start, start + len(question))
        if chat:
            before, after = self.QA_FORM
            return before + question + after, (len(before), len(before) + len(question))
        return question, (0, len(question))

    def encode(self, questions: list[str], targets: list[str] | None = None, chat: bool = True,
               ends: bool = True) -> Encoded:
        """Tokenize prompts (optionally followed by target tokens), right-padded.

        user_mask covers the user's text inside the prompt; target tokens are never in it.
        `chat=False`: plain prompts, continued as text (a workspace in completion mode).
        `ends=False`: targets do not end the turn (a corrected sentence the answer goes on from).
        """
        rows, users, prompt_lens = [], [], []
        template = self.uses_chat(chat)       # a chat template carries its own special tokens
        for i, q in enumerate(questions):
            text, (s, e) = self.format_prompt(q, chat)
            enc = self.tokenizer(text, add_special_tokens=not template, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            user = [1 if (a < e and b > s) else 0 for a, b in enc["offset_mapping"]]
            prompt_lens.append(len(ids))
            if targets is not None:
                extra = self.target_ids(targets[i], chat, ends)
                ids += extra
                user += [0] * len(extra)
            rows.append(ids)
            users.append(user)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        prompt_mask = torch.zeros((len(rows), width), dtype=torch.long)
        user_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, u, n) in enumerate(zip(rows, users, prompt_lens)):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
            prompt_mask[i, :n] = 1
            user_mask[i, : len(u)] = torch.tensor(u)
        d = self.device
        return Encoded(ids.to(d), mask.to(d), prompt_mask.to(d), user_mask.to(d))

    def target_ids(self, target: str, chat: bool = True, ends: bool = True) -> list[int]:
        """Tokens of an answer as the model should produce it, ending the turn with EOS
        unless `ends` is False. A plain-text prompt is continued after a space."""
        text = target.strip() if self.uses_chat(chat) else " " + target.strip()
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids + [self.tokenizer.eos_token_id] if ends else ids

    # ---- running parts of the stack ----------------------------------------------------
    def _part(self, start: int, stop: int, final_norm: bool) -> nn.Module:
        """The inner decoder over layers[start:stop] only: a view sharing every weight with
        the model, made once. The model itself is never changed, so forwards of the whole
        model and of parts run at the same time in different threads."""
        with self.lock:
            view = self._parts.get((start, stop, final_norm))
            if view is None:
                view = copy.copy(self._inner)
                view._modules = dict(self._inner._modules)      # its own children, same weights
                view._modules[self._layers_attr] = nn.ModuleList(list(self.layers)[start:stop])
                arch = self.architecture
                if not final_norm and arch.final_norm in view._modules:
                    view._modules[arch.final_norm] = nn.Identity()
                if start > 0 and arch.position_embedding in view._modules:
                    # Hidden states entering layer `start` carry their positions already.
                    view._modules[arch.position_embedding] = _NoPositions(view._modules[arch.position_embedding])
                types = getattr(getattr(view, "config", None), "layer_types", None)
                if isinstance(types, (list, tuple)) and len(types) == self.num_layers:
                    # Models that mix attention kinds (Gemma 2/3: sliding and full, each with
                    # its own rotary base) look a layer's kind up by its index in the list:
                    # the view's own config says the kinds of its own layers.
                    config = copy.copy(view.config)
                    config.layer_types = list(types)[start:stop]
                    config.num_hidden_layers = stop - start
                    view.config = config
                self._parts[(start, stop, final_norm)] = view
            return view

    @torch.no_grad()
    def lower(self, enc: Encoded, stop: int) -> torch.Tensor:
        """Hidden states after layer stop-1 (before any LoRA layer when stop <= first LoRA)."""
        embeds = self.model.get_input_embeddings()(enc.ids)
        out = self._part(0, stop, final_norm=False)(inputs_embeds=embeds, attention_mask=enc.mask, use_cache=False)
        return out.last_hidden_state

    def keys(self, enc: Encoded, layer: int, reduction: str, distance: str) -> torch.Tensor:
        """Routing keys [batch, dim]: layer `layer`'s output reduced over each prompt.

        With the cosine distance keys are unit vectors, so L2 between them orders like cosine.
        """
        k = reduce_key(self.lower(enc, layer + 1), enc, reduction)
        return torch.nn.functional.normalize(k, dim=-1) if distance == "cosine" else k

    def keys_of(self, questions: list[str], layer: int, reduction: str, distance: str,
                batch: int = 32, chat: bool = True) -> torch.Tensor:
        """`keys` for many questions, a batch at a time so that memory stays flat."""
        return torch.cat([self.keys(self.encode(questions[i:i + batch], chat=chat), layer, reduction, distance).cpu()
                          for i in range(0, len(questions), batch)])

    def upper_logits(self, hidden: torch.Tensor, enc: Encoded, start: int, positions: torch.Tensor):
        """Logits at `positions` [batch, k] from hidden states entering layer `start`."""
        out = self._part(start, self.num_layers, final_norm=True)(inputs_embeds=hidden, attention_mask=enc.mask,
                                                                   use_cache=False)
        h = out.last_hidden_state
        picked = h[torch.arange(h.shape[0], device=h.device)[:, None], positions.to(h.device)]
        # Only the target positions go through the (large) output projection.
        return self.model.get_output_embeddings()(picked)

    def full_logits(self, enc: Encoded, positions: torch.Tensor):
        """The same logits from a plain full forward (used where the split is not exact)."""
        out = self.model(input_ids=enc.ids, attention_mask=enc.mask, use_cache=False)
        return out.logits[torch.arange(enc.ids.shape[0], device=self.device)[:, None], positions.to(self.device)]

    @torch.no_grad()
    def split_is_exact(self, start: int) -> bool:
        """Does lower(...) then upper_logits(...) reproduce the full model? Checked once per
        layer, since some models (e.g. Gemma) transform inputs_embeds inside forward."""
        if start not in self._upper_ok:
            enc = self.encode(["Is the split exact?"], ["Yes."])
            pos = torch.arange(enc.ids.shape[1] - 3, enc.ids.shape[1])[None]
            a = self.upper_logits(self.lower(enc, start), enc, start, pos)
            b = self.full_logits(enc, pos)
            self._upper_ok[start] = bool(torch.allclose(a, b, atol=1e-3, rtol=1e-3))
        return self._upper_ok[start]

    def teacher(self, enc: Encoded, first: int) -> Callable[[dict[str, ActiveBlocks]], tuple[torch.Tensor, float]]:
        """For training a block (train.py): a function of the held blocks that returns
        (cross-entropy of enc's target tokens, the share of them that are the argmax), for
        one prompt followed by its target. The layers below `first` (the lowest layer with
        blocks) never change during training: they run once, here, where the split is exact."""
        positions, targets = target_positions(enc)
        exact = self.split_is_exact(first)
        hidden = self.lower(enc, first) if exact else None

        def loss_of(active):
            with self.lora(active):
                logits = (self.upper_logits(hidden, enc, first, positions) if exact
                          else self.full_logits(enc, positions))[0]
            return F.cross_entropy(logits, targets), (logits.argmax(-1) == targets).float().mean().item()

        return loss_of

    @contextlib.contextmanager
    def lora(self, active: dict[str, ActiveBlocks] | None):
        """Hold these block matrices in the LoRA layers for this thread's calls inside (None:
        none). Other threads' forwards, with their own blocks, may run meanwhile."""
        active = self.on_device(active)
        for name, layer in self.loras.items():
            layer.active = active.get(name) if active else None
        try:
            yield
        finally:
            for layer in self.loras.values():
                layer.active = None

    def on_device(self, active: dict[str, ActiveBlocks] | None) -> dict[str, ActiveBlocks] | None:
        """Block matrices (kept in CPU memory) where the model runs."""
        if not active or self.device.type == "cpu":
            return active
        return {name: blocks.to(self.device) for name, blocks in active.items()}

    @torch.no_grad()
    def generate(self, question: str, active: dict[str, ActiveBlocks] | None, max_new_tokens: int,
                 min_new_tokens: int = 0, chat: bool = True, hold: int | None = None) -> str:
        """Greedy answer to one question with the given blocks held for every new token, or
        only for the first `hold` new tokens: then the original model goes on from there
        (a sentence correction that does not end the answer taught the block its tokens
        and nothing after them; held longer, the block repeats what it was taught)."""
        enc = self.encode([question], chat=chat)
        if hold is None or active is None or hold >= max_new_tokens:
            with self.lora(active):
                return self._greedy(enc, max_new_tokens, min_new_tokens, chat)
        with self.lora(active):
            new = self._new_tokens(enc, chat, max_new_tokens=hold)[0]
        eos = self.tokenizer.eos_token_id
        if len(new) < hold or (eos is not None and int(new[-1]) == eos):
            return self.decoded_answer(new, chat)                              # it ended there
        out = self._continued(enc, new, chat, max_new_tokens=max_new_tokens - hold,
                              min_new_tokens=max(0, min_new_tokens - hold))
        return self.decoded_answer(out[0], chat)

    def _new_tokens(self, enc: Encoded, chat: bool, **generation) -> torch.Tensor:
        """Greedy new tokens [batch, n] after each prompt of `enc` (rows moved to the right
        edge: generation continues every row at its end); `generation`: generate's limits."""
        ids, mask = self.left_padded(enc)
        out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id,
                                  stopping_criteria=self._stops(chat, ids.shape[1]), **generation)
        return out[:, ids.shape[1]:]

    def _continued(self, enc: Encoded, new: torch.Tensor, chat: bool, **generation) -> torch.Tensor:
        """Greedy tokens after one prompt that continue from `new` (its first new tokens),
        `new` included: [1, n]."""
        width = enc.ids.shape[1]
        ids = torch.cat([enc.ids, new[None].to(enc.ids.device)], 1)
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id,
                                  stopping_criteria=self._stops(chat, width), **generation)
        return out[:, width:]

    @torch.no_grad()
    def generate_batch(self, questions: list[str], active: dict[str, ActiveBlocks] | None,
                       max_new_tokens: int | list[int], chat: bool = True) -> list[str]:
        """Greedy answers to many questions in one generation, question i with block row i of
        `active`. Rows are padded on the left (generation continues every row at its end);
        a row without a block runs the original model exactly. `max_new_tokens` may be one
        budget per row: every row then stops where it would have stopped alone."""
        limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(questions)
        with self.lora(active):
            out = self._new_tokens(self.encode(questions, chat=chat), chat, max_new_tokens=max(limits))
        return [self.decoded_answer(row[:n], chat) for row, n in zip(out, limits)]

    def left_padded(self, enc: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) of a right-padded batch moved to the right edge, for generation: every
        prompt then ends at the last column and new tokens follow all of them alike."""
        width = enc.ids.shape[1]
        ids = torch.full_like(enc.ids, self.tokenizer.pad_token_id)
        mask = torch.zeros_like(enc.mask)
        for i, n in enumerate(enc.mask.sum(1).tolist()):
            ids[i, width - n:] = enc.ids[i, :n]
            mask[i, width - n:] = 1
        return ids, mask

    def _greedy(self, enc: Encoded, max_new_tokens: int, min_new_tokens: int = 0, chat: bool = True) -> str:
        out = self._new_tokens(enc, chat, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens)
        return self.decoded_answer(out[0], chat)

    def _stops(self, chat: bool, width: int):
        """In the question-answer form an answer is one line: a base model goes on to ask
        itself the next question ("...Paris.\nQ: ..."), so a row stops at its first line break."""
        if self.prompt_form(chat) != "question-answer":
            return None
        return StoppingCriteriaList([_LineEnd(self.line_ended, width)])

    def line_ended(self, ids) -> bool:
        """Whether new tokens `ids` hold a line break after any leading white space."""
        return "\n" in self.tokenizer.decode(ids, skip_special_tokens=True).lstrip()

    def decoded_answer(self, ids, chat: bool) -> str:
        """The answer new tokens `ids` say (in the question-answer form, its first line)."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return text.split("\n", 1)[0].rstrip() if self.prompt_form(chat) == "question-answer" else text

    @torch.no_grad()
    def generate_routed(self, question: str, key_layer: int, reduction: str, distance: str,
                        choose: Callable[[torch.Tensor], tuple[dict | None, object]], max_new_tokens: int,
                        min_new_tokens: int = 0, chat: bool = True):
        """Greedy answer where the block is chosen from the prompt inside the first forward.

        A hook on the key layer reduces the prompt's hidden states to the key, asks
        `choose(key)` for (blocks, info), and sets the blocks before any LoRA layer runs:
        no separate forward for the key, and one routing decision held for all new tokens.
        Returns (text, info).
        """
        enc = self.encode([question], chat=chat)
        decided: dict = {}
        me = threading.get_ident()

        def route_on_prefill(_module, _args, output):
            if decided or threading.get_ident() != me:     # the hook sees every thread's forwards
                return
            hidden = output[0] if isinstance(output, tuple) else output
            key = reduce_key(hidden, enc, reduction)[0]
            if distance == "cosine":
                key = torch.nn.functional.normalize(key, dim=-1)
            active, decided["info"] = choose(key.cpu())
            active = self.on_device(active)
            for name, layer in self.loras.items():
                layer.active = active.get(name) if active else None

        handle = self.key_layers[key_layer].register_forward_hook(route_on_prefill)
        try:
            text = self._greedy(enc, max_new_tokens, min_new_tokens, chat)
        finally:
            handle.remove()
            for layer in self.loras.values():
                layer.active = None
        return text, decided["info"]
