"""Selective scan (Mamba's S6 recurrence) in plain PyTorch.

The recurrence per channel ``d`` and state ``n`` is

    h_t = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B_t[n] * u_t
    y_t = sum_n C_t[n] * h_t[n] + D[d] * u_t          (then y_t * silu(z_t) if z is given)

Shapes follow mamba-ssm's ``selective_scan_fn`` so the two are interchangeable: ``u, delta, z``
are ``[batch, dim, length]``, ``A`` is ``[dim, d_state]``, ``B`` and ``C`` are
``[batch, d_state, length]`` or grouped ``[batch, groups, d_state, length]`` (channel ``d`` uses
group ``d // (dim // groups)``), ``D`` and ``delta_bias`` are ``[dim]``.

``selective_scan_torch`` solves the linear recurrence with a log-depth (Hillis-Steele) scan, so
its cost is O(L log L) vectorised work rather than L Python steps, and its backward is a second
scan in reverse rather than autograd through every step. ``selective_scan_ref`` is the
step-by-step loop kept as the ground truth for tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _prepare(u, delta, A, B, C, delta_bias, delta_softplus):
    """Upcast to at least fp32, apply the delta bias/softplus, and split channels into groups."""
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A = u.to(compute), delta.to(compute), A.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    return u, delta, A, B.to(compute), C.to(compute)


def _finish(y, u, D, z, out_dtype):
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       z: Tensor | None = None, delta_bias: Tensor | None = None,
                       delta_softplus: bool = False) -> Tensor:
    """Sequential reference: one Python step per time step. Slow; for tests only."""
    out_dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    groups = B.shape[1]
    Bd = B.repeat_interleave(dim // groups, dim=1)  # [b, d, n, l]
    Cd = C.repeat_interleave(dim // C.shape[1], dim=1)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * Bd[..., t]
        ys.append((h * Cd[..., t]).sum(-1))
    return _finish(torch.stack(ys, dim=-1), u, D, z, out_dtype)


def _hillis_steele(a: Tensor, x: Tensor) -> Tensor:
    """Inclusive scan of h_t = a_t * h_{t-1} + x_t along the last dim, in ceil(log2 L) steps."""
    length = x.shape[-1]
    step = 1
    while step < length:
        x = torch.cat([x[..., :step], torch.addcmul(x[..., step:], a[..., step:], x[..., :-step])], dim=-1)
        if step * 2 < length:  # the decays are not needed after the last step
            a = torch.cat([a[..., :step], a[..., step:] * a[..., :-step]], dim=-1)
        step *= 2
    return x


class _LinearScan(torch.autograd.Function):
    """h = scan(a, x) with a memory-light backward: the adjoint is the same scan run in reverse."""

    @staticmethod
    def forward(ctx, a: Tensor, x: Tensor) -> Tensor:
        h = _hillis_steele(a, x)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, grad_h: Tensor):
        a, h = ctx.saved_tensors
        # lambda_t = g_t + a_{t+1} * lambda_{t+1}: a forward scan over the time-reversed sequence.
        a_next = torch.cat([a[..., 1:], torch.zeros_like(a[..., :1])], dim=-1)
        lam = _hillis_steele(a_next.flip(-1), grad_h.flip(-1)).flip(-1)
        h_prev = torch.cat([torch.zeros_like(h[..., :1]), h[..., :-1]], dim=-1)
        return lam * h_prev, lam


def selective_scan_torch(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                         z: Tensor | None = None, delta_bias: Tensor | None = None,
                         delta_softplus: bool = False) -> Tensor:
    """Parallel selective scan; same function and signature as mamba-ssm's ``selective_scan_fn``."""
    out_dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    per_group = dim // groups
    decay = torch.exp(delta[:, :, None, :] * A[None, :, :, None])  # [b, d, n, l]
    drive = (delta * u).view(batch, groups, per_group, 1, length) * B[:, :, None]  # [b, g, dg, n, l]
    h = _LinearScan.apply(decay, drive.reshape(batch, dim, d_state, length))
    y = (h.view(batch, groups, per_group, d_state, length) * C[:, :, None]).sum(3).reshape(batch, dim, length)
    return _finish(y, u, D, z, out_dtype)
