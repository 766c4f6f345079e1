"""Command-line and process plumbing around ``train.py``.

* CPU quick start: with no GPU and no ``trainer=``/``experiment=`` on the command line, a run gets
  ``experiment=quickstart_cpu`` (a real pretraining sized to finish in minutes on a laptop).
* DDP inside Hydra multiruns: Lightning starts DDP workers by re-running the script with the
  original command line, which for ``-m`` would start the whole sweep again in every worker. The
  job exports its own overrides and output folder, and a worker started for it runs just that job.
* Between multirun jobs the process group is torn down, so the next job's workers can join a new one.
"""
from __future__ import annotations

import json
import logging
import os

import torch

log = logging.getLogger(__name__)

JOB_ENV = "SSAMBA_DDP_JOB_ARGS"
PORT_ENV_OWNED = "SSAMBA_OWNS_MASTER_PORT"
QUICKSTART = "experiment=quickstart_cpu"
_CHOICE_PREFIXES = ("trainer=", "experiment=", "+experiment=", "~experiment")
_LIGHTNING_CHILD_ARGS = ("hydra.job.name=", "hydra.output_subdir=")


def with_cpu_quickstart(argv: list[str]) -> list[str]:
    """Add ``experiment=quickstart_cpu`` when there is no GPU and the user chose no trainer/experiment."""
    if torch.cuda.is_available() or any(arg.startswith(_CHOICE_PREFIXES) for arg in argv[1:]):
        return argv
    if any(arg in ("--help", "-h", "--hydra-help", "--info") or arg.startswith("--cfg") for arg in argv[1:]):
        return argv
    print(f"No GPU found: adding {QUICKSTART} (CPU-sized run). Pass trainer=... or experiment=... to choose yourself.",
          flush=True)
    return [*argv, QUICKSTART]


def ddp_worker_argv(argv: list[str]) -> list[str]:
    """In a DDP worker started for one multirun job, replace the sweep command line by that job's."""
    job = os.environ.get(JOB_ENV)
    if job is None or int(os.environ.get("LOCAL_RANK", "0")) == 0:
        return argv
    from_lightning = [arg for arg in argv[1:] if arg.startswith(_LIGHTNING_CHILD_ARGS)]
    return [argv[0], *json.loads(job), *from_lightning]


def export_job_for_ddp_workers() -> None:
    """Called by each job: record its overrides and folder for DDP workers, or clear a stale record."""
    os.environ.pop(JOB_ENV, None)
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    args = [*hydra_cfg.overrides.task, f"hydra.run.dir={hydra_cfg.runtime.output_dir}"]
    os.environ[JOB_ENV] = json.dumps(args)
    if "MASTER_PORT" not in os.environ:
        os.environ[PORT_ENV_OWNED] = "1"  # Lightning will pick a port; we may drop it after the job


def end_distributed_job() -> None:
    """Leave the process group and forget the port we picked, so the next multirun job starts clean."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if os.environ.pop(PORT_ENV_OWNED, None):
        os.environ.pop("MASTER_PORT", None)
