"""Hydra instantiation of the config sections that hold a named set of objects (loggers, callbacks)."""
from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig


def instantiate_named(section: DictConfig | None, key: str) -> list[Any]:
    """One object per entry with a ``_target_``; entries set to null are switched off."""
    if not section:
        return []
    objects = []
    for name, entry in section.items():
        if entry is None:
            continue
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            raise ValueError(f"{key}.{name}: expected a config with _target_ (or null to switch it off)")
        objects.append(hydra.utils.instantiate(entry, _convert_="all"))
    return objects


def build_callbacks(cfg: DictConfig) -> list[Any]:
    """``cfg.callbacks``; a configured progress bar is left out when ``trainer.enable_progress_bar`` is false."""
    from lightning.pytorch.callbacks import ProgressBar

    callbacks = instantiate_named(cfg.get("callbacks"), "callbacks")
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return callbacks
