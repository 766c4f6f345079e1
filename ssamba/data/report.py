"""Epoch-end report of audio items the data pipeline had to skip."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback


class SkippedAudioReport(Callback):
    """Logs per-reason skip counts (``data/skipped_<reason>``, summed over ranks) after each epoch.

    Datamodules of :mod:`ssamba.data` add it to the trainer themselves at setup.
    """

    def _report(self, trainer, pl_module, stage: str) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "pop_skip_report"):
            return
        for reason, count in datamodule.pop_skip_report(stage).items():
            pl_module.log(f"data/skipped_{reason}_{stage}", float(count), reduce_fx="sum", sync_dist=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._report(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, pl_module, "test")
