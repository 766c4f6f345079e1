"""The block's residual add and norm in one Triton kernel each way (LayerNorm or RMSNorm).

``residual + drop_path(hidden)`` followed by the norm is, in PyTorch, an add, a norm in fp32, a cast
of its output for the bf16 in_proj and, in the backward, the norm's input gradient, a separate
reduction for the weight gradients and the adds of the two residual-stream gradients: about seven
kernels and passes over ``[batch, L, D]``. Here the forward reads ``hidden`` and ``residual`` once and
writes the new residual and the normalised rows (in autocast's dtype under autocast); the backward
reads them once more and writes both input gradients, with the weight gradients summed per program.
Statistics and arithmetic are fp32, as autocast runs the norm.

The published pairing runs two such add+norms on the same ``(hidden, residual)``; the pair kernels
do both in one pass and write the pair's next residual (the sum of the two norm inputs) directly.
Their backward keeps nothing of the forward but ``hidden`` and ``residual``: it recomputes the norm
inputs and statistics (see ``ops.pair``).
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
def _normalise(x, mask, dim, eps, IS_RMS: tl.constexpr):
    """Rows ``x`` (fp32, masked-off columns 0) -> ``(xhat, mean, rstd)``; ``mean`` is 0 for RMSNorm."""
    if IS_RMS:
        mean = tl.zeros([x.shape[0]], dtype=tl.float32)
        centred = x
    else:
        mean = tl.sum(x, axis=1) / dim
        centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / dim + eps)
    return centred * rstd[:, None], mean, rstd


@triton.jit
def _affine(xhat, w_ptr, b_ptr, d, d_mask, IS_RMS: tl.constexpr):
    y = xhat * tl.load(w_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    if not IS_RMS:
        y += tl.load(b_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _norm_input_grad(xhat, dy, w, rstd, dim, IS_RMS: tl.constexpr):
    """The norm's input gradient from its output gradient ``dy`` (``w``: the weight row, ``[1, D]``)."""
    wdy = dy * w
    dx = wdy - xhat * (tl.sum(xhat * wdy, axis=1) / dim)[:, None]
    if not IS_RMS:
        dx -= (tl.sum(wdy, axis=1) / dim)[:, None]
    return dx * rstd[:, None]


@triton.jit
def _row_tile(tile, rows, dim, d, d_mask, BLOCK_M: tl.constexpr):
    """Row tile ``tile``'s row indices, row mask, element mask and element offsets."""
    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = r < rows
    return r, row_mask, row_mask[:, None] & d_mask[None, :], r.to(tl.int64)[:, None] * dim + d[None, :]


