"""Patch masks for masked spectrogram patch modeling, generated on the device for a whole batch.

``cluster`` masks (the SSAST recipe for square patches) grow the masked set out of random
``c x c`` blocks (``c`` drawn from ``cluster_sizes``) until ``count`` patches are covered; the
last block drawn may be cut short so that every clip masks exactly ``count`` patches. ``random``
masks (for frame patches, e.g. 128x2) draw ``count`` patches uniformly.

By default a block is laid out on the 2-D (frequency, time) grid and clipped at its edges.
``reference_quirks=True`` instead reproduces the released SSAST code exactly: a block covers the
flat indices ``start + t_dim * i + j``, so blocks near the end of a time row wrap into the next
frequency row, and patch 0 is never masked. Either way the masked patches are a function of the
torch random state only, so seeded runs are reproducible.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

STYLES = ("cluster", "random")


def fit_count_to_grid(count: int, stated_patches: int, num_patches: int) -> int:
    """``count`` masked of ``stated_patches``, scaled to a grid of ``num_patches`` at the same ratio
    (rounded, and kept in 1..num_patches - 1 so every clip keeps a masked and an unmasked patch)."""
    return min(max(round(count * num_patches / stated_patches), 1), num_patches - 1)


def random_mask(batch: int, num_patches: int, count: int, device=None, generator=None) -> Tensor:
    """Bool ``[batch, num_patches]`` with exactly ``count`` uniformly chosen True per row."""
    _check_count(count, num_patches)
    scores = torch.rand(batch, num_patches, device=device, generator=generator)
    chosen = scores.topk(count, dim=1).indices
    return torch.zeros(batch, num_patches, dtype=torch.bool, device=device).scatter_(1, chosen, True)


def cluster_mask(batch: int, grid: tuple[int, int], count: int, cluster_sizes: Sequence[int] = (3, 4, 5),
                 reference_quirks: bool = False, device=None, generator=None) -> Tensor:
    """Bool ``[batch, f_dim * t_dim]`` (frequency-major) with exactly ``count`` True per row, in blocks.

    Each patch gets the index of the first block (in draw order) that covers it; the ``count``
    patches with the lowest index are masked. That is the reference's "add blocks until at
    least ``count`` patches are masked, keep ``count``", done for all clips at once.
    """
    f_dim, t_dim = grid
    num_patches = f_dim * t_dim
    _check_count(count, num_patches)
    sides = [int(c) for c in cluster_sizes]
    if not sides or min(sides) < 1:
        raise ValueError(f"cluster_sizes must be positive block sides, got {list(cluster_sizes)}")
    # from the host's list: a value read back from the GPU makes the host wait for its queued work
    sizes = torch.tensor(sides).to(device, non_blocking=True)
    side = max(sides)
    offsets = torch.arange(side, device=device)
    i, j = offsets.view(-1, 1), offsets.view(1, -1)  # block rows (frequency) and columns (time)
    no_block = torch.iinfo(torch.long).max
    first_block = torch.full((batch, num_patches + 1), no_block, dtype=torch.long, device=device)
    drawn = 0
    chunk = max(8, 2 * count // int(sum(c * c for c in sides) / len(sides)) + 1)
    while True:
        starts = torch.randint(num_patches, (batch, chunk), device=device, generator=generator)
        c = sizes[torch.randint(len(sizes), (batch, chunk), device=device, generator=generator)]
        inside = (i < c[..., None, None]) & (j < c[..., None, None])  # [B, K, side, side]
        if reference_quirks:
            index = starts[..., None, None] + t_dim * i + j
            valid = inside & (index > 0) & (index < num_patches)
        else:
            f = starts[..., None, None] // t_dim + i
            t = starts[..., None, None] % t_dim + j
            index = f * t_dim + t
            valid = inside & (f < f_dim) & (t < t_dim)
        index = torch.where(valid, index, num_patches).flatten(1)  # invalid cells go to a spare column
        block_id = (drawn + torch.arange(chunk, device=device)).view(1, -1, 1, 1).expand_as(valid).flatten(1)
        first_block.scatter_reduce_(1, index, block_id, reduce="amin")
        drawn += chunk
        covered = first_block[:, :num_patches] < no_block
        if int(covered.sum(1).min()) >= count:  # the one read of the device a mask needs (per round of blocks)
            break
    # Lowest block index first; random tie-break inside the block that is cut short.
    order = first_block[:, :num_patches].float() + 0.5 * torch.rand(batch, num_patches, device=device,
                                                                    generator=generator)
    chosen = order.topk(count, dim=1, largest=False).indices
    return torch.zeros(batch, num_patches, dtype=torch.bool, device=device).scatter_(1, chosen, True)


def make_mask(style: str, batch: int, grid: tuple[int, int], count: int, cluster_sizes: Sequence[int] = (3, 4, 5),
              reference_quirks: bool = False, device=None, generator=None) -> Tensor:
    """Dispatch on the configured ``mask.style``."""
    if style == "cluster":
        return cluster_mask(batch, grid, count, cluster_sizes, reference_quirks, device, generator)
    if style == "random":
        return random_mask(batch, grid[0] * grid[1], count, device, generator)
    raise ValueError(f"mask.style={style!r} is not one of {', '.join(STYLES)}")


def _check_count(count: int, num_patches: int) -> None:
    """At least one patch stays visible, or there is no context to predict from."""
    if not 0 < count < num_patches:
        raise ValueError(f"mask.count={count} must be in 1..{num_patches - 1} (the grid has {num_patches} patches)")
