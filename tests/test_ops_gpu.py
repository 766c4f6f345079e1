"""GPU backends (Triton, mamba-ssm CUDA) against the plain-PyTorch path on the same weights.

fp32 with TF32 off: relative error <= 1e-4 for outputs and every gradient; bf16 inputs: <= 1e-2
against an fp32 reference. Shapes include odd lengths and the pretraining length (513 tokens).
"""
import pytest
import torch

from ssamba.models import build_encoder
from ssamba.models.ssamba import BiMambaMixer, MambaBlock, SSAMBAConfig
from ssamba.ops import BranchWeights, bimamba_inner
from ssamba.ops import bimamba as bimamba_module
from ssamba.ops.backend import cuda_kernels, gluon_scan_usable, triton_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _available(backend, monkeypatch):
    """The backend name to run. ``triton-plain`` is the ``triton`` backend with its plain-Triton scan,
    what runs where the Gluon scan cannot (``triton`` itself uses Gluon on this GPU)."""
    if backend.startswith("triton") and not triton_available():
        pytest.skip("triton not installed")
    if backend == "cuda" and cuda_kernels() is None:
        pytest.skip("mamba-ssm / causal-conv1d not installed")
    if backend == "triton-plain":  # the mixer and the encoder's pairs both ask ops.bimamba.gluon_mixer_runs
        monkeypatch.setattr(bimamba_module, "gluon_scan_usable", lambda *args: False)
        return "triton"
    return backend


@pytest.fixture(autouse=True)
def no_tf32():
    """TF32 in the reference's matmuls/convs alone gives ~1e-3 differences; compare exact fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _relerr(a, b):
    """Relative error; a (near-)zero reference such as dA at length 1 is compared absolutely."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-3)).item()


def _weights(E, N, R, K, gen, zero_bias=False):
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).requires_grad_()

    dt_bias = torch.zeros(E, device="cuda") if zero_bias else torch.rand(E, generator=gen, device="cuda") * 4 - 6
    A_log = torch.log(torch.rand(E, N, generator=gen, device="cuda") * 15 + 1)
    return BranchWeights(rnd(E, 1, K, scale=0.5), rnd(E, scale=0.2), rnd(R + 2 * N, E, scale=E ** -0.5),
                         rnd(E, R, scale=R ** -0.5), dt_bias.requires_grad_(), A_log.requires_grad_(), rnd(E))


@pytest.mark.parametrize("backend", ["triton", "triton-plain", "cuda"])
@pytest.mark.parametrize("batch,length,E,N,R", [(2, 37, 32, 16, 2), (3, 513, 64, 16, 4), (2, 100, 48, 8, 3),
                                                (1, 1, 16, 16, 1), (2, 70, 40, 16, 3),
                                                (2, 45, 42, 16, 3)])
def test_inner_fp32_matches_torch(backend, batch, length, E, N, R, monkeypatch):
    name = _available(backend, monkeypatch)
    gen = torch.Generator(device="cuda").manual_seed(length * 7 + E)
    fwd, bwd = _weights(E, N, R, 4, gen), _weights(E, N, R, 4, gen, zero_bias=True)
    xz = torch.randn(batch, length, 2 * E, generator=gen, device="cuda").requires_grad_()
    params = [xz, *fwd, *bwd]
    dy = torch.randn(batch, length, E, generator=gen, device="cuda")
    results = {}
    for run in ("torch", name):
        y = bimamba_inner(xz.transpose(1, 2), fwd, bwd, backend=run)
        results[run] = (y, torch.autograd.grad(y, params, dy))
    (y, grads), (y_ref, grads_ref) = results[name], results["torch"]
    assert torch.isfinite(y).all() and _relerr(y, y_ref) <= 1e-4
    names = ["xz"] + [f"fwd.{f}" for f in BranchWeights._fields] + [f"bwd.{f}" for f in BranchWeights._fields]
    for param, g, g_ref in zip(names, grads, grads_ref):
        assert _relerr(g, g_ref) <= 1e-4, f"{backend} grad {param}: {_relerr(g, g_ref):.2e}"


def _errors_against_float64_at_513(backend):
    """The output's and every gradient's relative error of one backend in fp32 against the PyTorch
    path in float64, on the 513-token case."""
    batch, length, E, N, R = 3, 513, 64, 16, 4
    gen = torch.Generator(device="cuda").manual_seed(length * 7 + E)
    fwd, bwd = _weights(E, N, R, 4, gen), _weights(E, N, R, 4, gen, zero_bias=True)
    xz = torch.randn(batch, length, 2 * E, generator=gen, device="cuda").requires_grad_()
    dy = torch.randn(batch, length, E, generator=gen, device="cuda")
    params = [xz, *fwd, *bwd]
    exact = [p.detach().double().requires_grad_() for p in params]
    y_ref = bimamba_inner(exact[0].transpose(1, 2), BranchWeights(*exact[1:8]), BranchWeights(*exact[8:]), "torch")
    grads_ref = torch.autograd.grad(y_ref, exact, dy.double())
    y = bimamba_inner(xz.transpose(1, 2), fwd, bwd, backend=backend)
    grads = torch.autograd.grad(y, params, dy)
    names = ["xz"] + [f"fwd.{f}" for f in BranchWeights._fields] + [f"bwd.{f}" for f in BranchWeights._fields]
    return _relerr(y, y_ref), {param: _relerr(g, g_ref) for param, g, g_ref in zip(names, grads, grads_ref)}


@pytest.mark.parametrize("backend", ["torch", "triton", "triton-plain", "cuda"])
def test_inner_fp32_against_float64_at_the_pretraining_length(backend, monkeypatch):
    """Ground truth for the 513-token case: each fp32 path against the PyTorch path in float64.

    Where the fp32 backends disagree with each other, this says which one is off.
    """
    name = backend if backend == "torch" else _available(backend, monkeypatch)
    out_error, errors = _errors_against_float64_at_513(name)
    assert out_error <= 1e-4
    assert max(errors.values()) <= 1e-4, f"{backend} vs float64: {errors}"


@pytest.mark.parametrize("backend", ["triton", "triton-plain", "cuda"])
@pytest.mark.parametrize("length,embed_dim", [(513, 192), (77, 192), (77, 21)])
def test_mixer_bf16_matches_fp32_torch(backend, length, embed_dim, monkeypatch):
    """bf16 autocast mixer vs the fp32 PyTorch mixer on the same weights (42 channels per direction:
    the Gluon scan's row copies narrow to 4 bytes)."""
    name = _available(backend, monkeypatch)
    torch.manual_seed(length)
    cfg = SSAMBAConfig(embed_dim=embed_dim, depth=2, backend="torch")
    mixer = BiMambaMixer(cfg, layer_idx=0).cuda()
    with torch.no_grad():  # trained-like parameters rather than the init's ones/zeros
        mixer.D.normal_(), mixer.D_b.normal_(), mixer.dt_proj_b.bias.uniform_(-5, -2)
    hidden = torch.randn(4, length, embed_dim, device="cuda", requires_grad=True)
    dy = torch.randn(4, length, embed_dim, device="cuda")
    params = [hidden, *mixer.parameters()]
    out_ref = mixer(hidden)
    grads_ref = torch.autograd.grad(out_ref, params, dy)
    mixer.cfg.backend = name
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = mixer(hidden)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out, params, dy)
    assert _relerr(out, out_ref) <= 1e-2
    names = ["hidden"] + [n for n, _ in mixer.named_parameters()]
    for param, g, g_ref in zip(names, grads, grads_ref):
        assert _relerr(g, g_ref) <= 1e-2, f"{backend} grad {param}: {_relerr(g, g_ref):.2e}"


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("first_layer", [False, True])
def test_block_fused_add_norm_matches_torch(norm, first_layer):
    """The ``triton`` block (fused residual add + norm, then the mixer) vs the PyTorch block under bf16
    autocast, training mode with drop path (the same per-sample draw on both paths)."""
    if not triton_available():
        pytest.skip("triton not installed")
    torch.manual_seed(0)
    cfg = SSAMBAConfig(embed_dim=64, depth=2, norm=norm, backend="torch")
    block = MambaBlock(cfg, layer_idx=1, drop_path=0.5).cuda().train()
    hidden = torch.randn(6, 77, 64, device="cuda", requires_grad=True)
    residual = None if first_layer else torch.randn(6, 77, 64, device="cuda", requires_grad=True)
    d_out, d_res = torch.randn(6, 77, 64, device="cuda"), torch.randn(6, 77, 64, device="cuda")
    inputs = [hidden] + ([] if first_layer else [residual]) + list(block.parameters())

    def run(backend):
        cfg.backend = backend
        torch.manual_seed(1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, res = block(hidden, residual)
        return out, res, torch.autograd.grad((out.float() * d_out).sum() + (res.float() * d_res).sum(), inputs)

    out_ref, res_ref, grads_ref = run("torch")
    out, res, grads = run("triton")
    assert out.dtype == out_ref.dtype and res.dtype == res_ref.dtype
    assert _relerr(out, out_ref) <= 1e-2 and _relerr(res, res_ref) <= 1e-5
    names = ["hidden"] + ([] if first_layer else ["residual"]) + [n for n, _ in block.named_parameters()]
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert _relerr(g, g_ref) <= 1e-2, f"grad {name}: {_relerr(g, g_ref):.2e}"


@pytest.mark.parametrize("backend", ["triton", "triton-plain"])
def test_parameter_gradients_keep_no_activation_sized_buffer(backend, monkeypatch):
    """No parameter gradient of a training step is a view of an activation-sized buffer (the scan's
    dB/dC, 2 MiB here): a gradient keeps its storage alive until the optimizer step. Views of small
    per-layer buffers (a few parameters' gradients side by side) are fine."""
    name = _available(backend, monkeypatch)
    torch.manual_seed(0)
    encoder = build_encoder("ssamba_tiny", depth=4, backend=name).cuda().train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = encoder(torch.randn(16, 1024, 128, device="cuda"))
    out.float().pow(2).mean().backward()
    for pname, p in encoder.named_parameters():
        extra = p.grad.untyped_storage().nbytes() - p.grad.numel() * p.grad.element_size()
        assert extra <= 2**18, f"{pname}: its gradient keeps {extra} bytes more alive"


def _pair_step(encoder, fbank, pair):
    """A bf16 training step of ``encoder`` with its pairs run by ``pair`` (the encoder's fused or
    two-block path): output, every parameter gradient, and the peak memory above the start."""
    encoder._pair = pair
    encoder.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    torch.manual_seed(1)  # the same drop-path draws on both paths
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = encoder(fbank)
    out.float().pow(2).mean().backward()
    peak = torch.cuda.max_memory_allocated() - start
    del encoder._pair
    grads = torch.cat([p.grad.flatten() for p in encoder.parameters()]).double()
    return out.detach().double(), grads, peak


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_fused_pair_matches_two_blocks_and_keeps_less(norm):
    """The published pair as one Function (``ops.pair``) vs two blocks, in a bf16 training step of the
    tiny encoder at the pretraining grid with drop path: the same outputs and gradients (bf16 <= 1e-2;
    the residual stream's arithmetic is the same fp32) and, per pair, at least half of the memory
    arithmetic says it saves (two fp32 residuals and two bf16 normed streams kept, against one fp32
    residual and one bf16 hidden)."""
    if not (triton_available() and gluon_scan_usable(torch.device("cuda"), 16, 384)):
        pytest.skip("the fused pair runs on the Gluon scan")
    torch.manual_seed(0)
    encoder = build_encoder("ssamba_tiny", norm=norm, drop_path_rate=0.1, backend="triton").cuda().train()
    fbank = torch.randn(8, 1024, 128, device="cuda")
    out_ref, grads_ref, peak_ref = _pair_step(encoder, fbank, encoder._pair_blocks)
    out, grads, peak = _pair_step(encoder, fbank, encoder._pair_fused)
    assert _relerr(out, out_ref) <= 1e-2 and _relerr(grads, grads_ref) <= 1e-2
    pairs, tokens, dim = len(encoder.layers) // 2, out.shape[0] * out.shape[1], out.shape[2]
    arithmetic = pairs * tokens * dim * (2 * 4 + 2 * 2 - (4 + 2))
    assert peak_ref - peak >= arithmetic / 2, f"saved {(peak_ref - peak) / 2**20:.0f} MiB of {arithmetic / 2**20:.0f}"


def _encoder_run(encoder, fbank, backend, dtype):
    encoder.set_backend(backend)
    encoder.to(dtype).zero_grad()
    out = encoder(fbank.to(dtype))
    out.pow(2).mean().backward()
    grads = torch.cat([p.grad.flatten() for p in encoder.parameters()])
    return out.detach().double(), grads.double()


@pytest.mark.parametrize("backend", ["triton", "triton-plain", "cuda"])
def test_encoder_fp32_as_accurate_as_torch(backend, monkeypatch):
    """The full 24-layer tiny encoder at the pretraining grid (513 tokens), outputs and all parameter grads.

    The published layer pairing sums the residual streams at every pair, so the encoder amplifies
    rounding: on CPU the fp32 PyTorch path alone is ~5e-3 from float64. Each fp32 backend is therefore
    held to the fp32 PyTorch path's own error against a float64 run of the same weights.
    """
    name = _available(backend, monkeypatch)
    torch.manual_seed(0)
    encoder = build_encoder("ssamba_tiny", backend="torch").cuda()
    fbank = torch.randn(2, 1024, 128, device="cuda")
    out64, grad64 = _encoder_run(encoder, fbank, "torch", torch.float64)
    out_t, grad_t = _encoder_run(encoder, fbank, "torch", torch.float32)
    out_b, grad_b = _encoder_run(encoder, fbank, name, torch.float32)
    assert _relerr(out_b, out64) <= max(2 * _relerr(out_t, out64), 1e-4)
    assert _relerr(grad_b, grad64) <= max(2 * _relerr(grad_t, grad64), 1e-4)


def test_auto_prefers_triton_on_cuda():
    from ssamba.ops.backend import resolve_backend

    expected = "triton" if triton_available() else ("cuda" if cuda_kernels() is not None else "torch")
    assert resolve_backend("auto", on_cuda=True) == expected


def test_triton_backend_uses_the_gluon_scan_here():
    """On a compute capability >= 8.0 NVIDIA GPU the fast path is the one the tests above exercise."""
    if torch.version.hip is not None or torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("Gluon scan needs an NVIDIA GPU of compute capability >= 8.0")
    pytest.importorskip("triton.experimental.gluon")
    assert gluon_scan_usable(torch.device("cuda"), 16, 384)
    assert not gluon_scan_usable(torch.device("cuda"), 12, 384)  # the plain-Triton scan pads odd state counts
    assert not gluon_scan_usable(torch.device("cuda"), 16, 35)  # 16-bit rows copied in 4-byte pieces
