"""Build the configured task (``cfg.task``) for a datamodule and a model config."""
from __future__ import annotations

from typing import Any

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from ssamba.errors import ConfigError
from ssamba.tasks.base import EncoderTask, data_info

# Keys of a task config that describe the run rather than the module's constructor.
RUN_KEYS = ("name", "monitor", "monitor_mode")


def extra_metrics(datamodule: Any, task_cfg: DictConfig) -> dict:
    """Dataset-specific torchmetrics: the datamodule's ``extra_metrics()`` configs plus ``task.metrics``."""
    configs = dict(datamodule.extra_metrics()) if hasattr(datamodule, "extra_metrics") else {}
    configs.update(task_cfg.get("metrics") or {})
    metrics = {}
    for name, config in configs.items():
        try:
            metrics[name] = hydra.utils.instantiate(config, _convert_="all")
        except InstantiationException as error:  # e.g. an aggregation rule that does not fit the classes
            raise ConfigError(f"metric {name!r} ({config.get('_target_')}): {error.__cause__ or error}") from None
    return metrics


def build_task(cfg: DictConfig, datamodule: Any) -> EncoderTask:
    """Instantiate ``cfg.task`` with the model (as a factory, built only when needed) and the data's facts."""
    task_cfg = OmegaConf.create(OmegaConf.to_container(cfg.task, resolve=True))  # detached from the root
    for key in RUN_KEYS:
        task_cfg.pop(key, None)
    kwargs: dict[str, Any] = {"data": data_info(datamodule)}
    if cfg.get("model") is not None:
        kwargs["encoder"] = hydra.utils.instantiate(cfg.model, _partial_=True)
    if "metrics" in task_cfg:
        kwargs["metrics"] = extra_metrics(datamodule, task_cfg)
        del task_cfg["metrics"]
    return hydra.utils.instantiate(task_cfg, _convert_="all", **kwargs)
