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
def _bidir_conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, length, dim,
                           sx_b, sx_l, so_b, so_l,
                           K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_t, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < dim
    x_rows = x_ptr + pid_b * sx_b + c[None, :]
    acc_f = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32) + tl.load(bias_ptr + c, mask=c_mask, other=0.0)[None, :]
    acc_b = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32) + tl.load(bias_ptr + dim + c, mask=c_mask,
                                                                     other=0.0)[None, :]
    for k in tl.static_range(K):
        w_f = tl.load(w_ptr + c * K + k, mask=c_mask, other=0.0)
        w_b = tl.load(w_ptr + (dim + c) * K + k, mask=c_mask, other=0.0)
        src_f = t - (K - 1) + k
        src_b = t + (K - 1) - k
        x_f = tl.load(x_rows + src_f[:, None] * sx_l, mask=((src_f >= 0) & (src_f < length))[:, None] & c_mask[None, :],
                      other=0.0).to(tl.float32)
        x_b = tl.load(x_rows + src_b[:, None] * sx_l, mask=(src_b < length)[:, None] & c_mask[None, :],
                      other=0.0).to(tl.float32)
        acc_f += w_f[None, :] * x_f
        acc_b += w_b[None, :] * x_b
    mask = (t < length)[:, None] & c_mask[None, :]
    out_rows = out_ptr + pid_b * so_b + t[:, None] * so_l + c[None, :]
    tl.store(out_rows, (acc_f * tl.sigmoid(acc_f)).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_rows + dim, (acc_b * tl.sigmoid(acc_b)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_grad(pre, grad):
    sig = tl.sigmoid(pre)
    return grad * sig * (1.0 + pre * (1.0 - sig))


@triton.jit
def _bidir_conv_bwd_kernel(x_ptr, w_ptr, bias_ptr, dout_ptr, dx_ptr, dw_ptr, dbias_ptr, length, dim,
                           sx_b, sx_l, sg_b, sg_l, sdx_b, sdx_l,
                           K: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program per (batch row, channel block) walks the sequence so weight gradients need no atomics.

    The forward branch's output at ``s`` uses ``x[s-K+1 .. s]`` and the backward branch's uses
    ``x[s .. s+K-1]``, so ``dx[t]`` collects forward-branch gradients from ``s = t .. t+K-1`` and
    backward-branch ones from ``s = t-K+1 .. t``; their pre-activations are recomputed from ``x``.
    """
    pid_c, pid_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < dim
    offs_k = tl.arange(0, KP)
    x_rows = x_ptr + pid_b * sx_b + c[None, :]
    g_rows = dout_ptr + pid_b * sg_b + c[None, :]
    bias_f = tl.load(bias_ptr + c, mask=c_mask, other=0.0)
    bias_b = tl.load(bias_ptr + dim + c, mask=c_mask, other=0.0)
    dw_f = tl.zeros([KP, BLOCK_C], dtype=tl.float32)
    dw_b = tl.zeros([KP, BLOCK_C], dtype=tl.float32)
    db_f = tl.zeros([BLOCK_C], dtype=tl.float32)
    db_b = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t0 in range(0, length, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        dx = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for m in tl.static_range(K):
            # forward branch output at s = t + m, through tap k = K-1-m
            s = t + m
            pre = bias_f[None, :]
            for k in tl.static_range(K):
                src = s - (K - 1) + k
                x = tl.load(x_rows + src[:, None] * sx_l, mask=((src >= 0) & (src < length))[:, None] & c_mask[None, :],
                            other=0.0).to(tl.float32)
                pre += tl.load(w_ptr + c * K + k, mask=c_mask, other=0.0)[None, :] * x
            s_mask = (s < length)[:, None] & c_mask[None, :]
            g = _silu_grad(pre, tl.load(g_rows + s[:, None] * sg_l, mask=s_mask, other=0.0).to(tl.float32))
            g = tl.where(s_mask, g, 0.0)
            dx += tl.load(w_ptr + c * K + (K - 1 - m), mask=c_mask, other=0.0)[None, :] * g
            if m == 0:
                db_f += tl.sum(g, axis=0)
                for k in tl.static_range(K):
                    src = t - (K - 1) + k
                    x = tl.load(x_rows + src[:, None] * sx_l,
                                mask=((src >= 0) & (src < length))[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
                    dw_f += tl.where(offs_k[:, None] == k, tl.sum(g * x, axis=0)[None, :], 0.0)
            # backward branch output at s = t - m, through tap k = K-1-m
            s = t - m
            pre = bias_b[None, :]
            for k in tl.static_range(K):
                src = s + (K - 1) - k
                x = tl.load(x_rows + src[:, None] * sx_l, mask=((src >= 0) & (src < length))[:, None] & c_mask[None, :],
                            other=0.0).to(tl.float32)
                pre += tl.load(w_ptr + (dim + c) * K + k, mask=c_mask, other=0.0)[None, :] * x
            s_mask = ((s >= 0) & (s < length))[:, None] & c_mask[None, :]
            g = _silu_grad(pre, tl.load(g_rows + dim + s[:, None] * sg_l, mask=s_mask, other=0.0).to(tl.float32))
            g = tl.where(s_mask, g, 0.0)
            dx += tl.load(w_ptr + (dim + c) * K + (K - 1 - m), mask=c_mask, other=0.0)[None, :] * g
            if m == 0:
                db_b += tl.sum(g, axis=0)
                for k in tl.static_range(K):
                    src = t + (K - 1) - k
                    x = tl.load(x_rows + src[:, None] * sx_l, mask=(src < length)[:, None] & c_mask[None, :],
                                other=0.0).to(tl.float32)
                    dw_b += tl.where(offs_k[:, None] == k, tl.sum(g * x, axis=0)[None, :], 0.0)
        tl.store(dx_ptr + pid_b * sdx_b + t[:, None] * sdx_l + c[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=(t < length)[:, None] & c_mask[None, :])
    kc_mask = (offs_k < K)[:, None] & c_mask[None, :]
    dw_rows = dw_ptr + pid_b * 2 * dim * K + c[None, :] * K + offs_k[:, None]
    tl.store(dw_rows, dw_f, mask=kc_mask)
    tl.store(dw_rows + dim * K, dw_b, mask=kc_mask)
    tl.store(dbias_ptr + pid_b * 2 * dim + c, db_f, mask=c_mask)
    tl.store(dbias_ptr + pid_b * 2 * dim + dim + c, db_b, mask=c_mask)


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
    """Writes dL/dx into ``dx`` (a ``[batch, L, E]`` view) and returns fp32 ``dweight [2E, K]``, ``dbias [2E]``."""
    batch, length, dim = x.shape
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    K = weight.shape[1]
    dw = torch.empty(batch, 2 * dim, K, device=x.device, dtype=torch.float32)
    db = torch.empty(batch, 2 * dim, device=x.device, dtype=torch.float32)
    block_c = min(64, triton.next_power_of_2(dim))
    grid = (triton.cdiv(dim, block_c), batch)
    _bidir_conv_bwd_kernel[grid](x, weight, bias, dout, dx, dw, db, length, dim, x.stride(0), x.stride(1),
                                 dout.stride(0), dout.stride(1), dx.stride(0), dx.stride(1),
                                 K=K, KP=triton.next_power_of_2(K), BLOCK_T=32, BLOCK_C=block_c)
    return dw.sum(0), db.sum(0)
