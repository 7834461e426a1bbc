"""The interface every editing method has, so one benchmark loop measures them all alike.

A method makes edits and, for a batch of prompts, makes the shared Backbone behave as the
edited model, each prompt routed on its own (`applied(prompts, last)`, a context manager;
`last[i]` is where prompt i's last token sits in the batch). Methods are found by name in
registry.METHODS and made by `create`, which every method takes with the same arguments,
so `build` needs no list of them.
"""
from __future__ import annotations

import abc
import contextlib
from pathlib import Path


class EditingMethod(abc.ABC):
    name: str = ""

    @classmethod
    @abc.abstractmethod
    def create(cls, backbone, workspace: Path, settings: dict | None, chat: bool, ends: bool) -> "EditingMethod":
        """A fresh method on `backbone`. `workspace`: a folder it may keep its edits in;
        `settings`: the method's own options by name (None: its defaults); `chat=False`:
        prompts are plain text the model continues; `ends=False`: a target is a sentence the
        text goes on from (the hallucination task)."""

    @abc.abstractmethod
    def edit(self, prompt: str, target: str) -> dict:
        """Make one edit; at least {"seconds", "params"} of it."""

    @abc.abstractmethod
    def applied(self, prompts: list[str], last: list[int]) -> contextlib.AbstractContextManager:
        """Inside, the backbone answers `prompts` as the edited model."""

    @abc.abstractmethod
    def summary(self) -> dict:
        """Figures about the method's state after the edits, and its settings."""

    def close(self) -> None:
        """Release what the method holds open (files, threads). Most hold nothing."""
