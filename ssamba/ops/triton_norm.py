"""The block's residual add and norm in one Triton kernel each way (LayerNorm or RMSNorm).

``residual + drop_path(hidden)`` followed by the norm is, in PyTorch, an add, a norm in fp32, a cast
of its output for the bf16 in_proj and, in the backward, the norm's input gradient, a separate
reduction for the weight gradients and the adds of the two residual-stream gradients: about seven
kernels and passes over ``[batch, L, D]``. Here the forward reads ``hidden`` and ``residual`` once and
writes the new residual and the normalised rows (in autocast's dtype under autocast); the backward
reads them once more and writes both input gradients, with the weight gradients summed per program.
Statistics and arithmetic are fp32, as autocast runs the norm.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

ELEMENTS_PER_THREAD = 8  # a row tile holds this many elements per thread and tensor (registers, no spills)
BACKWARD_PROGRAMS_PER_SM = 4  # the backward's programs loop over row tiles, holding weight-gradient sums


@triton.jit
def _load_rows(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _add_norm_fwd_kernel(h_ptr, r_ptr, scale_ptr, w_ptr, b_ptr, y_ptr, res_ptr, mean_ptr, rstd_ptr, rows, dim, length,
                         eps, HAS_RESIDUAL: tl.constexpr, HAS_SCALE: tl.constexpr, IS_RMS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    row_mask = r < rows
    mask = row_mask[:, None] & (d < dim)[None, :]
    offs = r.to(tl.int64)[:, None] * dim + d[None, :]
    x = _load_rows(h_ptr, offs, mask)
    if HAS_SCALE:  # drop path: one factor per sample (0 or 1 / keep probability)
        x *= tl.load(scale_ptr + r // length, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    if HAS_RESIDUAL:
        x += _load_rows(r_ptr, offs, mask)
    tl.store(res_ptr + offs, x.to(res_ptr.dtype.element_ty), mask=mask)
    if IS_RMS:
        centred = x
    else:
        mean = tl.sum(x, axis=1) / dim
        centred = tl.where(mask, x - mean[:, None], 0.0)
        tl.store(mean_ptr + r, mean, mask=row_mask)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / dim + eps)
    tl.store(rstd_ptr + r, rstd, mask=row_mask)
    y = centred * rstd[:, None] * tl.load(w_ptr + d, mask=d < dim, other=0.0).to(tl.float32)[None, :]
    if not IS_RMS:
        y += tl.load(b_ptr + d, mask=d < dim, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_norm_bwd_kernel(dy_ptr, dres_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, scale_ptr, dr_ptr, dh_ptr, dw_ptr,
                         rows, dim, length, tiles_per_program,
                         HAS_RESIDUAL: tl.constexpr, HAS_DRES: tl.constexpr, HAS_SCALE: tl.constexpr,
                         IS_RMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``x`` is the saved sum (the norm's input). Writes the gradients of ``residual`` (``dr``, if there
    was one) and of ``hidden`` (``dh``, drop-path factor applied) and this program's partial weight /
    bias gradients."""
    d = tl.arange(0, BLOCK_D)
    d_mask = d < dim
    w = tl.load(w_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    acc_w = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    first = tl.program_id(0) * tiles_per_program
    for tile in range(first, first + tiles_per_program):
        r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = r < rows
        mask = row_mask[:, None] & d_mask[None, :]
        offs = r.to(tl.int64)[:, None] * dim + d[None, :]
        x = _load_rows(x_ptr, offs, mask)
        dy = _load_rows(dy_ptr, offs, mask)
        rstd = tl.load(rstd_ptr + r, mask=row_mask, other=0.0)
        if IS_RMS:
            xhat = x * rstd[:, None]
        else:
            xhat = tl.where(mask, (x - tl.load(mean_ptr + r, mask=row_mask, other=0.0)[:, None]) * rstd[:, None], 0.0)
        wdy = dy * w
        dx = wdy - xhat * (tl.sum(xhat * wdy, axis=1) / dim)[:, None]
        if not IS_RMS:
            dx -= (tl.sum(wdy, axis=1) / dim)[:, None]
        dx *= rstd[:, None]
        if HAS_DRES:
            dx += _load_rows(dres_ptr, offs, mask)
        if HAS_RESIDUAL:
            tl.store(dr_ptr + offs, dx.to(dr_ptr.dtype.element_ty), mask=mask)
        if HAS_SCALE:
            dx *= tl.load(scale_ptr + r // length, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(dh_ptr + offs, dx.to(dh_ptr.dtype.element_ty), mask=mask)
        acc_w += dy * xhat
        acc_b += dy
    tl.store(dw_ptr + tl.program_id(0) * 2 * dim + d, tl.sum(acc_w, axis=0), mask=d_mask)
    tl.store(dw_ptr + tl.program_id(0) * 2 * dim + dim + d, tl.sum(acc_b, axis=0), mask=d_mask)


def _tile(dim: int) -> tuple[int, int, int]:
    """Row tile ``[BLOCK_M, BLOCK_D]`` covering whole rows, and the warps for it."""
    block_d = triton.next_power_of_2(dim)
    warps = 4 if block_d <= 512 else 8
    return max(1, ELEMENTS_PER_THREAD * 32 * warps // block_d), block_d, warps


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


class AddNorm(torch.autograd.Function):
    """``(residual + hidden * scale, norm(residual + hidden * scale))``; see :func:`add_norm`."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, residual, scale, weight, bias, eps, residual_dtype):
        batch, length, dim = hidden.shape
        rows = batch * length
        hidden = hidden.contiguous()
        residual = residual.contiguous() if residual is not None else None
        out_dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else weight.dtype
        new_residual = torch.empty(hidden.shape, device=hidden.device, dtype=residual_dtype)
        normed = torch.empty(hidden.shape, device=hidden.device, dtype=out_dtype)
        mean = torch.empty(rows, device=hidden.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        block_m, block_d, warps = _tile(dim)
        _add_norm_fwd_kernel[(triton.cdiv(rows, block_m),)](
            hidden, residual if residual is not None else hidden, scale if scale is not None else hidden, weight,
            bias if bias is not None else weight, normed, new_residual, mean, rstd, rows, dim, length, eps,
            HAS_RESIDUAL=residual is not None, HAS_SCALE=scale is not None, IS_RMS=bias is None,
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
        ctx.save_for_backward(new_residual, weight, mean, rstd, scale)
        ctx.input_dtypes = hidden.dtype, residual.dtype if residual is not None else None
        ctx.is_rms = bias is None
        return normed, new_residual

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, d_normed, d_residual):
        x, weight, mean, rstd, scale = ctx.saved_tensors
        hidden_dtype, residual_in_dtype = ctx.input_dtypes
        batch, length, dim = x.shape
        rows = batch * length
        d_normed = d_normed.contiguous()
        d_residual = d_residual.contiguous() if d_residual is not None else None
        d_hidden = torch.empty(x.shape, device=x.device, dtype=hidden_dtype)
        d_res_in = torch.empty(x.shape, device=x.device, dtype=residual_in_dtype) if residual_in_dtype else d_hidden
        block_m, block_d, warps = _tile(dim)
        tiles = triton.cdiv(rows, block_m)
        programs = min(tiles, BACKWARD_PROGRAMS_PER_SM * _multiprocessors(x.device))
        per_program = triton.cdiv(tiles, programs)
        programs = triton.cdiv(tiles, per_program)
        partial = torch.empty(programs, 2, dim, device=x.device, dtype=torch.float32)
        _add_norm_bwd_kernel[(programs,)](
            d_normed, d_residual if d_residual is not None else d_normed, x, weight, mean, rstd,
            scale if scale is not None else x, d_res_in, d_hidden, partial, rows, dim, length, per_program,
            HAS_RESIDUAL=residual_in_dtype is not None, HAS_DRES=d_residual is not None, HAS_SCALE=scale is not None,
            IS_RMS=ctx.is_rms, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
        sums = partial.sum(0)
        d_weight = sums[0].to(weight.dtype)
        d_bias = None if ctx.is_rms else sums[1].to(weight.dtype)
        return d_hidden, d_res_in if residual_in_dtype else None, None, d_weight, d_bias, None, None


def add_norm(hidden: Tensor, residual: Tensor | None, weight: Tensor, bias: Tensor | None, eps: float,
             scale: Tensor | None = None, residual_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``residual + hidden * scale`` (per-sample ``scale [batch]``: drop path) and its norm, ``[batch, L, D]``.

    ``bias=None`` means RMSNorm, else LayerNorm. Returns ``(normed, new_residual)``: ``normed`` in
    autocast's dtype under autocast (what the in_proj would cast it to), else the weight's;
    ``new_residual`` in ``residual_dtype`` (default: the promoted dtype of the inputs). With no
    ``residual`` (the first layer) the new residual is a copy of ``hidden`` and ``scale`` must be None.
    """
    if residual is None and scale is not None:
        raise ValueError("drop path applies to the branch added to a residual; the first layer has none")
    if residual_dtype is None:
        residual_dtype = hidden.dtype if residual is None else torch.result_type(hidden, residual)
    return AddNorm.apply(hidden, residual, scale, weight, bias, eps, residual_dtype)
