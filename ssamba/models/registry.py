"""A small model registry: every encoder family registers named sizes here."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_SIZE_ALIASES = {"tiny": "ssamba_tiny", "small": "ssamba_small", "base": "ssamba_base"}


def register_model(name: str):
    """Register ``factory(**overrides) -> encoder`` under ``name``."""

    def decorator(factory: Callable[..., nn.Module]):
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    return sorted(_MODELS)


def build_encoder(name: str, **overrides: Any) -> nn.Module:
    """Build a registered encoder backbone (no task head); ``overrides`` are fields of its config."""
    key = _SIZE_ALIASES.get(name, name)
    if key not in _MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(list_models())} "
                       f"(or a size: {', '.join(_SIZE_ALIASES)})")
    return _MODELS[key](**overrides)


def encoder_from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuild an encoder from ``dataclasses.asdict(encoder.config)`` (as stored in checkpoints)."""
    config = dict(config)
    return build_encoder(config.pop("name"), **config)


def config_overrides(config_cls: type, defaults: dict[str, Any], overrides: dict[str, Any]):
    """Instantiate a config dataclass, rejecting unknown override keys with the allowed names."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown {config_cls.__name__} field(s) {unknown}; allowed: {sorted(fields)}")
    return config_cls(**{**defaults, **overrides})
