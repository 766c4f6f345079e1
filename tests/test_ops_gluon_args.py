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
