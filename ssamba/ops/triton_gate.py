"""Triton kernels for the mixer's output gate: ``(y_f + y_b) / 2 * silu(z)`` and its gradients.

The scan writes both directions' outputs side by side (``y [rows, 2E]``); one pass reads them with
``z`` and writes the gated average and the sum ``y_f + y_b``, the one thing of ``y`` the backward
needs (so the backward keeps ``[rows, E]`` instead of ``[rows, 2E]``); one pass in the backward
writes ``dL/dz`` and the gradient both scan directions receive.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_R, BLOCK_E = 32, 128


@triton.jit
def _gate_fwd_kernel(y_ptr, z_ptr, out_ptr, sum_ptr, rows, dim, sy, sz, so,
                     BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask = (r < rows)[:, None] & (e < dim)[None, :]
    y_rows = y_ptr + r[:, None] * sy + e[None, :]
    y = tl.load(y_rows, mask=mask, other=0.0).to(tl.float32) + tl.load(y_rows + dim, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + r[:, None] * sz + e[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + r[:, None] * so + e[None, :], (0.5 * y * z * tl.sigmoid(z)).to(out_ptr.dtype.element_ty),
             mask=mask)
    tl.store(sum_ptr + r[:, None] * so + e[None, :], y.to(sum_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_bwd_kernel(dout_ptr, sum_ptr, z_ptr, g_ptr, dz_ptr, out_ptr, rows, dim, sd, ss, sz, sg, sdz,
                     BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, WRITE_OUT: tl.constexpr):
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask = (r < rows)[:, None] & (e < dim)[None, :]
    half_dout = 0.5 * tl.load(dout_ptr + r[:, None] * sd + e[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(sum_ptr + r[:, None] * ss + e[None, :], mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + r[:, None] * sz + e[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(z)
    tl.store(g_ptr + r[:, None] * sg + e[None, :], (half_dout * z * sig).to(g_ptr.dtype.element_ty), mask=mask)
    tl.store(dz_ptr + r[:, None] * sdz + e[None, :],
             (half_dout * y * sig * (1.0 + z * (1.0 - sig))).to(dz_ptr.dtype.element_ty), mask=mask)
    if WRITE_OUT:  # the forward's output again, for a following projection's weight gradient
        tl.store(out_ptr + r[:, None] * sg + e[None, :], (0.5 * y * z * sig).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A ``[batch, L, C]`` tensor as rows with one row stride (copied only if it has none)."""
    if t.stride(-1) != 1 or t.stride(0) != t.shape[1] * t.stride(1):
        t = t.contiguous()
    return t, t.stride(1)


def _grid(rows: int, dim: int) -> tuple[int, int]:
    return triton.cdiv(rows, BLOCK_R), triton.cdiv(dim, BLOCK_E)


def gate_fwd(y: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``y [batch, L, 2E]`` (both directions), ``z [batch, L, E]`` -> ``(y_f + y_b) / 2 * silu(z)`` (dtype of z)
    and ``y_f + y_b`` (dtype of y), what :func:`gate_bwd` takes."""
    batch, length, dim = z.shape
    (y, sy), (z, sz) = _rows(y), _rows(z)
    out = torch.empty(batch, length, dim, device=z.device, dtype=z.dtype)
    y_sum = torch.empty(batch, length, dim, device=z.device, dtype=y.dtype)
    _gate_fwd_kernel[_grid(batch * length, dim)](y, z, out, y_sum, batch * length, dim, sy, sz, dim,
                                                 BLOCK_R=BLOCK_R, BLOCK_E=BLOCK_E)
    return out, y_sum


def gate_bwd(dout: torch.Tensor, y_sum: torch.Tensor, z: torch.Tensor, dz: torch.Tensor,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """Writes ``dL/dz`` into ``dz`` (a ``[batch, L, E]`` view with one row stride) given ``y_sum = y_f + y_b``
    from :func:`gate_fwd`, and returns fp32 ``dL/dy`` of either direction, ``dout / 2 * silu(z)``.
    ``out`` (contiguous ``[batch, L, E]``), if given, receives :func:`gate_fwd`'s output recomputed."""
    batch, length, dim = z.shape
    (dout, sd), (y_sum, ss), (z, sz) = _rows(dout), _rows(y_sum), _rows(z)
    if dz.stride(-1) != 1 or dz.stride(0) != length * dz.stride(1):
        raise ValueError(f"dz must be rows with one stride, got strides {dz.stride()}")
    g = torch.empty(batch, length, dim, device=z.device, dtype=torch.float32)
    if out is not None and not (out.is_contiguous() and out.shape == z.shape):
        raise ValueError(f"out must be a contiguous {tuple(z.shape)} tensor, got {tuple(out.shape)} strides {out.stride()}")
    _gate_bwd_kernel[_grid(batch * length, dim)](dout, y_sum, z, g, dz, g if out is None else out, batch * length,
                                                 dim, sd, ss, sz, dim, dz.stride(1), BLOCK_R=BLOCK_R, BLOCK_E=BLOCK_E,
                                                 WRITE_OUT=out is not None)
    return g
