"""Weights & Biases without surprises: offline when there is no key, never fatal to a run.

Keys come only from the environment (``WANDB_API_KEY``) or wandb's own login; nothing is read
from or written to the configs. With no ``WANDB_API_KEY`` and no ``WANDB_MODE`` the run logs
offline and says how to upload it later (``wandb sync``); set ``WANDB_MODE=online`` to use a key
stored by ``wandb login`` instead.

Offline, the copies wandb makes of what it will upload (checkpoint artifacts, tables) are kept in the
run's own ``wandb/`` folder instead of the home directory, so the folder is all ``wandb sync`` needs
and large checkpoints never fill a home quota.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from lightning.pytorch.loggers import Logger, WandbLogger

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id"  # in the run folder: the W&B run a resume into the same folder continues
LOG_MODEL_VALUES = (False, True, "all")  # logger.wandb.log_model: Lightning's checkpoint-artifact modes
STAGING_ENV = "WANDB_DATA_DIR"  # where wandb stages artifact files until they are uploaded
_staging_set_here: str | None = None  # the value this module set (a multirun job replaces it, not the user's)


def choose_wandb_mode() -> str:
    """Set ``WANDB_MODE=offline`` unless a mode was chosen or an API key is in the environment."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    os.environ["WANDB_MODE"] = "offline"
    log.info("W&B: no WANDB_API_KEY in the environment, logging offline "
             "(export WANDB_API_KEY=... or WANDB_MODE=online to log online)")
    return "offline"


def prepare_wandb(cfg, resuming: bool = False) -> None:
    """Before the loggers are built: pick the W&B mode and name the run (no-op without logger.wandb).

    ``resuming``: the fit continues from a checkpoint. If its run folder already started a W&B run (a
    requeued job, or ``ckpt_path=`` with the same ``hydra.run.dir``) and no ``logger.wandb.id`` is given,
    that W&B run is continued instead of a new one being opened.
    """
    if (cfg.get("logger") or {}).get("wandb") is None:
        return
    if choose_wandb_mode() == "offline":
        stage_in_run_folder(cfg.logger.wandb.get("save_dir") or ".")
    name_wandb_run(cfg)
    if resuming:
        continue_earlier_run(cfg.logger.wandb)


def continue_earlier_run(settings) -> None:
    """Set ``id`` (and ``resume=allow``) to the W&B run recorded in the run folder, if any and none is set."""
    from omegaconf import open_dict

    path = Path(settings.get("save_dir") or ".") / RUN_ID_FILE
    if settings.get("id") is not None or not path.is_file():
        return
    run_id = path.read_text().strip()
    if not run_id:
        return
    with open_dict(settings):
        settings.id = run_id
        settings.resume = settings.get("resume") or "allow"
    log.info("W&B: continuing run %s of this folder (%s)", run_id, path)


def record_run_id(logger: WandbLogger) -> None:
    """Write the started W&B run's id into the run folder (first process only) for a later resume there."""
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    try:
        (Path(logger.save_dir or ".") / RUN_ID_FILE).write_text(f"{logger.experiment.id}\n")
    except OSError as error:
        log.warning("W&B: could not record the run id in the run folder (%r); a resume will open a new run", error)


def stage_in_run_folder(save_dir: str) -> None:
    """Offline: stage artifact files under ``<save_dir>/wandb`` unless the user chose ``WANDB_DATA_DIR``."""
    global _staging_set_here
    if os.environ.get(STAGING_ENV) not in (None, _staging_set_here):
        return
    _staging_set_here = os.environ[STAGING_ENV] = str(Path(save_dir).absolute() / "wandb")


def name_wandb_run(cfg) -> None:
    """Fill ``logger.wandb.name``/``group`` when unset: jobs of one multirun share a group."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    settings = cfg.logger.wandb
    with open_dict(settings):
        if settings.get("name") is None:
            settings.name = cfg.name
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            job = HydraConfig.get().job
            if settings.get("group") is None:
                settings.group = f"{cfg.name}-{Path(HydraConfig.get().sweep.dir).name}"
            settings.name = f"{settings.name}-{job.num}" + (f"-{job.override_dirname}" if job.override_dirname else "")


def start_wandb(loggers: list[Logger]) -> list[Logger]:
    """Start the W&B run now (rank 0); if that fails, warn and go on with the other loggers."""
    kept = []
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            try:
                experiment = logger.experiment
                if getattr(experiment, "dir", None) and os.environ.get("WANDB_MODE") == "offline":
                    log.info("W&B offline run in %s; upload it later with: wandb sync %s",
                             Path(experiment.dir).parent, Path(experiment.dir).parent)
                record_run_id(logger)
            except Exception as error:  # no network, bad key, full disk: training goes on without W&B
                log.warning("W&B could not start (%r); continuing without it (the CSV log is complete)", error)
                continue
        kept.append(logger)
    return kept


def finish_wandb(exit_code: int = 0) -> None:
    """Close the run so the next job of a multirun starts its own, and repeat the sync hint."""
    wandb = sys.modules.get("wandb")  # never imported: no run to close (and wandb may not be installed)
    run = None if wandb is None else wandb.run
    if run is None:
        return
    try:
        run_dir = Path(run.dir).parent
        wandb.finish(exit_code=exit_code)
        if os.environ.get("WANDB_MODE") == "offline":
            log.info("W&B run saved offline; to upload: wandb sync %s", run_dir)
    except Exception as error:
        log.warning("W&B did not close cleanly (%r)", error)
