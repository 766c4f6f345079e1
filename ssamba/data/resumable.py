"""A training order that survives a restart: each epoch's order is fixed by ``(seed, epoch)``, and a run resumed
mid-epoch continues right after the batches its checkpoint had trained on.

Lightning restores its loop counters from a checkpoint, but a plain shuffled DataLoader would start the
interrupted epoch over in a new random order (drawn from the global RNG), so some items would be trained twice and
others not at all. Here:

* the order of epoch ``e`` is ``randperm(n)`` from a generator seeded with ``seed + e`` (``seed`` is the run's
  ``seed_everything`` value), split across DDP ranks like ``DistributedSampler`` -- but without its padding, which
  would show a few items twice per epoch: up to ``world_size - 1`` items are left out instead, different ones
  each epoch;
* the loader is *stateful* for Lightning: its ``state_dict`` (saved in every checkpoint) records the epoch and
  how many batches of it were trained, and ``load_state_dict`` (called on a mid-epoch restart) makes the next
  iteration skip exactly those batches;
* DataLoader worker seeds follow ``(seed, epoch)`` too, so no part of the loader draws on the global RNG, whose
  state the checkpoint restores separately (:class:`ssamba.callbacks.RandomStateCheckpoint`).
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def run_seed() -> int:
    """The seed ``lightning.seed_everything`` exported for this run (0 without one)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def epoch_to_run(trainer: Any | None) -> int | None:
    """The epoch a fitting trainer is about to run, None without one. Lightning creates a resumed run's first
    iterator before it advances ``current_epoch`` past a checkpoint written at an epoch's end, so that counter
    would give the resumed epoch the previous one's order; the epoch progress already counts it."""
    fit_loop = getattr(trainer, "fit_loop", None)
    return None if fit_loop is None else fit_loop.epoch_progress.current.processed


def worker_seed(seed: int, epoch: int) -> int:
    """The DataLoader's base seed for epoch ``epoch`` (its workers' seeds follow from it), drawn from no RNG."""
    key = f"{seed}/{epoch}/workers".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch shuffle over this rank's share of the items, able to start after ``skip`` items.

    A ``DistributedSampler`` subclass, so Lightning leaves it in place under DDP instead of wrapping it.
    ``len()`` is always the full epoch: Lightning counts the skipped batches as already done.
    """

    def __init__(self, dataset: Dataset, shuffle: bool = True, seed: int | None = None,
                 trainer: Any | None = None, num_replicas: int | None = None, rank: int | None = None):
        if num_replicas is None:  # the process group's, or one process
            distributed = dist.is_available() and dist.is_initialized()
            num_replicas, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=run_seed() if seed is None else seed, drop_last=True)
        self.trainer = trainer
        self.skip = 0  # items to leave out at the start of the next iteration (one-shot, set on resume)

    def current_epoch(self) -> int:
        """:func:`epoch_to_run` (Lightning calls ``set_epoch`` only after creating the first iterator);
        ``set_epoch``'s value without a trainer."""
        epoch = epoch_to_run(self.trainer)
        return self.epoch if epoch is None else epoch

    def __iter__(self):
        self.set_epoch(self.current_epoch())
        order = list(super().__iter__())
        skip, self.skip = min(self.skip, len(order)), 0
        return iter(order[skip:])


class ResumableDataLoader(DataLoader):
    """DataLoader over a :class:`ResumableSampler`, stateful in Lightning's sense (``state_dict`` /
    ``load_state_dict``), with worker seeds that depend only on ``(seed, epoch)``."""

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = True, trainer: Any | None = None,
                 seed: int | None = None, **kwargs):
        for key in ("sampler", "batch_sampler", "generator"):
            if kwargs.pop(key, None) is not None:
                raise ValueError(f"ResumableDataLoader makes its own {key}")
        super().__init__(dataset, batch_size=batch_size, sampler=ResumableSampler(dataset, shuffle, seed, trainer),
                         generator=torch.Generator(), **kwargs)

    def __iter__(self):
        self.generator.manual_seed(worker_seed(self.sampler.seed, self.sampler.current_epoch()))
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        """Where training stands in the epoch: Lightning stores this in checkpoints (loops.fit_loop)."""
        trainer = self.sampler.trainer
        batches_done = 0 if trainer is None else trainer.fit_loop.epoch_loop.batch_progress.current.processed
        epoch = self.sampler.epoch if trainer is None else self.sampler.current_epoch()
        return {"epoch": epoch, "batches_done": batches_done, "batch_size": self.batch_size,
                "num_replicas": self.sampler.num_replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Called by Lightning on a mid-epoch restart, before the first iterator is made.

        The ranks' shares interleave one permutation, so the items done are its first ``batches_done x global
        batch`` entries whatever the number of ranks: a run resumed on another number of nodes or devices
        continues exactly when the global batch (batch size x ranks) is the same.
        """
        epoch = self.sampler.current_epoch()
        if state["epoch"] != epoch:
            raise RuntimeError(f"checkpoint's data position is in epoch {state['epoch']} but the trainer resumes "
                               f"epoch {epoch}")
        saved = state.get("batch_size", self.batch_size), state.get("num_replicas", self.sampler.num_replicas)
        mid_epoch = state["batches_done"] * saved[0] < len(self.dataset) // saved[1]
        if mid_epoch and saved[0] * saved[1] != self.batch_size * self.sampler.num_replicas:
            raise RuntimeError(
                f"data.batch_size: the checkpoint stopped mid-epoch with a global batch of {saved[0] * saved[1]} "
                f"({saved[1]} rank(s) x {saved[0]}), this run has {self.sampler.num_replicas} x {self.batch_size}; "
                f"keep batch size x ranks equal to resume mid-epoch, or resume from an end-of-epoch checkpoint")
        self.sampler.skip = state["batches_done"] * self.batch_size
