"""Skip optimizer steps whose loss or gradients are not finite; stop cleanly when it keeps happening.

One NaN batch (a corrupt clip that slipped through, an fp overflow) would otherwise write NaN into every weight
and the optimizer's moments, and the run would silently train on garbage from then on. Here such a step leaves
weights and optimizer state untouched (its gradients are dropped before the optimizer sees them), is counted
(``train/nonfinite_steps``, logged every step) and warned about. After ``max_consecutive`` non-finite steps in a
row the run stops with :class:`NonFiniteTrainingError`; the weights at that point are those of the last finite
step, and they are saved first as ``<checkpoints>/nonfinite-step<N>.ckpt``.

Under DDP every rank takes the same decision (any rank non-finite: all skip), so replicas never drift apart.
The LR schedulers still count a skipped step, as with float16 loss scaling.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from ssamba.callbacks.resume_points import last_checkpoint_path
from ssamba.errors import ConfigError

log = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Training stopped after too many consecutive non-finite steps."""


def gradients_finite(module: torch.nn.Module) -> bool:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return True
    largest = torch._foreach_norm(grads, float("inf"))  # max |g| per tensor: inf or nan if any entry is
    return bool(torch.isfinite(torch.stack(largest)).all())


class NonFiniteGuard(Callback):
    """See the module docstring. ``max_consecutive``: non-finite steps in a row that end the run (>= 1)."""

    def __init__(self, max_consecutive: int = 10, warn_first: int = 5):
        if max_consecutive < 1:
            raise ConfigError(f"callbacks.nonfinite_guard.max_consecutive={max_consecutive}: must be >= 1")
        self.max_consecutive = max_consecutive
        self.warn_first = warn_first
        self.skipped = 0       # non-finite steps over the whole run (kept across resumes)
        self.consecutive = 0
        self._loss_finite = True
        self._stop = False

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = state_dict["skipped"]
        self.consecutive = state_dict["consecutive"]

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        # several backward passes per step with gradient accumulation: any non-finite one spoils the step
        self._loss_finite = self._loss_finite and bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        bad = not (self._loss_finite and gradients_finite(pl_module))
        self._loss_finite = True
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            optimizer.zero_grad(set_to_none=True)  # parameters without gradients are left alone by the step
            self.skipped += 1
            self.consecutive += 1
            if self.skipped <= self.warn_first:
                log.warning("non-finite loss or gradients at global step %d: optimizer step skipped (%d so far, "
                            "%d in a row; the run stops at %d in a row)", trainer.global_step, self.skipped,
                            self.consecutive, self.max_consecutive)
            self._stop = self.consecutive >= self.max_consecutive
        else:
            self.consecutive = 0
        pl_module.log("train/nonfinite_steps", float(self.skipped), on_step=True, on_epoch=False, reduce_fx="max")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._stop:
            return
        first = trainer.global_step - self.consecutive
        path = os.path.join(os.path.dirname(last_checkpoint_path(trainer)), f"nonfinite-step{first:07d}.ckpt")
        trainer.save_checkpoint(path, weights_only=False)
        raise NonFiniteTrainingError(
            f"{self.consecutive} consecutive optimizer steps with non-finite loss or gradients (global steps "
            f"{first}..{trainer.global_step - 1}; {self.skipped} in this run); stopped. The weights of the last "
            f"finite step are saved in {path}. Lower task.optimizer.lr, set trainer.gradient_clip_val, or check "
            f"the data (callbacks.nonfinite_guard.max_consecutive sets the limit).")
