"""Triton kernels of the bidirectional mixer on CPU, through Triton's interpreter (tiny shapes).

Outputs and gradients against the plain-PyTorch path and the step-by-step reference, odd lengths
and partial channel/state blocks included. The GPU-compiled kernels are checked in test_ops_gpu.py.

Triton picks interpreter or compiler when ``triton.language`` is first imported, process-wide, so
the checks run in one child process started with ``TRITON_INTERPRET=1`` (``python
tests/test_ops_triton.py`` runs them and prints a JSON report); each test reads its entry.
"""
import contextlib
import json
import math
import os
import subprocess
import sys
import traceback

import pytest
import torch

from ssamba.ops import BranchWeights, bimamba_inner, selective_scan_ref

CHECKS = {}


def check(name):
    def register(fn):
        CHECKS[name] = fn
        return fn
    return register


def _fix_interpreter_scalar_index():
    """Triton 3.6's interpreter calls ``int()`` on 1-element arrays, which NumPy >= 2.4 refuses."""
    import numpy as np
    import triton.runtime.interpreter as interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


def _kernels():
    from ssamba.ops import triton_conv, triton_scan
    return triton_scan, triton_conv


def _relerr(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _branch(E, N, R, K, gen, zero_bias=False):
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).requires_grad_()

    return BranchWeights(rnd(E, 1, K, scale=0.5), rnd(E, scale=0.2), rnd(R + 2 * N, E, scale=E ** -0.5),
                         rnd(E, R, scale=R ** -0.5), (torch.zeros(E) if zero_bias else rnd(E, scale=0.5)).requires_grad_(),
                         (torch.log(torch.rand(E, N, generator=gen) * 4 + 0.5)).requires_grad_(), rnd(E))


def _scan_reference(u, dt_f, dt_b, B_f, C_f, B_b, C_b, z, A, D, bias):
    """Both directions with the step-by-step reference, on explicitly flipped copies."""
    E = dt_f.shape[-1]
    T = lambda x: x.transpose(1, 2)  # noqa: E731
    F = lambda x: T(x).flip(-1)  # noqa: E731
    y_f = selective_scan_ref(T(u[..., :E]), T(dt_f), A[:E], T(B_f), T(C_f), D[:E], T(z), bias[:E], True)
    y_b = selective_scan_ref(F(u[..., E:]), F(dt_b), A[E:], F(B_b), F(C_b), D[E:], F(z), bias[E:], True).flip(-1)
    return T((y_f + y_b) / 2)


SCAN_CASES = {
    "scan-partial-chunk-and-block": (21, 5, 4, dict(T=8, BLOCK_D=4, NP=4)),
    "scan-whole-chunks-padded-states": (16, 4, 3, dict(T=4, BLOCK_D=4, NP=4)),
    "scan-length-1": (1, 3, 2, dict(T=4, BLOCK_D=2, NP=2)),
}


