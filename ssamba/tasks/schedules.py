"""Learning-rate schedules in the parametrisation the reference recipes use."""
from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import MultiStepLR

from ssamba.errors import ConfigError


def stepped_multistep_lr(optimizer: Optimizer, start: int, step: int, gamma: float, last: int = 1000) -> MultiStepLR:
    """Multiply the learning rate by ``gamma`` at epochs ``start, start + step, ...`` (the SSAST finetuning
    schedule: e.g. AS-20K start 15, step 10, gamma 0.75)."""
    if start < 0 or step < 1:
        raise ConfigError(f"task.scheduler: start={start} must be >= 0 and step={step} >= 1")
    return MultiStepLR(optimizer, milestones=list(range(start, last, step)), gamma=gamma)
