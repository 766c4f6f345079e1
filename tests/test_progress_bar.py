"""The progress bar reads the logged metrics (GPU values: each read waits for the device) only every few steps."""
from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import TQDMProgressBar

from ssamba.callbacks import LazyMetricsProgressBar


def test_metrics_are_read_every_n_steps_and_on_every_epoch_or_validation(monkeypatch):
    reads = []
    monkeypatch.setattr(TQDMProgressBar, "get_metrics", lambda self, trainer, module: reads.append(
        (trainer.current_epoch, trainer.global_step)) or {"train/loss": float(len(reads))})
    bar = LazyMetricsProgressBar(metrics_every_n_steps=4)
    trainer = SimpleNamespace(training=True, current_epoch=0, global_step=0)
    shown = []
    for step in range(10):
        trainer.global_step = step
        shown.append(bar.get_metrics(trainer, None)["train/loss"])
    assert reads == [(0, 0), (0, 4), (0, 8)]
    assert shown == [1.0] * 4 + [2.0] * 4 + [3.0] * 2  # the last value read until the next read
    trainer.training = False  # a validation run inside the epoch: always fresh
    bar.get_metrics(trainer, None)
    trainer.training, trainer.current_epoch = True, 1  # a new epoch: fresh, even before N more steps
    bar.get_metrics(trainer, None)
    assert reads[3:] == [(0, 9), (1, 9)]


def test_the_default_config_uses_it_and_a_bad_interval_is_refused():
    import hydra
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=unused"])
    bar = hydra.utils.instantiate(cfg.callbacks.progress_bar)
    assert isinstance(bar, LazyMetricsProgressBar) and bar.metrics_every_n_steps == 25
    with pytest.raises(ValueError, match="metrics_every_n_steps=0: must be >= 1"):
        LazyMetricsProgressBar(metrics_every_n_steps=0)
