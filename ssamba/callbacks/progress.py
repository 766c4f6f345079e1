"""The tqdm progress bar, with the logged metrics it shows read every few training steps.

Showing a metric logged from the GPU (``train/loss``) means reading it on the host, which waits for every
kernel queued before it: at each refresh of Lightning's bar the host stops running ahead of the device.
Here the bar still moves every ``refresh_rate`` batches, and its metrics are read every
``metrics_every_n_steps`` optimizer steps (and on every validation and epoch change).
"""
from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar

from ssamba.errors import ConfigError


class LazyMetricsProgressBar(TQDMProgressBar):
    """Lightning's ``TQDMProgressBar`` whose shown metrics are read every ``metrics_every_n_steps`` steps."""

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False,
                 metrics_every_n_steps: int = 25):
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        if metrics_every_n_steps < 1:
            raise ConfigError(f"callbacks.progress_bar.metrics_every_n_steps={metrics_every_n_steps}: must be >= 1")
        self.metrics_every_n_steps = metrics_every_n_steps
        self._shown: dict | None = None
        self._read_at: tuple[int, int] | None = None  # (epoch, global step) of the last read

    def get_metrics(self, trainer, pl_module):
        now = (trainer.current_epoch, trainer.global_step)
        due = (self._shown is None or not trainer.training or now[0] != self._read_at[0]
               or now[1] - self._read_at[1] >= self.metrics_every_n_steps)
        if due:
            self._shown, self._read_at = super().get_metrics(trainer, pl_module), now
        return self._shown
