"""The published pairing's two layers as one autograd Function, on the Gluon mixer.

In the released SSAMBA, layers ``2i`` and ``2i+1`` both read the same ``(hidden, residual)``: each adds
its drop-path-scaled ``hidden`` to ``residual`` and normalises the sum, layer ``2i+1`` mixes the
time-reversed stream, and the pair's outputs are the sums of the two layers' outputs and residuals.
Run as two blocks, each layer keeps its norm input (the fp32 residual) and its normed stream (the
in_proj input) for the backward: 12 bytes per token and channel for a pair under bf16 autocast. Here
one kernel computes both norms and the pair's next residual, and the backward keeps only the pair's
inputs (6 bytes: the bf16 ``hidden`` and the fp32 ``residual``) and recomputes the normed streams and
the norms' statistics from them (``triton_norm.pair_add_norm_fwd``/``_bwd``). The arithmetic is that
of two ``triton_norm.add_norm`` calls followed by the sum of their residuals.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .gluon_bimamba import mixer_backward, mixer_forward
from .triton_norm import pair_add_norm_bwd, pair_add_norm_fwd

MIXER_TENSORS = 16  # in_proj, out_proj and each branch's seven BranchWeights


class PublishedPair(torch.autograd.Function):
    """``(hidden, residual)`` -> ``(mixer_f(norm_f(x_f)) + mixer_b(norm_b(x_b)), x_f + x_b)`` with
    ``x_f = residual + hidden * scale_f`` and ``x_b = residual + hidden * scale_b`` (both ``hidden``
    without a residual). ``mixer_b`` gets its layer's branches swapped (the time-reversed stream)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, residual, scale_f, scale_b, eps, residual_dtype, w_f, b_f, w_b, b_b, *mixers):
        hidden = hidden.contiguous()
        residual = None if residual is None else residual.contiguous()
        scales = _scales(scale_f, scale_b, hidden)
        out_dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else w_f.dtype
        normed_f, normed_b, new_residual = pair_add_norm_fwd(hidden, residual, scales, (w_f, b_f), (w_b, b_b), eps,
                                                             out_dtype, residual_dtype)
        mixer_f, mixer_b = mixers[:MIXER_TENSORS], mixers[MIXER_TENSORS:]
        out_f, saved_f = mixer_forward(normed_f, mixer_f[0], mixer_f[1], mixer_f[2:])
        del normed_f
        out_b, saved_b = mixer_forward(normed_b, mixer_b[0], mixer_b[1], mixer_b[2:])
        ctx.save_for_backward(hidden, residual, *(scales or (None, None)), w_f, b_f, w_b, b_b, *saved_f, *saved_b)
        ctx.eps, ctx.out_dtype, ctx.saved_per_mixer = eps, out_dtype, len(saved_f)
        ctx.dtypes = [[t.dtype for t in m[2:]] for m in (mixer_f, mixer_b)]
        ctx.projection_dtypes = [[m[0].dtype, m[1].dtype] for m in (mixer_f, mixer_b)]
        ctx.dt_ranks = [m[5].shape[1] for m in (mixer_f, mixer_b)]  # m[5]: the first branch's dt_proj weight
        return out_f + out_b, new_residual

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, d_hidden_next, d_residual_next):
        hidden, residual, s_f, s_b, w_f, b_f, w_b, b_b, *saved = ctx.saved_tensors
        scales = None if s_f is None else (s_f, s_b)
        normed = list(pair_add_norm_fwd(hidden, residual, scales, (w_f, b_f), (w_b, b_b), ctx.eps, ctx.out_dtype,
                                        None)[:2])
        per_mixer = ctx.saved_per_mixer
        mixer_grads = []
        for i in range(2):
            x, normed[i] = normed[i], None  # each normed stream freed once its mixer's backward has it
            mixer_grads.append(mixer_backward(x, saved[i * per_mixer:(i + 1) * per_mixer], d_hidden_next,
                                              ctx.dtypes[i], ctx.projection_dtypes[i], ctx.dt_ranks[i]))
            del x
        d_hidden, d_residual, (dw_f, db_f, dw_b, db_b) = pair_add_norm_bwd(
            hidden, residual, scales, (w_f, w_b), b_f is None, ctx.eps, mixer_grads[0][0], mixer_grads[1][0],
            d_residual_next)
        norm_grads = [dw_f.to(w_f.dtype), None if b_f is None else db_f.to(b_f.dtype),
                      dw_b.to(w_b.dtype), None if b_b is None else db_b.to(b_b.dtype)]
        return (d_hidden, d_residual, None, None, None, None, *norm_grads, *mixer_grads[0][1:], *mixer_grads[1][1:])


def _scales(scale_f: Tensor | None, scale_b: Tensor | None, hidden: Tensor) -> tuple[Tensor, Tensor] | None:
    """Both layers' drop-path factors, a layer that drops nothing getting ones; None if neither drops."""
    if scale_f is None and scale_b is None:
        return None
    ones = torch.ones(hidden.shape[0], device=hidden.device)
    return (ones if scale_f is None else scale_f.float()), (ones if scale_b is None else scale_b.float())


def published_pair(hidden: Tensor, residual: Tensor | None, scales: tuple[Tensor | None, Tensor | None],
                   norms: tuple[tuple[Tensor, Tensor | None], tuple[Tensor, Tensor | None]], eps: float,
                   residual_dtype: torch.dtype, mixers: tuple[tuple[Tensor, ...], tuple[Tensor, ...]]
                   ) -> tuple[Tensor, Tensor]:
    """One pair of the published pairing: ``(hidden, residual)`` of the next pair.

    ``scales``: each layer's per-sample drop-path factors (None: nothing dropped; both None without a
    residual); ``norms``: each layer's ``(weight, bias)`` (bias None: RMSNorm); ``mixers``: each layer's
    ``(in_proj, out_proj, *branch_1, *branch_2)`` in the order its mixer runs them (the second layer's
    branches swapped); ``residual_dtype``: the next residual's dtype.
    """
    (w_f, b_f), (w_b, b_b) = norms
    if (b_f is None) != (b_b is None):
        raise ValueError("both layers of a pair must use the same norm (LayerNorm or RMSNorm)")
    return PublishedPair.apply(hidden, residual, *scales, eps, residual_dtype, w_f, b_f, w_b, b_b, *mixers[0],
                               *mixers[1])
