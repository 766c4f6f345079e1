"""Triton kernels for the two depthwise convolutions + SiLU of a bimamba-v2 mixer.

The forward branch convolves ``x`` causally; the backward branch convolves ``flip(x)`` causally,
which in the original time order is an anti-causal convolution of ``x``. One kernel computes both
from a single read of ``x`` (channel-last ``[batch, L, E]``, any row stride) and writes
``[batch, L, 2E]`` with the forward branch's channels first, in the original time order.

Each program walks time through a few sequence segments at once (``[segments, channels]`` tiles),
keeping the rows the taps need in registers and sliding them by one row a step: every element is
read from memory once (plus a few halo rows per segment), and the weight gradients are summed per
thread, so no tile is re-read at shifted offsets and no step needs a cross-thread reduction. Loads
run two steps ahead of their use, so a step's store never holds back the next loads.
Kernels up to 4 taps (the released ``d_conv``) are supported; shorter ones are zero-padded.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TAPS = 4  # the kernels' tap count; shorter convolutions get leading zero taps
SEGMENT = 64  # longest time segment one program row walks; the halo costs 2 * (TAPS - 1) extra steps
BLOCK_S, BLOCK_C, NUM_WARPS = 2, 128, 4


@triton.jit
def _row(rows, t, row_mask, c_mask, length, stride_l):
    """The rows at time ``t [segments]`` of a ``[segments, channels]`` tile, fp32, zero outside the sequence."""
    valid = (t >= 0) & (t < length) & row_mask
    return tl.load(rows + t[:, None] * stride_l, mask=valid[:, None] & c_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _tap(ptr, c, c_mask, k: tl.constexpr):
    """Tap ``k`` of each channel's ``TAPS`` (4) weights, as a ``[1, channels]`` row."""
    return tl.load(ptr + c * 4 + k, mask=c_mask, other=0.0)[None, :]


@triton.jit
def _branch_weights(w_ptr, bias_ptr, c, c_mask):
    """One branch's four taps and bias, each a ``[1, channels]`` row (``w_ptr``/``bias_ptr`` at its first channel)."""
    return (_tap(w_ptr, c, c_mask, 0), _tap(w_ptr, c, c_mask, 1), _tap(w_ptr, c, c_mask, 2), _tap(w_ptr, c, c_mask, 3),
            tl.load(bias_ptr + c, mask=c_mask, other=0.0)[None, :])


@triton.jit
def _window(rows, first, row_mask, c_mask, length, stride_l):
    """The eight rows at times ``first .. first + 7``: a step's seven tap inputs and the row loaded ahead."""
    return (_row(rows, first, row_mask, c_mask, length, stride_l),
            _row(rows, first + 1, row_mask, c_mask, length, stride_l),
            _row(rows, first + 2, row_mask, c_mask, length, stride_l),
            _row(rows, first + 3, row_mask, c_mask, length, stride_l),
            _row(rows, first + 4, row_mask, c_mask, length, stride_l),
            _row(rows, first + 5, row_mask, c_mask, length, stride_l),
            _row(rows, first + 6, row_mask, c_mask, length, stride_l),
            _row(rows, first + 7, row_mask, c_mask, length, stride_l))


@triton.jit
def _pre_activation(bias, w0, w1, w2, w3, x0, x1, x2, x3):
    """A branch's conv output before the SiLU: taps 0..3 against ``x0..x3`` (oldest input first for the
    forward branch, newest first for the backward branch)."""
    return bias + w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3


