"""Changing a workspace's settings: those that apply to new edits only (radius, rank,
learning rate, ...) at any time, and those that decide what keys mean (the key source, the
prompt mode) only while the workspace has no edits, with the radius recalibrated.
"""
from __future__ import annotations

import dataclasses

from . import store
from .calibrate import calibrated_radius
from .config import EDIT_SETTINGS, MeloConfig
from .keys import Keyer


def default_settings(ed) -> dict:
    """The settings a new workspace of this model and key source starts with."""
    fresh = MeloConfig()
    out = {k: getattr(fresh, k) for k in EDIT_SETTINGS if k != "init_radius"}
    out["init_radius"] = calibrated_radius(ed.backbone, ed.config, ed.keyer)
    return out


def update(ed, **changes) -> MeloConfig:
    """Change settings that affect new edits only (radius, rank, lr, iterations, ...)."""
    bad = set(changes) - set(EDIT_SETTINGS)
    if bad:
        raise ValueError(f"cannot change {sorted(bad)} on an existing workspace")
    ed.ws.writable()
    with ed.ws.lock:
        cfg = dataclasses.replace(ed.config, **changes)
        cfg.validate()
        cfg.save(ed.workspace / store.CONFIG)
        ed.config = cfg
    return cfg


def reroute(ed, what: str, **changes) -> MeloConfig:
    """A setting that decides what keys mean: changed only while there are no edits, and
    the radius recalibrated. The first of `changes` is the one asked for."""
    ed.ws.writable()
    first, value = next(iter(changes.items()))
    with ed.ws.lock:
        if getattr(ed.config, first) == value:
            return ed.config
        if ed.ws.entries:
            raise ValueError(f"the {what} can change only while the workspace has no edits: reset it first")
        cfg = dataclasses.replace(ed.config, init_radius=None, **changes)
        cfg.validate()
        keyer = Keyer(ed.backbone, cfg)
        cfg = dataclasses.replace(cfg, init_radius=calibrated_radius(ed.backbone, cfg, keyer))
        cfg.save(ed.workspace / store.CONFIG)
        ed.config, ed.keyer = cfg, keyer
        return cfg
