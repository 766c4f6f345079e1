"""The inner part of a bidirectional Mamba mixer ("bimamba v2"), from in_proj output to out_proj input.

Both directions run in one scan call: the backward branch's input is the time-reversed sequence,
and since the two directions differ only in their per-channel parameters, ``[x, flip(x)]`` is
stacked along channels (2E channels) with the two branches' B/C as two groups. One depthwise conv
and one selective scan then serve both directions. The ``triton`` backend goes further and keeps
both directions in the original time order (see ``gluon_scan`` and ``triton_scan``), so no flipped
copies are made.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import cuda_kernels, gluon_scan_usable, resolve_backend, triton_or_fallback
from .selective_scan import selective_scan_torch


class BranchWeights(NamedTuple):
    """One direction's parameters, named as in the mixer."""

    conv_weight: Tensor  # [E, 1, k]
    conv_bias: Tensor  # [E]
    x_proj_weight: Tensor  # [dt_rank + 2 * d_state, E]
    dt_proj_weight: Tensor  # [E, dt_rank]
    dt_proj_bias: Tensor  # [E]
    A_log: Tensor  # [E, d_state]
    D: Tensor  # [E]


def _scan_param(t: Tensor) -> Tensor:
    """Scan parameters run in fp32 (as mamba-ssm expects), or fp64 when the model is fp64."""
    return t if t.dtype == torch.float64 else t.float()


