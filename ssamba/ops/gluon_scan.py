"""Gluon kernels for the bidirectional selective scan: one channel per thread, its states in registers.

Triton's implicit layouts spread the state axis over lanes, so every per-channel quantity was
computed once per state and every sum over states took shuffles (docs/performance.md, optimisation
log). Gluon fixes the layout by hand: a thread owns one channel of one direction and all ``N`` of
its states (or half of them, ``SPLIT=2``, a configuration ``bench/layer.py --sweep`` times), so the
recurrence, the softplus of ``delta``, the sums over states and the ``D`` skip are register
arithmetic, and time is a sequential loop. A chunk's inputs (``u``, dt, B, C and, backward, the
output gradient) are copied into shared memory asynchronously while the previous chunk runs, so a
step reads shared memory instead of waiting on global loads. Every thread reads the whole row of B
and C at every step, so once a chunk's rows have landed its 16-bit B rows (and, in the forward, C
rows) are widened to fp32 in shared memory, once, instead of by every thread at every step. The
backward widens B only: an fp32 C (docs/performance.md, optimisation log, step 28) made it 5% faster
over the tiny model's grid and 10% slower over the base model's.

The two directions run in separate programs over the original time order (the backward branch
walks from the last step to the first), each writing its own half of ``y [batch, L, 2E]``; gating
and the average happen outside, where both halves meet. The forward pass saves the state at the
start of every chunk of ``T`` steps. The backward pass walks the chunks in reverse: it recomputes a
chunk's states from the saved one, keeping every other one in shared memory, then runs the adjoint
back through it in pairs of steps. The only cross-channel sums (the gradients of ``B`` and ``C``,
shared by all channels of a direction) are reduced across the program's channels, then added into
fp32 buffers atomically.

Layouts are channel-last, as the projections produce them: ``u`` is ``[batch, L, 2E]`` (forward
branch channels first), and so is ``dt`` (the dt_proj outputs before bias and softplus, both
directions' from one matmul); ``g`` is ``[batch, L, E]``; ``bc`` is ``[batch, L, 2 (direction), 2N]``,
each direction's ``B`` then ``C``.
"""
from __future__ import annotations

import math

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

LOG2E = gl.constexpr(math.log2(math.e))
LN2 = gl.constexpr(math.log(2.0))


@gluon.jit
def _log2_approx(x):
    """The hardware's base-2 logarithm (``lg2.approx``, relative error ~1e-7 away from 1)."""
    return gl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=True,
                                     pack=1)


@gluon.jit
def _softplus_sigmoid(x):
    """``softplus(x)`` (threshold 20, as ``torch.nn.functional.softplus``) and its derivative
    ``sigmoid(x)``, from one exponential. ``log1p(e)`` is a short series where ``e = exp(x) < 0.05``
    (truncation ~5e-8 relative) and the hardware logarithm of ``1 + e`` above, where rounding ``1 + e``
    costs at most ~1e-6 relative: a fraction of the instructions of a libdevice ``log1p``."""
    e = gl.exp2(x * LOG2E)
    series = e * (1.0 + e * (-0.5 + e * (1.0 / 3.0 + e * (-0.25 + e * 0.2))))
    softplus = gl.where(x > 20.0, x, gl.where(e < 0.05, series, _log2_approx(1.0 + e) * LN2))
    sigmoid = gl.where(x > 20.0, 1.0, e / (1.0 + e))
    return softplus, sigmoid


@gluon.jit
def _put_column(tile, values, offs, i: gl.constexpr):
    """``tile[:, i] = values`` for a chunk tile held in registers (the select folds away at compile time)."""
    col = gl.convert_layout(values, gl.SliceLayout(1, tile.type.layout))
    return gl.where(offs[None, :] == i, col[:, None], tile)


@gluon.jit
def _pair(first, second, offs):
    """Two per-channel vectors as the columns of a ``[BD, 2]`` tile (layout of ``offs``' parent)."""
    layout: gl.constexpr = gl.SliceLayout(1, offs.type.layout.parent)
    a = gl.convert_layout(first, layout)[:, None]
    b = gl.convert_layout(second, layout)[:, None]
    return gl.where(offs[None, :] == 0, a, b)


@gluon.jit
def _pair_rows(first, second, offs, layout: gl.constexpr):
    """Two per-state vectors as the rows of a ``[2, N]`` tile."""
    a = gl.convert_layout(first, gl.SliceLayout(0, layout))[None, :]
    b = gl.convert_layout(second, gl.SliceLayout(0, layout))[None, :]
    return gl.where(offs[:, None] == 0, a, b)


@gluon.jit
def _tile_rows(base, ch, tile_layout: gl.constexpr):
    """``[BD, 1]`` pointers ``base + ch`` in a chunk tile's layout."""
    return base + gl.convert_layout(ch, gl.SliceLayout(1, tile_layout))[:, None]


