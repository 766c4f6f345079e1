"""Composing the data config from the command line, shared by the summary and stats commands."""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

DEFAULT_CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose_data_config(overrides: list[str], config_dir: str | os.PathLike | None = None) -> DictConfig:
    """The ``data`` node as training would see it: the root ``train.yaml`` when the config dir has
    one, otherwise the ``data`` group alone (``data=synthetic`` unless chosen)."""
    config_dir = Path(config_dir or DEFAULT_CONFIG_DIR).resolve()
    if not (config_dir / "data").is_dir():
        raise FileNotFoundError(f"no data config group in {config_dir}")
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        if (config_dir / "train.yaml").is_file():
            return compose("train", overrides=overrides).data
        if not any(o.split("=", 1)[0].lstrip("+~") == "data" for o in overrides):
            overrides = ["data=synthetic", *overrides]
        overrides = ["+" + o if o.startswith("data=") else o for o in overrides]
        return compose(overrides=overrides).data


def instantiate_data(overrides: list[str], config_dir: str | os.PathLike | None = None):
    return instantiate(compose_data_config(overrides, config_dir), _convert_="partial")
