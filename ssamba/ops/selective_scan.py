"""Selective scan (Mamba's S6 recurrence) in plain PyTorch.

The recurrence per channel ``d`` and state ``n`` is

    h_t = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B_t[n] * u_t
    y_t = sum_n C_t[n] * h_t[n] + D[d] * u_t          (then y_t * silu(z_t) if z is given)

Shapes follow mamba-ssm's ``selective_scan_fn`` so the two are interchangeable: ``u, delta, z``
are ``[batch, dim, length]``, ``A`` is ``[dim, d_state]``, ``B`` and ``C`` are
``[batch, d_state, length]`` or grouped ``[batch, groups, d_state, length]`` (channel ``d`` uses
group ``d // (dim // groups)``), ``D`` and ``delta_bias`` are ``[dim]``.

``selective_scan_torch`` picks one of two solvers of the linear recurrence, both with a hand-written
backward rather than autograd through every step:

- on CPU, once the state (batch x channels x states) is big enough to amortise an op's overhead, it
  steps through time on the ``[batch, channels, states]`` state: O(L) work on cache-sized tensors.
  Its backward recomputes each chunk of ``STEPPED_CHUNK`` steps from the state saved at the chunk's
  start, so training keeps L / STEPPED_CHUNK states per layer instead of L;
- elsewhere (a GPU, where each op is a kernel launch, or a small state) a log-depth (Hillis-Steele)
  scan over ``[batch, channels, states, L]`` tensors: O(L log L) work in ceil(log2 L) vectorised
  steps, whose backward is the same scan in reverse.

``selective_scan_ref`` is the step-by-step loop under autograd, kept as the ground truth for tests.
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


# Where stepping through time beats the log-depth scan on CPU. Forward + backward on a 2-core CPU at
# L = 64 / 256 / 1024, stepped against log-depth: 4.4x / 3.8x / 1.4x slower at 2048 state elements,
# 1.9x / 1.4x slower / level at 4096, 1.2x slower / 1.8x / 6x faster at 8192, 1.3x / 3.7x / 6.7x faster
# at 16384; 15x faster at an SSAMBA-tiny layer's 49152 (batch 4, L = 601; bench/cpu_scan.py).
STEPPED_MIN_STATE = 8192
STEPPED_CHUNK = 32  # time steps per recomputed chunk in the stepped scan's backward


def _step(h: Tensor, delta: Tensor, du: Tensor, A: Tensor, B: Tensor, t: int) -> tuple[Tensor, Tensor]:
    """Time step ``t`` of the recurrence in ``_SteppedScan``'s layouts: its decay ``exp(delta_t A)`` and the
    next state (the forward and the backward's recompute both take it from here)."""
    decay = torch.exp(delta[t, ..., None] * A)
    return decay, torch.addcmul(decay * h, du[t, ..., None], B[t, :, :, None, :])


class _SteppedScan(torch.autograd.Function):
    """``y_t = C_t . h_t`` with ``h_t = exp(delta_t A) h_{t-1} + du_t B_t``, one time step per iteration.

    Time-first contiguous layouts so that each step reads whole slices: ``delta``, ``du``: ``[L, batch,
    groups, channels per group]``; ``A``: ``[groups, channels per group, N]``; ``B``, ``C``: ``[L, batch,
    groups, N]``; ``y`` like ``delta``. Keeps only its inputs and the state at each chunk's start."""

    @staticmethod
    def forward(ctx, delta: Tensor, du: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
        h = delta.new_zeros(*delta.shape[1:], A.shape[-1])
        y = torch.empty_like(delta)
        chunk_starts = []
        for t in range(delta.shape[0]):
            if t % STEPPED_CHUNK == 0:
                chunk_starts.append(h)
            _, h = _step(h, delta, du, A, B, t)
            torch.matmul(h, C[t, ..., None], out=y[t, ..., None])
        ctx.save_for_backward(delta, du, A, B, C, *chunk_starts)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        delta, du, A, B, C, *chunk_starts = ctx.saved_tensors
        dy = dy.contiguous()
        length = delta.shape[0]
        d_delta, d_du, dB, dC = (torch.empty_like(t) for t in (delta, du, B, C))
        dA = torch.zeros_like(chunk_starts[0])  # per batch element, summed at the end
        carry = torch.zeros_like(chunk_starts[0])  # a_{t+1} * lambda_{t+1}, lambda_t = dLoss/dh_t
        for c in reversed(range(len(chunk_starts))):
            start, stop = c * STEPPED_CHUNK, min((c + 1) * STEPPED_CHUNK, length)
            states, decays = [chunk_starts[c]], []
            for t in range(start, stop):  # the chunk's states again, from its first
                decay, state = _step(states[-1], delta, du, A, B, t)
                decays.append(decay)
                states.append(state)
            for k in reversed(range(stop - start)):
                t = start + k
                lam = torch.addcmul(carry, dy[t, ..., None], C[t, :, :, None, :])
                torch.matmul(dy[t, :, :, None, :], states[k + 1], out=dC[t, :, :, None, :])
                torch.matmul(du[t, :, :, None, :], lam, out=dB[t, :, :, None, :])
                torch.matmul(lam, B[t, ..., None], out=d_du[t, ..., None])
                carry = decays[k] * lam
                d_exponent = carry * states[k]  # the gradient w.r.t. delta_t * A
                torch.sum(d_exponent * A, -1, out=d_delta[t])
                dA.addcmul_(d_exponent, delta[t, ..., None])
        return d_delta, d_du, dA.sum(0), dB, dC


def _time_first(x: Tensor) -> Tensor:
    return x.permute(-1, *range(x.dim() - 1)).contiguous()


def selective_scan_torch(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                         z: Tensor | None = None, delta_bias: Tensor | None = None,
                         delta_softplus: bool = False) -> Tensor:
    """Selective scan in PyTorch; same function and signature as mamba-ssm's ``selective_scan_fn``."""
    out_dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    per_group = dim // groups
    if u.device.type == "cpu" and batch * dim * d_state >= STEPPED_MIN_STATE:
        with torch.autocast("cpu", enabled=False):  # its matmuls carry the state: kept in the compute dtype
            y = _SteppedScan.apply(_time_first(delta.view(batch, groups, per_group, length)),
                                   _time_first((delta * u).view(batch, groups, per_group, length)),
                                   A.view(groups, per_group, d_state), _time_first(B), _time_first(C))
        y = y.permute(1, 2, 3, 0).reshape(batch, dim, length)
    else:
        decay = torch.exp(delta[:, :, None, :] * A[None, :, :, None])  # [b, d, n, l]
        drive = (delta * u).view(batch, groups, per_group, 1, length) * B[:, :, None]  # [b, g, dg, n, l]
        h = _LinearScan.apply(decay, drive.reshape(batch, dim, d_state, length))
        y = (h.view(batch, groups, per_group, d_state, length) * C[:, :, None]).sum(3).reshape(batch, dim, length)
    return _finish(y, u, D, z, out_dtype)
