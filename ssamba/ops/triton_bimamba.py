"""The bimamba-v2 mixer's inner part on plain Triton kernels, where the Gluon scan cannot run
(Triton's CPU interpreter, GPUs older than compute capability 8.0).

One autograd Function covers conv + SiLU, the per-direction x/dt projections (cuBLAS) and the fused
bidirectional scan, with a hand-written backward, so the in_proj output's gradient is written in
place by the kernels instead of being assembled from slices.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .triton_conv import bidir_conv_bwd, bidir_conv_fwd
from .triton_scan import LOG2E, bimamba_scan_bwd, bimamba_scan_fwd


def _bc_views(x_dbl: Tensor, dt_rank: int, d_state: int) -> tuple[Tensor, Tensor]:
    return x_dbl[..., dt_rank:dt_rank + d_state], x_dbl[..., dt_rank + d_state:]


def branch_projection_grads(xc: Tensor, half: int, x_dbl: Tensor, ddt_rows: Tensor, dBC: Tensor, x_proj: Tensor,
                            dt_proj: Tensor, dxc: Tensor) -> tuple[Tensor, Tensor]:
    """Backward of one branch's x_proj and dt_proj (``half`` 0: forward branch, 1: backward branch).

    ``ddt_rows [batch * L, E]`` is the gradient of the dt_proj output (after the softplus backward)
    and ``dBC [batch, L, 2, N]`` that of B and C. Adds the gradient w.r.t. this branch's half of
    ``xc [batch, L, 2E]`` into ``dxc`` and returns the two weight gradients (dtype of ``xc``).
    """
    dim, dt_rank, dtype = xc.shape[-1] // 2, dt_proj.shape[1], xc.dtype
    cols = slice(half * dim, (half + 1) * dim)
    d_dt_proj = ddt_rows.t() @ x_dbl[..., :dt_rank].reshape(-1, dt_rank)
    d_x_dbl = torch.cat([ddt_rows @ dt_proj.to(dtype), dBC.flatten(0, 1).flatten(1).to(dtype)], 1)
    d_x_proj = d_x_dbl.t() @ xc.view(-1, 2 * dim)[:, cols]
    dxc.view(-1, 2 * dim)[:, cols].addmm_(d_x_dbl, x_proj.to(dtype))
    return d_x_proj, d_dt_proj


class BiMambaInnerTriton(torch.autograd.Function):
    """``xz [batch, L, 2E]`` (channel-last) -> ``(y_f + flip(y_b)) / 2`` as ``[batch, L, E]``."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, xz, conv_weight, conv_bias, x_proj_f, x_proj_b, dt_proj_f, dt_proj_b, dt_bias, A_log, D):
        if xz.stride(-1) != 1:
            xz = xz.contiguous()
        dim = xz.shape[-1] // 2
        dt_rank, d_state = dt_proj_f.shape[1], A_log.shape[1]
        dtype = xz.dtype
        x, z = xz[..., :dim], xz[..., dim:]
        xc = bidir_conv_fwd(x, conv_weight, conv_bias)
        x_dbl_f = F.linear(xc[..., :dim], x_proj_f.to(dtype))
        x_dbl_b = F.linear(xc[..., dim:], x_proj_b.to(dtype))
        # the bias is added and the softplus taken in fp32 (in bf16 the bias would swamp small dt)
        bias_f, bias_b = dt_bias.float().chunk(2)
        raw_f = F.linear(x_dbl_f[..., :dt_rank], dt_proj_f.to(dtype))
        raw_b = F.linear(x_dbl_b[..., :dt_rank], dt_proj_b.to(dtype))
        delta_f, delta_b = F.softplus(raw_f.float() + bias_f), F.softplus(raw_b.float() + bias_b)
        A2 = (-torch.exp(A_log.float()) * LOG2E).contiguous()
        y, ckpt = bimamba_scan_fwd(xc, delta_f, delta_b, *_bc_views(x_dbl_f, dt_rank, d_state),
                                   *_bc_views(x_dbl_b, dt_rank, d_state), z, A2, D.float().contiguous())
        ctx.save_for_backward(xz, conv_weight, conv_bias, x_proj_f, x_proj_b, dt_proj_f, dt_proj_b, dt_bias, A_log, D,
                              xc, x_dbl_f, x_dbl_b, raw_f, raw_b, delta_f, delta_b, A2, ckpt)
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        (xz, conv_weight, conv_bias, x_proj_f, x_proj_b, dt_proj_f, dt_proj_b, dt_bias, A_log, D,
         xc, x_dbl_f, x_dbl_b, raw_f, raw_b, delta_f, delta_b, A2, ckpt) = ctx.saved_tensors
        dim = xz.shape[-1] // 2
        dt_rank, d_state = dt_proj_f.shape[1], A_log.shape[1]
        dtype = xz.dtype
        dxz = torch.empty_like(xz, memory_format=torch.contiguous_format)
        dxc, d_delta_f, d_delta_b, dBC, dA, dD = bimamba_scan_bwd(
            xc, delta_f, delta_b, *_bc_views(x_dbl_f, dt_rank, d_state), *_bc_views(x_dbl_b, dt_rank, d_state),
            xz[..., dim:], A2, D.float().contiguous(), ckpt, dy, dxz[..., dim:])
        grads, d_bias = [], []
        biases = dt_bias.float().chunk(2)
        for half, (x_dbl, raw, d_delta, x_proj, dt_proj) in enumerate(((x_dbl_f, raw_f, d_delta_f, x_proj_f, dt_proj_f),
                                                                       (x_dbl_b, raw_b, d_delta_b, x_proj_b, dt_proj_b))):
            d_raw = (d_delta * torch.sigmoid(raw.float() + biases[half])).view(-1, dim)  # through the softplus
            d_bias.append(d_raw.sum(0))
            d_x_proj, d_dt_proj = branch_projection_grads(xc, half, x_dbl, d_raw.to(dtype), dBC[:, :, half], x_proj,
                                                          dt_proj, dxc)
            grads.append((d_x_proj.to(x_proj.dtype), d_dt_proj.to(dt_proj.dtype)))
        d_conv_weight, d_conv_bias = bidir_conv_bwd(xz[..., :dim], conv_weight, conv_bias, dxc, dxz[..., :dim])
        A = -torch.exp(A_log.float())
        return (dxz, d_conv_weight.to(conv_weight.dtype), d_conv_bias.to(conv_bias.dtype), grads[0][0], grads[1][0],
                grads[0][1], grads[1][1], torch.cat(d_bias).to(dt_bias.dtype), (dA.sum(0) * A).to(A_log.dtype),
                dD.sum(0).to(D.dtype))


def bimamba_inner_triton(xz: Tensor, conv_weight: Tensor, conv_bias: Tensor, x_proj_f: Tensor, x_proj_b: Tensor,
                         dt_proj_f: Tensor, dt_proj_b: Tensor, dt_bias: Tensor, A_log: Tensor, D: Tensor) -> Tensor:
    """Both branches' parameters stacked forward-first: ``conv_weight [2E, K]``, ``dt_bias, D [2E]``, ``A_log [2E, N]``."""
    return BiMambaInnerTriton.apply(xz, conv_weight, conv_bias, x_proj_f, x_proj_b, dt_proj_f, dt_proj_b, dt_bias,
                                    A_log, D)