def _check_scan(length, dim, d_state, config):
    scan = _kernels()[0]
    g = torch.Generator().manual_seed(length)
    batch, dt_rank = 2, 3
    P = dt_rank + 2 * d_state
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u, x_dbl_f, x_dbl_b, dt_f, dt_b = rnd(batch, length, 2 * dim), rnd(batch, length, P), rnd(batch, length, P), \
        rnd(batch, length, dim), rnd(batch, length, dim)
    xz = rnd(batch, length, 2 * dim)
    A = -torch.rand(2 * dim, d_state, generator=g) * 3 - 0.2
    D, bias = rnd(2 * dim), rnd(2 * dim) * 0.5
    bc = lambda t: (t[..., dt_rank:dt_rank + d_state], t[..., dt_rank + d_state:])  # noqa: E731
    cfg = dict(config, num_warps=4)

    # the kernels take delta after bias and softplus; the reference applies them itself
    delta = [torch.nn.functional.softplus(d + b) for d, b in ((dt_f, bias[:dim]), (dt_b, bias[dim:]))]
    y, ckpt = scan.bimamba_scan_fwd(u, *delta, *bc(x_dbl_f), *bc(x_dbl_b), xz[..., dim:],
                                    (A * scan.LOG2E).contiguous(), D, cfg)
    leaves = [t.double().requires_grad_() for t in (u, dt_f, dt_b, x_dbl_f, x_dbl_b, xz, A, D, bias)]
    lu, ldf, ldb, lxf, lxb, lxz, lA, lD, lb = leaves
    y_ref = _scan_reference(lu, ldf, ldb, *bc(lxf), *bc(lxb), lxz[..., dim:], lA, lD, lb)
    assert _relerr(y, y_ref) < 1e-5

    dy = rnd(batch, length, dim)
    ref = torch.autograd.grad(y_ref, leaves, dy.double())
    dz = torch.full((batch, length, 2 * dim), float("nan"))[..., dim:]  # every element must be written
    du, ddelta_f, ddelta_b, dBC, dA, dD = scan.bimamba_scan_bwd(
        u, *delta, *bc(x_dbl_f), *bc(x_dbl_b), xz[..., dim:], (A * scan.LOG2E).contiguous(), D, ckpt, dy, dz, cfg)
    ddt_f, ddt_b = ddelta_f * torch.sigmoid(dt_f + bias[:dim]), ddelta_b * torch.sigmoid(dt_b + bias[dim:])
    dbias = torch.cat([ddt_f.sum((0, 1)), ddt_b.sum((0, 1))])
    checks = {"du": (du, ref[0]), "ddt_f": (ddt_f, ref[1]), "ddt_b": (ddt_b, ref[2]),
              "dB_f": (dBC[:, :, 0, 0], bc(ref[3])[0]), "dC_f": (dBC[:, :, 0, 1], bc(ref[3])[1]),
              "dB_b": (dBC[:, :, 1, 0], bc(ref[4])[0]), "dC_b": (dBC[:, :, 1, 1], bc(ref[4])[1]),
              "dz": (dz, ref[5][..., dim:]), "dA": (dA.sum(0), ref[6]), "dD": (dD.sum(0), ref[7]),
              "dbias": (dbias, ref[8])}
    for name, (got, want) in checks.items():
        assert _relerr(got, want) < 1e-5, name


def _check_mixer_inner(length):
    """The whole Triton inner path (conv, projections, scan) vs the PyTorch path, outputs and all grads."""
    g = torch.Generator().manual_seed(100 + length)
    batch, E, N, R, K = 2, 6, 4, 2, 4
    fwd, bwd = _branch(E, N, R, K, g), _branch(E, N, R, K, g, zero_bias=True)
    xz = torch.randn(batch, length, 2 * E, generator=g).requires_grad_()
    params = [xz, *fwd, *bwd]
    outs, grads = {}, {}
    dy = torch.randn(batch, length, E, generator=g)
    for backend in ("torch", "triton"):
        outs[backend] = bimamba_inner(xz.transpose(1, 2), fwd, bwd, backend=backend)
        grads[backend] = torch.autograd.grad(outs[backend], params, dy)
    assert _relerr(outs["triton"], outs["torch"]) < 1e-5
    names = ["xz"] + [f"fwd.{f}" for f in BranchWeights._fields] + [f"bwd.{f}" for f in BranchWeights._fields]
    for name, got, want in zip(names, grads["triton"], grads["torch"]):
        assert got is not None and _relerr(got, want) < 1e-5, name


# (batch, length, E, K, dtype): the kernels walk time in segments of at most 64 steps (two per
# program) with a 3-row halo each side, over channel blocks of 128, so these cover one and several
# segments (exactly 64, just over), a partial pair of segments, several and partial channel blocks,
# lengths below K and of 1, kernels shorter than 4 taps (zero-padded), bf16
CONV_CASES = {
    "conv": (2, 9, 5, 4, torch.float32),
    "conv-length-1": (2, 1, 3, 4, torch.float32),
    "conv-shorter-than-kernel": (1, 3, 6, 4, torch.float32),
    "conv-several-segments-and-channel-blocks": (3, 130, 150, 4, torch.float32),
    "conv-one-whole-segment": (1, 64, 64, 4, torch.float32),
    "conv-two-segments-just-over-one": (1, 65, 20, 4, torch.float32),
    "conv-kernel-3": (2, 33, 12, 3, torch.float32),
    "conv-kernel-2-several-segments": (2, 70, 12, 2, torch.float32),
    "conv-bf16": (2, 61, 20, 4, torch.bfloat16),
}


