"""Where a run's wall time goes, written to ``<dirpath>/wall_times.json`` when fitting ends.

A short run (a cross-validation cell) can spend much of its time outside the model: process start-up, waiting for
the loader, validation passes, checkpoints. This callback sums, in host wall seconds: the training steps (from a
batch's arrival to the end of its step), the waits for the next batch (loader and loop, also each epoch's first
batch), the validation passes (the sanity check included) and the checkpoint saves (counted). Clock times of the
start and end of fitting let a caller that knows when it started the process add the start-up and the exit. On a
GPU a step's time is what the host spends in it: kernels still queued at its end run during the next wait.
"""
from __future__ import annotations

import json
import os
import time

from lightning.pytorch.callbacks import Callback


class WallTimes(Callback):
    def __init__(self, dirpath: str):
        self.path = os.path.join(dirpath, "wall_times.json")
        self.times = {"step_seconds": 0.0, "wait_seconds": 0.0, "validation_seconds": 0.0}
        self.counts = {"steps": 0, "validations": 0, "checkpoint_saves": 0}
        self._mark = None

    def _add(self, key: str) -> None:
        now = time.monotonic()
        if self._mark is not None:
            self.times[key] += now - self._mark
        self._mark = now

    def on_fit_start(self, trainer, pl_module) -> None:
        self.fit_start = time.time()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._mark = time.monotonic()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._add("wait_seconds")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._add("step_seconds")
        self.counts["steps"] += 1

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validation_start = time.monotonic()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.times["validation_seconds"] += time.monotonic() - self._validation_start
        self.counts["validations"] += 1
        if self._mark is not None:  # a validation inside an epoch is not a wait for the next batch
            self._mark = time.monotonic()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.counts["checkpoint_saves"] += 1

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            record = {"fit_start": self.fit_start, "fit_end": time.time(),
                      **{k: round(v, 3) for k, v in self.times.items()}, **self.counts}
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "w") as f:
                f.write(json.dumps(record, indent=1) + "\n")
