"""What each rank of a train.py run trained on, for tests that compare runs (``+callbacks.probe={_target_:
probes.RecordTraining, out: DIR}`` with this folder on PYTHONPATH).

Every rank appends one JSON line per training batch to ``DIR/rank<global rank>.jsonl`` as it happens (flushed, so
a killed run leaves what it did): epoch, optimizer step, item ids, a digest of the masks the batch drew and a digest
of the weights after the step.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
from lightning.pytorch.callbacks import Callback


def digest(tensors) -> str:
    hasher = hashlib.sha256()
    for tensor in tensors:
        hasher.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()[:16]


def read(out: str, rank: int) -> list[dict]:
    with open(os.path.join(out, f"rank{rank}.jsonl")) as f:
        return [json.loads(line) for line in f]


class RecordTraining(Callback):
    def __init__(self, out: str):
        self.out = out
        self.masks: list[torch.Tensor] = []

    def _write(self, trainer, record: dict) -> None:
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def on_fit_start(self, trainer, pl_module) -> None:
        sample_mask = pl_module.sample_mask

        def recording(batch, count, generator=None):  # training masks come from the global RNG, no generator
            mask = sample_mask(batch, count, generator)
            if pl_module.training and generator is None:
                self.masks.append(mask)
            return mask

        pl_module.sample_mask = recording

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        masks, self.masks = self.masks, []
        self._write(trainer, {"epoch": trainer.current_epoch, "step": trainer.global_step - 1,
                              "ids": list(batch["id"]), "masks": digest(masks),
                              "weights": digest(pl_module.state_dict().values())})
