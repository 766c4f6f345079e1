"""Command-line and process plumbing around ``train.py``.

* Numeric choices: Hydra parses ``mask=250`` as an integer, which cannot name a config file, so
  ``mask=250`` and sweeps like ``mask=250,300,400`` are quoted before Hydra sees them.
* CPU quick start: with no GPU and no ``trainer=``/``experiment=`` on the command line, the default
  run (pretraining on generated audio) gets ``experiment=quickstart_cpu`` (a real pretraining sized
  to finish in minutes on a laptop).
* DDP inside Hydra multiruns: Lightning starts DDP workers by re-running the script with the
  original command line, which for ``-m`` would start the whole sweep again in every worker. The
  job exports its own overrides and output folder, and a worker started for it runs just that job.
* Between multirun jobs the process group is torn down and the launcher's environment variables are
  removed, so the next job starts its own workers on a fresh port.
* Processes started by torchrun or srun (e.g. on several nodes) each compose the config and would each resolve
  the default run folder's ``${now:...}``, so such a run must name its folder (``hydra.run.dir``).
* Cluster sweeps (``hydra/launcher=slurm``): a job that submitit requeued after its time limit or a
  pre-emption runs again in its own folder and continues from the ``last.ckpt`` it wrote there.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

JOB_ENV = "SSAMBA_DDP_JOB_ARGS"
# Set by Lightning's launcher in the process that starts the workers; left behind, they make the
# next job think its workers were started externally (LOCAL_RANK) and never start them.
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
_launcher_env_to_clear: list[str] = []
QUICKSTART = "experiment=quickstart_cpu"
# a choice of the user's; a cluster launcher runs the jobs elsewhere, so this machine's lack of a GPU says nothing
_CHOICE_PREFIXES = ("trainer=", "experiment=", "+experiment=", "~experiment", "hydra/launcher=")
# The run the quick start sizes; its keys (data.num_train, task.joint_passes) fit no other task or dataset.
_QUICKSTART_RUN = {"task": "pretrain", "data": "synthetic"}
_LIGHTNING_CHILD_ARGS = ("hydra.job.name=", "hydra.output_subdir=")


# hydra-submitit-launcher's own configs, which conf/hydra/launcher/{slurm,local}.yaml extend with this project's
# job layout; chosen directly they would run without it (one task per job, whatever trainer.devices says)
PLUGIN_LAUNCHERS = {"submitit_slurm": "slurm", "submitit_local": "local"}


def _group_choice(arg: str) -> tuple[str, str]:
    """``[+]group=choice`` on the command line -> (group, choice without shell quotes)."""
    group, _, choice = arg.lstrip("+").partition("=")
    return group, choice.strip("'\"")


def refuse_plugin_launchers(argv: list[str]) -> list[str]:
    """Stop, naming ours, when the command line chooses one of :data:`PLUGIN_LAUNCHERS`."""
    for arg in argv[1:]:
        group, choice = _group_choice(arg)
        if group == "hydra/launcher" and choice in PLUGIN_LAUNCHERS:
            ours = PLUGIN_LAUNCHERS[choice]
            print(f"config error: {arg} is hydra-submitit-launcher's bare config, without this project's job "
                  f"layout; use hydra/launcher={ours} (conf/hydra/launcher/{ours}.yaml)", file=sys.stderr)
            raise SystemExit(2)
    return argv


NUMERIC_GROUPS = ("mask",)
_NUMERIC_CHOICE = re.compile(rf"^(\+?(?:{'|'.join(NUMERIC_GROUPS)}))=(\d+(?:,\d+)*)$")


def quote_numeric_choices(argv: list[str]) -> list[str]:
    """``mask=250,300`` -> ``mask="250","300"`` (config groups whose file names are numbers)."""
    quoted = []
    for arg in argv:
        match = _NUMERIC_CHOICE.match(arg)
        if match:
            arg = f"{match[1]}=" + ",".join(f'"{value}"' for value in match[2].split(","))
        quoted.append(arg)
    return quoted


def with_cpu_quickstart(argv: list[str]) -> list[str]:
    """Add ``experiment=quickstart_cpu`` when there is no GPU, the user chose no trainer/experiment/launcher
    and the run is pretraining on generated audio (another ``task=`` or ``data=`` keeps its own config)."""
    if torch.cuda.is_available() or any(arg.startswith(_CHOICE_PREFIXES) for arg in argv[1:]):
        return argv
    for arg in argv[1:]:
        group, choice = _group_choice(arg)
        if group in _QUICKSTART_RUN and choice != _QUICKSTART_RUN[group]:
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
    args = [*hydra_cfg.overrides.task, f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"']
    os.environ[JOB_ENV] = json.dumps(args)
    _launcher_env_to_clear[:] = [key for key in LAUNCHER_ENV if key not in os.environ]


def end_distributed_job() -> None:
    """Leave the process group and drop what the launcher set, so the next multirun job starts clean."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key in _launcher_env_to_clear:
        os.environ.pop(key, None)
    _launcher_env_to_clear.clear()


