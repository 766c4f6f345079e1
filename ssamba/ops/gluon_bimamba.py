"""The bimamba-v2 mixer's inner part (in_proj output -> out_proj input) on the Gluon scan.

conv + SiLU (Triton), the per-direction x/dt projections (cuBLAS), the Gluon scan (``A`` from
``A_log``, dt bias, softplus and ``D`` skip inside; each direction writes its own half of ``y``) and
the gate kernel that averages the halves. The backward is hand-written: the in_proj output's
gradient is written in place by the kernels, and the scan parameters' gradients are summed over
the batch inside the scan kernel. Kernel launches are few on purpose: at the tiny model's sizes the
host's launch cost is comparable to the GPU work (docs/performance.md).

What the backward keeps is what costs memory in training (every layer's, for two passes, until the
backward reaches it): the mixer's input (``[batch, L, d]``), the sum of the two directions' outputs
(``[batch, L, E]``), the scan's chunk-entry states and the weights. The in_proj output, the conv
output, the x_proj outputs (B, C and dt's low-rank input), dt and the out_proj input are recomputed
in the backward by the forward's kernels and matmuls from the forward's inputs, so to the same values
(docs/performance.md, "Training memory").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .gluon_scan import scan_bwd, scan_fwd
from .triton_conv import bidir_conv_bwd, bidir_conv_fwd
from .triton_bimamba import branch_projection_grads
from .triton_gate import gate_bwd, gate_fwd


def _b_c_dt(x_dbl_f, x_dbl_b, dt_proj_f, dt_proj_b):
    """From the x_proj outputs: B and C of both directions in one aligned buffer ``[batch, L, 2
    (direction), 2N]``, and dt of each direction (the forward's and the backward's recompute)."""
    dt_rank = dt_proj_f.shape[1]
    bc = torch.stack((x_dbl_f[..., dt_rank:], x_dbl_b[..., dt_rank:]), dim=2)
    return bc, F.linear(x_dbl_f[..., :dt_rank], dt_proj_f), F.linear(x_dbl_b[..., :dt_rank], dt_proj_b)


def mixer_forward(x: Tensor, in_proj: Tensor | None, out_proj: Tensor | None,
                  weights: tuple[Tensor, ...]) -> tuple[Tensor, tuple]:
    """The mixer's output and what :func:`mixer_backward` needs besides ``x`` (see ``BiMambaMixerGluon``)."""
    fwd, bwd = weights[:7], weights[7:]
    if in_proj is None:  # x is the in_proj output, channels contiguous
        xz, w_in, dtype = x, None, x.dtype
    else:
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
        w_in = in_proj.to(dtype)
        xz = F.linear(x.to(dtype), w_in)
    dim = xz.shape[-1] // 2
    conv_weight = torch.cat([fwd[0], bwd[0]]).flatten(1)
    conv_bias = torch.cat([fwd[1], bwd[1]])
    # the projections' weights in the activations' dtype, cast once and kept for the backward
    x_proj_f, x_proj_b, dt_proj_f, dt_proj_b = (w.to(dtype) for w in (fwd[2], bwd[2], fwd[3], bwd[3]))
    w_out = None if out_proj is None else out_proj.to(dtype)
    xc = bidir_conv_fwd(xz[..., :dim], conv_weight, conv_bias)
    x_dbl_f = F.linear(xc[..., :dim], x_proj_f)
    x_dbl_b = F.linear(xc[..., dim:], x_proj_b)
    bc, dt_f, dt_b = _b_c_dt(x_dbl_f, x_dbl_b, dt_proj_f, dt_proj_b)
    params = tuple(t.contiguous() for t in (fwd[5], bwd[5], fwd[6], bwd[6], fwd[4], bwd[4]))
    y, ckpt = scan_fwd(xc, dt_f, dt_b, bc, params)
    out, y_sum = gate_fwd(y, xz[..., dim:])
    saved = (w_in, w_out, conv_weight, conv_bias, x_proj_f, x_proj_b, dt_proj_f, dt_proj_b, y_sum, ckpt, *params)
    return (out if w_out is None else F.linear(out, w_out)), saved


