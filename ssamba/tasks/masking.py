"""Patch masks for masked spectrogram patch modeling, generated on the device for a whole batch.

``cluster`` masks (the SSAST recipe for square patches) grow the masked set out of random
``c x c`` blocks (``c`` drawn from ``cluster_sizes``) until ``count`` patches are covered; the
last block drawn may be cut short so that every clip masks exactly ``count`` patches. The blocks
are drawn at once, so many that on average they leave uncovered an eighth of the patches the mask
must leave unmasked (:func:`blocks_to_draw`), so the host never waits for the device to count
them; should a clip's blocks still cover fewer than ``count`` (never seen at SSAST's 400 of 512,
in some clips when the mask leaves only a few patches unmasked), its other patches are drawn
uniformly.
``random`` masks (for frame patches, e.g. 128x2) draw ``count`` patches uniformly.

By default a block is laid out on the 2-D (frequency, time) grid and clipped at its edges.
``reference_quirks=True`` instead draws masks as the released SSAST code does: a block covers the
flat indices ``start + t_dim * i + j``, so blocks near the end of a time row wrap into the next
frequency row, and patch 0 is never masked; one block side per clip; blocks are added until more
than ``count`` patches are covered, and the ``count`` lowest patch indices of those are kept (the
released ``list(set(ids))[:count]``, as CPython orders a set of small integers). Either way the
masked patches are a function of the torch random state only, so seeded runs are reproducible.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ssamba.errors import ConfigError

STYLES = ("cluster", "random")
UNCOVERED_SHARE = 0.125  # blocks_to_draw: expected uncovered patches, as a share of those a mask leaves unmasked
MAX_BLOCKS = 4096  # blocks_to_draw's cap (reached only when a mask leaves a handful of patches unmasked)


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


@functools.lru_cache(maxsize=64)
def blocks_to_draw(grid: tuple[int, int], count: int, sides: tuple[int, ...], reference_quirks: bool) -> int:
    """How many blocks a clip draws: the fewest ``K`` whose expected number of uncovered patches,
    ``sum_p (1 - q_p) ** K``, is at most ``UNCOVERED_SHARE`` of the ``n - count`` patches the mask leaves
    unmasked, where ``q_p`` is the chance that one block covers patch ``p`` (blocks start anywhere and grow
    down and to the right, so patches near the top and left edges, and with the reference's flat indices
    the first patches, are covered least). At most ``MAX_BLOCKS``. With the reference's one side per clip,
    for the smallest side, which needs the most."""
    if reference_quirks:
        sides = (min(sides),)
    f_dim, t_dim = grid
    n = f_dim * t_dim
    chances = []
    for p in range(n):
        f, t = divmod(p, t_dim)
        if reference_quirks:  # starts p - t_dim * i - j >= 0; patch 0 is never masked
            starts = [sum(t_dim * i + j <= p for i in range(c) for j in range(c)) if p else 0 for c in sides]
        else:
            starts = [min(c, f + 1) * min(c, t + 1) for c in sides]
        chances.append(sum(starts) / len(sides) / n)

    def uncovered(k: int) -> float:
        return sum((1 - q) ** k for q in chances if q > 0)

    target = UNCOVERED_SHARE * (n - count)
    low, high = 0, 1
    while uncovered(high) > target and high < MAX_BLOCKS:
        low, high = high, min(2 * high, MAX_BLOCKS)
    while high - low > 1:  # uncovered(high) <= target (or high is the cap), uncovered(low) > target
        middle = (low + high) // 2
        low, high = (low, middle) if uncovered(middle) <= target else (middle, high)
    return high


def cluster_mask(batch: int, grid: tuple[int, int], count: int, cluster_sizes: Sequence[int] = (3, 4, 5),
                 reference_quirks: bool = False, device=None, generator=None) -> Tensor:
    """Bool ``[batch, f_dim * t_dim]`` (frequency-major) with exactly ``count`` True per row, in blocks.

    Each patch gets the index of the first block (in draw order) that covers it; the ``count``
    patches with the lowest index are masked. That is the reference's "add blocks until at
    least ``count`` patches are masked, keep ``count``", done for all clips at once, with
    :func:`blocks_to_draw` blocks per clip and no read of the device.
    """
    _check_count(count, grid[0] * grid[1])
    sides = [int(c) for c in cluster_sizes]
    if not sides or min(sides) < 1:
        raise ValueError(f"cluster_sizes must be positive block sides, got {list(cluster_sizes)}")
    first = first_covering_block(batch, grid, count, sides, reference_quirks, device, generator)
    spare = torch.rand(first.shape, device=device, generator=generator)
    if reference_quirks:
        # the blocks up to the one that first covers more than ``count`` patches; of what they cover, the lowest
        # patch indices; patches no drawn block covers (the rare clip whose blocks fall short) in random order
        last = first.kthvalue(count + 1, dim=1, keepdim=True).values
        patch = torch.arange(first.shape[1], device=device, dtype=torch.float)
        blocks = blocks_to_draw(grid, count, tuple(sides), reference_quirks)
        order = torch.where((first <= last) & (first < blocks), patch, first.shape[1] * (1 + spare))
        order = torch.where(first.isinf(), math.inf, order)  # patch 0, never masked
    else:
        order = first + 0.5 * spare  # lowest block index first; random tie-break inside the block cut short
    chosen = order.topk(count, dim=1, largest=False).indices
    return torch.zeros(first.shape, dtype=torch.bool, device=device).scatter_(1, chosen, True)


def first_covering_block(batch: int, grid: tuple[int, int], count: int, sides: list[int], reference_quirks: bool,
                         device=None, generator=None) -> Tensor:
    """Float ``[batch, f_dim * t_dim]``: per clip and patch, the index of the first of its
    :func:`blocks_to_draw` random blocks that covers the patch; the number of blocks where none does
    (so such patches rank after every covered one), infinity for patch 0 with the reference's indices."""
    f_dim, t_dim = grid
    num_patches = f_dim * t_dim
    blocks = blocks_to_draw(grid, count, tuple(sides), reference_quirks)
    offsets = torch.arange(max(sides), device=device)
    i, j = offsets.view(-1, 1), offsets.view(1, -1)  # block rows (frequency) and columns (time)
    starts = torch.randint(num_patches, (batch, blocks), device=device, generator=generator)
    # a side per block; the reference draws one per clip
    choice = torch.randint(len(sides), (batch, 1 if reference_quirks else blocks), device=device, generator=generator)
    c = torch.zeros_like(choice)
    for k, side in enumerate(sides):  # the sides as kernel arguments: no copy of a host list to the device
        c = torch.where(choice == k, side, c)
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
    block_id = torch.arange(blocks, device=device, dtype=torch.float).view(1, -1, 1, 1).expand_as(valid).flatten(1)
    first = torch.full((batch, num_patches + 1), float(blocks), device=device)
    first.scatter_reduce_(1, index, block_id, reduce="amin")
    if reference_quirks:
        first[:, 0] = math.inf
    return first[:, :num_patches]


def make_mask(style: str, batch: int, grid: tuple[int, int], count: int, cluster_sizes: Sequence[int] = (3, 4, 5),
              reference_quirks: bool = False, device=None, generator=None) -> Tensor:
    """Dispatch on the configured ``mask.style``."""
    if style == "cluster":
        return cluster_mask(batch, grid, count, cluster_sizes, reference_quirks, device, generator)
    if style == "random":
        return random_mask(batch, grid[0] * grid[1], count, device, generator)
    raise ConfigError(f"mask.style={style!r} is not one of {', '.join(STYLES)}")


def _check_count(count: int, num_patches: int) -> None:
    """At least one patch stays visible, or there is no context to predict from."""
    if not 0 < count < num_patches:
        raise ConfigError(f"mask.count={count} must be in 1..{num_patches - 1} (the grid has {num_patches} patches)")
