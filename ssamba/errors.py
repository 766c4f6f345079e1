"""The error type every layer raises for a bad config value, and how entry points find it behind Hydra's
wrapping; imports nothing of ours, so data, tasks and callbacks can raise it while ``ssamba.utils.config``
(which imports them) checks configs."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class ConfigError(ValueError):
    """An inconsistent or unknown config value; the message names the key and the allowed values."""


class MissingFileError(ConfigError, FileNotFoundError):
    """A config value naming a file that is not there (a dataset not prepared yet, a typo in a path)."""


def find_config_error(error: BaseException | None) -> ConfigError | None:
    """The ConfigError behind an exception (Hydra wraps errors raised while instantiating)."""
    while error is not None:
        if isinstance(error, ConfigError):
            return error
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def config_errors_exit_cli(prog: str) -> Iterator[None]:
    """Around a module command's work: a :class:`ConfigError` behind any exception is one ``<prog>: config
    error`` line on stderr and exit status 2, as ``train.py`` logs its own; the rest propagate."""
    try:
        yield
    except Exception as error:
        config_error = find_config_error(error)
        if config_error is None:
            raise
        print(f"{prog}: config error: {config_error}", file=sys.stderr)
        raise SystemExit(2) from None
