"""The error type every layer raises for a bad config value; imports nothing of ours, so data,
tasks and callbacks can raise it while ``ssamba.utils.config`` (which imports them) checks configs."""


class ConfigError(ValueError):
    """An inconsistent or unknown config value; the message names the key and the allowed values."""


class MissingFileError(ConfigError, FileNotFoundError):
    """A config value naming a file that is not there (a dataset not prepared yet, a typo in a path)."""
