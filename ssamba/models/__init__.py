"""Encoder families. Importing this package registers every family with the registry."""
from . import ssamba  # noqa: F401  (registers ssamba_tiny/small/base)
from . import ssast  # noqa: F401  (registers ssast_tiny/small/base)
from .registry import build_encoder, encoder_from_config, list_models, register_model
from .ssamba import SSAMBAConfig, SSAMBAEncoder

__all__ = ["build_encoder", "encoder_from_config", "list_models", "register_model", "SSAMBAConfig", "SSAMBAEncoder"]
