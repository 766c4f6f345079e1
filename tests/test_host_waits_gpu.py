"""A training step on the GPU waits for the device only where it must.

A host read of a GPU value (``.item()``, ``bool(tensor)``, a blocking copy to or from the device) makes
the host wait for every kernel queued before it, so that it cannot prepare the next step while the GPU
runs this one. With the default callbacks (non-finite guard, progress bar) and a fused optimizer, neither
a finetuning nor a pretraining step has such a wait (masking.py draws all of a mask's blocks at once
instead of counting, on the host, what the blocks drawn so far cover). ``torch.cuda.set_sync_debug_mode``
reports every wait."""
import functools
import warnings

import pytest
import torch

import lightning as L
import ssamba
from ssamba.callbacks import LazyMetricsProgressBar, NonFiniteGuard

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


# the warning each waiting operation raises; not the one-off "Synchronization debug mode is a prototype
# feature ... synchronizing operations" that the first set_sync_debug_mode call of a process raises
SYNC_WARNING = "called a synchronizing CUDA operation"


class RecordWaits(L.Callback):
    """From training step ``after`` on, the places where the host waited for the device, inside each step's
    hooks and training (first in the callback list: its hooks open and close the window)."""

    def __init__(self, after: int = 3):
        self.after, self.waits, self._catcher, self._seen = after, [], None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.after:
            self._catcher = warnings.catch_warnings(record=True)
            self._seen = self._catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._catcher is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._catcher.__exit__(None, None, None)
            self.waits += [f"{w.filename}:{w.lineno}" for w in self._seen if SYNC_WARNING in str(w.message)]
            self._catcher = None


def fit(task, batches, steps=8):
    waits = RecordWaits()
    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=steps, precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                        log_every_n_steps=1000,
                        callbacks=[waits, NonFiniteGuard(check_every_n_steps=1000),
                                   LazyMetricsProgressBar(metrics_every_n_steps=1000)])
    loader = torch.utils.data.DataLoader(batches, batch_size=None, pin_memory=True)
    trainer.fit(task, train_dataloaders=loader)
    assert trainer.global_step == steps
    return waits.waits


def encoder():
    torch.manual_seed(0)
    return ssamba.build_encoder("tiny", depth=4, input_tdim=256, backend="auto")


def test_a_finetuning_step_never_waits_for_the_device():
    from ssamba.tasks import Finetuning

    data = {"target_length": 256, "label_names": ["a", "b", "c"], "multilabel": False}
    task = Finetuning(functools.partial(torch.optim.Adam, lr=1e-4, fused=True), encoder=encoder(), fstride=16,
                      tstride=16, data=data)
    batches = [{"fbank": torch.randn(8, 256, 128), "target": torch.eye(3)[torch.arange(8) % 3]} for _ in range(8)]
    assert fit(task, batches) == []


def test_a_pretraining_step_never_waits_for_the_device():
    from ssamba.tasks import MaskedPatchPretraining

    task = MaskedPatchPretraining(encoder(), functools.partial(torch.optim.AdamW, lr=1e-4, fused=True),
                                  mask={"count": 40})
    assert fit(task, [{"fbank": torch.randn(8, 256, 128)} for _ in range(8)]) == []
