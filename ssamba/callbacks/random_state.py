"""Random number generator states in checkpoints, so a resumed run draws the same masks, dropout and
augmentations from where the interrupted one stopped.

The states are saved per DDP rank (each rank restores its own) as tensors and plain values, so checkpoints still
load with ``weights_only=True``. They are restored when training starts, after Lightning has rebuilt the train
loader (whose order and worker seeds never use the global RNG: :mod:`ssamba.data.resumable`).
"""
from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


def capture_rng_states() -> dict[str, Any]:
    """Python, NumPy, torch CPU and every CUDA device's generator state."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                  "gauss": float(numpy_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
                         "has_gauss": numpy_state["has_gauss"], "gauss": numpy_state["gauss"]})
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        if len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states["cuda"])
        else:
            log.warning("checkpoint has CUDA RNG states of %d device(s), this machine has %d: CUDA draws after "
                        "resume will differ from the interrupted run", len(states["cuda"]), torch.cuda.device_count())


class RandomStateCheckpoint(Callback):
    """Saves every rank's RNG states with each checkpoint and restores them when a resumed fit starts."""

    def __init__(self):
        self._to_restore: list[dict[str, Any]] | None = None

    @property
    def state_key(self) -> str:
        return "RandomStateCheckpoint"

    def state_dict(self) -> dict[str, Any]:
        states = capture_rng_states()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)  # every rank saves a checkpoint at the same moment
            return {"ranks": gathered}
        return {"ranks": [states]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict["ranks"]

    def on_train_start(self, trainer, pl_module) -> None:
        if self._to_restore is None:
            return
        ranks, self._to_restore = self._to_restore, None
        rank = trainer.global_rank
        if len(ranks) != trainer.world_size:
            log.warning("checkpoint holds RNG states of %d rank(s), this run has %d: every rank restores rank 0's",
                        len(ranks), trainer.world_size)
            rank = 0
        restore_rng_states(ranks[rank])
