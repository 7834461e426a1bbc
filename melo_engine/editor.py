"""MeloEditor: the façade over one workspace of edits on top of a frozen model.

Every operation the app, the command line and the benchmarks use is a method here, a few
lines that check the input (checks.py) and hand over to the room that does the work:

    workspace.py   the records, blocks and cluster state, and their commits
    answering.py   route a question, generate, probe
    editing.py     train a block, commit it, delete an edit
    exchange.py    export and import
    settings.py    settings, key source and prompt mode
    inspection.py  the index map, true distances, side effects, sizes

An editor owns its workspace; it borrows a Backbone (possibly shared with other editors)
for every forward. Nothing lives at module level, so two editors in one process never see
each other's edits.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch

from . import answering, checks, editing, exchange, inspection, settings, store
from .backbone import Backbone
from .calibrate import calibrated_radius
from .config import DEFAULT_MODEL, MeloConfig
from .index import ClusterState, Route
from .keys import Keyer
from .neighbours import Neighbour, reference_keys
from .records import Answer, EditResult, TrainedEdit
from .router import Router, router_for
from .workspace import Workspace


class MeloEditor:
    """Edit, ask, undo, export: the whole MELO workflow on one workspace directory."""

    def __init__(self, ws: Workspace, backbone: Backbone, config: MeloConfig, keyer: Keyer | None = None):
        self.ws = ws
        self.backbone = backbone
        self.config = config
        self.keyer = keyer or Keyer(backbone, config)
        self.modules = backbone.ensure_lora(config.lora_layers, config.lora_modules)
        self._reference = None      # (key space, questions, keys) of the side-effect bank, when first needed
        # A server's shared generations (batching.AnswerBatcher), set by whoever serves many
        # workspaces on one backbone; None: this editor generates on its own.
        self.answers = None
        # Likewise its training processes (trainproc.TrainingCrew); None: trains on the caller's thread.
        self.trainer = None

    # The workspace's parts, as callers have always reached them.
    workspace = property(lambda self: self.ws.folder)
    read_only = property(lambda self: self.ws.read_only)
    store = property(lambda self: self.ws.store)
    bank = property(lambda self: self.ws.bank)
    entries = property(lambda self: self.ws.entries)

    @property
    def state(self) -> ClusterState:
        return self.ws.state

    @property
    def router(self) -> Router:
        """Which edit within the radius fires (router.py), per the workspace's setting."""
        return router_for(self.backbone, self.config.router)

    @property
    def chat(self) -> bool:
        """Prompts go through the chat template (else: plain text the model continues)."""
        return self.config.prompt_mode == "chat"

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, workspace, model: str | None = None, config: MeloConfig | None = None,
             backbone: Backbone | None = None, read_only: bool = False, device: str | None = None) -> "MeloEditor":
        """Create or reopen a workspace. `backbone` lets many workspaces share one loaded model.

        A new workspace takes `config` (default settings otherwise); an existing one keeps
        the settings it was made with. Opening it with a different model is an error.
        `read_only`: an existing workspace, opened without writing a byte (no clean-up of
        what a crash left); asking, listing and exporting work, changes refuse.
        `device`: where a model loaded here runs (cpu, cuda, mps, auto; devices.py).
        """
        ws = checks.workspace_folder(workspace)
        header = store.read_header(ws) if ws.is_dir() else None
        if read_only and header is None:
            raise ValueError(f"there is no workspace at {ws.name or ws}")
        if read_only and header.get("format") != store.FORMAT:
            raise ValueError("this workspace has an older format: open it once for writing, which upgrades it")
        if header is not None:
            try:
                cfg = MeloConfig.load(ws / store.CONFIG)
            except (OSError, ValueError, TypeError, AttributeError):
                raise ValueError("the workspace's config.json is missing or damaged") from None
            if model is not None and model != cfg.model:
                raise ValueError(f"workspace {ws.name} was made with model {cfg.model!r}, not {model!r}")
        else:
            cfg = dataclasses.replace(config or MeloConfig(), model=model or (config.model if config else DEFAULT_MODEL))
            cfg.validate()
        if backbone is None:
            backbone = Backbone.load(cfg.model, cfg.layers_path, cfg.lora_modules, device=device)
        elif backbone.name != cfg.model:
            raise ValueError(f"workspace {ws.name} is for model {cfg.model!r}; the loaded model is {backbone.name!r}")
        if header is not None and header.get("fingerprint") != backbone.fingerprint:
            raise ValueError(f"workspace {ws.name} was made with another model than {backbone.name!r} (fingerprints differ)")
        cfg = cfg.for_backbone(backbone)
        keyer = Keyer(backbone, cfg)
        if cfg.init_radius is None:
            cfg = dataclasses.replace(cfg, init_radius=calibrated_radius(backbone, cfg, keyer))
        if header is None:
            room = Workspace.create(ws, {"model": cfg.model, "fingerprint": backbone.fingerprint,
                                         "created": time.time()}, cfg.to_json())
        else:
            room = Workspace(ws, read_only)
        ed = cls(room, backbone, cfg, keyer)
        try:
            room.load()
        except BaseException:
            ed.close()
            raise
        return ed

    @classmethod
    def repair(cls, workspace, backbone: Backbone | None = None) -> dict:
        """Rebuild what the files allow, without guessing: journal records after damage are
        moved aside (kept in a file of their own), leftovers of interrupted writes are removed."""
        ws = Path(workspace).expanduser()
        if store.read_header(ws) is None:
            raise ValueError(f"there is no workspace at {ws.name or ws}")
        kept, aside = Workspace.set_aside_damage(ws)
        ed = cls.open(ws, backbone=backbone)
        out = {"journal_records_kept": kept, "set_aside": aside, "edits": len(ed.entries),
               "clusters": len(ed.state.clusters)}
        ed.close()
        return out

    @staticmethod
    def has_edits(workspace) -> bool:
        """Whether the workspace folder holds any edit, without opening it."""
        return Workspace.has_edits(workspace)

    def close(self) -> None:
        """Let go of the workspace and its lock (waits for an edit in progress to finish)."""
        self.ws.close()

    # ---- asking --------------------------------------------------------------------------
    def _check(self, text: str, what: str) -> str:
        return checks.clean_text(text, what, self.config.max_text_chars)

    def key(self, question: str) -> torch.Tensor:
        return self.keyer.keys([question])[0]

    def route(self, question: str) -> Route:
        """Which block (if any) fires for this question, and why: distance versus radius."""
        return answering.route(self, self._check(question, "the question"))

    def ask(self, question: str, compare_base: bool = False) -> Answer:
        """Answer with the edited model: route once from the prompt, hold that block throughout."""
        return answering.ask(self, self._check(question, "the question"), compare_base)

    def generate(self, question: str, max_new_tokens: int, min_new_tokens: int = 0,
                 timer: Callable[[float], None] | None = None) -> tuple[str, Route]:
        """Greedy text from the edited model, routed once from the prompt (answering.generate)."""
        return answering.generate(self, question, max_new_tokens, min_new_tokens, timer)

    def budget(self, edit_id: str | None) -> int:
        """New tokens to generate when edit `edit_id` fires (answering.budget)."""
        return answering.budget(self, edit_id)

    def probe(self, questions: list[str], workers: int | None = None) -> list[Answer]:
        """Ask many questions, each with the unedited answer beside it, answered together."""
        if not isinstance(questions, (list, tuple)):
            raise ValueError("the questions must be a list of texts")
        qs = [self._check(q, f"question {i + 1}") for i, q in enumerate(questions)]
        if not qs:
            raise ValueError("no questions to probe")
        return answering.probe(self, qs, workers)

    def answered_by(self, question: str) -> dict | None:
        """The record of the edit whose block answers `question` now, or None when the
        original model does: routing alone, nothing generated."""
        r = self.route(question)
        return self.record(r.edit_id) if r.edit_id is not None else None

    # ---- editing -------------------------------------------------------------------------
    def edit(self, prompt: str, target: str, progress: Callable[[int, float], None] | None = None,
             prefix: str | None = None, end: bool = False) -> EditResult:
        """Teach the model to answer `prompt` with `target`, in a fresh LoRA block.

        With `prefix` the edit corrects one sentence of a longer answer: for `prompt` the
        model says `prefix` (the answer's text before the wrong sentence, kept exactly; ""
        for the first sentence), then `target` in place of the wrong sentence, and goes on
        from there (what follows may change), or, with `end`, stops there.
        """
        return self.commit(self.train(prompt, target, progress, prefix, end))

    def train(self, prompt: str, target: str, progress: Callable[[int, float], None] | None = None,
              prefix: str | None = None, end: bool = False) -> TrainedEdit:
        """The first half of `edit`: train the block, write nothing. A caller can still drop
        it (the app does when the visitor who asked has gone); `commit` makes it an edit."""
        self.ws.writable()
        prompt = self._check(prompt, "the prompt")
        target = self._check(target, "the corrected sentence" if prefix is not None else "the target")
        if prefix is not None:
            prefix = checks.clean_prefix(prefix, 4 * self.config.max_text_chars)
        return editing.train(self, prompt, target, progress, prefix, end)

    def commit(self, pending: TrainedEdit) -> EditResult:
        """The second half of `edit`: write the trained block and place its key in the index."""
        self.ws.writable()
        return editing.commit(self, pending)

    def correct(self, question: str, number: int, sentence: str, answer: str | None = None,
                progress: Callable[[int, float], None] | None = None, end: bool = False) -> EditResult:
        """Correct sentence `number` (1 for the first) of the answer to `question`: the
        answer given now, or `answer` as it was shown. The sentences before it stay exactly
        as they are (sentences.py splits the answer); with `end` the answer stops after the
        corrected sentence."""
        return self.commit(self.train_correction(question, number, sentence, answer, progress, end))

    def train_correction(self, question: str, number: int, sentence: str, answer: str | None = None,
                         progress: Callable[[int, float], None] | None = None, end: bool = False) -> TrainedEdit:
        """The first half of `correct` (see `train`): the block trained, nothing written."""
        self._check(sentence, "the corrected sentence")      # refused before anything is generated
        checks.flag(end, "end")
        return self.train(question, sentence, progress, prefix=self.sentence_prefix(question, number, answer),
                          end=end)

    def sentence_prefix(self, question: str, number: int, answer: str | None = None) -> str:
        """The text before sentence `number` (1 for the first) of the answer to `question`
        (the answer given now, unless `answer` says what was shown)."""
        number = checks.sentence_number(number)
        return answering.sentence_prefix(self, self._check(question, "the question"), number, answer)

    def delete(self, edit_id: str) -> list[str]:
        """Undo one edit: its point leaves the index and its block is dropped. Edits it had
        superseded become active again; returns their ids."""
        self.ws.writable()
        return editing.delete(self, edit_id)

    def compact(self) -> None:
        """Write the whole workspace as one snapshot and start an empty journal."""
        self.ws.compact()

    def reset(self, default_settings: bool = False) -> None:
        """Remove every edit; the settings stay, unless `default_settings`."""
        self.ws.reset()
        if default_settings:        # chat prompts too (a mode changes only while there are no edits)
            self.set_prompt_mode("chat")
            self.update_settings(**self.default_settings())

    # ---- what there is -------------------------------------------------------------------
    def edits(self) -> list[dict]:
        """Every edit, oldest first: id, prompt, target, block, cluster, status, timing."""
        return [e.to_json() for e in self.ws.entries.values()]

    def record(self, edit_id: str) -> dict:
        """One edit's record: prompt, target, status, block, timing, ..."""
        return self.ws.entry(str(edit_id)).to_json()

    def side_effects(self, edit_id: str, n: int = 8) -> list[Neighbour]:
        """The reference questions nearest an active edit, and every one that now fires it."""
        space = self.config.key_name()
        if self._reference is None or self._reference[0] != space:
            self._reference = (space, *reference_keys(self.keyer, self.reference_texts()))
        return inspection.edit_side_effects(self, edit_id, self._reference[1:], n)

    def reference_texts(self) -> list[str] | None:
        """What every side-effect check runs over (None: the bundled reference questions)."""
        return None

    def probe_bank(self, shared: bool = False):
        """Your own questions (probebank.ProbeBank: add_file, sources, remove_source), kept
        per model and key setting: this workspace's, or with `shared` the list every
        workspace on them sees. Every side-effect check runs against both."""
        return inspection.probe_bank(self, shared)

    def index_snapshot(self) -> dict:
        """Everything needed to plot the index: keys, centers, radii, blocks and labels."""
        return inspection.index_snapshot(self)

    def distances(self, question: str, n: int = 8) -> list[dict]:
        """The `n` clusters nearest a question, true distance against radius."""
        return inspection.distances(self, self._check(question, "the question"), n)

    def stats(self) -> dict:
        return inspection.stats(self)

    def model_info(self) -> dict:
        """The workspace's model, how a question reaches it (Backbone.prompt_form: "chat
        template", "question-answer" or "plain text") and its licence."""
        from .model import licence

        return {"model": self.config.model, "prompt_form": self.backbone.prompt_form(self.chat),
                "licence": licence(self.config.model), "device": str(self.backbone.device)}

    # ---- settings ------------------------------------------------------------------------
    def default_settings(self) -> dict:
        """The settings a new workspace of this model and key source starts with."""
        return settings.default_settings(self)

    def update_settings(self, **changes) -> MeloConfig:
        """Change settings that affect new edits only (radius, rank, lr, iterations, ...)."""
        return settings.update(self, **changes)

    def set_key_source(self, source: str) -> MeloConfig:
        """Route by another key source (a name in registry.KEY_SOURCES). Only while the
        workspace has no edits (reset it first): stored keys of one source do not compare
        with another's. The radius goes back to the one calibrated for the new source."""
        return settings.reroute(self, "key source", key_source=source, key_whitening=None)

    def set_prompt_mode(self, mode: str) -> MeloConfig:
        """Prompt the model through its chat template ("chat") or as plain text it continues
        ("completion"). Only while the workspace has no edits: a block is trained on prompts
        formatted one way and would not fit the other. The radius goes back to the one
        calibrated for the mode."""
        return settings.reroute(self, "prompt mode", prompt_mode=mode)

    # ---- export / import -----------------------------------------------------------------
    def export(self, path) -> Path:
        """Write every active edit (text, key, block matrices) to one safetensors file."""
        return exchange.export_edits(self, path)

    def import_(self, path) -> list[str]:
        """Add the edits of an export file (trained blocks included: nothing retrains);
        those already here are skipped. Returns the new edit ids. A bad file raises
        ValueError and changes nothing."""
        return self.import_report(path).added

    def import_report(self, path) -> exchange.ImportReport:
        """`import_`, saying also which edits of the file were already here (skipped) and
        which earlier edits the new ones replaced (superseded)."""
        self.ws.writable()
        return exchange.import_edits(self, path)
