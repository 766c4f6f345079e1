"""Checks of the composed config that fail before any data is read or model built.

Each problem is a :class:`ConfigError` whose message starts with the offending key and says what
is allowed, so ``train.py`` can print it as one line. Checks that need the built objects (patch
grid vs mask count, labels of the data) live next to the code that knows them and raise the same
error type; the allowed values checked here are the ones their owning modules export.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from ssamba.checkpoints import HUB_SCHEME
from ssamba.data.circor import is_length
from ssamba.errors import ConfigError, exit_on_config_error
from ssamba.evaluation import SCORED_CHECKPOINTS
from ssamba.models.heads import POOLINGS
from ssamba.tasks import TASKS
from ssamba.tasks.finetune import LOSSES
from ssamba.tasks.masking import STYLES as MASK_STYLES
from ssamba.tasks.pretrain import JOINT_PASSES
from ssamba.utils.wandb import LOG_MODEL_VALUES

CPU_BACKENDS = ("gloo",)
DDP_STRATEGIES = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "ddp_find_unused_parameters_true")


def config_errors_exit(log: logging.Logger) -> contextlib.AbstractContextManager[None]:
    """Around an entry point's work: a :class:`ConfigError` behind any exception (Hydra wraps those raised while
    instantiating) is one logged ``config error`` line and exit status 2, not a traceback; the rest propagate."""
    return exit_on_config_error(lambda error: log.error("config error: %s", error))


def missing_keys(node, prefix: str = "") -> list[str]:
    """Keys set to ``???`` (interpolations to them are reported at their source, not resolved)."""
    found = []
    if isinstance(node, DictConfig):
        items = [(str(key), key) for key in node.keys() if not (prefix == "" and key == "hydra")]
    elif isinstance(node, ListConfig):
        items = [(str(index), index) for index in range(len(node))]
    else:
        return found
    for name, key in items:
        if OmegaConf.is_missing(node, key):
            found.append(prefix + name)
        elif not OmegaConf.is_interpolation(node, key):
            found.extend(missing_keys(node._get_node(key), f"{prefix}{name}."))
    return found


def _get(cfg: DictConfig, key: str, default=None):
    value = OmegaConf.select(cfg, key, default=default, throw_on_missing=False)
    return default if value is None else value


def _require_positive_int(cfg: DictConfig, key: str) -> None:
    value = _get(cfg, key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(f"{key}={value!r}: must be a positive integer")


def _choice(cfg: DictConfig, key: str, allowed: tuple) -> None:
    value = _get(cfg, key)
    if value is not None and value not in allowed:
        raise ConfigError(f"{key}={value!r}: allowed values are {', '.join(map(str, allowed))}")


def _strategy_name(strategy) -> str | None:
    if isinstance(strategy, str):
        return strategy
    if isinstance(strategy, DictConfig):
        target = str(strategy.get("_target_", ""))
        return "ddp" if target.endswith("DDPStrategy") else target.rsplit(".", 1)[-1] or None
    return None


def validate_config(cfg: DictConfig) -> None:
    """Static checks of a composed training config (``conf/train.yaml`` and its groups)."""
    missing = missing_keys(cfg)
    if missing:
        raise ConfigError(f"{missing[0]}: is required (???) but not set; set it on the command line, "
                          f"e.g. {missing[0]}=... (all missing: {', '.join(missing)})")
    for key in _get(cfg, "required", []):  # a recipe's keys that must not stay null
        if _get(cfg, key) is None:
            raise ConfigError(f"{key}: this recipe needs it set; give {key}=... on the command line")
    _choice(cfg, "task.name", TASKS)
    task = _get(cfg, "task.name")
    if task == "pretrain":
        _choice(cfg, "mask.style", MASK_STYLES)
        _require_positive_int(cfg, "mask.count")
        _require_positive_int(cfg, "mask.val_count")
        _choice(cfg, "task.joint_passes", JOINT_PASSES)
        if "model" not in cfg or cfg.model is None:
            raise ConfigError("model: task=pretrain needs a model, allowed: model=tiny|small|base|ssast_*")
    if task == "finetune":
        _choice(cfg, "task.pooling", POOLINGS)
        _choice(cfg, "task.loss", LOSSES)
        _require_positive_int(cfg, "task.fstride")
        _require_positive_int(cfg, "task.tstride")
        if _get(cfg, "task.num_classes") is not None:
            _require_positive_int(cfg, "task.num_classes")
        if _get(cfg, "task.head_lr_multiplier", 1.0) <= 0:
            raise ConfigError(f"task.head_lr_multiplier={cfg.task.head_lr_multiplier}: must be > 0")
    if task in ("finetune", "probe"):
        pretrained = _get(cfg, "task.pretrained")
        if pretrained is not None and not (Path(pretrained).is_file() or Path(pretrained).is_dir()
                                           or str(pretrained).startswith(HUB_SCHEME)):
            raise ConfigError(f"task.pretrained={pretrained}: no such checkpoint file or model folder")
    if _get(cfg, "task.cuda_graphs", False) is True and _get(cfg, "trainer.accelerator", "auto") == "cpu":
        raise ConfigError("task.cuda_graphs=true: CUDA graphs need a GPU, but trainer.accelerator=cpu; "
                          "allowed: task.cuda_graphs=false, or trainer=gpu|ddp")
    if _get(cfg, "task.warmup_steps", 0) < 0:
        raise ConfigError(f"task.warmup_steps={cfg.task.warmup_steps}: must be >= 0")
    scored = _get(cfg, "score_checkpoint")
    if scored is not None and (task != "finetune" or scored not in SCORED_CHECKPOINTS):
        raise ConfigError(f"score_checkpoint={scored}: allowed values are {', '.join(SCORED_CHECKPOINTS)} or null, "
                          "with task=finetune")
    ensemble = list(_get(cfg, "score_ensemble") or [])
    if ensemble and scored is None:
        raise ConfigError("score_ensemble=[...] is scored together with the run's own checkpoint: set "
                          "score_checkpoint=last|best too")
    missing = [path for path in ensemble if not Path(str(path)).is_file()]
    if missing:
        raise ConfigError(f"score_ensemble: no such checkpoint file {missing[0]}")
    lengths = list(_get(cfg, "score_max_seconds") or [])
    if lengths and scored is None:
        raise ConfigError("score_max_seconds=[...] scores the run's checkpoint on shorter recordings: set "
                          "score_checkpoint=last|best too")
    if not all(map(is_length, lengths)):
        raise ConfigError(f"score_max_seconds={lengths}: each must be a positive number of seconds")
    ckpt_path = _get(cfg, "ckpt_path")
    if ckpt_path is not None and ckpt_path != "last" and not Path(ckpt_path).is_file():
        # 'best' means a best checkpoint of this trainer, which a run that starts has none of
        raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file (or 'last': the run folder's last.ckpt)")
    _validate_trainer(cfg)
    _validate_loggers(cfg)


def _validate_loggers(cfg: DictConfig) -> None:
    wandb = (cfg.get("logger") or {}).get("wandb")
    if wandb is not None:
        log_model = wandb.get("log_model", False)  # 1 == True: only real booleans and the listed strings
        if not (log_model in LOG_MODEL_VALUES if isinstance(log_model, str) else isinstance(log_model, bool)):
            raise ConfigError(f"logger.wandb.log_model={log_model!r}: allowed values are "
                              f"{', '.join(str(v).lower() for v in LOG_MODEL_VALUES)}")
    targets = [str(entry.get("_target_", "")) for entry in (cfg.get("logger") or {}).values() if entry]
    if any(target.endswith("TensorBoardLogger") for target in targets):
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("logger=tensorboard needs the tensorboard package (pip install tensorboard); "
                              "allowed without it: logger=wandb|csv|none") from None


def _validate_trainer(cfg: DictConfig) -> None:
    trainer = cfg.get("trainer")
    if trainer is None:
        raise ConfigError("trainer: missing; allowed: trainer=default|cpu|gpu|ddp|ddp_sim")
    accelerator = _get(cfg, "trainer.accelerator", "auto")
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={accelerator}: no CUDA device on this machine; allowed here: "
                              "cpu or auto (trainer=default|cpu|ddp_sim)")
    strategy = _strategy_name(trainer.get("strategy"))
    backend = _get(cfg, "trainer.strategy.process_group_backend")
    if accelerator == "cpu" and strategy in DDP_STRATEGIES and backend not in (None, *CPU_BACKENDS):
        raise ConfigError(f"trainer.strategy.process_group_backend={backend}: DDP on CPU needs "
                          f"{' or '.join(CPU_BACKENDS)} (nccl is GPU only)")
    precision = str(_get(cfg, "trainer.precision", "32-true"))
    if accelerator == "cpu" and precision in ("16-mixed", "16", "16-true"):
        raise ConfigError(f"trainer.precision={precision}: float16 does not run on CPU; allowed there: "
                          "32-true, bf16-mixed, bf16-true")
    devices = _get(cfg, "trainer.devices", 1)
    if accelerator == "cpu" and isinstance(devices, int) and devices > 1 and strategy not in DDP_STRATEGIES:
        raise ConfigError(f"trainer.devices={devices}: several CPU processes need a DDP strategy "
                          "(use trainer=ddp_sim)")
