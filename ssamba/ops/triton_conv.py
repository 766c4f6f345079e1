"""Triton kernels for the two depthwise convolutions + SiLU of a bimamba-v2 mixer.

The forward branch convolves ``x`` causally; the backward branch convolves ``flip(x)`` causally,
which in the original time order is an anti-causal convolution of ``x``. One kernel computes both
from a single read of ``x`` (channel-last ``[batch, L, E]``, any row stride) and writes
``[batch, L, 2E]`` with the forward branch's channels first, in the original time order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _shifted_x(x_rows, src, c_mask, length, sx_l, ahead: tl.constexpr):
    """The ``x`` rows at time indices ``src`` (zero outside the sequence), in fp32. ``ahead``: ``src``
    is at or after the tile's own rows, so only the end of the sequence needs a bound."""
    valid = src < length if ahead else (src >= 0) & (src < length)
    return tl.load(x_rows + src[:, None] * sx_l, mask=valid[:, None] & c_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _pre_activations(x_rows, w_ptr, bias_ptr, t, c, c_mask, length, dim, sx_l,
                     K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Both branches' conv outputs before the SiLU on time rows ``t``: the forward branch reads
    ``x[t-K+1 .. t]``, the backward branch ``x[t .. t+K-1]`` (its taps in reverse)."""
    pre_f = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32) + tl.load(bias_ptr + c, mask=c_mask, other=0.0)[None, :]
    pre_b = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32) + tl.load(bias_ptr + dim + c, mask=c_mask,
                                                                     other=0.0)[None, :]
    for k in tl.static_range(K):
        w_f = tl.load(w_ptr + c * K + k, mask=c_mask, other=0.0)
        w_b = tl.load(w_ptr + (dim + c) * K + k, mask=c_mask, other=0.0)
        pre_f += w_f[None, :] * _shifted_x(x_rows, t - (K - 1) + k, c_mask, length, sx_l, False)
        pre_b += w_b[None, :] * _shifted_x(x_rows, t + (K - 1) - k, c_mask, length, sx_l, True)
    return pre_f, pre_b


@triton.jit
def _bidir_conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, length, dim,
                           sx_b, sx_l, so_b, so_l,
                           K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_t, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < dim
    x_rows = x_ptr + pid_b * sx_b + c[None, :]
    acc_f, acc_b = _pre_activations(x_rows, w_ptr, bias_ptr, t, c, c_mask, length, dim, sx_l, K, BLOCK_T, BLOCK_C)
    mask = (t < length)[:, None] & c_mask[None, :]
    out_rows = out_ptr + pid_b * so_b + t[:, None] * so_l + c[None, :]
    tl.store(out_rows, (acc_f * tl.sigmoid(acc_f)).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_rows + dim, (acc_b * tl.sigmoid(acc_b)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_grad(pre, grad):
    sig = tl.sigmoid(pre)
    return grad * sig * (1.0 + pre * (1.0 - sig))


@triton.jit
def _conv_pre_grad_kernel(x_ptr, w_ptr, bias_ptr, dout_ptr, g_ptr, dw_ptr, dbias_ptr, length, dim,
                          sx_b, sx_l, sd_b, sd_l, sg_b, sg_l,
                          K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """First half of the backward, per (time block, channel block, batch row): each branch's gradient
    w.r.t. its conv output before the SiLU, ``g [batch, L, 2E]``, and per-program partial sums of the
    weight and bias gradients (positions this program owns)."""
    pid_t, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < dim
    x_rows = x_ptr + pid_b * sx_b + c[None, :]
    pre_f, pre_b = _pre_activations(x_rows, w_ptr, bias_ptr, t, c, c_mask, length, dim, sx_l, K, BLOCK_T, BLOCK_C)
    mask = (t < length)[:, None] & c_mask[None, :]
    d_rows = dout_ptr + pid_b * sd_b + t[:, None] * sd_l + c[None, :]
    g_f = tl.where(mask, _silu_grad(pre_f, tl.load(d_rows, mask=mask, other=0.0).to(tl.float32)), 0.0)
    g_b = tl.where(mask, _silu_grad(pre_b, tl.load(d_rows + dim, mask=mask, other=0.0).to(tl.float32)), 0.0)
    g_rows = g_ptr + pid_b * sg_b + t[:, None] * sg_l + c[None, :]
    tl.store(g_rows, g_f.to(g_ptr.dtype.element_ty), mask=mask)
    tl.store(g_rows + dim, g_b.to(g_ptr.dtype.element_ty), mask=mask)
    part = (pid_t * tl.num_programs(2) + pid_b) * 2 * dim
    tl.store(dbias_ptr + part + c, tl.sum(g_f, axis=0), mask=c_mask)
    tl.store(dbias_ptr + part + dim + c, tl.sum(g_b, axis=0), mask=c_mask)
    for k in tl.static_range(K):  # the shifted x tiles are the ones loaded above (L1 hits)
        x_f = _shifted_x(x_rows, t - (K - 1) + k, c_mask, length, sx_l, False)
        x_b = _shifted_x(x_rows, t + (K - 1) - k, c_mask, length, sx_l, True)
        tl.store(dw_ptr + part * K + k * 2 * dim + c, tl.sum(g_f * x_f, axis=0), mask=c_mask)
        tl.store(dw_ptr + part * K + k * 2 * dim + dim + c, tl.sum(g_b * x_b, axis=0), mask=c_mask)


@triton.jit
def _conv_input_grad_kernel(w_ptr, g_ptr, dx_ptr, length, dim, sg_b, sg_l, sdx_b, sdx_l,
                            K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Second half: ``dx[t] = sum_m w_f[K-1-m] g_f[t+m] + w_b[m] g_b[t-(K-1)+m]`` from row-shifted
    loads of ``g`` (neighbouring rows come from L1/L2, not from other threads' registers)."""
    pid_t, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < dim
    g_rows = g_ptr + pid_b * sg_b + c[None, :]
    dx = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for m in tl.static_range(K):
        s_f = t + m
        s_b = t - (K - 1) + m
        g_f = tl.load(g_rows + s_f[:, None] * sg_l, mask=(s_f < length)[:, None] & c_mask[None, :], other=0.0)
        g_b = tl.load(g_rows + dim + s_b[:, None] * sg_l, mask=((s_b >= 0) & (s_b < length))[:, None] & c_mask[None, :],
                      other=0.0)
        dx += (tl.load(w_ptr + c * K + (K - 1 - m), mask=c_mask, other=0.0)[None, :] * g_f.to(tl.float32)
               + tl.load(w_ptr + (dim + c) * K + m, mask=c_mask, other=0.0)[None, :] * g_b.to(tl.float32))
    mask = (t < length)[:, None] & c_mask[None, :]
    tl.store(dx_ptr + pid_b * sdx_b + t[:, None] * sdx_l + c[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


def bidir_conv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x [batch, L, E]`` (unit channel stride), ``weight [2E, K]`` and ``bias [2E]`` -> ``[batch, L, 2E]``."""
    batch, length, dim = x.shape
    if x.stride(-1) != 1:
        raise ValueError(f"x must have unit channel stride, got strides {x.stride()}")
    out = torch.empty(batch, length, 2 * dim, device=x.device, dtype=x.dtype)
    block_t, block_c = 32, min(64, triton.next_power_of_2(dim))
    grid = (triton.cdiv(length, block_t), triton.cdiv(dim, block_c), batch)
    _bidir_conv_fwd_kernel[grid](x, weight, bias, out, length, dim, x.stride(0), x.stride(1),
                                 out.stride(0), out.stride(1), K=weight.shape[1], BLOCK_T=block_t, BLOCK_C=block_c)
    return out


def bidir_conv_bwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dout: torch.Tensor,
                   dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Writes dL/dx into ``dx`` (a ``[batch, L, E]`` view) and returns fp32 ``dweight [2E, K]``, ``dbias [2E]``.

    Two passes: the SiLU-backward of both branches goes through a ``[batch, L, 2E]`` buffer in the
    dtype of ``dout`` (what autocast's own conv backward would hold), and ``dx`` is summed from it."""
    batch, length, dim = x.shape
    if x.stride(-1) != 1 or dx.stride(-1) != 1:
        raise ValueError(f"x and dx must have unit channel stride, got strides {x.stride()} and {dx.stride()}")
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    K = weight.shape[1]
    block_t, block_c = 32, min(64, triton.next_power_of_2(dim))
    time_blocks = triton.cdiv(length, block_t)
    g = torch.empty(batch, length, 2 * dim, device=x.device, dtype=dout.dtype)
    # partials laid out channel-last ([K, 2E] per program) so the kernel's stores are coalesced
    dw = torch.empty(time_blocks * batch, K, 2 * dim, device=x.device, dtype=torch.float32)
    db = torch.empty(time_blocks * batch, 2 * dim, device=x.device, dtype=torch.float32)
    grid = (time_blocks, triton.cdiv(dim, block_c), batch)
    _conv_pre_grad_kernel[grid](x, weight, bias, dout, g, dw, db, length, dim, x.stride(0), x.stride(1),
                                dout.stride(0), dout.stride(1), g.stride(0), g.stride(1),
                                K=K, BLOCK_T=block_t, BLOCK_C=block_c)
    _conv_input_grad_kernel[grid](weight, g, dx, length, dim, g.stride(0), g.stride(1), dx.stride(0), dx.stride(1),
                                  K=K, BLOCK_T=block_t, BLOCK_C=block_c)
    return dw.sum(0).t().contiguous(), db.sum(0)