def _check_conv(batch, length, E, K, dtype):
    """Causal conv on x and anti-causal conv (= causal conv on flip(x)) with SiLU, and their gradients.

    x and dx are the first halves of ``[batch, L, 2E]`` tensors (row stride 2E), like xz's x half; the
    reference is autograd in float64 on the same (rounded) inputs.
    """
    conv = _kernels()[1]
    g = torch.Generator().manual_seed(length * 100 + E)
    x = torch.randn(batch, length, 2 * E, generator=g).to(dtype)[..., :E]
    w = torch.randn(2 * E, K, generator=g)
    b = torch.randn(2 * E, generator=g)
    dout = torch.randn(batch, length, 2 * E, generator=g).to(dtype)

    def ref(x, w, b):
        xt = x.transpose(1, 2)
        conv = torch.nn.functional.conv1d
        y_f = conv(xt, w[:E, None], b[:E], padding=K - 1, groups=E)[..., :length]
        y_b = conv(xt.flip(-1), w[E:, None], b[E:], padding=K - 1, groups=E)[..., :length].flip(-1)
        return torch.nn.functional.silu(torch.cat([y_f, y_b], 1)).transpose(1, 2)

    leaves = [t.double().requires_grad_() for t in (x, w, b)]
    y_ref = ref(*leaves)
    gx, gw, gb = torch.autograd.grad(y_ref, leaves, dout.double())
    # outputs rounded to bf16 are off by up to 2^-9 each; fp32 accumulation of bf16 inputs stays exact-ish
    out_tol = 1e-6 if dtype == torch.float32 else 1e-2
    y = conv.bidir_conv_fwd(x, w, b)
    assert y.dtype == dtype and _relerr(y, y_ref) < out_tol, "y"
    dxz = torch.full((batch, length, 2 * E), math.nan, dtype=dtype)
    dw, db = conv.bidir_conv_bwd(x, w, b, dout, dxz[..., :E])  # every element of the view must be written
    assert _relerr(dxz[..., :E], gx) < out_tol, "dx"
    assert dxz[..., E:].isnan().all(), "dx wrote outside its view"
    assert dw.shape == (2 * E, K) and db.shape == (2 * E,)
    assert _relerr(dw, gw) < 1e-5 and _relerr(db, gb) < 1e-5, "dw/db"


for _name, _case in CONV_CASES.items():
    check(_name)(lambda case=_case: _check_conv(*case))


@check("conv-more-than-4-taps")
def _check_conv_taps():
    conv = _kernels()[1]
    x = torch.randn(1, 8, 6)
    try:
        conv.bidir_conv_fwd(x[..., :3], torch.randn(6, 5), torch.randn(6))
    except ValueError as err:
        assert "d_conv" in str(err)
    else:
        raise AssertionError("a 5-tap conv was accepted")
# (batch, length, D, norm, residual, drop-path scale, hidden dtype): rows not a multiple of the row
# tile, D below and at a power of two, more row tiles than backward programs (each loops), the first
# layer (no residual), RMSNorm, a bf16 branch added to an fp32 residual stream
ADD_NORM_CASES = {
    "add-norm-layernorm-drop-path": (3, 7, 24, "layer", True, True, torch.float32),
    "add-norm-rmsnorm": (2, 9, 32, "rms", True, False, torch.float32),
    "add-norm-first-layer": (2, 5, 20, "layer", False, False, torch.float32),
    "add-norm-bf16-branch-many-tiles": (4, 300, 16, "layer", True, True, torch.bfloat16),
}


