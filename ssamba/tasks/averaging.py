"""Uniform weight averaging over a range of epochs (the AS-20K recipe averages epochs 12-40)."""
from __future__ import annotations

from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn


class EpochRangeAveraging(WeightAveraging):
    """Equal-weight average of the model at the end of epochs ``start_epoch..end_epoch`` (0-based, inclusive).

    Lightning's callback evaluates, checkpoints and finishes with the average as soon as it
    exists; before the first averaged epoch (or if training stops before ``start_epoch``) the
    model is used as it is, rather than the untrained copy the average starts from.
    """

    def __init__(self, start_epoch: int, end_epoch: int | None = None, device: str | None = None):
        super().__init__(device=device, use_buffers=True)
        if start_epoch < 0 or (end_epoch is not None and end_epoch < start_epoch):
            raise ValueError(f"weight averaging epochs {start_epoch}..{end_epoch}: need 0 <= start_epoch <= end_epoch")
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self._swapped = False

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        if epoch_idx is None:
            return False
        return epoch_idx >= self.start_epoch and (self.end_epoch is None or epoch_idx <= self.end_epoch)

    def has_average(self) -> bool:
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        updated = self._latest_update_epoch
        super().on_train_epoch_end(trainer, pl_module)
        if self._latest_update_epoch != updated:
            rank_zero_info(f"weight averaging: added epoch {trainer.current_epoch} "
                           f"({int(self._average_model.n_averaged)} averaged)")

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._swapped = self.has_average()
        if self._swapped:
            self._swap_models(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._swapped:
            self._swap_models(pl_module)
            self._swapped = False

    def on_train_end(self, trainer, pl_module) -> None:
        if self.has_average():
            self._copy_average_to_current(pl_module)
        else:
            rank_zero_warn(f"weight averaging: training ended before epoch {self.start_epoch}; "
                           "keeping the final weights")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.has_average():
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # Resuming a fit after averaging had started: restore both models. Testing or validating a
        # checkpoint keeps its state_dict, which holds the average.
        if trainer.state.fn == TrainerFn.FITTING and "current_model_state" in checkpoint:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "latest_update_epoch": self._latest_update_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._latest_update_epoch = state_dict.get("latest_update_epoch", -1)
