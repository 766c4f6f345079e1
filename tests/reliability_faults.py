"""Faults injected into real train.py runs by the reliability tests (``+callbacks.fault={_target_: ...}`` with
this folder on PYTHONPATH): a signal at a given step, NaN inputs, infinite gradients."""
from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


class SignalAtStep(Callback):
    """Send ``signal_name`` to this process, once, as the first batch of optimizer step ``step`` starts (with
    gradient accumulation a step spans several batches)."""

    def __init__(self, step: int, signal_name: str):
        self.step = step
        self.signal = getattr(signal, signal_name)
        self.sent = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signal)


class SignalInValidation(Callback):
    """Send ``signal_name`` to this process as batch ``batch`` of the fit's validation in epoch ``epoch`` starts."""

    def __init__(self, epoch: int, batch: int, signal_name: str):
        self.epoch, self.batch = epoch, batch
        self.signal = getattr(signal, signal_name)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking and trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), self.signal)


class NanInputAtSteps(Callback):
    """Replace the batch's features by NaN at the given optimizer steps (a non-finite loss)."""

    def __init__(self, steps: list[int]):
        self.steps = set(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            batch["fbank"].fill_(float("nan"))


class InfGradientAtSteps(Callback):
    """Make one gradient infinite at the given optimizer steps (finite loss, non-finite gradients)."""

    def __init__(self, steps: list[int]):
        self.steps = set(steps)

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step in self.steps:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")


class RequeueSignalToRankZero(Callback):
    """Stands in for submitit's requeue handler on every rank (it records the rank and step it ran at, then ends
    the process as submitit's does) and sends the requeue signal to rank 0 alone as optimizer step ``step``
    starts: the other ranks learn of it only from rank 0."""

    def __init__(self, step: int, out_dir: str, signal_name: str = "SIGUSR2"):
        self.step, self.out_dir = step, out_dir
        self.signal = getattr(signal, signal_name)
        self.sent = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        def requeue(signum, frame):
            with open(os.path.join(self.out_dir, f"requeued-rank{trainer.global_rank}"), "w") as handle:
                handle.write(str(trainer.global_step))
            raise SystemExit(0)

        signal.signal(self.signal, requeue)  # before the pre-emption callback's on_train_start takes it over

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == 0 and trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signal)