def external_launcher() -> str | None:
    """``torchrun`` or ``srun`` when one of them started this process as one of several, else None (one process,
    or workers that Lightning started itself, which it hands the run folder)."""
    if "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "torchrun"
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        return "srun"
    return None


def unshared_run_folder() -> str | None:
    """Why the processes of this run might not share one output folder, or None.

    Under torchrun or srun every process composes the config and resolves the default
    ``hydra.run.dir`` (``.../runs/${now:...}``) itself, at a slightly different time and possibly on another
    node's clock; rank 0 would write checkpoints and metrics to one folder and the others their logs elsewhere.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    launcher = external_launcher()
    if launcher is None or not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.RUN:
        return None
    if any(arg.lstrip("+").startswith("hydra.run.dir=") for arg in HydraConfig.get().overrides.hydra):
        return None
    example = "$SLURM_JOB_ID" if launcher == "srun" else "<job name>"
    return (f"hydra.run.dir: set it on the command line when {launcher} starts the processes (e.g. "
            f"hydra.run.dir=outputs/<name>/runs/{example}); each process would resolve the default "
            f"...runs/${{now:...}} folder itself and the ranks could write to different folders")


def in_submitit_job() -> bool:
    """Whether this process is a job that submitit started (on SLURM or locally)."""
    return bool(os.environ.get("SUBMITIT_EXECUTOR") or os.environ.get("SUBMITIT_LOCAL_JOB_ID"))


def submitit_signal() -> int:
    """The signal submitit sends before a job's time limit or at pre-emption (USR2 unless configured)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


def requeued_checkpoint(last_checkpoint: str) -> str | None:
    """In a submitit job, the ``last.ckpt`` an earlier attempt of this job left in its folder, if any.

    Each job of a sweep has a folder of its own, so a checkpoint already there was written by this job
    before submitit requeued it: continuing from it, not from scratch, is what the requeue is for.
    """
    if not (in_submitit_job() and os.path.isfile(last_checkpoint)):
        return None
    log.info("requeued job: continuing from %s", last_checkpoint)
    return last_checkpoint


def slurm_resumes(root_dir: str) -> bool:
    """Whether Lightning will resume this SLURM job from an ``hpc_ckpt_<n>.ckpt`` of its requeue handler:
    it does so, by itself, when a fit without ``ckpt_path`` finds one in ``default_root_dir``."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.detect() and any(Path(root_dir).glob("hpc_ckpt_*.ckpt"))


def keep_earlier_metrics(output_dir: str) -> str | None:
    """Move a ``metrics.csv`` already in the run folder to ``metrics.<n>.csv`` before the CSV logger starts.

    A folder is reused by a requeued job or a resume into the same ``hydra.run.dir``; Lightning's CSV
    logger would delete the earlier rows. Only the first process does this (ranks share the folder).
    """
    from lightning.pytorch.utilities import rank_zero_only

    current = os.path.join(output_dir, "metrics.csv")
    if rank_zero_only.rank != 0 or not os.path.isfile(current):
        return None
    number = 1
    while os.path.exists(os.path.join(output_dir, f"metrics.{number}.csv")):
        number += 1
    kept = os.path.join(output_dir, f"metrics.{number}.csv")
    os.replace(current, kept)
    log.info("this run folder already had metrics.csv (an earlier attempt): kept as %s", kept)
    return kept
