import pytest
import torch

from ssamba.tasks.masking import cluster_mask, make_mask, random_mask


@pytest.mark.parametrize("grid,count", [((8, 64), 400), ((8, 64), 250), ((8, 16), 100), ((12, 5), 59), ((1, 64), 30)])
@pytest.mark.parametrize("quirks", [False, True])
def test_cluster_mask_masks_exactly_count(grid, count, quirks):
    torch.manual_seed(0)
    mask = cluster_mask(16, grid, count, reference_quirks=quirks)
    assert mask.shape == (16, grid[0] * grid[1]) and mask.dtype == torch.bool
    assert (mask.sum(1) == count).all()


def test_random_mask_masks_exactly_count_uniformly():
    torch.manual_seed(0)
    mask = random_mask(4000, 20, 5)
    assert (mask.sum(1) == 5).all()
    frequency = mask.float().mean(0)
    assert torch.allclose(frequency, torch.full((20,), 0.25), atol=0.03)


def test_cluster_mask_is_made_of_blocks():
    torch.manual_seed(0)
    grid = (16, 16)
    mask = cluster_mask(200, grid, 9, cluster_sizes=[3]).view(200, *grid)
    scattered = random_mask(200, 256, 9).view(200, *grid)

    def with_masked_neighbour(m):
        padded = torch.nn.functional.pad(m.float(), (1, 1, 1, 1))
        neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
        return (neighbours[m] > 0).float().mean()

    # Almost every patch of a block mask touches another masked patch (only the cut-short last
    # block can leave one alone); few patches of a uniform mask do.
    assert with_masked_neighbour(mask) > 0.97
    assert with_masked_neighbour(scattered) < 0.3
    # A block that fits entirely is exactly 3x3 (the first block drawn covers all 9 patches).
    rows = mask.any(2).sum(1)
    cols = mask.any(1).sum(1)
    assert ((rows == 3) & (cols == 3)).float().mean() > 0.5


def test_reference_quirks_never_mask_patch_zero_and_wrap_rows():
    torch.manual_seed(0)
    grid = (4, 8)
    quirky = cluster_mask(3000, grid, 4, cluster_sizes=[2], reference_quirks=True)
    assert not quirky[:, 0].any()
    clean = cluster_mask(3000, grid, 4, cluster_sizes=[2])
    assert clean[:, 0].any()
    # A flat-index block starting at the end of a time row continues at the start of the next row.
    wrapped = quirky[:, 7] & quirky[:, 8]  # (f=0, t=7) next to (f=1, t=0)
    assert wrapped.any()
    assert not (clean[:, 7] & clean[:, 8] & ~clean[:, 6] & ~clean[:, 15]).all()


def test_masks_follow_the_generator():
    first = make_mask("cluster", 4, (8, 16), 50, generator=torch.Generator().manual_seed(3))
    second = make_mask("cluster", 4, (8, 16), 50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)


@pytest.mark.parametrize("count", [0, 128, 500])
def test_bad_counts_name_the_key(count):
    with pytest.raises(ValueError, match=r"mask.count=.*1\.\.127"):
        make_mask("cluster", 2, (8, 16), count)


def test_unknown_style_names_the_allowed_ones():
    with pytest.raises(ValueError, match="mask.style='blocks' is not one of cluster, random"):
        make_mask("blocks", 2, (8, 16), 10)


@pytest.mark.parametrize("style", ["cluster", "random"])
def test_masked_positions_select_like_boolean_indexing(style):
    """The pretraining task gathers the masked patches by index (no host sync); same rows, same order."""
    from ssamba.tasks.pretrain import _rows_at, masked_positions

    torch.manual_seed(0)
    mask = make_mask(style, 4, (8, 64), 100)
    x = torch.randn(4, 8 * 64, 5)
    torch.testing.assert_close(_rows_at(x, masked_positions(mask, 100)), x[mask].view(4, 100, 5), rtol=0, atol=0)


def test_a_cluster_mask_never_reads_a_tensor_on_the_host(monkeypatch):
    """On a GPU each such read would make the host wait for the device (tests/test_host_waits_gpu.py)."""
    def refuse(*_):
        raise AssertionError("a tensor was read on the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for quirks in (False, True):
        cluster_mask(4, (8, 64), 400, reference_quirks=quirks)


@pytest.mark.parametrize("quirks", [False, True])
def test_the_blocks_drawn_cover_the_count_in_every_clip_at_ssast_settings(quirks):
    """SSAST pretrains with 400 of 512 patches in blocks of 3-5: the blocks drawn at once must cover them
    (the uniform top-up is for masks that leave only a few patches unmasked)."""
    from ssamba.tasks.masking import blocks_to_draw, first_covering_block

    torch.manual_seed(0)
    for sides in ([3, 4, 5], [3]):
        blocks = blocks_to_draw((8, 64), 400, tuple(sides), quirks)
        covered = (first_covering_block(5000, (8, 64), 400, sides, quirks) < blocks).sum(1)
        assert covered.min() >= 400, (sides, int(covered.min()))
    assert blocks_to_draw((8, 64), 400, (3, 4, 5), quirks) < blocks_to_draw((8, 64), 500, (3, 4, 5), quirks)


def test_a_mask_that_leaves_one_patch_is_exact_even_when_its_blocks_fall_short():
    torch.manual_seed(0)
    quirky = cluster_mask(500, (12, 5), 59, reference_quirks=True)  # every patch but patch 0
    assert quirky[:, 1:].all() and not quirky[:, 0].any()


def released_mask(rng, t_dim: int, num_patches: int, count: int) -> set[int]:
    """The released SSAST generator, restated: one block side per clip, blocks of flat indices until more than
    ``count`` patches are covered, then the ``count`` lowest of them (CPython's order of a set of small ints)."""
    side, ids = rng.randrange(3) + 3, set()
    while len(ids) <= count:
        start = rng.randrange(num_patches)
        ids.update(start + t_dim * i + j for i in range(side) for j in range(side)
                   if 0 < start + t_dim * i + j < num_patches)
    return set(sorted(ids)[:count])


def test_reference_quirks_draw_masks_distributed_as_the_released_generator():
    """Per-row shares and the spread of masked neighbours match the released code's over 2000 clips (the
    per-block side and the first-drawn blocks, used before, put 56.6 patches in the last row against 52.6)."""
    import random

    grid, count, clips = (8, 64), 400, 2000
    rng = random.Random(0)
    released = torch.zeros(clips, 512, dtype=torch.bool)
    for k in range(clips):
        released[k, list(released_mask(rng, 64, 512, count))] = True
    torch.manual_seed(0)
    ours = cluster_mask(clips, grid, count, reference_quirks=True)

    def stats(mask):
        rows = mask.view(clips, *grid).sum(2).float()  # masked patches per frequency row
        pairs = (mask.view(clips, *grid)[..., 1:] & mask.view(clips, *grid)[..., :-1]).sum((1, 2)).float()
        return rows.mean(0), pairs.std()

    (rows_ours, spread_ours), (rows_ref, spread_ref) = stats(ours), stats(released)
    torch.testing.assert_close(rows_ours, rows_ref, atol=1.0, rtol=0)  # each row's mean within 1 of 50
    assert abs(spread_ours - spread_ref) < 0.1 * spread_ref
