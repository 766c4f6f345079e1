"""Run plumbing: config checks, W&B, launching, figures."""
from ssamba.utils.config import ConfigError, validate_config

__all__ = ["ConfigError", "validate_config"]
