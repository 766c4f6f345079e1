"""The bimamba-v2 mixer's inner part (in_proj output -> out_proj input) on the Gluon scan.

conv + SiLU (Triton), the x and dt projections of both directions (one cuBLAS matmul each, with
block-diagonal weights), the Gluon scan (``A`` from
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
from .triton_gate import gate_bwd, gate_fwd


def projection_weights(x_proj_f: Tensor, x_proj_b: Tensor, dt_proj_f: Tensor, dt_proj_b: Tensor,
                       dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Both directions' x_proj and dt_proj as one block-diagonal weight each (``[2P + 4N, 2E]`` and
    ``[2E, 2P]``), so that each projection is one matmul over ``xc [batch, L, 2E]`` instead of one per
    direction: the per-direction outputs (44 columns at tiny, 12 for dt's low-rank input) were rows
    cuBLAS can only read and write with narrow, slow kernels. The x_proj output's columns are
    ``[dt_f | dt_b | B_f C_f | B_b C_b]``, dt's low-rank parts padded with zero rows to ``P``, the rank
    rounded up to 8, so that every part starts on 16 bytes; the dt_proj output is ``dt [batch, L, 2E]``,
    the forward direction's channels first, as the scan takes it."""
    dim, dt_rank = dt_proj_f.shape
    bc_cols = x_proj_f.shape[0] - dt_rank
    padded = -(-dt_rank // 8) * 8
    w_x = x_proj_f.new_zeros(2 * padded + 2 * bc_cols, 2 * dim, dtype=dtype)
    w_dt = x_proj_f.new_zeros(2 * dim, 2 * padded, dtype=dtype)
    for half, (x_proj, dt_proj) in enumerate(((x_proj_f, dt_proj_f), (x_proj_b, dt_proj_b))):
        cols = slice(half * dim, (half + 1) * dim)
        w_x[half * padded:half * padded + dt_rank, cols] = x_proj[:dt_rank]
        w_x[2 * padded + half * bc_cols:2 * padded + (half + 1) * bc_cols, cols] = x_proj[dt_rank:]
        w_dt[cols, half * padded:half * padded + dt_rank] = dt_proj
    return w_x, w_dt


def _projections(xc: Tensor, w_x: Tensor, w_dt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The x_proj output, ``dt [batch, L, 2E]`` and B/C of both directions ``[batch, L, 2, 2N]``, a
    view of the x_proj output (the forward's and the backward's recompute)."""
    x_dbl = F.linear(xc, w_x)
    low_rank = w_dt.shape[1]
    return x_dbl, F.linear(x_dbl[..., :low_rank], w_dt), x_dbl[..., low_rank:].unflatten(-1, (2, -1))


def _projection_grads(xc: Tensor, x_dbl: Tensor, ddt: Tensor, dBC: Tensor, w_x: Tensor, w_dt: Tensor,
                      dxc: Tensor, dt_rank: int) -> list[tuple[Tensor, Tensor]]:
    """Backward of :func:`_projections`: adds the gradient w.r.t. ``xc`` into ``dxc`` and returns each
    direction's ``(d x_proj, d dt_proj)``, cut from the block-diagonal weights' gradients."""
    dim2, low_rank = xc.shape[-1], w_dt.shape[1]
    dim, padded, bc_cols = dim2 // 2, low_rank // 2, (w_x.shape[0] - low_rank) // 2
    ddt, x_dbl = ddt.reshape(-1, dim2), x_dbl.view(-1, x_dbl.shape[-1])
    d_w_dt = ddt.t() @ x_dbl[:, :low_rank]
    d_x_dbl = torch.cat([ddt @ w_dt, dBC.flatten(0, 1).flatten(1).to(ddt.dtype)], 1)
    d_w_x = d_x_dbl.t() @ xc.view(-1, dim2)
    dxc.view(-1, dim2).addmm_(d_x_dbl, w_x)
    grads = []
    for half in range(2):
        cols, low = slice(half * dim, (half + 1) * dim), slice(half * padded, half * padded + dt_rank)
        bc_rows = slice(low_rank + half * bc_cols, low_rank + (half + 1) * bc_cols)
        grads.append((torch.cat([d_w_x[low, cols], d_w_x[bc_rows, cols]]), d_w_dt[cols, low]))
    return grads


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
    # the projections' weights in the activations' dtype, built once and kept for the backward
    w_x, w_dt = projection_weights(fwd[2], bwd[2], fwd[3], bwd[3], dtype)
    w_out = None if out_proj is None else out_proj.to(dtype)
    xc = bidir_conv_fwd(xz[..., :dim], conv_weight, conv_bias)
    _, dt, bc = _projections(xc, w_x, w_dt)
    params = tuple(t.contiguous() for t in (fwd[5], bwd[5], fwd[6], bwd[6], fwd[4], bwd[4]))
    y, ckpt = scan_fwd(xc, dt, bc, params)
    out, y_sum = gate_fwd(y, xz[..., dim:])
    saved = (w_in, w_out, conv_weight, conv_bias, w_x, w_dt, y_sum, ckpt, *params)
    return (out if w_out is None else F.linear(out, w_out)), saved


def mixer_backward(x: Tensor, saved: tuple, dout: Tensor, param_dtypes: list, projection_dtypes: list,
                   dt_rank: int) -> list:
    """Gradients w.r.t. ``(x, in_proj, out_proj, *weights)`` of :func:`mixer_forward`, given its input
    ``x`` and ``saved`` (``param_dtypes``/``projection_dtypes``: the weights' dtypes, None for an absent
    projection; ``dt_rank``: the dt_proj weights' rank)."""
    w_in, w_out, conv_weight, conv_bias, w_x, w_dt, y_sum, ckpt, *params = saved
    # recomputed by the forward's kernels and matmuls from the forward's inputs: the same values
    xz = x if w_in is None else F.linear(x.to(w_in.dtype), w_in)
    dim = xz.shape[-1] // 2
    dtype = xz.dtype
    xc = bidir_conv_fwd(xz[..., :dim], conv_weight, conv_bias)
    x_dbl, dt, bc = _projections(xc, w_x, w_dt)
    dxz = torch.empty_like(xz, memory_format=torch.contiguous_format)
    gated = None if w_out is None else torch.empty_like(y_sum, dtype=dtype)
    d_gated = dout if w_out is None else dout.to(dtype) @ w_out
    g = gate_bwd(d_gated, y_sum, xz[..., dim:], dxz[..., dim:], gated)
    d_out_proj = None if w_out is None else dout.reshape(-1, dout.shape[-1]).to(dtype).t() @ gated.view(-1, dim)
    del gated, d_gated
    dxc, ddt, dBC, dA_log, dD, d_bias = scan_bwd(xc, dt, bc, params, ckpt, g)
    del dt, bc, g  # freed before the projections' gradients allocate theirs
    projection_grads = _projection_grads(xc, x_dbl, ddt.to(dtype), dBC, w_x, w_dt, dxc, dt_rank)
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
        ctx.dt_rank = weights[3].shape[1]
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        x, *saved = ctx.saved_tensors
        return tuple(mixer_backward(x, saved, dout, ctx.param_dtypes, ctx.projection_dtypes, ctx.dt_rank))


def bimamba_inner_gluon(xz: Tensor, fwd, bwd) -> Tensor:
    """``xz [batch, L, 2E]`` and the two branches' ``BranchWeights`` -> ``[batch, L, E]``."""
    return BiMambaMixerGluon.apply(xz, None, None, *fwd, *bwd)


def bimamba_mixer_gluon(hidden: Tensor, in_proj: Tensor, out_proj: Tensor, fwd, bwd) -> Tensor:
    """``out_proj(inner(in_proj(hidden)))`` for ``hidden [batch, L, d]``, keeping neither projection's
    activation for the backward."""
    return BiMambaMixerGluon.apply(hidden, in_proj, out_proj, *fwd, *bwd)
