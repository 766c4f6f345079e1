"""The Gluon scan's argument handling, which runs on the host (CPU tensors suffice): the alignment its
row copies rely on, and the copies it makes when an input does not start on 16 bytes. The kernels
themselves are checked on a GPU in test_ops_gpu.py."""
import pytest
import torch

gluon_scan = pytest.importorskip("ssamba.ops.gluon_scan", reason="needs triton with gluon")


def _inputs(dim, dtype=torch.bfloat16, batch=2, length=9, d_state=16):
    u = torch.zeros(batch, length, 2 * dim, dtype=dtype)
    dt = torch.zeros(batch, length, 2 * dim, dtype=dtype)
    bc = torch.zeros(batch, length, 2, 2 * d_state, dtype=dtype)
    return u, dt, bc


@pytest.mark.parametrize("dim,expected", [(384, 8), (42, 2), (20, 4)])
def test_alignment_is_the_largest_power_of_two_dividing_channels_and_strides(dim, expected):
    u, dt, bc = _inputs(dim)
    align, in_units = gluon_scan._in_alignment_units(u, dt, bc)
    assert align == expected
    assert [v * align for v in in_units] == [dim, *u.stride()[:2], *dt.stride()[:2], *bc.stride()[:2]]


def test_odd_channel_counts_of_16_bit_inputs_are_refused_clearly():
    with pytest.raises(ValueError, match="4-byte pieces.*multiples of 2"):
        gluon_scan._in_alignment_units(*_inputs(35))
    assert gluon_scan._in_alignment_units(*_inputs(35, dtype=torch.float32))[0] == 1  # 4-byte elements one by one


def test_misaligned_inputs_are_copied_together_and_keep_sharing_strides():
    aligned = torch.zeros(2, 9, 40)
    assert gluon_scan._aligned(aligned, aligned)[0] is aligned
    storage = torch.zeros(2 * 9 * 40 + 1)
    shifted = storage[1:].view(2, 9, 40)  # starts 4 bytes into its storage
    first, second = gluon_scan._aligned(shifted, aligned)
    assert first.data_ptr() % 16 == 0 and second.data_ptr() % 16 == 0
    assert first.stride() == second.stride() and torch.equal(first, shifted)


def test_bc_must_hold_both_directions_side_by_side_and_dt_both_directions_channels():
    u, dt, bc = _inputs(384)
    gluon_scan._check(u, dt, bc, 16)
    with pytest.raises(ValueError, match="bc must be"):
        gluon_scan._check(u, dt, bc[:, :, 0], 16)
    with pytest.raises(ValueError, match="dt must be"):
        gluon_scan._check(u, dt[..., :384], bc, 16)


def test_block_diagonal_projections_match_the_per_direction_ones_and_align_every_part():
    """Both directions' x_proj and dt_proj as one matmul each (gluon_bimamba.projection_weights): the same dt
    and B/C as per-direction projections, every part of the x_proj output starting on 16 bytes in bf16, and
    the backward's per-direction weight gradients and input gradient equal to autograd's."""
    gluon_bimamba = pytest.importorskip("ssamba.ops.gluon_bimamba")
    g = torch.Generator().manual_seed(0)
    batch, length, E, N, R = 2, 7, 24, 4, 3
    x_proj = [torch.randn(R + 2 * N, E, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    dt_proj = [torch.randn(E, R, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    xc = torch.randn(batch, length, 2 * E, generator=g, dtype=torch.float64, requires_grad=True)
    x_dbl = [torch.nn.functional.linear(xc[..., h * E:(h + 1) * E], x_proj[h]) for h in range(2)]
    dt_ref = torch.cat([torch.nn.functional.linear(x_dbl[h][..., :R], dt_proj[h]) for h in range(2)], -1)
    bc_ref = torch.stack([x[..., R:] for x in x_dbl], 2)

    w_x, w_dt = gluon_bimamba.projection_weights(*(t.detach() for t in (*x_proj, *dt_proj)), torch.float64)
    out, dt, bc = gluon_bimamba._projections(xc.detach(), w_x, w_dt)
    assert torch.allclose(dt, dt_ref) and torch.allclose(bc, bc_ref)
    assert w_x.shape[0] % 8 == 0 and w_dt.shape[1] % 16 == 0 and (bc.storage_offset() - out.storage_offset()) % 8 == 0

    ddt = torch.randn(dt.shape, generator=g, dtype=torch.float64)
    dBC = torch.randn(batch, length, 2, 2, N, generator=g, dtype=torch.float64)
    want = torch.autograd.grad((dt_ref * ddt).sum() + (bc_ref * dBC.flatten(3)).sum(), [xc, *x_proj, *dt_proj])
    dxc = torch.zeros_like(xc)
    grads = gluon_bimamba._projection_grads(xc.detach(), out, ddt, dBC, w_x, w_dt, dxc, R)
    got = [dxc, grads[0][0], grads[1][0], grads[0][1], grads[1][1]]
    for name, a, b in zip(["xc", "x_proj_f", "x_proj_b", "dt_proj_f", "dt_proj_b"], got, want):
        assert a.shape == b.shape and torch.allclose(a, b), name
