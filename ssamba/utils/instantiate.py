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
