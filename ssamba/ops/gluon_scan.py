"""Gluon kernels for the bidirectional selective scan: one channel per thread, its states in registers.

Triton's implicit layouts spread the state axis over lanes, so every per-channel quantity was
computed once per state and every sum over states took shuffles (docs/performance.md, optimisation
log). Gluon fixes the layout by hand: a thread owns one channel of one direction and all ``N`` of
its states, so the recurrence, the softplus of ``delta``, the sums over states and the ``D`` skip
are plain register arithmetic, and time is a sequential loop whose loads do not depend on the
state (the compiler issues a whole chunk's loads ahead).

The two directions run in separate programs over the original time order (the backward branch
walks from the last step to the first), each writing its own half of ``y [batch, L, 2E]``; gating
and the average happen outside, where both halves meet. The forward pass saves the state at the
start of every chunk of ``T`` steps. The backward pass walks the chunks in reverse: it recomputes a
chunk's states from the saved one into shared memory, then runs the adjoint back through it. The
only cross-channel sums (the gradients of ``B`` and ``C``, shared by all channels of a direction)
are reduced across the program's channels, then added into fp32 buffers atomically.

Layouts are channel-last, as the projections produce them: ``u`` is ``[batch, L, 2E]`` (forward
branch channels first); ``dt_f``, ``dt_b`` (dt_proj outputs before bias and softplus) and ``g`` are
``[batch, L, E]``; ``bc_f``, ``bc_b`` point at ``B`` of each row with ``C`` the ``N`` entries after it.
"""
from __future__ import annotations

import math

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.extra import libdevice

LOG2E = math.log2(math.e)
LN2 = gl.constexpr(math.log(2.0))


@gluon.jit
def _softplus(x):
    """``torch.nn.functional.softplus`` (threshold 20)."""
    return gl.where(x > 20.0, x, libdevice.log1p(gl.exp(x)))


@gluon.jit
def _sigmoid(x):
    return 1.0 / (1.0 + gl.exp(-x))


@gluon.jit
def _put_column(tile, values, offs, i: gl.constexpr):
    """``tile[:, i] = values`` for a chunk tile held in registers (the select folds away at compile time)."""
    col = gl.convert_layout(values, gl.SliceLayout(1, tile.type.layout))
    return gl.where(offs[None, :] == i, col[:, None], tile)


@gluon.jit
def _put_row(tile, values, offs, i: gl.constexpr):
    """``tile[i, :] = values``."""
    row = gl.convert_layout(values, gl.SliceLayout(0, tile.type.layout))
    return gl.where(offs[:, None] == i, row[None, :], tile)


@gluon.jit
def _tile_rows(base, ch, tile_layout: gl.constexpr):
    """``[BD, 1]`` pointers ``base + ch`` in a chunk tile's layout."""
    return base + gl.convert_layout(ch, gl.SliceLayout(1, tile_layout))[:, None]