def _check_add_norm(batch, length, D, norm, with_residual, with_scale, dtype):
    """``residual + hidden * scale`` then the norm, outputs and all gradients vs float64 autograd."""
    from ssamba.ops.triton_norm import add_norm

    g = torch.Generator().manual_seed(batch * 1000 + length * 10 + D)
    hidden = torch.randn(batch, length, D, generator=g).to(dtype)
    residual = torch.randn(batch, length, D, generator=g) if with_residual else None
    scale = torch.tensor([0.0, 1.25, 1.25, 0.0][:batch]) if with_scale else None
    weight = torch.randn(D, generator=g)
    bias = torch.randn(D, generator=g) if norm == "layer" else None
    d_normed, d_res = torch.randn(batch, length, D, generator=g), torch.randn(batch, length, D, generator=g)
    leaves = [t.double().requires_grad_() for t in (hidden, residual, weight, bias) if t is not None]
    h64, r64 = leaves[0], leaves[1] if with_residual else None
    w64, b64 = leaves[-2:] if bias is not None else (leaves[-1], None)
    x64 = h64 if r64 is None else r64 + h64 * (scale.double()[:, None, None] if with_scale else 1.0)
    if norm == "layer":
        y64 = torch.nn.functional.layer_norm(x64, (D,), w64, b64, 1e-5)
    else:
        y64 = torch.nn.functional.rms_norm(x64, (D,), w64, 1e-5)
    want = torch.autograd.grad((y64 * d_normed.double()).sum() + (x64 * d_res.double()).sum(), leaves)
    ins = [t.clone().requires_grad_() for t in (hidden, residual, weight, bias) if t is not None]
    h, r = ins[0], ins[1] if with_residual else None
    w, b = ins[-2:] if bias is not None else (ins[-1], None)
    y, x = add_norm(h, r, w, b, 1e-5, scale)
    assert y.dtype == torch.float32 and x.dtype == (torch.float32 if with_residual else dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert _relerr(y, y64) < 1e-5 and _relerr(x, x64) < tol, "outputs"
    got = torch.autograd.grad((y * d_normed).sum() + (x * d_res).sum(), ins)
    for name, a, e in zip(["hidden", "residual", "weight", "bias"][:len(got)], got, want):
        assert a.dtype == (dtype if name == "hidden" else torch.float32), name
        assert _relerr(a, e) < tol, f"d{name}: {_relerr(a, e):.2e}"


for _name, _case in ADD_NORM_CASES.items():
    check(_name)(lambda case=_case: _check_add_norm(*case))


@check("gate")
def _check_gate():
    """The output gate ``(y_f + y_b) / 2 * silu(z)`` and its gradients, z a strided view as in xz."""
    from ssamba.ops import triton_gate

    g = torch.Generator().manual_seed(11)
    batch, length, E = 2, 37, 150  # several row and channel blocks, both partial
    y = torch.randn(batch, length, 2 * E, generator=g).requires_grad_()
    xz = torch.randn(batch, length, 2 * E, generator=g).requires_grad_()
    out_ref = (y[..., :E] + y[..., E:]) * 0.5 * torch.nn.functional.silu(xz[..., E:])
    out, y_sum = triton_gate.gate_fwd(y.detach(), xz.detach()[..., E:])
    assert _relerr(out, out_ref) < 1e-6 and _relerr(y_sum, y[..., :E] + y[..., E:]) < 1e-6
    dout = torch.randn(batch, length, E, generator=g)
    dy, dxz = torch.autograd.grad(out_ref, (y, xz), dout)
    dz = torch.full((batch, length, 2 * E), math.nan)
    dy_either = triton_gate.gate_bwd(dout, y_sum, xz.detach()[..., E:], dz[..., E:])
    assert _relerr(dy_either, dy[..., :E]) < 1e-6 and _relerr(dy_either, dy[..., E:]) < 1e-6
    assert _relerr(dz[..., E:], dxz[..., E:]) < 1e-6 and dz[..., :E].isnan().all()
    again = torch.full((batch, length, E), math.nan)
    dz_again = torch.full((batch, length, 2 * E), math.nan)
    triton_gate.gate_bwd(dout, y_sum, xz.detach()[..., E:], dz_again[..., E:], out=again)
    assert torch.equal(again, out) and torch.equal(dz_again[..., E:], dz[..., E:])  # the forward's output again


def _reference_gluon_scan(u, dt, bc, params):
    """What ``gluon_scan.scan_fwd`` computes (``y [batch, L, 2E]``, the backward direction in original
    time order), with the step-by-step reference and autograd."""
    A_log_f, A_log_b, D_f, D_b, bias_f, bias_b = params
    E, N = u.shape[-1] // 2, A_log_f.shape[1]
    T = lambda x: x.transpose(1, 2)  # noqa: E731
    ys = []
    for d, (A_log, D, bias) in enumerate(((A_log_f, D_f, bias_f), (A_log_b, D_b, bias_b))):
        rows = [u[..., d * E:(d + 1) * E], dt[..., d * E:(d + 1) * E], bc[:, :, d, :N], bc[:, :, d, N:]]
        uu, dd, B, C = (r.flip(1) for r in rows) if d else rows
        y = T(selective_scan_ref(T(uu), T(dd), -torch.exp(A_log), T(B), T(C), D, None, bias, True))
        ys.append(y.flip(1) if d else y)
    return torch.cat(ys, -1)


@contextlib.contextmanager
def _gluon_scan_replaced_by_reference():
    """The Gluon path's autograd code with its scan kernels (which the interpreter cannot run) swapped
    for the reference; everything else (conv, gate, norm kernels) runs in the interpreter."""
    from ssamba.ops import gluon_bimamba

    def scan_fwd(u, dt, bc, params):
        with torch.no_grad():
            return _reference_gluon_scan(u, dt, bc, params), None

    def scan_bwd(u, dt, bc, params, ckpt, g):
        inputs = [t.detach().requires_grad_() for t in (u, dt, bc, *params)]
        with torch.enable_grad():
            y = _reference_gluon_scan(*inputs[:3], tuple(inputs[3:]))
            du, ddt, dbc, *dparams = (t.contiguous() for t in torch.autograd.grad(y, inputs, torch.cat([g, g], -1)))
        batch, length = dbc.shape[:2]
        dA_log, dD, dbias = (torch.stack(dparams[i:i + 2]) for i in (0, 2, 4))
        return du, ddt, dbc.view(batch, length, 2, 2, -1), dA_log, dD, dbias

    original = gluon_bimamba.scan_fwd, gluon_bimamba.scan_bwd
    gluon_bimamba.scan_fwd, gluon_bimamba.scan_bwd = scan_fwd, scan_bwd
    try:
        yield
    finally:
        gluon_bimamba.scan_fwd, gluon_bimamba.scan_bwd = original


@check("gluon-mixer-function")
def _check_gluon_mixer_function():
    """The Gluon path's autograd Function (what it keeps, recomputes and projects) with its scan kernels
    swapped for the reference: the whole mixer (in_proj and out_proj inside) and the xz entry point
    against the PyTorch path, outputs and every gradient, and which per-token tensors it keeps for the
    backward. (The kernels themselves: tests/test_ops_gpu.py.)"""
    from ssamba.ops import bimamba_mixer, gluon_bimamba

    g = torch.Generator().manual_seed(5)
    batch, length, dim, E, N, R = 2, 23, 12, 16, 4, 3
    fwd, bwd = _branch(E, N, R, 4, g), _branch(E, N, R, 4, g, zero_bias=True)
    in_proj = (torch.randn(2 * E, dim, generator=g) * dim ** -0.5).requires_grad_()
    out_proj = (torch.randn(dim, E, generator=g) * E ** -0.5).requires_grad_()
    hidden = torch.randn(batch, length, dim, generator=g).requires_grad_()
    xz = torch.randn(batch, length, 2 * E, generator=g).requires_grad_()
    with _gluon_scan_replaced_by_reference():
        for params, run, reference in (
                ([hidden, in_proj, out_proj, *fwd, *bwd],
                 lambda: gluon_bimamba.bimamba_mixer_gluon(hidden, in_proj, out_proj, fwd, bwd),
                 lambda: bimamba_mixer(hidden, in_proj, out_proj, fwd, bwd, "torch")),
                ([xz, *fwd, *bwd], lambda: gluon_bimamba.bimamba_inner_gluon(xz, fwd, bwd),
                 lambda: bimamba_inner(xz.transpose(1, 2), fwd, bwd, "torch"))):
            kept = []  # what the Function saves for its backward
            with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(tuple(t.shape)) or t, lambda t: t):
                out = run()
            out_ref = reference()
            # per token only its input and the directions' output sum (and the scan's states, None here)
            assert [s for s in kept if s[:2] == (batch, length)] == [tuple(params[0].shape), (batch, length, E)]
            dy = torch.randn(out.shape, generator=g)
            assert _relerr(out, out_ref) < 1e-5
            for i, (got, want) in enumerate(zip(torch.autograd.grad(out, params, dy),
                                                torch.autograd.grad(out_ref, params, dy))):
                assert _relerr(got, want) < 1e-5, f"gradient {i}: {_relerr(got, want):.2e}"


