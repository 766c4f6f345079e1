"""ssamba.callbacks.WallTimes: the counts of a small fit, and its sums within the fit's wall time."""

import json
import time

import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel

from ssamba.callbacks import WallTimes


def test_wall_times_counts_steps_validations_and_saves_and_sums_within_the_fit(tmp_path):
    trainer = L.Trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=2, num_sanity_val_steps=2,
                        callbacks=[WallTimes(str(tmp_path))], default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    started = time.time()
    trainer.fit(BoringModel())
    record = json.loads((tmp_path / "wall_times.json").read_text())
    assert (record["steps"], record["validations"], record["checkpoint_saves"]) == (6, 3, 2)  # sanity + 2 epochs
    assert started <= record["fit_start"] <= record["fit_end"] <= time.time()
    spent = record["step_seconds"] + record["wait_seconds"] + record["validation_seconds"]
    assert min(record["step_seconds"], record["wait_seconds"], record["validation_seconds"]) > 0
    assert spent <= record["fit_end"] - record["fit_start"]