@gluon.jit
def _scan_fwd_kernel(
        u_ptr, dt_f_ptr, dt_b_ptr, bias_ptr, bc_f_ptr, bc_b_ptr, a_ptr, d_ptr, y_ptr, ckpt_ptr,
        length, dim, num_chunks,
        su_b, su_l, sdt_b, sdt_l, sbc_b, sbc_l, sy_b, sy_l,
        N: gl.constexpr, T: gl.constexpr, WARPS: gl.constexpr):
    state_layout: gl.constexpr = gl.BlockedLayout([1, N], [32, 1], [WARPS, 1], [1, 0])
    tile_layout: gl.constexpr = gl.BlockedLayout([1, T], [32, 1], [WARPS, 1], [1, 0])  # a chunk of one channel per thread
    BD: gl.constexpr = 32 * WARPS
    pid_d = gl.program_id(0)
    pid_b = gl.program_id(1).to(gl.int64)
    direction = gl.program_id(2)
    offs_d = pid_d * BD + gl.arange(0, BD, layout=gl.SliceLayout(1, state_layout))
    offs_n = gl.arange(0, N, layout=gl.SliceLayout(0, state_layout))
    d_mask = offs_d < dim
    ch = offs_d + direction * dim
    dn_off = ch[:, None] * N + offs_n[None, :]
    dn_mask = d_mask[:, None] & (offs_n[None, :] < N)
    A = gl.load(a_ptr + dn_off, mask=dn_mask, other=0.0)  # log2-scaled
    d_skip = gl.load(d_ptr + ch, mask=d_mask, other=0.0)
    bias = gl.load(bias_ptr + ch, mask=d_mask, other=0.0)
    forward = direction == 0
    u_base = u_ptr + pid_b * su_b + ch
    dt_base = gl.where(forward, dt_f_ptr, dt_b_ptr) + pid_b * sdt_b + offs_d
    bc_base = gl.where(forward, bc_f_ptr, bc_b_ptr) + pid_b * sbc_b + offs_n
    ckpt_base = ckpt_ptr + pid_b * num_chunks * 2 * dim * N + dn_off
    offs_t = gl.arange(0, T, layout=gl.SliceLayout(0, tile_layout))
    y_rows = _tile_rows(y_ptr + pid_b * sy_b, ch, tile_layout)
    tile_mask = gl.convert_layout(d_mask, gl.SliceLayout(1, tile_layout))[:, None]
    h = gl.zeros([BD, N], gl.float32, state_layout)
    for chunk in range(num_chunks):
        gl.store(ckpt_base + chunk * 2 * dim * N, h, mask=dn_mask)
        y_tile = gl.zeros([BD, T], gl.float32, tile_layout)
        for i in gl.static_range(T):
            p = chunk * T + i  # position in scan order
            valid = p < length
            t = gl.where(forward, p, length - 1 - p)
            m = d_mask & valid
            u = gl.load(u_base + t * su_l, mask=m, other=0.0).to(gl.float32)
            raw = gl.load(dt_base + t * sdt_l, mask=m, other=0.0).to(gl.float32)
            delta = gl.where(m, _softplus(raw + bias), 0.0)
            n_mask = (offs_n < N) & valid
            B = gl.load(bc_base + t * sbc_l, mask=n_mask, other=0.0).to(gl.float32)
            C = gl.load(bc_base + t * sbc_l + N, mask=n_mask, other=0.0).to(gl.float32)
            h = gl.exp2(delta[:, None] * A) * h + (delta * u)[:, None] * B[None, :]
            y = gl.sum(h * C[None, :], axis=1) + d_skip * u
            y_tile = _put_column(y_tile, y, offs_t, i)
        # one store per chunk: a store between steps would keep the next step's loads from being issued early
        p_t = chunk * T + offs_t
        t_t = gl.where(forward, p_t, length - 1 - p_t)
        gl.store(y_rows + t_t[None, :] * sy_l, y_tile.to(y_ptr.dtype.element_ty), mask=tile_mask & (p_t < length)[None, :])