# (batch, length, D, norm, residual, which layers drop paths, hidden dtype): as ADD_NORM_CASES, plus a
# pair where only one layer drops (the other gets ones)
PAIR_NORM_CASES = {
    "pair-add-norm-layernorm-drop-path": (3, 7, 24, "layer", True, (True, True), torch.float32),
    "pair-add-norm-rmsnorm-one-layer-drops": (2, 9, 32, "rms", True, (False, True), torch.float32),
    "pair-add-norm-first-pair": (2, 5, 20, "layer", False, (False, False), torch.float32),
    "pair-add-norm-bf16-branch-many-tiles": (4, 300, 16, "layer", True, (True, True), torch.bfloat16),
}


def _check_pair_add_norm(batch, length, D, norm, with_residual, drops, dtype):
    """Both layers' add+norm and the pair's next residual in one pass, and the backward that recomputes
    them from hidden and residual, vs float64 autograd: outputs, input and weight gradients."""
    from ssamba.ops.pair import _scales
    from ssamba.ops.triton_norm import pair_add_norm_bwd, pair_add_norm_fwd

    g = torch.Generator().manual_seed(batch * 1000 + length * 10 + D)
    hidden = torch.randn(batch, length, D, generator=g).to(dtype)
    residual = torch.randn(batch, length, D, generator=g) if with_residual else None
    drop = torch.tensor([0.0, 1.25, 1.25, 0.0][:batch])
    scales = _scales(*((drop.flip(0) if i else drop) if on else None for i, on in enumerate(drops)), hidden)
    params = [torch.randn(D, generator=g) for _ in range(4)]
    if norm == "rms":
        params[1] = params[3] = None
    grads_out = [torch.randn(batch, length, D, generator=g) for _ in range(3)]
    h64, r64, *w64 = (None if t is None else t.double().requires_grad_() for t in (hidden, residual, *params))
    leaves = [t for t in (h64, r64, *w64) if t is not None]
    xs = [h64 if r64 is None else r64 + h64 * (1.0 if scales is None else s.double()[:, None, None])
          for s in (scales or (None, None))]
    ys = [torch.nn.functional.layer_norm(x, (D,), w, b, 1e-5) if norm == "layer" else
          torch.nn.functional.rms_norm(x, (D,), w, 1e-5) for x, w, b in zip(xs, w64[0::2], w64[1::2])]
    new64 = xs[0] + xs[1]
    loss64 = sum((t * d.double()).sum() for t, d in zip((*ys, new64), grads_out))
    want = torch.autograd.grad(loss64, leaves)

    residual_dtype = torch.float32 if with_residual else dtype
    y_f, y_b, new = pair_add_norm_fwd(hidden, residual, scales, tuple(params[:2]), tuple(params[2:]), 1e-5,
                                      torch.float32, residual_dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert new.dtype == residual_dtype and _relerr(new, new64) < tol, "next residual"
    assert _relerr(y_f, ys[0]) < 1e-5 and _relerr(y_b, ys[1]) < 1e-5, "normed streams"
    again = pair_add_norm_fwd(hidden, residual, scales, tuple(params[:2]), tuple(params[2:]), 1e-5, torch.float32, None)
    assert again[2] is None and torch.equal(again[0], y_f) and torch.equal(again[1], y_b), "recompute"
    d_hidden, d_residual, d_norms = pair_add_norm_bwd(hidden, residual, scales, (params[0], params[2]), norm == "rms",
                                                      1e-5, *grads_out)
    got = [d_hidden] + ([d_residual] if with_residual else []) + [
        d for d, p in zip(d_norms, params) if p is not None]
    assert d_hidden.dtype == dtype and (d_residual is None) == (not with_residual)
    for i, (a, e) in enumerate(zip(got, want)):
        assert _relerr(a, e) < tol, f"gradient {i}: {_relerr(a, e):.2e}"


for _name, _case in PAIR_NORM_CASES.items():
    check(_name)(lambda case=_case: _check_pair_add_norm(*case))


@check("published-pair-function")
def _check_published_pair_function():
    """A pair of the published pairing as one Function (``ops.pair``, Gluon scan swapped for the
    reference) vs the encoder's two PyTorch blocks, training with drop path (the same draws): the
    pair's outputs and the gradients of its inputs and of both layers' parameters, for LayerNorm and
    RMSNorm, the first pair (no residual) and a later one; and which per-token tensors it keeps."""
    from ssamba.models.ssamba import SSAMBAConfig, SSAMBAEncoder

    for norm, first in (("layernorm", False), ("rmsnorm", False), ("layernorm", True)):
        torch.manual_seed(3)
        encoder = SSAMBAEncoder(SSAMBAConfig(embed_dim=12, depth=4, d_state=4, drop_path_rate=0.5, norm=norm,
                                             backend="torch")).train()
        fwd, bwd = encoder.layers[2], encoder.layers[3]
        with torch.no_grad():  # trained-like parameters rather than the init's ones/zeros
            for p in (*fwd.norm.parameters(), *bwd.norm.parameters()):
                p.normal_()
        g = torch.Generator().manual_seed(7)
        hidden = torch.randn(4, 19, 12, generator=g).requires_grad_()
        residual = None if first else torch.randn(4, 19, 12, generator=g).requires_grad_()
        d_hidden, d_residual = torch.randn(4, 19, 12, generator=g), torch.randn(4, 19, 12, generator=g)
        inputs = [t for t in (hidden, residual) if t is not None] + [*fwd.parameters(), *bwd.parameters()]

        def run(pair):
            torch.manual_seed(11)
            out, res = pair(fwd, bwd, hidden, residual)
            loss = (out * d_hidden).sum() + (res * d_residual).sum()
            return out, res, torch.autograd.grad(loss, inputs)

        reference = run(encoder._pair_blocks)
        with _gluon_scan_replaced_by_reference():
            fused = run(encoder._pair_fused)
            kept = []  # what the pair's forward saves for its backward
            with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(tuple(t.shape)) or t, lambda t: t):
                encoder._pair_fused(fwd, bwd, hidden, residual)
        # per token: its inputs, and each mixer's output sum (and the scans' states, None here)
        expected = [(4, 19, 12)] * (1 if first else 2) + [(4, 19, 24)] * 2
        assert [s for s in kept if s[:2] == (4, 19)] == expected, (norm, first, kept)
        assert _relerr(fused[0], reference[0]) < 1e-5 and _relerr(fused[1], reference[1]) < 1e-6, (norm, first)
        for i, (a, e) in enumerate(zip(fused[2], reference[2])):
            assert _relerr(a, e) < 1e-5, f"{norm}, first={first}: gradient {i}: {_relerr(a, e):.2e}"