def _causal_conv_silu_torch(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    k = weight.shape[-1]
    return F.silu(F.conv1d(x, weight, bias, padding=k - 1, groups=x.shape[1])[..., : x.shape[-1]])


def _bimamba_inner_triton(xz: Tensor, fwd: BranchWeights, bwd: BranchWeights) -> Tensor:
    if gluon_scan_usable(xz.device, fwd.A_log.shape[1], fwd.A_log.shape[0]):
        from .gluon_bimamba import bimamba_inner_gluon

        return bimamba_inner_gluon(xz.transpose(1, 2), fwd, bwd)
    from .triton_bimamba import bimamba_inner_triton

    return bimamba_inner_triton(
        xz.transpose(1, 2), torch.cat([fwd.conv_weight, bwd.conv_weight]).flatten(1),
        torch.cat([fwd.conv_bias, bwd.conv_bias]), fwd.x_proj_weight, bwd.x_proj_weight, fwd.dt_proj_weight,
        bwd.dt_proj_weight, torch.cat([fwd.dt_proj_bias, bwd.dt_proj_bias]), torch.cat([fwd.A_log, bwd.A_log]),
        torch.cat([fwd.D, bwd.D]))


def gluon_mixer_runs(backend: str, device: torch.device, d_state: int, channels: int) -> bool:
    """Whether ``backend`` runs the mixer as the Gluon path's one Function here (and the encoder a published
    pair as ``ops.pair``): the ``triton`` backend where the Gluon scan can run."""
    return resolve_backend(backend, device.type == "cuda") == "triton" and gluon_scan_usable(device, d_state, channels)


def bimamba_mixer(hidden: Tensor, in_proj: Tensor, out_proj: Tensor, fwd: BranchWeights, bwd: BranchWeights,
                  backend: str = "auto") -> Tensor:
    """The mixer from its input ``hidden [batch, L, d]`` to its output: ``out_proj(bimamba_inner(in_proj(hidden)))``
    (bias-free projections). Where the Gluon scan runs, one autograd Function does it all and keeps
    neither the in_proj output nor the out_proj input for the backward (it recomputes them)."""
    requested = backend
    if gluon_mixer_runs(backend, hidden.device, fwd.A_log.shape[1], fwd.A_log.shape[0]):
        from .gluon_bimamba import bimamba_mixer_gluon

        return triton_or_fallback(requested, lambda: bimamba_mixer_gluon(hidden, in_proj, out_proj, fwd, bwd),
                                  lambda: bimamba_mixer(hidden, in_proj, out_proj, fwd, bwd, requested))
    xz = F.linear(hidden, in_proj).transpose(1, 2)  # [B, 2E, L]
    return F.linear(bimamba_inner(xz, fwd, bwd, requested), out_proj)


def bimamba_inner(xz: Tensor, fwd: BranchWeights, bwd: BranchWeights, backend: str = "auto") -> Tensor:
    """``(y_f + flip(y_b)) / 2`` for ``xz = in_proj(h)`` laid out ``[batch, 2E, L]``; returns ``[batch, L, E]``.

    ``xz`` is best the transposed view of a contiguous ``[batch, L, 2E]`` projection (what the mixer
    passes): the Triton path then reads it in place.
    """
    requested = backend
    backend = resolve_backend(backend, xz.is_cuda)
    if backend == "triton":
        return triton_or_fallback(requested, lambda: _bimamba_inner_triton(xz, fwd, bwd),
                                  lambda: bimamba_inner(xz, fwd, bwd, requested))
    x, z = xz.chunk(2, dim=1)
    batch, channels, length = x.shape
    d_state = fwd.A_log.shape[1]
    dt_rank = fwd.dt_proj_weight.shape[1]

    zs = torch.cat([z, z.flip(-1)], dim=1)
    conv_weight = torch.cat([fwd.conv_weight, bwd.conv_weight])
    conv_bias = torch.cat([fwd.conv_bias, bwd.conv_bias])
    if backend == "cuda":
        selective_scan_fn, causal_conv1d_fn = cuda_kernels()
        # causal-conv1d in its channel-last layout: in the time-contiguous layout its gradients are
        # ~2e-2 off at exactly 513 tokens, the pretraining length (docs/performance.md). That layout
        # needs a row stride that is a multiple of 8, so odd widths get zero channels appended.
        pad = -2 * channels % 8
        xs = torch.cat([x.transpose(1, 2), x.flip(-1).transpose(1, 2), x.new_zeros(batch, length, pad)], dim=2)
        weight = torch.cat([conv_weight.squeeze(1), conv_weight.new_zeros(pad, conv_weight.shape[-1])])
        bias = torch.cat([conv_bias, conv_bias.new_zeros(pad)])
        xs = causal_conv1d_fn(xs.transpose(1, 2), weight, bias, activation="silu")[:, :2 * channels].contiguous()
    else:
        xs = _causal_conv_silu_torch(torch.cat([x, x.flip(-1)], dim=1), conv_weight, conv_bias)

    # Per-direction projections as one batched matmul over the two branches.
    x_proj = torch.stack([fwd.x_proj_weight, bwd.x_proj_weight])  # [2, R + 2N, E]
    x_dbl = torch.einsum("kre,bkel->bkrl", x_proj, xs.view(batch, 2, channels, length))
    dt, B, C = x_dbl.split([dt_rank, d_state, d_state], dim=2)
    dt_proj = torch.stack([fwd.dt_proj_weight, bwd.dt_proj_weight])  # [2, E, R]
    delta = torch.einsum("ker,bkrl->bkel", dt_proj, dt).reshape(batch, 2 * channels, length)
    A = -torch.exp(_scan_param(torch.cat([fwd.A_log, bwd.A_log])))
    D = _scan_param(torch.cat([fwd.D, bwd.D]))
    delta_bias = _scan_param(torch.cat([fwd.dt_proj_bias, bwd.dt_proj_bias]))

    if backend == "cuda":
        y = selective_scan_fn(xs, delta.contiguous(), A, B.contiguous(), C.contiguous(), D, zs, delta_bias,
                              delta_softplus=True)
    else:
        y = selective_scan_torch(xs, delta, A, B, C, D, zs, delta_bias, delta_softplus=True)
    y_f, y_b = y.chunk(2, dim=1)
    return ((y_f + y_b.flip(-1)) * 0.5).transpose(1, 2)