def mixer_backward(x: Tensor, saved: tuple, dout: Tensor, param_dtypes: list, projection_dtypes: list) -> list:
    """Gradients w.r.t. ``(x, in_proj, out_proj, *weights)`` of :func:`mixer_forward`, given its input
    ``x`` and ``saved`` (``param_dtypes``/``projection_dtypes``: the weights' dtypes, None for an absent
    projection)."""
    w_in, w_out, conv_weight, conv_bias, x_proj_f, x_proj_b, dt_proj_f, dt_proj_b, y_sum, ckpt, *params = saved
    # recomputed by the forward's kernels and matmuls from the forward's inputs: the same values
    xz = x if w_in is None else F.linear(x.to(w_in.dtype), w_in)
    dim = xz.shape[-1] // 2
    dtype = xz.dtype
    xc = bidir_conv_fwd(xz[..., :dim], conv_weight, conv_bias)
    x_dbl_f = F.linear(xc[..., :dim], x_proj_f)
    x_dbl_b = F.linear(xc[..., dim:], x_proj_b)
    bc, dt_f, dt_b = _b_c_dt(x_dbl_f, x_dbl_b, dt_proj_f, dt_proj_b)
    dxz = torch.empty_like(xz, memory_format=torch.contiguous_format)
    gated = None if w_out is None else torch.empty_like(y_sum, dtype=dtype)
    d_gated = dout if w_out is None else dout.to(dtype) @ w_out
    g = gate_bwd(d_gated, y_sum, xz[..., dim:], dxz[..., dim:], gated)
    d_out_proj = None if w_out is None else dout.reshape(-1, dout.shape[-1]).to(dtype).t() @ gated.view(-1, dim)
    del gated, d_gated
    dxc, ddt_f, ddt_b, dBC, dA_log, dD, d_bias = scan_bwd(xc, dt_f, dt_b, bc, params, ckpt, g)
    del dt_f, dt_b, bc, g  # freed before the projections' gradients allocate theirs
    projection_grads = [
        branch_projection_grads(xc, half, x_dbl, ddt.view(-1, dim).to(dtype), dBC[:, :, half], x_proj, dt_proj, dxc)
        for half, (x_dbl, ddt, x_proj, dt_proj) in enumerate(((x_dbl_f, ddt_f, x_proj_f, dt_proj_f),
                                                              (x_dbl_b, ddt_b, x_proj_b, dt_proj_b)))]
    d_conv_weight, d_conv_bias = bidir_conv_bwd(xz[..., :dim], conv_weight, conv_bias, dxc, dxz[..., :dim])
    grads = []
    for half in range(2):
        d_x_proj, d_dt_proj = projection_grads[half]
        rows = slice(half * dim, (half + 1) * dim)
        grads += [d_conv_weight[rows].unsqueeze(1), d_conv_bias[rows], d_x_proj, d_dt_proj, d_bias[half],
                  dA_log[half], dD[half]]
    if w_in is None:
        dx, d_in_proj = dxz, None
    else:
        dx = (dxz @ w_in).to(x.dtype)
        d_in_proj = dxz.view(-1, 2 * dim).t() @ x.to(dtype).reshape(-1, x.shape[-1])
    in_dtype, out_dtype = projection_dtypes
    return [dx, None if d_in_proj is None else d_in_proj.to(in_dtype),
            None if d_out_proj is None else d_out_proj.to(out_dtype),
            *(grad.to(dt) for grad, dt in zip(grads, param_dtypes))]


class BiMambaMixerGluon(torch.autograd.Function):
    """``x`` -> ``(y_f + flip(y_b)) / 2``, ``[batch, L, E]``, or that through ``out_proj``.

    ``x`` is the in_proj output ``xz [batch, L, 2E]`` (channel-last) when ``in_proj`` is None, else
    the mixer's input ``[batch, L, d]``, projected here. With both projections' weights the backward
    recomputes the in_proj output (one matmul) and the out_proj input (in the gate's backward kernel)
    instead of keeping them. Takes each branch's seven tensors in ``BranchWeights`` order (conv weight,
    conv bias, x_proj, dt_proj weight, dt_proj bias, A_log, D), forward branch first.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, in_proj, out_proj, *weights):
        if in_proj is None and x.stride(-1) != 1:
            x = x.contiguous()
        out, saved = mixer_forward(x, in_proj, out_proj, weights)
        ctx.save_for_backward(x, *saved)
        ctx.param_dtypes = [t.dtype for t in weights]
        ctx.projection_dtypes = [None if w is None else w.dtype for w in (in_proj, out_proj)]
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        x, *saved = ctx.saved_tensors
        return tuple(mixer_backward(x, saved, dout, ctx.param_dtypes, ctx.projection_dtypes))


def bimamba_inner_gluon(xz: Tensor, fwd, bwd) -> Tensor:
    """``xz [batch, L, 2E]`` and the two branches' ``BranchWeights`` -> ``[batch, L, E]``."""
    return BiMambaMixerGluon.apply(xz, None, None, *fwd, *bwd)


def bimamba_mixer_gluon(hidden: Tensor, in_proj: Tensor, out_proj: Tensor, fwd, bwd) -> Tensor:
    """``out_proj(inner(in_proj(hidden)))`` for ``hidden [batch, L, d]``, keeping neither projection's
    activation for the backward."""
    return BiMambaMixerGluon.apply(hidden, in_proj, out_proj, *fwd, *bwd)