for _name, _case in SCAN_CASES.items():
    check(_name)(lambda case=_case: _check_scan(*case))
for _length in (7, 13):
    check(f"mixer-length-{_length}")(lambda length=_length: _check_mixer_inner(length))


@pytest.fixture(scope="module")
def interpreter_report():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreter checks did not run (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")
    report = json.loads(lines[-1])
    if report.get("skip"):
        pytest.skip(report["skip"])
    return report


@pytest.mark.parametrize("name", list(CHECKS))
def test_triton_kernels_in_interpreter(interpreter_report, name):
    error = interpreter_report[name]
    assert error is None, error


def test_triton_backend_refuses_cpu_without_interpreter(monkeypatch):
    from ssamba.ops.backend import resolve_backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="CUDA device"):
        resolve_backend("triton", on_cuda=False)
    assert resolve_backend("auto", on_cuda=False) == "torch"


def _run_checks() -> dict:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1")
    try:
        _fix_interpreter_scalar_index()
        _kernels()
    except Exception as err:  # the interpreter itself cannot run here
        return {"skip": f"Triton interpreter unavailable: {type(err).__name__}: {err}"}
    report = {}
    for name, fn in CHECKS.items():
        try:
            fn()
            report[name] = None
        except Exception:
            report[name] = traceback.format_exc(limit=3)
    return report


if __name__ == "__main__":
    print(json.dumps(_run_checks()))
