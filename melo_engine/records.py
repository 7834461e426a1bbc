"""What the engine hands back and keeps: typed records, one place that says which fields
an edit has.

An `EditRecord` is one edit as the workspace stores it (a line of the journal, an entry of
the snapshot, a row of the History tab). It is written as plain JSON with the optional
fields left out when unset, exactly the shape workspaces have always stored, so files
written before these types existed read back unchanged; fields a newer version wrote are
kept as they are (`extra`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .train import Trained

# Optional fields: stored only when set (None / False / 0 are not written).
_OPTIONAL = ("final_loss", "token_accuracy", "prefix", "taught_tokens", "ends_answer", "imported", "bulk",
             "superseded_by", "forgotten_by")


@dataclass
class EditRecord:
    id: str
    prompt: str
    target: str
    block: int | None             # None once forgotten
    cluster: str | None
    action: str                   # how it was placed: "new" | "beside" | "joined" | "superseded" | ...
    created: float
    steps: int = 0
    seconds: float = 0.0
    status: str = "active"        # "active" | "superseded" | "forgotten"
    final_loss: float | None = None
    token_accuracy: float | None = None
    prefix: str | None = None     # a sentence correction: the answer's text kept before `target`
    taught_tokens: int = 0        # tokens the block was taught to say (sentence corrections)
    ends_answer: bool = False     # a sentence correction that also ends the answer
    imported: bool = False
    bulk: bool = False
    superseded_by: str | None = None
    forgotten_by: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def is_correction(self) -> bool:
        return self.prefix is not None

    def to_json(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "extra" or (f.name in _OPTIONAL and not _kept(f.name, v, self)):
                continue
            out[f.name] = v
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, d: dict) -> "EditRecord":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})

    def replace(self, **changes) -> "EditRecord":
        return dataclasses.replace(self, **changes)


def answer_text(target: str, prefix: str | None = None, ends: bool = False) -> str:
    """What an edit makes the model say, as the index compares answers: the target, or for
    a sentence correction the kept text, the corrected sentence and whether the answer ends
    there. Two corrections of one question that teach different texts (one ends the answer,
    one goes on) are different answers: the newer supersedes the older instead of joining it
    and leaving the older block to fire."""
    if prefix is None:
        return target
    return f"{prefix} {target}" + (" [end]" if ends else " [continues]")


def _kept(name: str, value, record: EditRecord) -> bool:
    if name == "taught_tokens":            # a correction keeps its count, even 0
        return record.prefix is not None
    return value is not None and value is not False


@dataclass
class Answer:
    """The model's answer to a question, and how it was routed."""

    text: str
    block: int | None             # the LoRA block that fired; None: the original model answered
    distance: float | None        # to the nearest cluster center (None: index empty)
    radius: float | None          # that cluster's radius: the block fires when distance <= radius
    cluster: str | None
    edit_id: str | None = None    # the edit whose block fired
    base_text: str | None = None  # the unedited model's answer, when asked for
    seconds: float = 0.0
    truncated: bool = False       # `text` ran to the length limit (it stops mid-thought)
    base_truncated: bool = False  # the same for `base_text`
    key: list[float] | None = None   # the question's routing key (probe: for the index map)
    # Edits within the radius the verifier turned down (router.py): (edit id, why), nearest first.
    rejected: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class EditResult:
    edit_id: str
    block: int
    cluster: str
    action: str                   # "new" | "joined" | "beside" | "superseded" | "conflict"
    steps: int
    losses: list[float]
    seconds: float
    forgotten: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)   # earlier edits given clusters of their own
    token_accuracy: float = 0.0   # teacher-forced, on the edit prompt, at the end of training
    params: int = 0               # trainable parameters of this edit's block
    superseded: list[str] = field(default_factory=list)   # earlier edits of the same question, now dormant


@dataclass
class TrainedEdit:
    """A block trained for prompt -> target that is not part of the workspace yet (MeloEditor.train)."""

    prompt: str
    target: str
    key: torch.Tensor
    trained: Trained
    started: float                # perf_counter at the start of training
    prefix: str | None = None     # a sentence correction: the answer's text kept before `target`
    taught_tokens: int = 0        # tokens of what the block was taught to say
    ends_answer: bool = False     # a sentence correction that also ends the answer
