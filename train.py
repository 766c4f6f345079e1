"""Train an encoder: ``python train.py model=tiny task=pretrain [group=choice] [key=value]``.

Compose the config, check it, seed, build data / task / callbacks / loggers / trainer, fit, test the
best checkpoint where the data has a test split (and with ``score_checkpoint=last|best`` score one per patient,
as evaluate.py does), and return the monitored metric (for sweepers).
Config groups and recipes: docs/training.md.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig, OmegaConf

from ssamba.callbacks.preemption import EXIT_STATUS as PREEMPTED_EXIT_STATUS
from ssamba.callbacks.resume_points import last_checkpoint_in, last_checkpoint_path
from ssamba.errors import ConfigError
from ssamba.evaluation import score_checkpoint
from ssamba.tasks import build_task
from ssamba.utils.atomic_checkpoint import atomic_write_bytes
from ssamba.utils.config import config_errors_exit, validate_config
from ssamba.utils.instantiate import build_callbacks, instantiate_named
from ssamba.utils.launch import (ddp_worker_argv, end_distributed_job, export_job_for_ddp_workers,
                                 keep_earlier_metrics, quote_numeric_choices, refuse_plugin_launchers,
                                 requeued_checkpoint, slurm_resumes, unshared_run_folder, with_cpu_quickstart)
from ssamba.utils.memory import cpu_step_problem
from ssamba.utils.wandb import finish_wandb, prepare_wandb, start_wandb

log = logging.getLogger("train")


def train(cfg: DictConfig) -> float | None:
    validate_config(cfg)
    problem = unshared_run_folder()
    if problem:
        raise ConfigError(problem)
    L.seed_everything(cfg.seed, workers=True)
    export_job_for_ddp_workers()
    datamodule = hydra.utils.instantiate(cfg.data)
    if cfg.get("score_checkpoint") and not ("test" in getattr(datamodule, "splits", ())
                                            and hasattr(datamodule, "aggregation")):
        raise ConfigError(f"score_checkpoint={cfg.score_checkpoint}: the data has no test split of patients to score")
    if cfg.get("score_max_seconds") and not hasattr(datamodule, "set_eval_max_seconds"):
        raise ConfigError(f"score_max_seconds={list(cfg.score_max_seconds)}: {type(datamodule).__name__} cannot "
                          "score shortened recordings (data=circor can)")
    task = build_task(cfg, datamodule)
    callbacks = build_callbacks(cfg)
    # a requeued job continues from its own last.ckpt, not from the ckpt_path it was first started with
    root_dir = cfg.trainer.get("default_root_dir") or os.getcwd()
    ckpt_path = requeued_checkpoint(last_checkpoint_in(callbacks, root_dir)) or cfg.get("ckpt_path")
    prepare_wandb(cfg, resuming=ckpt_path is not None or slurm_resumes(root_dir))
    keep_earlier_metrics(cfg.paths.output_dir)
    loggers = start_wandb(instantiate_named(cfg.get("logger"), "logger"))
    exit_code, score = 1, None
    try:
        trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        if isinstance(trainer.accelerator, CPUAccelerator):  # a GPU recipe on CPU: refused before its first step
            problem = cpu_step_problem(task.encoder, cfg.data.batch_size, getattr(task, "joint_passes", 1),
                                       trainer.world_size)
            if problem:
                raise ConfigError(problem)
        for logger in trainer.loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
        score = _monitored(trainer, cfg.task.monitor)
        if cfg.get("test") and _has_test_split(datamodule):
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            trainer.test(task, datamodule=datamodule, ckpt_path=best or None)
        if cfg.get("score_checkpoint") and trainer.is_global_zero:
            _score_test(cfg.score_checkpoint, list(cfg.get("score_ensemble") or []),
                        list(cfg.get("score_max_seconds") or []), trainer, datamodule, cfg.paths.output_dir)
        exit_code = 0
    finally:
        finish_wandb(exit_code)
        end_distributed_job()
    if trainer.is_global_zero:
        log.info("%s = %s; outputs in %s", cfg.task.monitor, score, cfg.paths.output_dir)
    return score


def _score_test(which: str, ensemble: list[str], max_seconds: list[float], trainer: L.Trainer, datamodule,
                output_dir: str) -> None:
    """Score the run's ``which`` checkpoint (with the ``ensemble`` checkpoints, if any, as one ensemble) on the
    test patients in this process, exactly as evaluate.py would (rebuilt from the files), and write scores and
    patient predictions to ``<run>/test_scores.json``: a second process would redo the imports, the device
    set-up and the loader workers. For each of ``max_seconds``, the scores on each recording's first that
    many seconds as well (``by_max_seconds``)."""
    path = last_checkpoint_path(trainer) if which == "last" else trainer.checkpoint_callback.best_model_path
    started = time.perf_counter()
    precision = "bf16" if "bf16" in str(trainer.precision) else "32"
    scores, patients, shortened = score_checkpoint([path, *ensemble], datamodule, "test",
                                                   trainer.strategy.root_device, precision, max_seconds)
    record = {"checkpoint": which, "members": 1 + len(ensemble), "split": "test", "precision": precision,
              "scores": scores, "patients": patients, **({"by_max_seconds": shortened} if shortened else {}),
              "seconds": time.perf_counter() - started}
    atomic_write_bytes((json.dumps(record) + "\n").encode(), Path(output_dir) / "test_scores.json")
    log.info("test patients: %s", ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))


def _has_test_split(datamodule) -> bool:
    if hasattr(datamodule, "splits"):  # ssamba datamodules list the splits their config provides
        return "test" in datamodule.splits
    return is_overridden("test_dataloader", datamodule)


def _monitored(trainer: L.Trainer, monitor: str) -> float | None:
    """The best checkpoint's score, else the last logged value (fast_dev_run saves no checkpoints)."""
    score = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
    if score is None:
        score = trainer.callback_metrics.get(monitor)
    return None if score is None else float(score)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        with config_errors_exit(log):
            return train(cfg)
    except SIGTERMException as stop:  # Lightning's own stop on SIGTERM carries no status: a scheduler would read 0
        raise SystemExit(stop.code or PREEMPTED_EXIT_STATUS) from None


if __name__ == "__main__":
    sys.argv = with_cpu_quickstart(quote_numeric_choices(refuse_plugin_launchers(ddp_worker_argv(sys.argv))))
    main()