@triton.jit
def _row_scale(scale_ptr, r, row_mask, length):
    """Each row's drop-path factor (one per sample: 0 or 1 / keep probability), as a column."""
    return tl.load(scale_ptr + r // length, mask=row_mask, other=0.0).to(tl.float32)[:, None]


@triton.jit
def _add_norm_fwd_kernel(h_ptr, r_ptr, scale_ptr, w_ptr, b_ptr, y_ptr, res_ptr, mean_ptr, rstd_ptr, rows, dim, length,
                         eps, HAS_RESIDUAL: tl.constexpr, HAS_SCALE: tl.constexpr, IS_RMS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    r, row_mask, mask, offs = _row_tile(tl.program_id(0), rows, dim, d, d < dim, BLOCK_M)
    x = _load_rows(h_ptr, offs, mask)
    if HAS_SCALE:  # drop path
        x *= _row_scale(scale_ptr, r, row_mask, length)
    if HAS_RESIDUAL:
        x += _load_rows(r_ptr, offs, mask)
    tl.store(res_ptr + offs, x.to(res_ptr.dtype.element_ty), mask=mask)
    xhat, mean, rstd = _normalise(x, mask, dim, eps, IS_RMS)
    if not IS_RMS:
        tl.store(mean_ptr + r, mean, mask=row_mask)
    tl.store(rstd_ptr + r, rstd, mask=row_mask)
    tl.store(y_ptr + offs, _affine(xhat, w_ptr, b_ptr, d, d < dim, IS_RMS).to(y_ptr.dtype.element_ty), mask=mask)


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
        r, row_mask, mask, offs = _row_tile(tile, rows, dim, d, d_mask, BLOCK_M)
        x = _load_rows(x_ptr, offs, mask)
        dy = _load_rows(dy_ptr, offs, mask)
        rstd = tl.load(rstd_ptr + r, mask=row_mask, other=0.0)
        if IS_RMS:
            xhat = x * rstd[:, None]
        else:
            xhat = tl.where(mask, (x - tl.load(mean_ptr + r, mask=row_mask, other=0.0)[:, None]) * rstd[:, None], 0.0)
        dx = _norm_input_grad(xhat, dy, w, rstd, dim, IS_RMS)
        if HAS_DRES:
            dx += _load_rows(dres_ptr, offs, mask)
        if HAS_RESIDUAL:
            tl.store(dr_ptr + offs, dx.to(dr_ptr.dtype.element_ty), mask=mask)
        if HAS_SCALE:
            dx *= _row_scale(scale_ptr, r, row_mask, length)
        tl.store(dh_ptr + offs, dx.to(dh_ptr.dtype.element_ty), mask=mask)
        acc_w += dy * xhat
        acc_b += dy
    tl.store(dw_ptr + tl.program_id(0) * 2 * dim + d, tl.sum(acc_w, axis=0), mask=d_mask)
    tl.store(dw_ptr + tl.program_id(0) * 2 * dim + dim + d, tl.sum(acc_b, axis=0), mask=d_mask)


@triton.jit
def _pair_inputs(h_ptr, r_ptr, sf_ptr, sb_ptr, offs, r, mask, row_mask, length,
                 HAS_RESIDUAL: tl.constexpr, HAS_SCALE: tl.constexpr):
    """The two layers' norm inputs ``residual + hidden * scale_f`` and ``residual + hidden * scale_b``."""
    h = _load_rows(h_ptr, offs, mask)
    if HAS_RESIDUAL:
        res = _load_rows(r_ptr, offs, mask)
        if HAS_SCALE:
            x_f = h * _row_scale(sf_ptr, r, row_mask, length) + res
            x_b = h * _row_scale(sb_ptr, r, row_mask, length) + res
        else:
            x_f = h + res
            x_b = x_f
    else:
        x_f = h
        x_b = h
    return x_f, x_b


@triton.jit
def _pair_add_norm_fwd_kernel(h_ptr, r_ptr, sf_ptr, sb_ptr, wf_ptr, bf_ptr, wb_ptr, bb_ptr, yf_ptr, yb_ptr, res_ptr,
                              rows, dim, length, eps, HAS_RESIDUAL: tl.constexpr, HAS_SCALE: tl.constexpr,
                              IS_RMS: tl.constexpr, STORE_RESIDUAL: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    r, row_mask, mask, offs = _row_tile(tl.program_id(0), rows, dim, d, d < dim, BLOCK_M)
    x_f, x_b = _pair_inputs(h_ptr, r_ptr, sf_ptr, sb_ptr, offs, r, mask, row_mask, length, HAS_RESIDUAL, HAS_SCALE)
    if STORE_RESIDUAL:
        tl.store(res_ptr + offs, (x_f + x_b).to(res_ptr.dtype.element_ty), mask=mask)
    xhat, _, _ = _normalise(x_f, mask, dim, eps, IS_RMS)
    tl.store(yf_ptr + offs, _affine(xhat, wf_ptr, bf_ptr, d, d < dim, IS_RMS).to(yf_ptr.dtype.element_ty), mask=mask)
    xhat, _, _ = _normalise(x_b, mask, dim, eps, IS_RMS)
    tl.store(yb_ptr + offs, _affine(xhat, wb_ptr, bb_ptr, d, d < dim, IS_RMS).to(yb_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pair_add_norm_bwd_kernel(h_ptr, r_ptr, sf_ptr, sb_ptr, wf_ptr, wb_ptr, dyf_ptr, dyb_ptr, dres_ptr, dh_ptr, dr_ptr,
                              dw_ptr, rows, dim, length, eps, tiles_per_program,
                              HAS_RESIDUAL: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_DRES: tl.constexpr,
                              IS_RMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Recomputes both norms' inputs and statistics from ``hidden`` and ``residual`` (nothing else of
    the forward is kept); writes the gradients of ``residual`` and ``hidden`` and this program's partial
    weight / bias gradients of both norms (``dw [programs, 4, D]``: w_f, b_f, w_b, b_b)."""
    d = tl.arange(0, BLOCK_D)
    d_mask = d < dim
    w_f = tl.load(wf_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    w_b = tl.load(wb_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    acc_wf = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_bf = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_wb = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_bb = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    first = tl.program_id(0) * tiles_per_program
    for tile in range(first, first + tiles_per_program):
        r, row_mask, mask, offs = _row_tile(tile, rows, dim, d, d_mask, BLOCK_M)
        x_f, x_b = _pair_inputs(h_ptr, r_ptr, sf_ptr, sb_ptr, offs, r, mask, row_mask, length, HAS_RESIDUAL,
                                HAS_SCALE)
        dy_f = _load_rows(dyf_ptr, offs, mask)
        dy_b = _load_rows(dyb_ptr, offs, mask)
        xhat_f, _, rstd_f = _normalise(x_f, mask, dim, eps, IS_RMS)
        xhat_b, _, rstd_b = _normalise(x_b, mask, dim, eps, IS_RMS)
        dx_f = _norm_input_grad(xhat_f, dy_f, w_f, rstd_f, dim, IS_RMS)
        dx_b = _norm_input_grad(xhat_b, dy_b, w_b, rstd_b, dim, IS_RMS)
        if HAS_DRES:  # the new residual is x_f + x_b
            d_res = _load_rows(dres_ptr, offs, mask)
            dx_f += d_res
            dx_b += d_res
        if HAS_RESIDUAL:
            tl.store(dr_ptr + offs, (dx_f + dx_b).to(dr_ptr.dtype.element_ty), mask=mask)
        if HAS_SCALE:
            d_h = dx_f * _row_scale(sf_ptr, r, row_mask, length) + dx_b * _row_scale(sb_ptr, r, row_mask, length)
        else:
            d_h = dx_f + dx_b
        tl.store(dh_ptr + offs, d_h.to(dh_ptr.dtype.element_ty), mask=mask)
        acc_wf += dy_f * xhat_f
        acc_bf += dy_f
        acc_wb += dy_b * xhat_b
        acc_bb += dy_b
    out = dw_ptr + tl.program_id(0) * 4 * dim + d
    tl.store(out, tl.sum(acc_wf, axis=0), mask=d_mask)
    tl.store(out + dim, tl.sum(acc_bf, axis=0), mask=d_mask)
    tl.store(out + 2 * dim, tl.sum(acc_wb, axis=0), mask=d_mask)
    tl.store(out + 3 * dim, tl.sum(acc_bb, axis=0), mask=d_mask)


def _tile(dim: int) -> tuple[int, int, int]:
    """Row tile ``[BLOCK_M, BLOCK_D]`` covering whole rows, and the warps for it."""
    block_d = triton.next_power_of_2(dim)
    warps = 4 if block_d <= 512 else 8
    return max(1, ELEMENTS_PER_THREAD * 32 * warps // block_d), block_d, warps


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _backward_programs(rows: int, block_m: int, device: torch.device) -> tuple[int, int]:
    """How many programs a backward launches and how many row tiles each one loops over."""
    tiles = triton.cdiv(rows, block_m)
    per_program = triton.cdiv(tiles, min(tiles, BACKWARD_PROGRAMS_PER_SM * _multiprocessors(device)))
    return triton.cdiv(tiles, per_program), per_program


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
        programs, per_program = _backward_programs(rows, block_m, x.device)
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


def _check_pair_scales(residual: Tensor | None, scales) -> None:
    if residual is None and scales is not None:
        raise ValueError("drop path applies to the branch added to a residual; the first pair has none")


def pair_add_norm_fwd(hidden: Tensor, residual: Tensor | None, scales: tuple[Tensor, Tensor] | None,
                      norm_f: tuple[Tensor, Tensor | None], norm_b: tuple[Tensor, Tensor | None], eps: float,
                      out_dtype: torch.dtype, residual_dtype: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """The published pairing's two add+norms on one stream, in one pass (no autograd; see ``ops.pair``).

    Layer ``2i`` normalises ``residual + hidden * scale_f`` with ``norm_f = (weight, bias)``, layer
    ``2i+1`` ``residual + hidden * scale_b`` with ``norm_b`` (bias None: RMSNorm); without ``residual``
    both take ``hidden``. Returns both normed streams (``out_dtype``) and the pair's next residual,
    the sum of the two norm inputs, in ``residual_dtype`` (None: not written, for a recompute).
    ``hidden``/``residual`` contiguous ``[batch, L, D]``; ``scales`` fp32 ``[batch]`` each, or None.
    """
    _check_pair_scales(residual, scales)
    batch, length, dim = hidden.shape
    rows = batch * length
    normed_f = torch.empty(hidden.shape, device=hidden.device, dtype=out_dtype)
    normed_b = torch.empty_like(normed_f)
    new_residual = None if residual_dtype is None else torch.empty(hidden.shape, device=hidden.device,
                                                                    dtype=residual_dtype)
    (w_f, b_f), (w_b, b_b) = norm_f, norm_b
    block_m, block_d, warps = _tile(dim)
    _pair_add_norm_fwd_kernel[(triton.cdiv(rows, block_m),)](
        hidden, hidden if residual is None else residual, *(scales or (hidden, hidden)), w_f,
        w_f if b_f is None else b_f, w_b, w_b if b_b is None else b_b, normed_f, normed_b,
        normed_f if new_residual is None else new_residual, rows, dim, length, eps,
        HAS_RESIDUAL=residual is not None, HAS_SCALE=scales is not None, IS_RMS=b_f is None,
        STORE_RESIDUAL=new_residual is not None, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
    return normed_f, normed_b, new_residual


def pair_add_norm_bwd(hidden: Tensor, residual: Tensor | None, scales: tuple[Tensor, Tensor] | None,
                      weights: tuple[Tensor, Tensor], is_rms: bool, eps: float, d_normed_f: Tensor,
                      d_normed_b: Tensor, d_residual: Tensor | None) -> tuple[Tensor, Tensor | None, list[Tensor]]:
    """Gradients of :func:`pair_add_norm_fwd` w.r.t. ``hidden`` (its dtype), ``residual`` (its dtype;
    None without one) and the norms' ``[w_f, b_f, w_b, b_b]`` (fp32; the biases' are unused for RMSNorm),
    given those of both normed streams and of the next residual (None: unused)."""
    _check_pair_scales(residual, scales)
    batch, length, dim = hidden.shape
    rows = batch * length
    d_hidden = torch.empty_like(hidden)
    d_res_in = None if residual is None else torch.empty_like(residual)
    block_m, block_d, warps = _tile(dim)
    programs, per_program = _backward_programs(rows, block_m, hidden.device)
    partial = torch.empty(programs, 4, dim, device=hidden.device, dtype=torch.float32)
    d_normed_f, d_normed_b = d_normed_f.contiguous(), d_normed_b.contiguous()
    _pair_add_norm_bwd_kernel[(programs,)](
        hidden, hidden if residual is None else residual, *(scales or (hidden, hidden)), *weights, d_normed_f,
        d_normed_b, d_normed_f if d_residual is None else d_residual.contiguous(), d_hidden,
        d_hidden if d_res_in is None else d_res_in, partial, rows, dim, length, eps, per_program,
        HAS_RESIDUAL=residual is not None, HAS_SCALE=scales is not None, HAS_DRES=d_residual is not None,
        IS_RMS=is_rms, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
    return d_hidden, d_res_in, list(partial.sum(0).unbind(0))
