"""A small model registry: every encoder family registers named sizes here."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
# how an encoder runs, not what it is: left out of checkpoints, chosen when one is loaded
RUNTIME_FIELDS = ("backend",)
DEFAULT_FAMILY = "ssamba"  # a bare size (tiny, small, base) names this family's model


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
    key = name if name in _MODELS else f"{DEFAULT_FAMILY}_{name}"
    if key not in _MODELS:
        sizes = [m[len(DEFAULT_FAMILY) + 1:] for m in list_models() if m.startswith(DEFAULT_FAMILY + "_")]
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(list_models())} "
                       f"(or a size: {', '.join(sizes)})")
    return _MODELS[key](**overrides)


def encoder_record(encoder: nn.Module) -> dict[str, Any]:
    """The encoder's config as checkpoints store it: every field but the runtime ones."""
    return {k: v for k, v in dataclasses.asdict(encoder.config).items() if k not in RUNTIME_FIELDS}


def encoder_from_config(config: dict[str, Any], backend: str | None = None) -> nn.Module:
    """Rebuild an encoder from :func:`encoder_record` (or ``dataclasses.asdict(encoder.config)``).

    A runtime field that an older checkpoint stored is ignored; ``backend`` (None: the family's
    default) is the one way to choose the kernels of a rebuilt encoder.
    """
    config = {k: v for k, v in config.items() if k not in RUNTIME_FIELDS}
    encoder = build_encoder(config.pop("name"), **config)
    if backend is not None:
        encoder.set_backend(backend)
    return encoder


def config_overrides(config_cls: type, defaults: dict[str, Any], overrides: dict[str, Any]):
    """Instantiate a config dataclass, rejecting unknown override keys with the allowed names."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown {config_cls.__name__} field(s) {unknown}; allowed: {sorted(fields)}")
    return config_cls(**{**defaults, **overrides})