@gluon.jit
def _scan_bwd_kernel(
        u_ptr, dt_f_ptr, dt_b_ptr, bias_ptr, bc_f_ptr, bc_b_ptr, a_ptr, d_ptr, g_ptr, ckpt_ptr,
        du_ptr, ddt_f_ptr, ddt_b_ptr, dbc_ptr, da_ptr, dd_ptr, dbias_ptr,
        length, dim, num_chunks,
        su_b, su_l, sdt_b, sdt_l, sbc_b, sbc_l, sg_b, sg_l,
        N: gl.constexpr, T: gl.constexpr, WARPS: gl.constexpr):
    state_layout: gl.constexpr = gl.BlockedLayout([1, N], [32, 1], [WARPS, 1], [1, 0])
    tile_layout: gl.constexpr = gl.BlockedLayout([1, T], [32, 1], [WARPS, 1], [1, 0])
    # channels in registers, states on lanes: the sum over channels for dB / dC is mostly in-thread
    reduce_layout: gl.constexpr = gl.BlockedLayout([N, 1], [32 // N, N], [WARPS, 1], [0, 1])
    bc_tile_layout: gl.constexpr = gl.BlockedLayout([T, 1], [32 // N, N], [WARPS, 1], [0, 1])
    history_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0, 1])  # channels fastest
    BD: gl.constexpr = 32 * WARPS
    pid_d = gl.program_id(0)
    pid_b = gl.program_id(1).to(gl.int64)
    direction = gl.program_id(2)
    offs_d = pid_d * BD + gl.arange(0, BD, layout=gl.SliceLayout(1, state_layout))
    offs_n = gl.arange(0, N, layout=gl.SliceLayout(0, state_layout))
    offs_t = gl.arange(0, T, layout=gl.SliceLayout(0, tile_layout))
    offs_tr = gl.arange(0, T, layout=gl.SliceLayout(1, bc_tile_layout))
    offs_nr = gl.arange(0, N, layout=gl.SliceLayout(0, bc_tile_layout))
    d_mask = offs_d < dim
    ch = offs_d + direction * dim
    dn_off = ch[:, None] * N + offs_n[None, :]
    dn_mask = d_mask[:, None] & (offs_n[None, :] < N)
    A = gl.load(a_ptr + dn_off, mask=dn_mask, other=0.0)  # log2-scaled
    d_skip = gl.load(d_ptr + ch, mask=d_mask, other=0.0)
    bias = gl.load(bias_ptr + ch, mask=d_mask, other=0.0)
    forward = direction == 0
    u_base = u_ptr + pid_b * su_b + ch
    dt_base = gl.where(forward, dt_f_ptr, dt_b_ptr) + pid_b * sdt_b + offs_d
    bc_base = gl.where(forward, bc_f_ptr, bc_b_ptr) + pid_b * sbc_b + offs_n
    g_base = g_ptr + pid_b * sg_b + offs_d
    du_rows = _tile_rows(du_ptr + pid_b * su_b, ch, tile_layout)
    ddt_rows = _tile_rows(gl.where(forward, ddt_f_ptr, ddt_b_ptr) + pid_b * sdt_b, offs_d, tile_layout)
    tile_mask = gl.convert_layout(d_mask, gl.SliceLayout(1, tile_layout))[:, None]
    dbc_base = dbc_ptr + (pid_b * length * 2 + direction) * 2 * N + offs_nr[None, :]
    ckpt_base = ckpt_ptr + pid_b * num_chunks * 2 * dim * N + dn_off
    history = gl.allocate_shared_memory(gl.float32, [T, BD, N], history_layout)

    lam_next = gl.zeros([BD, N], gl.float32, state_layout)  # decay_{p+1} * dL/dh_{p+1}
    dA_acc = gl.zeros([BD, N], gl.float32, state_layout)
    dD_acc = gl.zeros([BD], gl.float32, gl.SliceLayout(1, state_layout))
    dbias_acc = gl.zeros([BD], gl.float32, gl.SliceLayout(1, state_layout))
    for k in range(num_chunks):
        chunk = num_chunks - 1 - k  # the adjoint runs against the scan
        # states of the chunk, restarted from the saved chunk-entry state; history[i] = h before step i
        h = gl.load(ckpt_base + chunk * 2 * dim * N, mask=dn_mask, other=0.0)
        for i in gl.static_range(T):
            p = chunk * T + i
            valid = p < length
            t = gl.where(forward, p, length - 1 - p)
            m = d_mask & valid
            u = gl.load(u_base + t * su_l, mask=m, other=0.0).to(gl.float32)
            raw = gl.load(dt_base + t * sdt_l, mask=m, other=0.0).to(gl.float32)
            delta = gl.where(m, _softplus(raw + bias), 0.0)
            B = gl.load(bc_base + t * sbc_l, mask=(offs_n < N) & valid, other=0.0).to(gl.float32)
            history.index(i).store(h)
            h = gl.exp2(delta[:, None] * A) * h + (delta * u)[:, None] * B[None, :]
        # the adjoint through the chunk; outputs gathered in registers and written once per chunk
        du_tile = gl.zeros([BD, T], gl.float32, tile_layout)
        ddt_tile = gl.zeros([BD, T], gl.float32, tile_layout)
        dB_tile = gl.zeros([T, N], gl.float32, bc_tile_layout)
        dC_tile = gl.zeros([T, N], gl.float32, bc_tile_layout)
        for j in gl.static_range(T):
            p = chunk * T + (T - 1 - j)
            valid = p < length
            t = gl.where(forward, p, length - 1 - p)
            m = d_mask & valid
            u = gl.load(u_base + t * su_l, mask=m, other=0.0).to(gl.float32)
            x = gl.load(dt_base + t * sdt_l, mask=m, other=0.0).to(gl.float32) + bias
            delta = gl.where(m, _softplus(x), 0.0)
            g = gl.load(g_base + t * sg_l, mask=m, other=0.0).to(gl.float32)
            n_mask = (offs_n < N) & valid
            B = gl.load(bc_base + t * sbc_l, mask=n_mask, other=0.0).to(gl.float32)
            C = gl.load(bc_base + t * sbc_l + N, mask=n_mask, other=0.0).to(gl.float32)
            decay = gl.exp2(delta[:, None] * A)
            h_prev = history.index(T - 1 - j).load(state_layout)
            drive = delta * u
            lam = lam_next + g[:, None] * C[None, :]
            lam_B = gl.sum(lam * B[None, :], axis=1)
            carried = lam * decay * h_prev
            d_delta = gl.sum(carried * A, axis=1) * LN2 + u * lam_B
            d_raw = gl.where(m, d_delta * _sigmoid(x), 0.0)
            dA_acc += carried * delta[:, None]
            dD_acc += g * u
            dbias_acc += d_raw
            du_tile = _put_column(du_tile, delta * lam_B + d_skip * g, offs_t, T - 1 - j)
            ddt_tile = _put_column(ddt_tile, d_raw, offs_t, T - 1 - j)
            h_cur = decay * h_prev + drive[:, None] * B[None, :]
            dB = gl.sum(gl.convert_layout(lam * drive[:, None], reduce_layout), axis=0)
            dC = gl.sum(gl.convert_layout(h_cur * g[:, None], reduce_layout), axis=0)
            dB_tile = _put_row(dB_tile, dB, offs_tr, T - 1 - j)
            dC_tile = _put_row(dC_tile, dC, offs_tr, T - 1 - j)
            lam_next = decay * lam
        p_t = chunk * T + offs_t
        t_t = gl.where(forward, p_t, length - 1 - p_t)
        t_mask = tile_mask & (p_t < length)[None, :]
        gl.store(du_rows + t_t[None, :] * su_l, du_tile.to(du_ptr.dtype.element_ty), mask=t_mask)
        gl.store(ddt_rows + t_t[None, :] * sdt_l, ddt_tile.to(ddt_f_ptr.dtype.element_ty), mask=t_mask)
        p_r = chunk * T + offs_tr
        t_r = gl.where(forward, p_r, length - 1 - p_r)
        r_mask = (p_r < length)[:, None] & (offs_nr[None, :] < N)
        dbc_rows = dbc_base + t_r[:, None] * 4 * N
        gl.atomic_add(dbc_rows, dB_tile, mask=r_mask, sem="relaxed")
        gl.atomic_add(dbc_rows + N, dC_tile, mask=r_mask, sem="relaxed")
    gl.store(da_ptr + pid_b * 2 * dim * N + dn_off, dA_acc, mask=dn_mask)
    gl.store(dd_ptr + pid_b * 2 * dim + ch, dD_acc, mask=d_mask)
    gl.store(dbias_ptr + pid_b * 2 * dim + ch, dbias_acc, mask=d_mask)


def _config(dim: int, d_state: int) -> dict:
    return dict(T=8, WARPS=1)


def _check(u, dt_f, dt_b, bc_f, bc_b, A2):
    d_state = A2.shape[1]
    if d_state & (d_state - 1) or d_state > 32:
        raise ValueError(f"the Gluon scan needs d_state a power of two <= 32, got {d_state}")
    if not u.is_contiguous():
        raise ValueError("u must be contiguous")
    for name, t in (("u", u), ("dt_f", dt_f), ("dt_b", dt_b), ("bc_f", bc_f), ("bc_b", bc_b)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along its last dim, got strides {t.stride()}")
    if dt_f.stride() != dt_b.stride() or bc_f.stride() != bc_b.stride():
        raise ValueError("the two directions' dt / B,C tensors must share strides")


def scan_fwd(u, dt_f, dt_b, dt_bias, bc_f, bc_b, A2, D, config: dict | None = None):
    """Both directions' ``y`` (before gating, ``D`` skip included) as ``[batch, L, 2E]`` (dtype of u)
    and the chunk-entry states ``[batch, chunks, 2E, N]`` (fp32) for the backward pass.

    ``bc_f`` / ``bc_b`` are ``[batch, L, 2N]`` views (B then C); ``A2 = -exp(A_log) * log2(e)``;
    ``dt_bias``, ``D`` are fp32 ``[2E]``.
    """
    _check(u, dt_f, dt_b, bc_f, bc_b, A2)
    batch, length, dim2 = u.shape
    dim, d_state = dim2 // 2, A2.shape[1]
    cfg = dict(_config(dim, d_state), **(config or {}))
    num_chunks = triton.cdiv(length, cfg["T"])
    y = torch.empty(batch, length, dim2, device=u.device, dtype=u.dtype)
    ckpt = torch.empty(batch, num_chunks, dim2, d_state, device=u.device, dtype=torch.float32)
    grid = (triton.cdiv(dim, 32 * cfg["WARPS"]), batch, 2)
    _scan_fwd_kernel[grid](
        u, dt_f, dt_b, dt_bias, bc_f, bc_b, A2, D, y, ckpt, length, dim, num_chunks,
        u.stride(0), u.stride(1), dt_f.stride(0), dt_f.stride(1), bc_f.stride(0), bc_f.stride(1),
        y.stride(0), y.stride(1), N=d_state, num_warps=cfg["WARPS"], **cfg)
    return y, ckpt


def scan_bwd(u, dt_f, dt_b, dt_bias, bc_f, bc_b, A2, D, ckpt, g, config: dict | None = None):
    """Gradients of :func:`scan_fwd` given ``g = dL/dy`` per channel of ``E`` (both directions see the same).

    Returns ``du`` (dtype of u), ``ddt_f, ddt_b`` (gradients of the dt_proj outputs, through bias and
    softplus; dtype of dt), ``dBC`` fp32 ``[batch, L, 2 (direction), 2 (B, C), N]``, and fp32
    per-batch partial sums ``dA [batch, 2E, N]`` (w.r.t. the natural-log ``A``), ``dD`` and
    ``dbias`` ``[batch, 2E]``.
    """
    _check(u, dt_f, dt_b, bc_f, bc_b, A2)
    batch, length, dim2 = u.shape
    dim, d_state = dim2 // 2, A2.shape[1]
    cfg = dict(_config(dim, d_state), **(config or {}))
    num_chunks = triton.cdiv(length, cfg["T"])
    if ckpt.shape != (batch, num_chunks, dim2, d_state):
        raise ValueError(f"checkpoint shape {tuple(ckpt.shape)} does not match the config's chunking")
    g = g if g.stride(-1) == 1 else g.contiguous()
    du = torch.empty_like(u)
    ddt_f = torch.empty(batch, length, dim, device=u.device, dtype=dt_f.dtype)
    ddt_b = torch.empty_like(ddt_f)
    if dt_f.stride() != ddt_f.stride():  # the kernel shares their strides
        dt_f, dt_b = dt_f.contiguous(), dt_b.contiguous()
    dBC = torch.zeros(batch, length, 2, 2, d_state, device=u.device, dtype=torch.float32)
    dA = torch.empty(batch, dim2, d_state, device=u.device, dtype=torch.float32)
    dD = torch.empty(batch, dim2, device=u.device, dtype=torch.float32)
    dbias = torch.empty_like(dD)
    grid = (triton.cdiv(dim, 32 * cfg["WARPS"]), batch, 2)
    _scan_bwd_kernel[grid](
        u, dt_f, dt_b, dt_bias, bc_f, bc_b, A2, D, g, ckpt, du, ddt_f, ddt_b, dBC, dA, dD, dbias,
        length, dim, num_chunks,
        u.stride(0), u.stride(1), dt_f.stride(0), dt_f.stride(1), bc_f.stride(0), bc_f.stride(1),
        g.stride(0), g.stride(1), N=d_state, num_warps=cfg["WARPS"], **cfg)
    return du, ddt_f, ddt_b, dBC, dA, dD, dbias
