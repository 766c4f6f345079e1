"""Label-balanced sampling for AudioSet-2M (AST's recipe): rare classes are drawn as often as common ones.

A clip's weight is the sum over its labels of ``1 / (clips carrying that label)``, so every class
contributes the same total weight; clips are drawn with replacement in proportion to it. The
draw is seeded by ``seed`` and the epoch, identical on every DDP rank, and each rank takes every
``world_size``-th index of it: together the ranks see one draw, without overlap.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DistributedSampler

from ssamba.errors import ConfigError


def label_balanced_weights(labels: Sequence[Sequence[int]]) -> torch.Tensor:
    """Per-clip weights from label frequencies: ``sum(1 / count[label] for label in clip)``.

    A clip without labels gets 0 (never drawn); a set without any label is refused.
    """
    counts = Counter(label for clip in labels for label in clip)
    if not counts:
        raise ConfigError("data.balanced_sampling: no clip has a label, so there is nothing to balance")
    return torch.tensor([sum(1.0 / counts[label] for label in clip) for clip in labels], dtype=torch.float64)


class BalancedSampler(DistributedSampler):
    """Weighted draw with replacement, deterministic by ``seed`` + epoch, split across DDP ranks.

    It is a :class:`DistributedSampler` so that Lightning calls :meth:`set_epoch` every epoch and
    leaves it unwrapped under DDP; ``num_samples`` per epoch (all ranks together) is padded up to a
    multiple of ``world_size`` so that every rank runs the same number of batches.
    """

    def __init__(self, weights: torch.Tensor, num_samples: int | None = None, seed: int = 0,
                 world_size: int = 1, rank: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        total = len(weights) if num_samples is None else num_samples
        if total < 1:
            raise ConfigError(f"data.samples_per_epoch={num_samples}: must be >= 1")
        self.weights = weights
        self.seed = seed
        self.epoch = 0
        self.num_replicas = world_size
        self.rank = rank
        self.shuffle, self.drop_last = True, False  # what Lightning reads off a DistributedSampler
        self.num_samples = -(-total // world_size)  # per rank
        self.total_size = self.num_samples * world_size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        draw = torch.multinomial(self.weights, self.total_size, replacement=True, generator=generator)
        return iter(draw[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples
