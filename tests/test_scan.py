"""Both solvers of the PyTorch selective scan against the step-by-step reference."""
import sys
from pathlib import Path

import pytest
import torch

import ssamba.ops.selective_scan as scan
from ssamba.ops import selective_scan_ref, selective_scan_torch
from ssamba.utils.memory import saved_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from cpu_scan import SOLVERS  # noqa: E402


@pytest.fixture(params=list(SOLVERS))
def solver(request, monkeypatch):
    monkeypatch.setattr(scan, "STEPPED_MIN_STATE", SOLVERS[request.param])
    return request.param


def _inputs(batch, dim, length, d_state, groups, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    A = (-torch.rand(dim, d_state, generator=g, dtype=dtype) * 4 - 0.1).requires_grad_()
    B_shape = (batch, d_state, length) if groups is None else (batch, groups, d_state, length)
    return dict(u=rnd(batch, dim, length), delta=rnd(batch, dim, length), A=A, B=rnd(*B_shape),
                C=rnd(*B_shape), D=rnd(dim), z=rnd(batch, dim, length), delta_bias=rnd(dim), delta_softplus=True)


@pytest.mark.parametrize("length", [1, 2, 7, 16, 32, 33, 129])
@pytest.mark.parametrize("groups", [None, 1, 2])
def test_scan_matches_sequential_float64(length, groups, solver):
    args = _inputs(2, 6, length, 4, groups, seed=length)
    y_ref = selective_scan_ref(**args)
    y = selective_scan_torch(**args)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(y_ref)
    leaves = [v for v in args.values() if isinstance(v, torch.Tensor)]
    for g_ref, g in zip(torch.autograd.grad(y_ref, leaves, grad), torch.autograd.grad(y, leaves, grad)):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


def test_scan_without_optional_terms_and_float32(solver):
    args = _inputs(1, 4, 50, 3, None, dtype=torch.float32, seed=3)
    for key in ("D", "z", "delta_bias"):
        args[key] = None
    args["delta_softplus"] = False
    args["delta"] = args["delta"].detach().abs().requires_grad_()
    y = selective_scan_torch(**args)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, selective_scan_ref(**args), rtol=1e-4, atol=1e-5)


def test_scan_state_stays_fp32_under_cpu_autocast(solver):
    args = _inputs(2, 8, 40, 4, 2, dtype=torch.float32, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = selective_scan_torch(**args)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, selective_scan_ref(**args), rtol=1e-5, atol=1e-5)


def test_scan_keeps_bfloat16_io(solver):
    args = _inputs(1, 4, 9, 3, None, dtype=torch.float32, seed=4)
    args["u"] = args["u"].detach().bfloat16()
    assert selective_scan_torch(**args).dtype == torch.bfloat16


def test_triton_failure_falls_back_only_under_auto(monkeypatch):
    """A Triton compile or launch failure under ``auto`` disables Triton for the process and runs the
    fallback; an explicit ``triton`` raises, and so do errors of the inputs themselves."""
    from ssamba.ops import backend

    monkeypatch.setattr(backend, "_triton_failure", [])

    def broken():
        raise RuntimeError("PTX compile failed")

    def bad_input():
        raise ValueError("x must have unit channel stride")

    with pytest.raises(RuntimeError):
        backend.triton_or_fallback("triton", broken, lambda: "fallback")
    assert not backend._triton_failure
    with pytest.raises(ValueError):
        backend.triton_or_fallback("auto", bad_input, lambda: "fallback")
    assert backend.triton_or_fallback("auto", broken, lambda: "fallback") == "fallback"
    assert backend._triton_failure and "PTX compile failed" in backend._triton_failure[0]
    assert backend.resolve_backend("auto", on_cuda=True) != "triton"


def test_cpu_picks_the_stepped_scan_for_big_states_and_it_keeps_no_state_per_step(monkeypatch):
    """A layer-sized state on CPU steps through time; for training it keeps its inputs and one state per
    32-step chunk, not the ``[batch, channels, N, L]`` decays and states the log-depth scan keeps."""
    batch, dim, d_state, length = 2, 512, 16, 256
    assert batch * dim * d_state >= scan.STEPPED_MIN_STATE
    args = _inputs(batch, dim, length, d_state, 2, dtype=torch.float32)
    one_state_per_step = batch * dim * d_state * length * 4
    stepped = saved_bytes(lambda: selective_scan_torch(**args))
    monkeypatch.setattr(scan, "STEPPED_MIN_STATE", SOLVERS["log-depth"])
    log_depth = saved_bytes(lambda: selective_scan_torch(**args))
    assert stepped < one_state_per_step <= log_depth / 2  # the stepped one keeps [batch, dim, L] inputs
