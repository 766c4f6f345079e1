"""Triton kernels for the bidirectional selective scan of a bimamba-v2 mixer.

Both directions are kept in the original time order: the backward branch's scan on ``flip(x)`` is
the same recurrence run from the last time step to the first, so no flipped copies exist and its
output needs no flip back. One program owns a batch row and a block of channels; it runs the
forward direction over the sequence in chunks of ``T`` steps and then the backward direction, each
chunk solved by an in-register associative scan seeded with the state carried from the previous
chunk. The ``D`` skip, the ``silu(z)`` gate and the ``(y_f + y_b) / 2`` average are fused; the
backward pass restarts each chunk from a state saved by the forward pass and recomputes everything
else. ``delta`` arrives after its bias and softplus: inside the kernel every ``[T, D]`` quantity is
replicated over the lanes that hold the states, so transcendental per-channel work is cheaper
outside.

Layouts are channel-last, as the projections produce them: ``u`` is ``[batch, L, 2E]`` (forward
branch channels first), delta, ``z`` and ``y`` are ``[batch, L, E]``, ``B`` and ``C`` ``[batch, L, N]``
(any row stride, unit channel stride).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)


@triton.jit
def _linear_combine(a_first, x_first, a_then, x_then):
    """Compose h -> a_first * h + x_first with h -> a_then * h + x_then (applied second)."""
    return a_first * a_then, a_then * x_first + x_then


@triton.jit
def _expand_td(x):
    """``[T, D]`` -> ``[T, D, 1]``."""
    return x[:, :, None]


@triton.jit
def _load_bc(b_ptr, c_ptr, row_off, t_mask, offs_n, n_mask):
    """B and C rows of a chunk as ``[T, 1, N]`` tiles."""
    mask = t_mask[:, None] & n_mask[None, :]
    B = tl.load(b_ptr + row_off[:, None] + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    C = tl.load(c_ptr + row_off[:, None] + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    return B[:, None, :], C[:, None, :]


@triton.jit
def _bimamba_scan_fwd_kernel(
        u_ptr, delta_f_ptr, delta_b_ptr, b_f_ptr, c_f_ptr, b_b_ptr, c_b_ptr, z_ptr,
        a_ptr, d_ptr, y_ptr, ckpt_ptr,
        length, dim, num_chunks,
        su_b, su_l, sdelta_b, sdelta_l, sbc_b, sbc_l, sz_b, sz_l, sy_b, sy_l,
        N: tl.constexpr, NP: tl.constexpr, T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_t = tl.arange(0, T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, NP)
    d_mask = offs_d < dim
    n_mask = offs_n < N
    dn_mask = d_mask[:, None] & n_mask[None, :]
    for direction in range(2):
        # Position p of the scan is time p (forward branch) or L - 1 - p (backward branch).
        ch = offs_d + direction * dim
        dn_off = ch[:, None] * N + offs_n[None, :]
        A = tl.load(a_ptr + dn_off, mask=dn_mask, other=0.0)[None]  # log2-scaled, [1, D, N]
        d_skip = tl.load(d_ptr + ch, mask=d_mask, other=0.0)
        delta_ptr = tl.where(direction == 0, delta_f_ptr, delta_b_ptr)
        b_ptr = tl.where(direction == 0, b_f_ptr, b_b_ptr)
        c_ptr = tl.where(direction == 0, c_f_ptr, c_b_ptr)
        h = tl.zeros([1, BLOCK_D, NP], dtype=tl.float32)
        for chunk in range(num_chunks):
            p = chunk * T + offs_t
            t_mask = p < length
            t = tl.where(direction == 0, p, length - 1 - p)
            td_mask = t_mask[:, None] & d_mask[None, :]
            ckpt = ckpt_ptr + (pid_b * num_chunks + chunk) * 2 * dim * N + dn_off
            tl.store(ckpt[None], h, mask=dn_mask[None])
            u = tl.load(u_ptr + pid_b * su_b + t[:, None] * su_l + ch[None, :], mask=td_mask, other=0.0).to(tl.float32)
            delta = tl.load(delta_ptr + pid_b * sdelta_b + t[:, None] * sdelta_l + offs_d[None, :], mask=td_mask,
                            other=0.0).to(tl.float32)
            B, C = _load_bc(b_ptr, c_ptr, pid_b * sbc_b + t * sbc_l, t_mask, offs_n, n_mask)
            decay = tl.exp2(_expand_td(delta) * A)
            drive = _expand_td(delta * u) * B
            acc_decay, acc_drive = tl.associative_scan((decay, drive), 0, _linear_combine)
            hs = acc_drive + acc_decay * h
            y = tl.sum(hs * C, axis=2) + d_skip[None, :] * u
            z = tl.load(z_ptr + pid_b * sz_b + t[:, None] * sz_l + offs_d[None, :], mask=td_mask,
                        other=0.0).to(tl.float32)
            out = y * z * tl.sigmoid(z) * 0.5
            y_ptrs = y_ptr + pid_b * sy_b + t[:, None] * sy_l + offs_d[None, :]
            out += tl.load(y_ptrs, mask=td_mask & (direction == 1), other=0.0).to(tl.float32)
            tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=td_mask)
            h = tl.sum(tl.where(offs_t[:, None, None] == T - 1, hs, 0.0), axis=0, keep_dims=True)
        tl.debug_barrier()  # the backward branch adds to the forward branch's partial outputs


@triton.jit
def _bimamba_scan_bwd_kernel(
        u_ptr, delta_f_ptr, delta_b_ptr, b_f_ptr, c_f_ptr, b_b_ptr, c_b_ptr, z_ptr,
        a_ptr, d_ptr, dy_ptr, ckpt_ptr,
        du_ptr, ddelta_f_ptr, ddelta_b_ptr, dbc_ptr, dz_ptr, da_ptr, dd_ptr,
        length, dim, num_chunks,
        su_b, su_l, sdelta_b, sdelta_l, sbc_b, sbc_l, sz_b, sz_l, sy_b, sy_l, sdz_b, sdz_l,
        N: tl.constexpr, NP: tl.constexpr, T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_t = tl.arange(0, T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, NP)
    d_mask = offs_d < dim
    n_mask = offs_n < N
    dn_mask = d_mask[:, None] & n_mask[None, :]
    for direction in range(2):
        ch = offs_d + direction * dim
        dn_off = ch[:, None] * N + offs_n[None, :]
        A = tl.load(a_ptr + dn_off, mask=dn_mask, other=0.0)[None]  # log2-scaled
        d_skip = tl.load(d_ptr + ch, mask=d_mask, other=0.0)
        delta_ptr = tl.where(direction == 0, delta_f_ptr, delta_b_ptr)
        ddelta_ptr = tl.where(direction == 0, ddelta_f_ptr, ddelta_b_ptr)
        b_ptr = tl.where(direction == 0, b_f_ptr, b_b_ptr)
        c_ptr = tl.where(direction == 0, c_f_ptr, c_b_ptr)
        lam_carry = tl.zeros([1, BLOCK_D, NP], dtype=tl.float32)
        dA_acc = tl.zeros([1, BLOCK_D, NP], dtype=tl.float32)
        dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i in range(num_chunks):
            chunk = num_chunks - 1 - i  # the adjoint runs against the scan
            p = chunk * T + offs_t
            t_mask = p < length
            t = tl.where(direction == 0, p, length - 1 - p)
            td_mask = t_mask[:, None] & d_mask[None, :]
            h0 = tl.load(ckpt_ptr + (pid_b * num_chunks + chunk) * 2 * dim * N + dn_off, mask=dn_mask, other=0.0)
            u = tl.load(u_ptr + pid_b * su_b + t[:, None] * su_l + ch[None, :], mask=td_mask, other=0.0).to(tl.float32)
            delta_rows = delta_ptr + pid_b * sdelta_b + offs_d[None, :]
            delta = tl.load(delta_rows + t[:, None] * sdelta_l, mask=td_mask, other=0.0).to(tl.float32)
            # decay of the step after p, which the adjoint crosses on its way back
            next_mask = (p + 1 < length)[:, None] & d_mask[None, :]
            t_next = tl.where(direction == 0, t + 1, t - 1)
            delta_next = tl.load(delta_rows + t_next[:, None] * sdelta_l, mask=next_mask, other=0.0).to(tl.float32)
            B, C = _load_bc(b_ptr, c_ptr, pid_b * sbc_b + t * sbc_l, t_mask, offs_n, n_mask)
            z = tl.load(z_ptr + pid_b * sz_b + t[:, None] * sz_l + offs_d[None, :], mask=td_mask,
                        other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + pid_b * sy_b + t[:, None] * sy_l + offs_d[None, :], mask=td_mask,
                         other=0.0).to(tl.float32)
            sig_z = tl.sigmoid(z)
            g = dy * z * sig_z * 0.5  # dL/d(y_pre) of this direction

            # states of this chunk, restarted from the saved chunk-entry state
            du_drive = delta * u
            drive = _expand_td(du_drive) * B
            acc_decay, acc_drive = tl.associative_scan((tl.exp2(_expand_td(delta) * A), drive), 0, _linear_combine)
            hs = acc_drive + acc_decay * h0[None]
            # adjoints lam_p = dL/dh_p = C_p g_p + decay_{p+1} lam_{p+1}
            src = _expand_td(g) * C
            acc_decay, acc_src = tl.associative_scan((tl.exp2(_expand_td(delta_next) * A), src), 0, _linear_combine,
                                                     reverse=True)
            lam = acc_src + acc_decay * lam_carry
            lam_carry = tl.sum(tl.where(offs_t[:, None, None] == 0, lam, 0.0), axis=0, keep_dims=True)

            lam_carried = lam * (hs - drive)  # lam_p * decay_p * h_{p-1}
            lam_B = tl.sum(lam * B, axis=2)
            d_delta = tl.sum(lam_carried * A, axis=2) * 0.6931471805599453 + u * lam_B
            dA_acc += tl.sum(lam_carried * _expand_td(delta), axis=0, keep_dims=True)
            dD_acc += tl.sum(g * u, axis=0)
            tl.store(ddelta_ptr + pid_b * sdelta_b + t[:, None] * sdelta_l + offs_d[None, :],
                     d_delta.to(ddelta_ptr.dtype.element_ty), mask=td_mask)
            du = delta * lam_B + d_skip[None, :] * g
            tl.store(du_ptr + pid_b * su_b + t[:, None] * su_l + ch[None, :], du.to(du_ptr.dtype.element_ty),
                     mask=td_mask)
            dB = tl.sum(lam * _expand_td(du_drive), axis=1)  # [T, N]
            dC = tl.sum(hs * _expand_td(g), axis=1)
            dbc = dbc_ptr + ((pid_b * length + t[:, None]) * 2 + direction) * 2 * N + offs_n[None, :]
            tn_mask = t_mask[:, None] & n_mask[None, :]
            tl.atomic_add(dbc, dB, mask=tn_mask, sem="relaxed")
            tl.atomic_add(dbc + N, dC, mask=tn_mask, sem="relaxed")

            y_pre = tl.sum(hs * C, axis=2) + d_skip[None, :] * u
            dz = dy * 0.5 * y_pre * sig_z * (1.0 + z * (1.0 - sig_z))
            dz_ptrs = dz_ptr + pid_b * sdz_b + t[:, None] * sdz_l + offs_d[None, :]
            dz += tl.load(dz_ptrs, mask=td_mask & (direction == 1), other=0.0).to(tl.float32)
            tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=td_mask)
        tl.store(da_ptr + pid_b * 2 * dim * N + dn_off[None], dA_acc, mask=dn_mask[None])
        tl.store(dd_ptr + pid_b * 2 * dim + ch, dD_acc, mask=d_mask)
        tl.debug_barrier()  # the backward branch adds to the forward branch's dz


def _check_channel_last(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride along its last (channel/state) dim, got strides {t.stride()}")


def _config(dim: int, d_state: int) -> dict:
    """Chunk length, channel block and warps; the tile is chunk x channels x states."""
    np2 = triton.next_power_of_2(d_state)
    return dict(T=16, BLOCK_D=min(16, triton.next_power_of_2(dim)), NP=np2, num_warps=4)


def bimamba_scan_fwd(u, delta_f, delta_b, B_f, C_f, B_b, C_b, z, A2, D, config: dict | None = None):
    """Fused bidirectional scan of ``delta = softplus(dt + bias)``; returns ``y [batch, L, E]`` (dtype of ``z``) and the chunk-entry states."""
    batch, length, dim2 = u.shape
    dim, d_state = dim2 // 2, A2.shape[1]
    for name, t in (("u", u), ("delta_f", delta_f), ("delta_b", delta_b), ("B_f", B_f), ("C_f", C_f), ("B_b", B_b),
                    ("C_b", C_b), ("z", z)):
        _check_channel_last(name, t)
    if delta_f.stride() != delta_b.stride() or B_f.stride() != C_f.stride() or B_f.stride() != B_b.stride() \
            or B_b.stride() != C_b.stride():
        raise ValueError("the two directions' delta / B / C tensors must share strides")
    cfg = dict(_config(dim, d_state), **(config or {}))
    num_chunks = triton.cdiv(length, cfg["T"])
    y = torch.empty(batch, length, dim, device=u.device, dtype=z.dtype)
    ckpt = torch.empty(batch, num_chunks, dim2, d_state, device=u.device, dtype=torch.float32)
    grid = (triton.cdiv(dim, cfg["BLOCK_D"]), batch)
    _bimamba_scan_fwd_kernel[grid](
        u, delta_f, delta_b, B_f, C_f, B_b, C_b, z, A2, D, y, ckpt,
        length, dim, num_chunks,
        u.stride(0), u.stride(1), delta_f.stride(0), delta_f.stride(1), B_f.stride(0), B_f.stride(1),
        z.stride(0), z.stride(1), y.stride(0), y.stride(1),
        N=d_state, **cfg)
    return y, ckpt


def bimamba_scan_bwd(u, delta_f, delta_b, B_f, C_f, B_b, C_b, z, A2, D, ckpt, dy, dz_out,
                     config: dict | None = None):
    """Gradients of :func:`bimamba_scan_fwd`.

    Writes dL/dz into ``dz_out`` (a ``[batch, L, E]`` view, e.g. into the in_proj output's gradient)
    and returns ``du`` (dtype of u), fp32 ``ddelta_f, ddelta_b``, ``dBC`` fp32
    ``[batch, L, 2 (direction), 2 (B, C), N]``, and fp32 per-batch partial sums ``dA [batch, 2E, N]``
    (w.r.t. the natural-log ``A``) and ``dD [batch, 2E]``.
    """
    batch, length, dim2 = u.shape
    dim, d_state = dim2 // 2, A2.shape[1]
    cfg = dict(_config(dim, d_state), **(config or {}))
    num_chunks = triton.cdiv(length, cfg["T"])
    if ckpt.shape != (batch, num_chunks, dim2, d_state):
        raise ValueError(f"checkpoint shape {tuple(ckpt.shape)} does not match the config's chunking")
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    _check_channel_last("dz_out", dz_out)
    du = torch.empty_like(u)
    ddelta_f = torch.empty(batch, length, dim, device=u.device, dtype=torch.float32)  # feeds weight grads
    ddelta_b = torch.empty_like(ddelta_f)
    dBC = torch.zeros(batch, length, 2, 2, d_state, device=u.device, dtype=torch.float32)
    dA = torch.empty(batch, dim2, d_state, device=u.device, dtype=torch.float32)
    dD = torch.empty(batch, dim2, device=u.device, dtype=torch.float32)
    grid = (triton.cdiv(dim, cfg["BLOCK_D"]), batch)
    # ddelta_f / ddelta_b are contiguous while delta_f / delta_b may be views: the kernel shares their strides
    if delta_f.stride() != ddelta_f.stride():
        delta_f, delta_b = delta_f.contiguous(), delta_b.contiguous()
    _bimamba_scan_bwd_kernel[grid](
        u, delta_f, delta_b, B_f, C_f, B_b, C_b, z, A2, D, dy, ckpt,
        du, ddelta_f, ddelta_b, dBC, dz_out, dA, dD,
        length, dim, num_chunks,
        u.stride(0), u.stride(1), delta_f.stride(0), delta_f.stride(1), B_f.stride(0), B_f.stride(1),
        z.stride(0), z.stride(1), dy.stride(0), dy.stride(1), dz_out.stride(0), dz_out.stride(1),
        N=d_state, **cfg)
    return du, ddelta_f, ddelta_b, dBC, dA, dD
