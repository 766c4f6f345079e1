"""``last.ckpt`` every N optimizer steps, so that a run killed without warning (SIGKILL, node failure, OOM
killer) loses at most N steps and resumes exactly (docs/reliability.md)."""
from __future__ import annotations

from ssamba.callbacks.resume_points import ResumePointCallback, last_checkpoint_path
from ssamba.errors import ConfigError


class PeriodicCheckpoint(ResumePointCallback):
    """Writes ``<checkpoints>/last.ckpt`` every ``every_n_train_steps`` optimizer steps, at a resumable point."""

    def __init__(self, every_n_train_steps: int = 500):
        super().__init__()
        if every_n_train_steps < 1:
            raise ConfigError(f"callbacks.periodic_checkpoint.every_n_train_steps={every_n_train_steps}: "
                             "must be >= 1")
        self.every_n_train_steps = every_n_train_steps
        self._last_requested = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.continue_request(trainer)
        step = trainer.global_step
        # step 0 is seen only inside the first accumulation, before any optimizer step: nothing to keep yet
        if step and step % self.every_n_train_steps == 0 and step != self._last_requested and not self._pending:
            self._last_requested = step  # several batches share a step with gradient accumulation
            self.request(trainer)

    def at_resume_point(self, trainer) -> None:
        trainer.save_checkpoint(last_checkpoint_path(trainer), weights_only=False)