@gluon.constexpr_function
def _copy_layout(width, bits, T, warps):
    """Layout of a ``[T, width]`` tile for asynchronous copies: each thread moves up to 16 contiguous
    bytes of a row (at least 4, the smallest copy), rows spread over the remaining lanes and warps."""
    vec = min(128 // bits, width)
    while vec * bits > 32 and 32 // min(width // vec, 32) * warps > T:
        vec //= 2  # narrower copies, so the lanes cover the tile's rows instead of repeating them
    lanes = min(width // vec, 32)
    return gl.BlockedLayout([1, vec], [32 // lanes, lanes], [warps, 1], [1, 0])


@gluon.jit
def _copy_rows(ptr, first_col, n_cols, width: gl.constexpr, T: gl.constexpr, WARPS: gl.constexpr):
    """``[1, width]`` pointers to columns ``first_col ...`` of a row at ``ptr``, and their mask."""
    layout: gl.constexpr = _copy_layout(width, ptr.dtype.element_ty.primitive_bitwidth, T, WARPS)
    cols = first_col + gl.arange(0, width, layout=gl.SliceLayout(0, layout))
    return (ptr + cols)[None, :], (cols < n_cols)[None, :]


@gluon.jit
def _staging(dtype: gl.constexpr, width: gl.constexpr, T: gl.constexpr):
    """Two slots of ``T`` rows each for a chunk's copies, and a view of the same memory as single rows."""
    slots = gl.allocate_shared_memory(dtype, [2 * T, width], gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
    return slots, slots._reinterpret(dtype, [2 * T, width], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))


@gluon.jit
def _stage(slots, slot, rows, mask, stride, chunk, length, forward, T: gl.constexpr):
    """Starts copying one chunk's rows, in scan order, into slot ``slot`` of ``slots``. Positions past
    the end of the sequence copy its last row: finite values, which the consumer masks out."""
    p = chunk * T + gl.arange(0, T, layout=gl.SliceLayout(1, rows.type.layout))
    src = rows + gl.minimum(gl.maximum(gl.where(forward, p, length - 1 - p), 0), length - 1)[:, None] * stride
    if slot == 0:  # a copy's destination must be a static slice
        async_copy.async_copy_global_to_shared(slots.slice(0, T), src, mask=mask)
    else:
        async_copy.async_copy_global_to_shared(slots.slice(T, T), src, mask=mask)


@gluon.jit
def _widened(N: gl.constexpr, T: gl.constexpr):
    """An fp32 copy of one chunk's ``T`` rows of B (or C), and a view of it as single rows."""
    rows = gl.allocate_shared_memory(gl.float32, [T, N], gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
    return rows, rows._reinterpret(gl.float32, [T, N], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))


@gluon.jit
def _widen(slots, slot, wide, N: gl.constexpr, T: gl.constexpr, WARPS: gl.constexpr):
    """Slot ``slot``'s staged rows of ``slots`` into ``wide`` as fp32, once a chunk, so that the steps read
    them without converting (exact: every 16-bit float is an fp32 one)."""
    layout: gl.constexpr = _copy_layout(N, slots.dtype.primitive_bitwidth, T, WARPS)
    by_slot = slots._reinterpret(slots.dtype, [2, T, N], gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
    wide.store(by_slot.index(slot).load(layout).to(gl.float32))


@gluon.jit
def _scan_inputs(u_ptr, dt_ptr, bc_ptr, a_f_ptr, a_b_ptr, d_f_ptr, d_b_ptr, bias_f_ptr, bias_b_ptr,
                 ckpt_ptr, dim, num_chunks, su_b, su_l, sdt_b, sdt_l, sbc_b, sbc_l, N: gl.constexpr, T: gl.constexpr,
                 BD: gl.constexpr, WARPS: gl.constexpr, state_layout: gl.constexpr):
    """What both kernels derive from the program id: the batch row, the direction, this block of
    channels with its masks, the direction's ``A``, ``D`` and dt bias, the base of its saved
    chunk-entry states, and the rows the chunk copies read (``u``, dt, B, C: pointers and masks)."""
    pid_b = gl.program_id(1).to(gl.int64)
    direction = gl.program_id(2)
    first = gl.program_id(0) * BD
    offs_d = first + gl.arange(0, BD, layout=gl.SliceLayout(1, state_layout))
    offs_n = gl.arange(0, N, layout=gl.SliceLayout(0, state_layout))
    d_mask = offs_d < dim
    ch = offs_d + direction * dim
    dn_off = ch[:, None] * N + offs_n[None, :]
    dn_mask = d_mask[:, None] & (offs_n[None, :] < N)
    forward = direction == 0
    a_ptr = gl.where(forward, a_f_ptr, a_b_ptr)
    A_log = gl.load(a_ptr + offs_d[:, None] * N + offs_n[None, :], mask=dn_mask, other=0.0).to(gl.float32)
    d_skip = gl.load(gl.where(forward, d_f_ptr, d_b_ptr) + offs_d, mask=d_mask, other=0.0).to(gl.float32)
    bias = gl.load(gl.where(forward, bias_f_ptr, bias_b_ptr) + offs_d, mask=d_mask, other=0.0).to(gl.float32)
    A = -gl.exp(A_log) * LOG2E
    ckpt_base = ckpt_ptr + pid_b * num_chunks * 2 * dim * N + dn_off
    u_rows, u_mask = _copy_rows(u_ptr + pid_b * su_b + direction * dim, first, dim, BD, T, WARPS)
    dt_rows, dt_mask = _copy_rows(dt_ptr + pid_b * sdt_b + direction * dim, first, dim, BD, T, WARPS)
    b_rows, bc_mask = _copy_rows(bc_ptr + pid_b * sbc_b + direction * 2 * N, 0, N, N, T, WARPS)
    return (pid_b, direction, forward, offs_d, offs_n, d_mask, ch, dn_off, dn_mask, A, d_skip, bias, ckpt_base,
            u_rows, u_mask, dt_rows, dt_mask, b_rows, bc_mask)


@gluon.jit
def _stage_chunk(u_s, dt_s, b_s, c_s, slot, u_rows, u_mask, dt_rows, dt_mask, b_rows, bc_mask, su_l, sdt_l, sbc_l,
                 chunk, length, forward, N: gl.constexpr, T: gl.constexpr):
    """Starts the copies of a chunk's ``u``, dt, B and C into one slot of the staging buffers."""
    _stage(u_s, slot, u_rows, u_mask, su_l, chunk, length, forward, T)
    _stage(dt_s, slot, dt_rows, dt_mask, sdt_l, chunk, length, forward, T)
    _stage(b_s, slot, b_rows, bc_mask, sbc_l, chunk, length, forward, T)
    _stage(c_s, slot, b_rows + N, bc_mask, sbc_l, chunk, length, forward, T)


@gluon.jit
def _staged_rows(u_r, b_w, c_rows, row, j, c_row, m, state_layout: gl.constexpr):
    """In fp32: staged row ``row`` (slot * T + j) of ``u`` (zero where ``m`` is false), step ``j``'s row of
    B from the chunk's fp32 copy (:func:`_widen`), and row ``c_row`` of ``c_rows``, C's fp32 copy
    (forward, ``c_row = j``) or its staged rows (backward, ``c_row = row``)."""
    u = gl.where(m, u_r.index(row).load(gl.SliceLayout(1, state_layout)).to(gl.float32), 0.0)
    B = b_w.index(j).load(gl.SliceLayout(0, state_layout))
    C = c_rows.index(c_row).load(gl.SliceLayout(0, state_layout)).to(gl.float32)
    return u, B, C


@gluon.jit
def _staged_step(u_r, dt_r, b_w, c_rows, row, j, c_row, m, bias, state_layout: gl.constexpr):
    """Staged row ``row`` (step ``j`` of the chunk): u, delta, its derivative w.r.t. the dt_proj output
    (``sigmoid`` of it with the bias added), B and C (``u`` and delta zero where ``m`` is false)."""
    u, B, C = _staged_rows(u_r, b_w, c_rows, row, j, c_row, m, state_layout)
    softplus, sigmoid = _softplus_sigmoid(dt_r.index(row).load(gl.SliceLayout(1, state_layout)).to(gl.float32)
                                          + bias)
    return u, gl.where(m, softplus, 0.0), sigmoid, B, C


@gluon.jit
def _replayed_step(u_r, b_w, c_r, delta_s, sigmoid_s, row, j, m, state_layout: gl.constexpr):
    """Step ``j`` of the chunk again, in the adjoint: what :func:`_staged_step` gave the recompute
    pass, with delta and its derivative read back from where that pass kept them."""
    u, B, C = _staged_rows(u_r, b_w, c_r, row, j, row, m, state_layout)
    channels: gl.constexpr = gl.SliceLayout(1, state_layout)
    return u, delta_s.index(j).load(channels), sigmoid_s.index(j).load(channels), B, C


@gluon.jit
def _scan_fwd_kernel(
        u_ptr, dt_ptr, bc_ptr, a_f_ptr, a_b_ptr, d_f_ptr, d_b_ptr, bias_f_ptr, bias_b_ptr,
        y_ptr, ckpt_ptr,
        length, num_chunks,
        dim_a, su_b_a, su_l_a, sdt_b_a, sdt_l_a, sbc_b_a, sbc_l_a, sy_b, sy_l,
        N: gl.constexpr, T: gl.constexpr, TS: gl.constexpr, SPLIT: gl.constexpr, WARPS: gl.constexpr,
        ALIGN: gl.constexpr):
    """``*_a`` arguments are in units of ``ALIGN`` elements, so the compiler knows the copies' alignment."""
    dim, su_b, su_l, sdt_b, sdt_l = dim_a * ALIGN, su_b_a * ALIGN, su_l_a * ALIGN, sdt_b_a * ALIGN, sdt_l_a * ALIGN
    sbc_b, sbc_l = sbc_b_a * ALIGN, sbc_l_a * ALIGN
    state_layout: gl.constexpr = gl.BlockedLayout([1, N // SPLIT], [32 // SPLIT, SPLIT], [WARPS, 1], [1, 0])
    # TS steps of one channel per thread
    tile_layout: gl.constexpr = gl.BlockedLayout([1, TS], [32 // SPLIT, SPLIT], [WARPS, 1], [1, 0])
    BD: gl.constexpr = 32 // SPLIT * WARPS
    (pid_b, direction, forward, offs_d, offs_n, d_mask, ch, dn_off, dn_mask, A, d_skip, bias, ckpt_base,
     u_rows, u_mask, dt_rows, dt_mask, b_rows, bc_mask) = _scan_inputs(
        u_ptr, dt_ptr, bc_ptr, a_f_ptr, a_b_ptr, d_f_ptr, d_b_ptr, bias_f_ptr, bias_b_ptr, ckpt_ptr, dim,
        num_chunks, su_b, su_l, sdt_b, sdt_l, sbc_b, sbc_l, N, T, BD, WARPS, state_layout)
    u_s, u_r = _staging(u_ptr.dtype.element_ty, BD, T)
    dt_s, dt_r = _staging(dt_ptr.dtype.element_ty, BD, T)
    b_s = _staging(bc_ptr.dtype.element_ty, N, T)[0]
    c_s = _staging(bc_ptr.dtype.element_ty, N, T)[0]
    b_wide, b_w = _widened(N, T)
    c_wide, c_w = _widened(N, T)
    offs_t = gl.arange(0, TS, layout=gl.SliceLayout(0, tile_layout))
    y_rows = _tile_rows(y_ptr + pid_b * sy_b, ch, tile_layout)
    tile_mask = gl.convert_layout(d_mask, gl.SliceLayout(1, tile_layout))[:, None]
    h = gl.zeros([BD, N], gl.float32, state_layout)
    _stage_chunk(u_s, dt_s, b_s, c_s, 0, u_rows, u_mask, dt_rows, dt_mask, b_rows, bc_mask, su_l, sdt_l, sbc_l, 0,
                 length, forward, N, T)
    async_copy.commit_group()
    for chunk in range(num_chunks):
        slot = chunk % 2
        # the next chunk's copies run during this one's steps (into the slot the previous chunk read)
        gl.thread_barrier()
        _stage_chunk(u_s, dt_s, b_s, c_s, 1 - slot, u_rows, u_mask, dt_rows, dt_mask, b_rows, bc_mask, su_l, sdt_l,
                     sbc_l, gl.minimum(chunk + 1, num_chunks - 1), length, forward, N, T)
        async_copy.commit_group()
        async_copy.wait_group(1)
        gl.thread_barrier()
        _widen(b_s, slot, b_wide, N, T, WARPS)
        _widen(c_s, slot, c_wide, N, T, WARPS)
        gl.thread_barrier()
        gl.store(ckpt_base + chunk * 2 * dim * N, h.to(ckpt_ptr.dtype.element_ty), mask=dn_mask)
        # groups of TS unrolled steps, their outputs stored together
        for group in range(T // TS):
            p0 = chunk * T + group * TS
            y_tile = gl.zeros([BD, TS], gl.float32, tile_layout)
            for i in gl.static_range(TS):
                m = d_mask & (p0 + i < length)
                u, delta, _, B, C = _staged_step(u_r, dt_r, b_w, c_w, slot * T + group * TS + i, group * TS + i,
                                                 group * TS + i, m, bias, state_layout)
                h = gl.exp2(delta[:, None] * A) * h + (delta * u)[:, None] * B[None, :]
                y = gl.sum(h * C[None, :], axis=1) + d_skip * u
                y_tile = _put_column(y_tile, y, offs_t, i)
            p_t = p0 + offs_t
            t_t = gl.where(forward, p_t, length - 1 - p_t)
            gl.store(y_rows + t_t[None, :] * sy_l, y_tile.to(y_ptr.dtype.element_ty),
                     mask=tile_mask & (p_t < length)[None, :])
    async_copy.wait_group(0)


@gluon.jit
def _adjoint_step(lam_next, h_prev, h_cur, decay, A, u, delta, sigmoid, g, B, C, m, d_skip,
                  reduce_layout: gl.constexpr):
    """One step of the adjoint: ``lam = dL/dh`` at this step from the next step's decayed one.

    Returns the decayed ``lam`` for the step before, this step's ``du``, ``d(dt before bias)``,
    ``lam * decay * h_prev`` (times delta, this step's contribution to ``dA``), and the channel sums
    ``dB``, ``dC``.
    """
    drive = delta * u
    lam = lam_next + g[:, None] * C[None, :]
    lam_B = gl.sum(lam * B[None, :], axis=1)
    carried = lam * decay * h_prev
    d_delta = gl.sum(carried * A, axis=1) * LN2 + u * lam_B
    d_raw = gl.where(m, d_delta * sigmoid, 0.0)
    du = delta * lam_B + d_skip * g
    dB = gl.sum(gl.convert_layout(lam * drive[:, None], reduce_layout), axis=0)
    dC = gl.sum(gl.convert_layout(h_cur * g[:, None], reduce_layout), axis=0)
    return decay * lam, du, d_raw, carried, dB, dC


@gluon.jit
def _scan_bwd_kernel(
        u_ptr, dt_ptr, bc_ptr, a_f_ptr, a_b_ptr, d_f_ptr, d_b_ptr, bias_f_ptr, bias_b_ptr,
        g_ptr, ckpt_ptr, du_ptr, ddt_ptr, dbc_ptr, dparam_ptr,
        length, num_chunks,
        dim_a, su_b_a, su_l_a, sdt_b_a, sdt_l_a, sbc_b_a, sbc_l_a, sg_b, sg_l,
        N: gl.constexpr, T: gl.constexpr, SPLIT: gl.constexpr, WARPS: gl.constexpr, ALIGN: gl.constexpr):
    """The adjoint walks each chunk's positions in pairs ``(e, e + 1)``, last pair first. Only the state
    before each even position is kept in shared memory (half the memory, so more warps fit): the state
    before ``e + 1`` is one step from it, with inputs the pair reads anyway. ``*_a`` arguments are in
    units of ``ALIGN`` elements, so the compiler knows the copies' alignment."""
    dim, su_b, su_l, sdt_b, sdt_l = dim_a * ALIGN, su_b_a * ALIGN, su_l_a * ALIGN, sdt_b_a * ALIGN, sdt_l_a * ALIGN
    sbc_b, sbc_l = sbc_b_a * ALIGN, sbc_l_a * ALIGN
    state_layout: gl.constexpr = gl.BlockedLayout([1, N // SPLIT], [32 // SPLIT, SPLIT], [WARPS, 1], [1, 0])
    pair_layout: gl.constexpr = gl.BlockedLayout([1, 2], [32 // SPLIT, SPLIT], [WARPS, 1], [1, 0])
    # channels in registers, states on lanes: the sum over channels for dB / dC is mostly in-thread
    reduce_layout: gl.constexpr = gl.BlockedLayout([N // SPLIT, 1], [32 // N, N], [WARPS, 1], [0, 1])
    bc_pair_layout: gl.constexpr = gl.BlockedLayout([2, 1], [32 // N, N], [WARPS, 1], [0, 1])
    history_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0, 1])  # channels fastest
    BD: gl.constexpr = 32 // SPLIT * WARPS
    (pid_b, direction, forward, offs_d, offs_n, d_mask, ch, dn_off, dn_mask, A, d_skip, bias, ckpt_base,
     u_rows, u_mask, dt_rows, dt_mask, b_rows, bc_mask) = _scan_inputs(
        u_ptr, dt_ptr, bc_ptr, a_f_ptr, a_b_ptr, d_f_ptr, d_b_ptr, bias_f_ptr, bias_b_ptr, ckpt_ptr, dim,
        num_chunks, su_b, su_l, sdt_b, sdt_l, sbc_b, sbc_l, N, T, BD, WARPS, state_layout)
    g_rows, g_mask = _copy_rows(g_ptr + pid_b * sg_b, gl.program_id(0) * BD, dim, BD, T, WARPS)
    u_s, u_r = _staging(u_ptr.dtype.element_ty, BD, T)
    dt_s, dt_r = _staging(dt_ptr.dtype.element_ty, BD, T)
    b_s = _staging(bc_ptr.dtype.element_ty, N, T)[0]
    c_s, c_r = _staging(bc_ptr.dtype.element_ty, N, T)
    b_wide, b_w = _widened(N, T)
    g_s, g_r = _staging(g_ptr.dtype.element_ty, BD, T)
    history = gl.allocate_shared_memory(gl.float32, [T // 2, BD, N], history_layout)
    # each step's delta and its derivative, from the recompute pass for the adjoint
    delta_s = gl.allocate_shared_memory(gl.float32, [T, BD], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    sigmoid_s = gl.allocate_shared_memory(gl.float32, [T, BD], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    offs_pair = gl.arange(0, 2, layout=gl.SliceLayout(0, pair_layout))
    offs_pair_r = gl.arange(0, 2, layout=gl.SliceLayout(1, bc_pair_layout))
    offs_nr = gl.arange(0, N, layout=gl.SliceLayout(0, bc_pair_layout))
    du_rows = _tile_rows(du_ptr + pid_b * su_b, ch, pair_layout)
    ddt_rows = _tile_rows(ddt_ptr + pid_b * sdt_b + direction * dim, offs_d, pair_layout)
    pair_mask = gl.convert_layout(d_mask, gl.SliceLayout(1, pair_layout))[:, None]
    dbc_base = dbc_ptr + (pid_b * length * 2 + direction) * 2 * N + offs_nr[None, :]
    channels: gl.constexpr = gl.SliceLayout(1, state_layout)

    lam_next = gl.zeros([BD, N], gl.float32, state_layout)  # decay_{p+1} * dL/dh_{p+1}
    dA_acc = gl.zeros([BD, N], gl.float32, state_layout)
    dD_acc = gl.zeros([BD], gl.float32, channels)
    dbias_acc = gl.zeros([BD], gl.float32, channels)
    _stage_chunk(u_s, dt_s, b_s, c_s, 0, u_rows, u_mask, dt_rows, dt_mask, b_rows, bc_mask, su_l, sdt_l, sbc_l,
                 num_chunks - 1, length, forward, N, T)
    _stage(g_s, 0, g_rows, g_mask, sg_l, num_chunks - 1, length, forward, T)
    async_copy.commit_group()
    for k in range(num_chunks):
        chunk = num_chunks - 1 - k  # the adjoint runs against the scan
        slot = k % 2
        # the next chunk's copies run during this one (into the slot read by the previous chunk)
        gl.thread_barrier()
        following = gl.maximum(chunk - 1, 0)
        _stage_chunk(u_s, dt_s, b_s, c_s, 1 - slot, u_rows, u_mask, dt_rows, dt_mask, b_rows, bc_mask, su_l, sdt_l,
                     sbc_l, following, length, forward, N, T)
        _stage(g_s, 1 - slot, g_rows, g_mask, sg_l, following, length, forward, T)
        async_copy.commit_group()
        async_copy.wait_group(1)
        gl.thread_barrier()
        _widen(b_s, slot, b_wide, N, T, WARPS)
        gl.thread_barrier()
        row0 = slot * T
        # the chunk's states, restarted from the saved chunk-entry state; history[i] = h before step 2i
        h = gl.load(ckpt_base + chunk * 2 * dim * N, mask=dn_mask, other=0.0).to(gl.float32)
        for pair in range(T // 2):
            history.index(pair).store(h)
            for i in gl.static_range(2):
                m = d_mask & (chunk * T + 2 * pair + i < length)
                row = row0 + 2 * pair + i
                u, delta, sigmoid, B, C = _staged_step(u_r, dt_r, b_w, c_r, row, 2 * pair + i, row, m, bias,
                                                       state_layout)
                delta_s.index(2 * pair + i).store(delta)
                sigmoid_s.index(2 * pair + i).store(sigmoid)
                h = gl.exp2(delta[:, None] * A) * h + (delta * u)[:, None] * B[None, :]
        gl.thread_barrier()
        for q in range(T // 2):
            pair = T // 2 - 1 - q
            p0 = chunk * T + 2 * pair
            m0 = d_mask & (p0 < length)
            m1 = d_mask & (p0 + 1 < length)
            u0, delta0, sig0, B0, C0 = _replayed_step(u_r, b_w, c_r, delta_s, sigmoid_s, row0 + 2 * pair, 2 * pair,
                                                      m0, state_layout)
            u1, delta1, sig1, B1, C1 = _replayed_step(u_r, b_w, c_r, delta_s, sigmoid_s, row0 + 2 * pair + 1,
                                                      2 * pair + 1, m1, state_layout)
            g0 = gl.where(m0, g_r.index(row0 + 2 * pair).load(channels).to(gl.float32), 0.0)
            g1 = gl.where(m1, g_r.index(row0 + 2 * pair + 1).load(channels).to(gl.float32), 0.0)
            h0 = history.index(pair).load(state_layout)  # before p0
            decay0 = gl.exp2(delta0[:, None] * A)
            h1 = decay0 * h0 + (delta0 * u0)[:, None] * B0[None, :]  # after p0, before p0 + 1
            decay1 = gl.exp2(delta1[:, None] * A)
            h2 = decay1 * h1 + (delta1 * u1)[:, None] * B1[None, :]
            lam_next, du1, d_raw1, carried1, dB1, dC1 = _adjoint_step(
                lam_next, h1, h2, decay1, A, u1, delta1, sig1, g1, B1, C1, m1, d_skip, reduce_layout)
            lam_next, du0, d_raw0, carried0, dB0, dC0 = _adjoint_step(
                lam_next, h0, h1, decay0, A, u0, delta0, sig0, g0, B0, C0, m0, d_skip, reduce_layout)
            dA_acc = gl.fma(carried0, delta0[:, None], gl.fma(carried1, delta1[:, None], dA_acc))
            dD_acc += g0 * u0 + g1 * u1
            dbias_acc += d_raw0 + d_raw1
            # both positions' outputs written together
            p_t = p0 + offs_pair
            t_t = gl.where(forward, p_t, length - 1 - p_t)
            t_mask = pair_mask & (p_t < length)[None, :]
            gl.store(du_rows + t_t[None, :] * su_l, _pair(du0, du1, offs_pair).to(du_ptr.dtype.element_ty), mask=t_mask)
            gl.store(ddt_rows + t_t[None, :] * sdt_l, _pair(d_raw0, d_raw1, offs_pair).to(ddt_ptr.dtype.element_ty),
                     mask=t_mask)
            p_r = p0 + offs_pair_r
            t_r = gl.where(forward, p_r, length - 1 - p_r)
            r_mask = (p_r < length)[:, None] & (offs_nr[None, :] < N)
            dbc_rows = dbc_base + t_r[:, None] * 4 * N
            gl.atomic_add(dbc_rows, _pair_rows(dB0, dB1, offs_pair_r, bc_pair_layout), mask=r_mask, sem="relaxed")
            gl.atomic_add(dbc_rows + N, _pair_rows(dC0, dC1, offs_pair_r, bc_pair_layout), mask=r_mask, sem="relaxed")
    async_copy.wait_group(0)
    # parameter gradients summed over the batch: dL/dA_log = dL/dA * A, A = A2 * ln 2
    gl.atomic_add(dparam_ptr + dn_off, dA_acc * A * LN2, mask=dn_mask, sem="relaxed")
    gl.atomic_add(dparam_ptr + 2 * dim * N + ch, dD_acc, mask=d_mask, sem="relaxed")
    gl.atomic_add(dparam_ptr + 2 * dim * (N + 1) + ch, dbias_acc, mask=d_mask, sem="relaxed")


def _config(forward: bool) -> dict:
    """Chunk of ``T`` steps between saved states (half of their states live in shared memory in the
    backward); forward outputs leave registers every ``TS`` steps; one warp per program, one thread per
    channel (``SPLIT=1``). Measured in docs/performance.md (optimisation log, step 27, after B and C became
    fp32 rows): two threads per channel made the d=192 backward 5% slower, which had been its choice
    below 1024 channels, and the forward's registers capped at 128 beat a cap of 96 by 2-3%."""
    if forward:
        return dict(T=16, TS=2, SPLIT=1, WARPS=1, maxnreg=128)
    return dict(T=16, TS=2, SPLIT=1, WARPS=1)


def _launch_options(cfg: dict, keys=("T", "TS", "SPLIT", "WARPS")) -> dict:
    options = {key: cfg[key] for key in keys}
    options["num_warps"] = cfg["WARPS"]
    if cfg.get("maxnreg"):  # caps registers so more warps fit on a multiprocessor
        options["maxnreg"] = cfg["maxnreg"]
    return options


def _check(u, dt, bc, d_state):
    if d_state & (d_state - 1) or not 2 <= d_state <= 32:
        raise ValueError(f"the Gluon scan needs d_state a power of two in [2, 32], got {d_state}")
    if not u.is_contiguous():
        raise ValueError("u must be contiguous")
    if dt.shape != u.shape or dt.stride(-1) != 1:
        raise ValueError(f"dt must be [batch, L, 2E] like u with unit stride along its last dim, got "
                         f"{tuple(dt.shape)} strides {dt.stride()}")
    if bc.stride(-1) != 1:
        raise ValueError(f"bc must have unit stride along its last dim, got strides {bc.stride()}")
    if bc.dim() != 4 or bc.shape[2:] != (2, 2 * d_state) or bc.stride(2) != 2 * d_state:
        raise ValueError(f"bc must be [batch, L, 2 (direction), 2N] with the directions adjacent, got "
                         f"{tuple(bc.shape)} strides {bc.stride()}")


def _aligned(*tensors):
    """The tensors themselves if each one's data starts on 16 bytes (what the kernels' row copies
    assume), else contiguous copies of all of them (they keep sharing strides)."""
    if all(t.data_ptr() % 16 == 0 for t in tensors):
        return tensors
    return tuple(t.clone(memory_format=torch.contiguous_format) for t in tensors)


def _in_alignment_units(u, dt, bc) -> tuple[int, list[int]]:
    """The largest power of two (at most 8) dividing the channel count and every row stride, in
    elements, and those numbers in its units: the kernels take them so, and multiply back, so the
    compiler can vectorise the row copies. The copies move at least 4 bytes, so 16-bit inputs need
    even counts and strides."""
    values = (u.shape[-1] // 2, u.stride(0), u.stride(1), dt.stride(0), dt.stride(1), bc.stride(0), bc.stride(1))
    align = 8
    while align > 1 and any(v % align for v in values):
        align //= 2
    narrowest = min(t.element_size() for t in (u, dt, bc))
    if align * narrowest < 4:
        raise ValueError(f"the Gluon scan copies rows in 4-byte pieces: with {narrowest}-byte inputs the channel "
                         f"count and row strides must be multiples of {4 // narrowest} (channels {values[0]}, "
                         f"strides {values[1:]})")
    return align, [v // align for v in values]


def scan_fwd(u, dt, bc, params, config: dict | None = None):
    """Both directions' ``y`` (before gating, ``D`` skip included) as ``[batch, L, 2E]`` (dtype of u)
    and the chunk-entry states ``[batch, chunks, 2E, N]`` for the backward pass, also in the dtype of
    u: they are the largest thing a layer keeps for its backward (T=16, N=16: in fp32 twice the bytes
    of a bf16 ``u``). In bf16 the backward's recomputed states carry bf16's rounding (2^-9 relative);
    the forward's states stay fp32 throughout.

    ``bc`` is ``[batch, L, 2 (direction), 2N]`` (B then C); ``params`` is
    ``(A_log_f, A_log_b, D_f, D_b, dt_bias_f, dt_bias_b)``, contiguous, ``[E, N]`` / ``[E]``.
    """
    d_state = params[0].shape[1]
    _check(u, dt, bc, d_state)
    (u,), (dt,), (bc,) = _aligned(u), _aligned(dt), _aligned(bc)
    batch, length, dim2 = u.shape
    dim = dim2 // 2
    cfg = {**_config(forward=True), **(config or {})}
    num_chunks = triton.cdiv(length, cfg["T"])
    align, in_units = _in_alignment_units(u, dt, bc)
    y = torch.empty(batch, length, dim2, device=u.device, dtype=u.dtype)
    ckpt = torch.empty(batch, num_chunks, dim2, d_state, device=u.device, dtype=u.dtype)
    grid = (triton.cdiv(dim, 32 // cfg["SPLIT"] * cfg["WARPS"]), batch, 2)
    _scan_fwd_kernel[grid](
        u, dt, bc, *params, y, ckpt, length, num_chunks, *in_units, y.stride(0), y.stride(1), N=d_state, ALIGN=align,
        **_launch_options(cfg))
    return y, ckpt


def scan_bwd(u, dt, bc, params, ckpt, g, config: dict | None = None):
    """Gradients of :func:`scan_fwd` given ``g = dL/dy`` per channel of ``E`` (both directions see the same).

    Returns ``du`` (dtype of u), ``ddt [batch, L, 2E]`` (gradient of the dt_proj outputs, through bias and
    softplus; dtype of dt), ``dBC`` fp32 ``[batch, L, 2 (direction), 2 (B, C), N]`` and fp32
    ``dA_log [2, E, N]``, ``dD [2, E]``, ``dbias [2, E]`` (direction first, summed over the batch).
    """
    d_state = params[0].shape[1]
    _check(u, dt, bc, d_state)
    batch, length, dim2 = u.shape
    dim = dim2 // 2
    cfg = {**_config(forward=False), **(config or {})}
    num_chunks = triton.cdiv(length, cfg["T"])
    if ckpt.shape != (batch, num_chunks, dim2, d_state):
        raise ValueError(f"checkpoint shape {tuple(ckpt.shape)} does not match the config's chunking")
    g = g if g.stride(-1) == 1 else g.contiguous()
    dt = dt if dt.is_contiguous() else dt.contiguous()  # the kernel gives ddt the strides of dt
    (u,), (dt,), (bc,), (g,) = _aligned(u), _aligned(dt), _aligned(bc), _aligned(g)
    align, in_units = _in_alignment_units(u, dt, bc)
    du, ddt = torch.empty_like(u), torch.empty_like(dt)
    # accumulated atomically, so zeroed first. The parameters' gradients get a buffer of their own: the
    # parameters' .grad keeps them, and views of one shared buffer kept the batch-sized dB/dC alive with
    # them, every layer's until the optimizer step (docs/performance.md, "Training memory")
    n_a = dim2 * d_state
    dBC = torch.zeros(batch, length, 2, 2, d_state, device=u.device, dtype=torch.float32)
    dparam = torch.zeros(n_a + 2 * dim2, device=u.device, dtype=torch.float32)
    grid = (triton.cdiv(dim, 32 // cfg["SPLIT"] * cfg["WARPS"]), batch, 2)
    _scan_bwd_kernel[grid](
        u, dt, bc, *params, g, ckpt, du, ddt, dBC, dparam, length, num_chunks, *in_units, g.stride(0), g.stride(1),
        N=d_state, ALIGN=align, **_launch_options(cfg, ("T", "SPLIT", "WARPS")))
    dA_log = dparam[:n_a].view(2, dim, d_state)
    dD, dbias = dparam[n_a:].view(2, 2, dim).unbind(0)
    return du, ddt, dBC, dA_log, dD, dbias
