"""Checkpoint at the next resumable point when the job is told to stop, then stop.

* SIGTERM (``kill``, Kubernetes, SLURM at pre-emption or at the time limit): Lightning's handler only notes it.
  This callback lets the current batch finish (and the validation due right after it, if any), writes
  ``<checkpoints>/last.ckpt`` and ends the process with exit status 143 (128 + SIGTERM).
* SLURM's requeue signal (SIGUSR1 by default; ask for it with ``#SBATCH --signal=SIGUSR1@120``): Lightning's
  ``SLURMEnvironment`` handler saves ``hpc_ckpt_<n>.ckpt`` and runs ``scontrol requeue``. Run inside the signal
  handler, that save could catch an optimizer step half-way, so this callback defers Lightning's handler to the
  resumable point as well, writes ``last.ckpt`` too and stops the run; the requeued job resumes
  (docs/reliability.md).
* A submitit job (``hydra/launcher=slurm`` or ``local``) gets submitit's pre-emption signal
  (USR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` names another) before its time limit. submitit's handler requeues
  the job and exits at once; this callback runs it at the resumable point instead, after writing ``last.ckpt``,
  and the requeued job continues from there (``ssamba.utils.launch.requeued_checkpoint``).

A SIGTERM that arrives during a fit's validation lets the validation finish (Lightning would stop it at the next
batch, with no checkpoint and exit status 0), and the checkpoint is written where the validation ends: after it,
mid-epoch, or at the end of the epoch it closes. A second signal during that validation stops the run there; the
resumed run then starts from the previous ``last.ckpt``, which periodic saves keep recent.
"""
from __future__ import annotations

import logging
import signal
from typing import Any

import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ssamba.callbacks.resume_points import ResumePointCallback, last_checkpoint_path
from ssamba.utils.launch import in_submitit_job, submitit_signal

log = logging.getLogger(__name__)

EXIT_STATUS = 128 + signal.SIGTERM


class PreemptionCheckpoint(ResumePointCallback):
    """See the module docstring."""

    def __init__(self):
        super().__init__()
        self._requeue_handlers: dict[int, Any] = {}  # signal -> the handler that requeues the job
        self._requeue_signal: int | None = None
        self._requeue = False
        self._stop = False
        self._sigterm_in_validation = False

    def on_train_start(self, trainer, pl_module) -> None:
        signals = []
        environment = getattr(trainer._accelerator_connector, "cluster_environment", None)
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            signals.append(environment.requeue_signal)  # Lightning's handler: hpc checkpoint + scontrol requeue
        if in_submitit_job():
            signals.append(submitit_signal())  # submitit's handler: requeue and exit
        for signum in signals:
            handler = signal.getsignal(signum)
            if callable(handler):  # run it at the resumable point instead
                self._requeue_handlers[signum] = handler
                signal.signal(signum, self._note_requeue_signal)

    def _note_requeue_signal(self, signum, frame) -> None:
        log.info("received signal %d: checkpoint and requeue after the current batch", signum)
        self._requeue_signal = signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.continue_request(trainer)
        if self._stop or self._pending:
            return
        requeue_signal, sigterm = _agreed(trainer, self._requeue_signal, trainer.received_sigterm)
        self._requeue = requeue_signal is not None
        if self._requeue:  # a rank the signal has not reached yet runs the requeue handler with the others
            self._requeue_signal = requeue_signal
        if not (self._requeue or sigterm):
            return
        # a validation due now runs to its end instead of being cut by Lightning's own SIGTERM check
        trainer._signal_connector.received_sigterm = False
        self.request(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._fit_validation(trainer) and trainer.received_sigterm:
            self._sigterm_in_validation = True  # finish the validation; the checkpoint follows it
            trainer._signal_connector.received_sigterm = False

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)  # a checkpoint a training batch asked for
        if not self._fit_validation(trainer) or not _agreed(trainer, None, self._sigterm_in_validation)[1]:
            return
        self._sigterm_in_validation = False
        trainer._signal_connector.received_sigterm = False  # a signal on the validation's last batch
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._pending = "epoch_end"  # the epoch's validation: the checkpoint closes the epoch
        else:
            self._flush(trainer)

    def _fit_validation(self, trainer) -> bool:
        """In a fit's validation (not the sanity check), with no checkpoint or stop already under way."""
        return (trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
                and not (self._stop or self._pending))

    def at_resume_point(self, trainer) -> None:
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)
        log.warning("stopping at global step %d on %s; checkpoint %s (resume with ckpt_path=%s)",
                    trainer.global_step, "the requeue signal" if self._requeue else "SIGTERM", path, path)
        if self._requeue and self._requeue_signal in self._requeue_handlers:  # on every rank: it may hold a barrier
            self._requeue_handlers[self._requeue_signal](self._requeue_signal, None)  # may requeue and exit
        self._stop = True  # exit at the next hook, once the other callbacks (ModelCheckpoint) have seen this point

    def _exit_if_stopping(self) -> None:
        if self._stop:
            raise SIGTERMException(EXIT_STATUS)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._exit_if_stopping()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._exit_if_stopping()

    def on_train_end(self, trainer, pl_module) -> None:
        self._exit_if_stopping()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and not self._stop:
            log.warning("stopped before a checkpoint could be written (signal during validation?); resume from "
                        "the last saved one, %s", last_checkpoint_path(trainer))


def _agreed(trainer, requeue_signal: int | None, sigterm: bool) -> tuple[int | None, bool]:
    """The same decision on every rank, in one collective and one device-to-host copy (signals may reach ranks a
    moment apart): the requeue signal some rank received, if any, and whether some rank received SIGTERM."""
    if trainer.world_size == 1:
        return requeue_signal, bool(sigterm)
    local = torch.tensor([requeue_signal or 0, int(sigterm)], device=trainer.strategy.root_device)
    signum, any_sigterm = trainer.strategy.all_gather(local).reshape(-1, 2).amax(dim=0).tolist()
    return signum or None, bool(any_sigterm)
