"""Skip optimizer steps whose loss or gradients are not finite; stop cleanly when it keeps happening.

One NaN batch (a corrupt clip that slipped through, an fp overflow) would otherwise write NaN into every weight
and the optimizer's moments, and the run would silently train on garbage from then on. Here such a step leaves
weights and optimizer state untouched, is counted (``train/nonfinite_steps``, logged every step) and warned
about. After ``max_consecutive`` non-finite steps in a row the run stops with :class:`NonFiniteTrainingError`;
the weights then are those of the last finite step, and they are saved first as
``<checkpoints>/nonfinite-step<N>.ckpt`` (N: the first step of the run of non-finite ones).

The decision stays on the device where the optimizer can take it there: a fused Adam, AdamW or SGD (the
configs' default, ``fused: true``) skips its update when its ``found_inf`` tensor is 1, as under float16 loss
scaling. Reading a GPU value on the host each step would make the host wait for the device twice a step, so
that neither could run ahead of the other; the counts are read every ``check_every_n_steps`` steps instead, at
epoch ends and when a checkpoint is saved, and warnings and the stop come then. Any other optimizer gets the
decision on the host, every step (its gradients are dropped before it steps).

Under DDP every rank takes the same decision (any rank non-finite: all skip), so replicas never drift apart.
The LR schedulers still count a skipped step, as with float16 loss scaling.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from ssamba.callbacks.resume_points import last_checkpoint_path
from ssamba.errors import ConfigError

log = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Training stopped after too many consecutive non-finite steps."""


def gradients_nonfinite(module: torch.nn.Module) -> torch.Tensor | None:
    """A 0-d bool tensor on the gradients' device, True when any gradient has an inf or NaN (None: no gradient)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    largest = torch._foreach_norm(grads, float("inf"))  # max |g| per tensor: inf or nan if any entry is
    return ~torch.isfinite(torch.stack(largest)).all()


def skips_on_device(optimizer) -> bool:
    """Whether ``optimizer.step()`` honours a ``found_inf`` tensor (torch's fused optimizers do)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


class NonFiniteGuard(Callback):
    """See the module docstring. ``max_consecutive``: non-finite steps in a row that end the run (>= 1);
    ``check_every_n_steps``: how often the device's counts are read on the host (>= 1)."""

    def __init__(self, max_consecutive: int = 10, warn_first: int = 5, check_every_n_steps: int = 50):
        if max_consecutive < 1:
            raise ConfigError(f"callbacks.nonfinite_guard.max_consecutive={max_consecutive}: must be >= 1")
        if check_every_n_steps < 1:
            raise ConfigError(f"callbacks.nonfinite_guard.check_every_n_steps={check_every_n_steps}: must be >= 1")
        self.max_consecutive = max_consecutive
        self.warn_first = warn_first
        self.check_every_n_steps = check_every_n_steps
        self.skipped = 0       # non-finite steps over the whole run (kept across resumes), as last read
        self.consecutive = 0
        self._loss_nonfinite: torch.Tensor | None = None  # any backward of the step had a non-finite loss
        # on the device: [skipped, consecutive, first step of the first run that reached max_consecutive or -1]
        self._counts: torch.Tensor | None = None
        self._stop_at: int | None = None  # host decision: first step of the run that stops training

    def state_dict(self) -> dict[str, Any]:
        self._read()
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = state_dict["skipped"]
        self.consecutive = state_dict["consecutive"]
        self._counts = None  # rebuilt from these on the next step

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        # several backward passes per step with gradient accumulation: any non-finite one spoils the step
        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_nonfinite = bad if self._loss_nonfinite is None else self._loss_nonfinite | bad

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        bad = (self._loss_nonfinite if self._loss_nonfinite is not None
               else torch.zeros((), dtype=torch.bool, device=pl_module.device))
        self._loss_nonfinite = None
        grads_bad = gradients_nonfinite(pl_module)
        if grads_bad is not None:
            bad = bad.to(grads_bad.device) | grads_bad
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            bad = bad.to(torch.int32)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # enqueued on the device: no host wait with NCCL
            bad = bad.bool()
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        if skips_on_device(optimizer):
            self._count_on_device(bad, trainer.global_step)
            optimizer.found_inf = bad.to(torch.float32)
            pl_module.log("train/nonfinite_steps", self._counts[0].float(), on_step=True, on_epoch=False,
                          reduce_fx="max")
            return
        if bool(bad):  # the host decides: one wait for the device per step
            optimizer.zero_grad(set_to_none=True)  # parameters without gradients are left alone by the step
            self.skipped += 1
            self.consecutive += 1
            if self.skipped <= self.warn_first:
                log.warning("non-finite loss or gradients at global step %d: optimizer step skipped (%d so far, "
                            "%d in a row; the run stops at %d in a row)", trainer.global_step, self.skipped,
                            self.consecutive, self.max_consecutive)
            if self.consecutive >= self.max_consecutive and self._stop_at is None:
                self._stop_at = trainer.global_step - self.consecutive + 1
        else:
            self.consecutive = 0
        self._counts = None
        pl_module.log("train/nonfinite_steps", float(self.skipped), on_step=True, on_epoch=False, reduce_fx="max")

    def _count_on_device(self, bad: torch.Tensor, step: int) -> None:
        if self._counts is None or self._counts.device != bad.device:
            self._counts = torch.tensor([self.skipped, self.consecutive, -1], dtype=torch.long, device=bad.device)
        skipped, consecutive, first = self._counts.unbind()
        consecutive = (consecutive + 1) * bad
        first = torch.where((first < 0) & (consecutive >= self.max_consecutive), step - consecutive + 1, first)
        self._counts = torch.stack((skipped + bad, consecutive, first))

    def _read(self) -> None:
        """The device's counts on the host (one wait for the device), with the warning for new skipped steps."""
        if self._counts is None:
            return
        skipped, consecutive, first = self._counts.tolist()
        new, before = skipped - self.skipped, self.skipped
        self.skipped, self.consecutive = skipped, consecutive
        if new and before < self.warn_first:
            log.warning("non-finite loss or gradients in %d optimizer step(s) since the last check: skipped (%d so "
                        "far, %d in a row now; the run stops at %d in a row)", new, skipped, consecutive,
                        self.max_consecutive)
        if first >= 0 and self._stop_at is None:
            self._stop_at = first

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for optimizer in trainer.optimizers:  # stepped: a later step outside this guard must not see the flag
            getattr(optimizer, "_optimizer", optimizer).__dict__.pop("found_inf", None)
        if self._counts is not None and trainer.global_step % self.check_every_n_steps == 0:
            self._read()
        self._stop_if_due(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._read()
        self._stop_if_due(trainer)

    def _stop_if_due(self, trainer) -> None:
        if self._stop_at is None:
            return
        first, last = self._stop_at, self._stop_at + self.max_consecutive - 1
        path = os.path.join(os.path.dirname(last_checkpoint_path(trainer)), f"nonfinite-step{first:07d}.ckpt")
        trainer.save_checkpoint(path, weights_only=False)
        later = f", stopped at global step {trainer.global_step}" if trainer.global_step > last + 1 else ""
        raise NonFiniteTrainingError(
            f"{self.max_consecutive} consecutive optimizer steps with non-finite loss or gradients (global steps "
            f"{first}..{last}; {self.skipped} in this run{later}); stopped. The weights of the last finite step "
            f"are saved in {path}. Lower task.optimizer.lr, set trainer.gradient_clip_val, or check the data "
            f"(callbacks.nonfinite_guard.max_consecutive sets the limit).")
