"""The bimamba-v2 mixer's inner part (in_proj output -> out_proj input) on the Gluon scan.

conv + SiLU (Triton), the per-direction x/dt projections (cuBLAS), the Gluon scan (bias, softplus
and ``D`` skip inside; each direction writes its own half of ``y``) and the gate kernel that
averages the halves; the backward is hand-written, so the in_proj output's gradient is written in
place by the kernels instead of being assembled from slices.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .gluon_scan import LOG2E, scan_bwd, scan_fwd
from .triton_conv import bidir_conv_bwd, bidir_conv_fwd
from .triton_gate import gate_bwd, gate_fwd


class BiMambaInnerGluon(torch.autograd.Function):
    """``xz [batch, L, 2E]`` (channel-last) -> ``(y_f + flip(y_b)) / 2`` as ``[batch, L, E]``."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, xz, conv_weight, conv_bias, x_proj_f, x_proj_b, dt_proj_f, dt_proj_b, dt_bias, A_log, D,
                scan_config=None):
        if xz.stride(-1) != 1:
            xz = xz.contiguous()
        dim = xz.shape[-1] // 2
        dt_rank = dt_proj_f.shape[1]
        dtype = xz.dtype
        x, z = xz[..., :dim], xz[..., dim:]
        xc = bidir_conv_fwd(x, conv_weight, conv_bias)
        x_dbl_f = F.linear(xc[..., :dim], x_proj_f.to(dtype))
        x_dbl_b = F.linear(xc[..., dim:], x_proj_b.to(dtype))
        # B and C of both directions in one aligned buffer [batch, L, 2 (direction), 2N]
        bc = torch.stack((x_dbl_f[..., dt_rank:], x_dbl_b[..., dt_rank:]), dim=2)
        dt_f = F.linear(x_dbl_f[..., :dt_rank], dt_proj_f.to(dtype))
        dt_b = F.linear(x_dbl_b[..., :dt_rank], dt_proj_b.to(dtype))
        A2 = (-torch.exp(A_log.float()) * LOG2E).contiguous()
        bias, D32 = dt_bias.float().contiguous(), D.float().contiguous()
        y, ckpt = scan_fwd(xc, dt_f, dt_b, bias, bc[:, :, 0], bc[:, :, 1], A2, D32, scan_config)
        out = gate_fwd(y, z)
        ctx.save_for_backward(xz, conv_weight, conv_bias, x_proj_f, x_proj_b, dt_proj_f, dt_proj_b, dt_bias, A_log,
                              xc, x_dbl_f, x_dbl_b, bc, dt_f, dt_b, A2, bias, D32, y, ckpt)
        ctx.scan_config = scan_config
        ctx.D_dtype = D.dtype
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        (xz, conv_weight, conv_bias, x_proj_f, x_proj_b, dt_proj_f, dt_proj_b, dt_bias, A_log,
         xc, x_dbl_f, x_dbl_b, bc, dt_f, dt_b, A2, bias, D32, y, ckpt) = ctx.saved_tensors
        dim = xz.shape[-1] // 2
        dt_rank = dt_proj_f.shape[1]
        dtype = xz.dtype
        dxz = torch.empty_like(xz, memory_format=torch.contiguous_format)
        g = gate_bwd(dout, y, xz[..., dim:], dxz[..., dim:])
        dxc, ddt_f, ddt_b, dBC, dA, dD, d_bias = scan_bwd(xc, dt_f, dt_b, bias, bc[:, :, 0], bc[:, :, 1], A2, D32,
                                                          ckpt, g, ctx.scan_config)
        grads = []
        dxc_rows = dxc.view(-1, 2 * dim)
        for half, (x_dbl, ddt, x_proj, dt_proj) in enumerate(((x_dbl_f, ddt_f, x_proj_f, dt_proj_f),
                                                              (x_dbl_b, ddt_b, x_proj_b, dt_proj_b))):
            ddt_rows = ddt.view(-1, dim).to(dtype)
            d_dt_proj = ddt_rows.t() @ x_dbl[..., :dt_rank].reshape(-1, dt_rank)
            d_x_dbl = torch.cat([ddt_rows @ dt_proj.to(dtype), dBC[:, :, half].flatten(0, 1).flatten(1).to(dtype)], 1)
            xc_half = xc.view(-1, 2 * dim)[:, half * dim:(half + 1) * dim]
            d_x_proj = d_x_dbl.t() @ xc_half
            dxc_rows[:, half * dim:(half + 1) * dim].addmm_(d_x_dbl, x_proj.to(dtype))
            grads.append((d_x_proj.to(x_proj.dtype), d_dt_proj.to(dt_proj.dtype)))
        d_conv_weight, d_conv_bias = bidir_conv_bwd(xz[..., :dim], conv_weight, conv_bias, dxc, dxz[..., :dim])
        A = -torch.exp(A_log.float())
        return (dxz, d_conv_weight.to(conv_weight.dtype), d_conv_bias.to(conv_bias.dtype), grads[0][0], grads[1][0],
                grads[0][1], grads[1][1], d_bias.sum(0).to(dt_bias.dtype), (dA.sum(0) * A).to(A_log.dtype),
                dD.sum(0).to(ctx.D_dtype), None)


def bimamba_inner_gluon(xz: Tensor, conv_weight: Tensor, conv_bias: Tensor, x_proj_f: Tensor, x_proj_b: Tensor,
                        dt_proj_f: Tensor, dt_proj_b: Tensor, dt_bias: Tensor, A_log: Tensor, D: Tensor,
                        scan_config: dict | None = None) -> Tensor:
    """Both branches' parameters stacked forward-first: ``conv_weight [2E, K]``, ``dt_bias, D [2E]``, ``A_log [2E, N]``."""
    return BiMambaInnerGluon.apply(xz, conv_weight, conv_bias, x_proj_f, x_proj_b, dt_proj_f, dt_proj_b, dt_bias,
                                   A_log, D, scan_config)
