"""Where a checkpoint can be taken so that a resumed run repeats nothing and skips nothing.

Lightning restarts correctly from a checkpoint written at the end of a training batch *unless* validation or the
end of the epoch comes right after that batch: resumed from there, it counts the validation as done without
running it (so the plateau schedule, the best checkpoint and the RNG stream change), or skips the next epoch's
batches. Checkpoints requested at such a batch are therefore written where Lightning's ``ModelCheckpoint`` writes
``last.ckpt``: after a mid-epoch validation (``on_validation_end``), or at the end of the epoch
(``on_train_epoch_end``; after the epoch's validation).
"""
from __future__ import annotations

import os

from lightning.pytorch.callbacks import Callback, ModelCheckpoint


def last_checkpoint_path(trainer) -> str:
    """``last.ckpt`` in the first ModelCheckpoint's folder (``<run>/checkpoints`` with conf/callbacks/default)."""
    return last_checkpoint_in(trainer.checkpoint_callbacks, trainer.default_root_dir)


def last_checkpoint_in(callbacks, root_dir: str) -> str:
    """:func:`last_checkpoint_path` before the trainer exists: from its callbacks and ``default_root_dir``."""
    folders = [cb.dirpath for cb in callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    folder = folders[0] if folders else os.path.join(root_dir, "checkpoints")
    return os.path.join(folder, ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION)


def _after_batch(trainer) -> str | None:
    """At ``on_train_batch_end``: what follows this batch -- ``"epoch_end"``, ``"validation"`` or nothing.

    Asks the training loop's own validation schedule (a Lightning internal, covered by tests/test_resume.py).
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    if epoch_loop.batch_progress.is_last_batch:
        return "epoch_end"
    if epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
        return "validation"
    return None


class ResumePointCallback(Callback):
    """Base: ``request(trainer)`` at a batch end runs :meth:`at_resume_point` there, or after the validation that
    follows the batch, or at the end of the epoch when the batch was its last (where ModelCheckpoint saves too);
    with gradient accumulation, from the batch that ends the accumulation on (subclasses call
    :meth:`continue_request` first in their ``on_train_batch_end``)."""

    def __init__(self):
        self._pending: str | None = None

    def at_resume_point(self, trainer) -> None:
        raise NotImplementedError

    def request(self, trainer) -> None:
        if trainer.fit_loop.epoch_loop._should_accumulate():
            self._pending = "step"  # mid-accumulation: the gradients summed so far would be in no checkpoint
            return
        self._pending = _after_batch(trainer)
        if self._pending is None:
            self.at_resume_point(trainer)

    def continue_request(self, trainer) -> None:
        """At ``on_train_batch_end``: a request deferred to the end of an accumulation goes on at its last batch."""
        if self._pending == "step" and not trainer.fit_loop.epoch_loop._should_accumulate():
            self.request(trainer)

    def _flush(self, trainer) -> None:
        self._pending = None
        self.at_resume_point(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._pending == "validation" and not trainer.sanity_checking:
            self._flush(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._pending:
            self._flush(trainer)


class EveryEpochLastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` follows every validation (or epoch end), as before Lightning 2.6.

    From 2.6 on, ``save_last=True`` writes ``last.ckpt`` only when a top-k checkpoint is saved at the same step:
    once the monitored metric stops improving, ``last.ckpt`` stays at the best epoch, and a resume from it would
    train the later epochs again.
    """

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_skipped(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_skipped(trainer)

    def _save_last_if_skipped(self, trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):  # skipped: saved at this step
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