@triton.jit
def _segments(pid_s, n_rows, n_seg, seg_len, BLOCK_S: tl.constexpr):
    """Batch row, first time step and validity of the program's segments."""
    j = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    return (j // n_seg).to(tl.int64), (j % n_seg) * seg_len, j < n_rows


@triton.jit
def _bidir_conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, length, dim, n_rows, n_seg, seg_len,
                           sx_b, sx_l, so_b, so_l, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < dim
    b, t0, row_mask = _segments(tl.program_id(1), n_rows, n_seg, seg_len, BLOCK_S)
    x_rows = x_ptr + b[:, None] * sx_b + c[None, :]
    out_rows = out_ptr + b[:, None] * so_b + c[None, :]
    wf0, wf1, wf2, wf3, bias_f = _branch_weights(w_ptr, bias_ptr, c, c_mask)
    wb0, wb1, wb2, wb3, bias_b = _branch_weights(w_ptr + dim * 4, bias_ptr + dim, c, c_mask)
    # x at t-3 .. t+5 (a..i); step t uses a..g and loads the row two steps ahead
    xa, xb, xc, xd, xe, xf, xg, xh = _window(x_rows, t0 - 3, row_mask, c_mask, length, sx_l)
    mask = row_mask[:, None] & c_mask[None, :]
    for i in range(0, seg_len):
        t = t0 + i
        xi = _row(x_rows, t + 5, row_mask, c_mask, length, sx_l)
        pre_f = _pre_activation(bias_f, wf0, wf1, wf2, wf3, xa, xb, xc, xd)
        pre_b = _pre_activation(bias_b, wb0, wb1, wb2, wb3, xg, xf, xe, xd)
        out = out_rows + t[:, None] * so_l
        ok = mask & (t < length)[:, None]
        tl.store(out, (pre_f * tl.sigmoid(pre_f)).to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(out + dim, (pre_b * tl.sigmoid(pre_b)).to(out_ptr.dtype.element_ty), mask=ok)
        xa, xb, xc, xd, xe, xf, xg, xh = xb, xc, xd, xe, xf, xg, xh, xi


@triton.jit
def _zeros(BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    return tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)


@triton.jit
def _silu_grad(pre, grad):
    sig = tl.sigmoid(pre)
    return grad * sig * (1.0 + pre * (1.0 - sig))


@triton.jit
def _bidir_conv_bwd_kernel(x_ptr, w_ptr, bias_ptr, dout_ptr, dx_ptr, dw_ptr, length, dim, n_rows, n_seg,
                           seg_len, sx_b, sx_l, sd_b, sd_l, sdx_b, sdx_l,
                           BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """One pass: each step recomputes both pre-activations, takes the SiLU backward (``g``), adds
    ``g`` times the tap inputs to the weight gradients and emits ``dx`` three steps behind, once the
    ``g`` rows it needs exist. A segment starts three steps early (the ``g`` rows before it) and ends
    three steps late; only the rows it owns count towards the weight gradients."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < dim
    b, t0, row_mask = _segments(tl.program_id(1), n_rows, n_seg, seg_len, BLOCK_S)
    x_rows = x_ptr + b[:, None] * sx_b + c[None, :]
    d_rows = dout_ptr + b[:, None] * sd_b + c[None, :]
    dx_rows = dx_ptr + b[:, None] * sdx_b + c[None, :]
    wf0, wf1, wf2, wf3, bias_f = _branch_weights(w_ptr, bias_ptr, c, c_mask)
    wb0, wb1, wb2, wb3, bias_b = _branch_weights(w_ptr + dim * 4, bias_ptr + dim, c, c_mask)
    start = t0 - 3
    # x at t-3 .. t+5 (a..i) and each branch's output gradient (of*, ob*) at t .. t+2, loaded ahead
    xa, xb, xc, xd, xe, xf, xg, xh = _window(x_rows, start - 3, row_mask, c_mask, length, sx_l)
    of0 = _row(d_rows, start, row_mask, c_mask, length, sd_l)
    ob0 = _row(d_rows + dim, start, row_mask, c_mask, length, sd_l)
    of1 = _row(d_rows, start + 1, row_mask, c_mask, length, sd_l)
    ob1 = _row(d_rows + dim, start + 1, row_mask, c_mask, length, sd_l)
    # g_f at t-3 .. t-1 and g_b at t-6 .. t-1 (the rows dx[t-3] needs besides step t's own). Each
    # loop-carried tile starts from its own zeros: Triton's frontend takes a name assigned another
    # name's initial value (``gf3 = gf2``) as unchanged, and drops it from the loop, when both
    # started from the same tensor.
    gf1, gf2, gf3 = _zeros(BLOCK_S, BLOCK_C), _zeros(BLOCK_S, BLOCK_C), _zeros(BLOCK_S, BLOCK_C)
    gb1, gb2, gb3 = _zeros(BLOCK_S, BLOCK_C), _zeros(BLOCK_S, BLOCK_C), _zeros(BLOCK_S, BLOCK_C)
    gb4, gb5, gb6 = _zeros(BLOCK_S, BLOCK_C), _zeros(BLOCK_S, BLOCK_C), _zeros(BLOCK_S, BLOCK_C)
    dwf0, dwf1, dwf2, dwf3 = _zeros(BLOCK_S, BLOCK_C), _zeros(BLOCK_S, BLOCK_C), _zeros(BLOCK_S, BLOCK_C), \
        _zeros(BLOCK_S, BLOCK_C)
    dwb0, dwb1, dwb2, dwb3 = _zeros(BLOCK_S, BLOCK_C), _zeros(BLOCK_S, BLOCK_C), _zeros(BLOCK_S, BLOCK_C), \
        _zeros(BLOCK_S, BLOCK_C)
    dbf, dbb = _zeros(BLOCK_S, BLOCK_C), _zeros(BLOCK_S, BLOCK_C)
    mask = row_mask[:, None] & c_mask[None, :]
    for i in range(0, seg_len + 6):
        t = start + i
        xi = _row(x_rows, t + 5, row_mask, c_mask, length, sx_l)
        of2 = _row(d_rows, t + 2, row_mask, c_mask, length, sd_l)
        ob2 = _row(d_rows + dim, t + 2, row_mask, c_mask, length, sd_l)
        g_f = _silu_grad(_pre_activation(bias_f, wf0, wf1, wf2, wf3, xa, xb, xc, xd), of0)
        g_b = _silu_grad(_pre_activation(bias_b, wb0, wb1, wb2, wb3, xg, xf, xe, xd), ob0)
        own = (i >= 3) & (i < seg_len + 3)  # outside the sequence g is zero already (dout is masked)
        o_f = tl.where(own, g_f, 0.0)
        o_b = tl.where(own, g_b, 0.0)
        dwf0 += o_f * xa
        dwf1 += o_f * xb
        dwf2 += o_f * xc
        dwf3 += o_f * xd
        dwb0 += o_b * xg
        dwb1 += o_b * xf
        dwb2 += o_b * xe
        dwb3 += o_b * xd
        dbf += o_f
        dbb += o_b
        dx = wf3 * gf3 + wf2 * gf2 + wf1 * gf1 + wf0 * g_f + wb0 * gb6 + wb1 * gb5 + wb2 * gb4 + wb3 * gb3
        s = t - 3  # rows before t0 (i < 6) belong to the previous segment
        tl.store(dx_rows + s[:, None] * sdx_l, dx.to(dx_ptr.dtype.element_ty),
                 mask=mask & (s < length)[:, None] & (i >= 6))
        gf3, gf2, gf1 = gf2, gf1, g_f
        gb6, gb5, gb4, gb3, gb2, gb1 = gb5, gb4, gb3, gb2, gb1, g_b
        xa, xb, xc, xd, xe, xf, xg, xh = xb, xc, xd, xe, xf, xg, xh, xi
        of0, of1, ob0, ob1 = of1, of2, ob1, ob2
    # per-program partial sums laid out [5, 2E] (4 taps, then the bias) so the stores are coalesced
    part = dw_ptr + tl.program_id(1).to(tl.int64) * 10 * dim + c
    tl.store(part, tl.sum(dwf0, axis=0), mask=c_mask)
    tl.store(part + 2 * dim, tl.sum(dwf1, axis=0), mask=c_mask)
    tl.store(part + 4 * dim, tl.sum(dwf2, axis=0), mask=c_mask)
    tl.store(part + 6 * dim, tl.sum(dwf3, axis=0), mask=c_mask)
    tl.store(part + 8 * dim, tl.sum(dbf, axis=0), mask=c_mask)
    tl.store(part + dim, tl.sum(dwb0, axis=0), mask=c_mask)
    tl.store(part + 3 * dim, tl.sum(dwb1, axis=0), mask=c_mask)
    tl.store(part + 5 * dim, tl.sum(dwb2, axis=0), mask=c_mask)
    tl.store(part + 7 * dim, tl.sum(dwb3, axis=0), mask=c_mask)
    tl.store(part + 9 * dim, tl.sum(dbb, axis=0), mask=c_mask)


def _taps(weight: torch.Tensor) -> torch.Tensor:
    """``[2E, K]`` weights as ``[2E, 4]``, zero taps in front (the oldest inputs) when K < 4."""
    K = weight.shape[1]
    if K > TAPS:
        raise ValueError(f"the triton conv kernels take up to {TAPS} taps (d_conv), got {K}; use backend=torch")
    if K < TAPS:
        weight = torch.cat([weight.new_zeros(weight.shape[0], TAPS - K), weight], 1)
    return weight.contiguous()


def _launch_shape(batch: int, length: int, dim: int) -> tuple[int, int, int, tuple[int, int]]:
    """Segments per sequence, segment length, segment rows and the grid."""
    n_seg = triton.cdiv(length, SEGMENT)
    seg_len = triton.cdiv(length, n_seg)
    rows = batch * n_seg
    return n_seg, seg_len, rows, (triton.cdiv(dim, BLOCK_C), triton.cdiv(rows, BLOCK_S))


def bidir_conv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x [batch, L, E]`` (unit channel stride), ``weight [2E, K]`` and ``bias [2E]`` -> ``[batch, L, 2E]``."""
    batch, length, dim = x.shape
    if x.stride(-1) != 1:
        raise ValueError(f"x must have unit channel stride, got strides {x.stride()}")
    out = torch.empty(batch, length, 2 * dim, device=x.device, dtype=x.dtype)
    n_seg, seg_len, rows, grid = _launch_shape(batch, length, dim)
    _bidir_conv_fwd_kernel[grid](x, _taps(weight), bias, out, length, dim, rows, n_seg, seg_len, x.stride(0),
                                 x.stride(1), out.stride(0), out.stride(1), BLOCK_S=BLOCK_S, BLOCK_C=BLOCK_C,
                                 num_warps=NUM_WARPS)
    return out


def bidir_conv_bwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dout: torch.Tensor,
                   dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Writes dL/dx into ``dx`` (a ``[batch, L, E]`` view) and returns fp32 ``dweight [2E, K]``, ``dbias [2E]``."""
    batch, length, dim = x.shape
    if x.stride(-1) != 1 or dx.stride(-1) != 1:
        raise ValueError(f"x and dx must have unit channel stride, got strides {x.stride()} and {dx.stride()}")
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    K = weight.shape[1]
    n_seg, seg_len, rows, grid = _launch_shape(batch, length, dim)
    partial = torch.empty(grid[1], TAPS + 1, 2 * dim, device=x.device, dtype=torch.float32)
    _bidir_conv_bwd_kernel[grid](x, _taps(weight), bias, dout, dx, partial, length, dim, rows, n_seg, seg_len,
                                 x.stride(0), x.stride(1), dout.stride(0), dout.stride(1), dx.stride(0), dx.stride(1),
                                 BLOCK_S=BLOCK_S, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
    sums = partial.sum(0)
    return sums[TAPS - K:TAPS].t().contiguous(), sums[TAPS]
