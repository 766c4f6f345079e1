"""The error type every layer raises for a bad config value, and how entry points find it behind Hydra's
wrapping; imports nothing of ours, so data, tasks and callbacks can raise it while ``ssamba.utils.config``
(which imports them) checks configs."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


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
def exit_on_config_error(report: Callable[[ConfigError], None]) -> Iterator[None]:
    """Around an entry point's work: a :class:`ConfigError` behind any exception is handed to ``report`` (one
    line) and ends the process with exit status 2, not a traceback; the rest propagate."""
    try:
        yield
    except Exception as error:
        config_error = find_config_error(error)
        if config_error is None:
            raise
        report(config_error)
        raise SystemExit(2) from None


def config_errors_exit_cli(prog: str) -> contextlib.AbstractContextManager[None]:
    """:func:`exit_on_config_error` for a module command: ``<prog>: config error: ...`` on stderr."""
    return exit_on_config_error(lambda error: print(f"{prog}: config error: {error}", file=sys.stderr))
