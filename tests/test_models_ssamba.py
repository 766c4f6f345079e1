"""The SSAMBA encoder: sizes, grids, the released layer pairing and mixer, options, backends."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import ssamba
from ssamba.models import SSAMBAConfig, encoder_from_config, list_models
from ssamba.ops import selective_scan_ref

SMALL = dict(embed_dim=32, depth=2, input_tdim=64, input_fdim=32)  # 2 x 4 patches of 16 x 16


@pytest.mark.parametrize("size,expected", [("tiny", 6_922_176), ("small", 25_345_920), ("base", 96_698_112)])
def test_parameter_counts_match_the_released_models(size, expected):
    encoder = ssamba.build_encoder(size)
    assert sum(p.numel() for p in encoder.parameters()) == expected
    assert encoder.grid == (8, 64) and encoder.num_patches == 512


def test_registry_lists_sizes_and_rejects_unknown_names_and_fields():
    assert {"ssamba_tiny", "ssamba_small", "ssamba_base"} <= set(list_models())
    with pytest.raises(KeyError, match="unknown model 'huge'"):
        ssamba.build_encoder("huge")
    with pytest.raises(TypeError, match="unknown SSAMBAConfig field"):
        ssamba.build_encoder("tiny", width=3)
    with pytest.raises(ValueError, match="norm='batchnorm'"):
        ssamba.build_encoder("tiny", norm="batchnorm")
    with pytest.raises(ValueError, match="depth=3 must be even"):
        ssamba.build_encoder("tiny", depth=3)


def test_pretraining_and_finetuning_grids():
    torch.manual_seed(0)
    encoder = ssamba.build_encoder("tiny", depth=2).eval()
    with torch.no_grad():
        assert encoder(torch.randn(2, 1024, 128)).shape == (2, 513, 192)
        finetune = ssamba.build_encoder("tiny", depth=2, fstride=10, tstride=10)
        assert finetune.grid == (12, 101)
        assert finetune(torch.randn(1, 1024, 128)).shape == (1, 1 + 12 * 101, 192)
    with pytest.raises(ValueError, match="call set_grid"):
        encoder(torch.randn(1, 998, 128))


def test_set_grid_adapts_position_embedding():
    torch.manual_seed(0)
    encoder = ssamba.build_encoder("tiny", depth=2)
    cls_pos = encoder.pos_embed[:, :1].clone()
    patch_pos = encoder.pos_embed[:, 1:].reshape(8, 64, 192).clone()
    encoder.set_grid(input_tdim=512)  # time axis shrinks 64 -> 32: centre cut
    assert encoder.grid == (8, 32) and encoder.pos_embed.shape == (1, 1 + 256, 192)
    torch.testing.assert_close(encoder.pos_embed[:, :1], cls_pos)
    torch.testing.assert_close(encoder.pos_embed[0, 1:].reshape(8, 32, 192), patch_pos[:, 16:48])
    encoder.set_grid(input_tdim=1024, fstride=10, tstride=10)  # both axes grow: interpolation
    assert encoder.grid == (12, 101) and encoder.pos_embed.shape == (1, 1 + 1212, 192)
    assert encoder.config.fstride == 10 and encoder.layers[0].mixer.cfg.tstride == 10
    assert encoder.patch_embed.proj.stride == (10, 10)
    with torch.no_grad():
        assert encoder(torch.randn(1, 1024, 128)).shape == (1, 1213, 192)
    same = ssamba.build_encoder("tiny", depth=2)
    before = same.pos_embed.clone()
    same.set_grid(input_tdim=1024)
    torch.testing.assert_close(same.pos_embed, before)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    encoder = ssamba.build_encoder("tiny", **SMALL)
    mask_token = torch.nn.Parameter(torch.randn(32))
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, :3] = True
    encoder.forward_features(torch.randn(2, 64, 32), mask=mask, mask_token=mask_token).square().mean().backward()
    missing = [n for n, p in encoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert mask_token.grad.abs().sum() > 0


def _mixer_by_hand(mixer, hidden):
    """Each direction written out separately, with the sequential reference scan."""
    d_inner, d_state, dt_rank = mixer.cfg.d_inner, mixer.cfg.d_state, mixer.cfg.dt_rank
    x, z = mixer.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)
    length = x.shape[-1]

    def direction(x, z, conv, x_proj, dt_proj, A_log, D):
        x = F.silu(conv(x)[..., :length])
        dt, B, C = x_proj(x.transpose(1, 2)).split([dt_rank, d_state, d_state], dim=-1)
        delta = (dt @ dt_proj.weight.T).transpose(1, 2)
        return selective_scan_ref(x, delta, -torch.exp(A_log), B.transpose(1, 2), C.transpose(1, 2), D, z,
                                  dt_proj.bias, delta_softplus=True)

    y_f = direction(x, z, mixer.conv1d, mixer.x_proj, mixer.dt_proj, mixer.A_log, mixer.D)
    y_b = direction(x.flip(-1), z.flip(-1), mixer.conv1d_b, mixer.x_proj_b, mixer.dt_proj_b, mixer.A_b_log, mixer.D_b)
    assert y_f.shape[1] == d_inner
    return mixer.out_proj(((y_f + y_b.flip(-1)) / 2).transpose(1, 2))


def test_bidirectional_mixer_equals_its_two_directions_written_out():
    torch.manual_seed(0)
    encoder = ssamba.build_encoder("tiny", **SMALL).double()
    for p in encoder.parameters():  # move away from the init so the two branches really differ
        p.data.add_(torch.randn_like(p) * 0.05)
    mixer = encoder.layers[0].mixer
    hidden = torch.randn(2, 11, 32, dtype=torch.float64)
    torch.testing.assert_close(mixer(hidden), _mixer_by_hand(mixer, hidden), rtol=1e-9, atol=1e-9)


def test_encoder_follows_the_released_pairing_and_double_final_norm():
    torch.manual_seed(0)
    encoder = ssamba.build_encoder("tiny", **SMALL).double().eval()
    x = torch.randn(2, 64, 32, dtype=torch.float64)
    l0, l1 = encoder.layers
    tokens = encoder.patch_embed(x.transpose(1, 2).unsqueeze(1))
    h0 = torch.cat([encoder.cls_token.expand(2, -1, -1), tokens], 1) + encoder.pos_embed
    h = l0.mixer(l0.norm(h0)) + l1.mixer(l1.norm(h0.flip(1))).flip(1)
    residual = h0 + h0.flip(1).flip(1)  # the released code sums the two residual streams
    expected = encoder.norm_f(encoder.norm_f(residual + h))
    torch.testing.assert_close(encoder(x), expected, rtol=1e-9, atol=1e-9)


def test_options_change_the_function_but_keep_the_interface():
    torch.manual_seed(0)
    x = torch.randn(1, 64, 32)
    base = ssamba.build_encoder("tiny", **SMALL).eval()
    once = ssamba.build_encoder("tiny", **SMALL, final_norm="once").eval()
    once.load_state_dict(base.state_dict())
    torch.testing.assert_close(base(x), base.norm_f(once(x)))
    for option in (dict(norm="rmsnorm"), dict(pairing="stack"), dict(residual_in_fp32=True)):
        variant = ssamba.build_encoder("tiny", **SMALL, **option).eval()
        assert variant(x).shape == (1, 9, 32), option
    stacked = ssamba.build_encoder("tiny", **SMALL, pairing="stack").eval()
    stacked.load_state_dict(base.state_dict())
    assert not torch.allclose(stacked(x), base(x))


def test_released_initialisation():
    encoder = ssamba.build_encoder("tiny", depth=2)
    mixer = encoder.layers[1].mixer
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    assert torch.all(mixer.dt_proj_b.bias == 0)  # the backward-branch quirk
    expected_A = torch.log(torch.arange(1, 17, dtype=torch.float32)).expand(384, 16)
    torch.testing.assert_close(mixer.A_log, expected_A)
    torch.testing.assert_close(mixer.A_b_log, expected_A)
    assert torch.all(mixer.D == 1) and torch.all(mixer.D_b == 1)
    assert encoder.layers[0].drop_path.p == 0.0
    assert math.isclose(encoder.layers[1].drop_path.p, 0.0)  # [0] + linspace(0, 0.1, 2) -> index 1 is 0
    deep = ssamba.build_encoder("tiny", depth=24)
    assert math.isclose(deep.layers[23].drop_path.p, 0.1 * 22 / 23, rel_tol=1e-6)
    assert math.isclose(deep.drop_path.p, 0.1)


def test_determinism_under_a_fixed_seed():
    def run():
        torch.manual_seed(123)
        encoder = ssamba.build_encoder("tiny", **SMALL).eval()
        return encoder, encoder(torch.randn(2, 64, 32))

    (a, ya), (b, yb) = run(), run()
    assert torch.equal(ya, yb)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_config_round_trip_and_state_dict_across_backends():
    torch.manual_seed(0)
    encoder = ssamba.build_encoder("tiny", **SMALL, backend="torch").eval()
    rebuilt = encoder_from_config(dataclasses.asdict(encoder.config)).eval()
    rebuilt.load_state_dict(encoder.state_dict())
    rebuilt.set_backend("auto")
    x = torch.randn(1, 64, 32)
    torch.testing.assert_close(rebuilt(x), encoder(x))
    assert isinstance(rebuilt.config, SSAMBAConfig) and rebuilt.config.backend == "auto"


def test_hidden_states_one_per_pair():
    encoder = ssamba.build_encoder("tiny", **{**SMALL, "depth": 4}).eval()
    out, states = encoder.forward_features(torch.randn(1, 64, 32), return_hidden_states=True)
    assert len(states) == 2 and all(s.shape == out.shape for s in states)
    stacked = ssamba.build_encoder("tiny", **{**SMALL, "depth": 4}, pairing="stack").eval()
    assert len(stacked.forward_features(torch.randn(1, 64, 32), return_hidden_states=True)[1]) == 4


@pytest.mark.parametrize("first_layer", [False, True])
def test_reverse_block_is_the_block_on_flipped_time(first_layer):
    """The published pairing's second layer runs ``reverse=True`` on the original order instead of on
    flipped copies: the same function (the branches' parameters swap roles)."""
    from ssamba.models.ssamba import MambaBlock, SSAMBAConfig

    torch.manual_seed(0)
    block = MambaBlock(SSAMBAConfig(embed_dim=32, depth=2, backend="torch"), layer_idx=1, drop_path=0.0).double()
    with torch.no_grad():  # make the two branches differ everywhere
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hidden = torch.randn(2, 11, 32, dtype=torch.float64)
    residual = None if first_layer else torch.randn(2, 11, 32, dtype=torch.float64)
    out_ref, res_ref = block(hidden.flip(1), None if residual is None else residual.flip(1))
    out, res = block(hidden, residual, reverse=True)
    torch.testing.assert_close(out, out_ref.flip(1))
    torch.testing.assert_close(res, res_ref.flip(1))
    assert not torch.allclose(out, block(hidden, residual)[0])  # reverse is not a no-op


def test_patchify_is_token_ordered():
    encoder = ssamba.build_encoder("tiny", **SMALL)
    x = torch.arange(64 * 32, dtype=torch.float32).reshape(1, 64, 32)  # [frames, bins]
    patches = encoder.patchify(x)
    assert patches.shape == (1, 8, 256)
    # token 5 is frequency row 1, time column 1: bins 16..31, frames 16..31
    torch.testing.assert_close(patches[0, 5].reshape(16, 16), x[0, 16:32, 16:32].T)


@pytest.mark.parametrize("frames,bins,shape,stride", [(64, 32, (16, 16), (16, 16)), (70, 37, (16, 16), (16, 16)),
                                                      (64, 32, (16, 16), (10, 10)), (20, 128, (128, 2), (128, 2))])
def test_unfold_patches_matches_unfold(frames, bins, shape, stride):
    """The reshape used for non-overlapping patches gives ``F.unfold``'s values and order (partial
    patches at the edges dropped), and overlapping patches still go through ``F.unfold``."""
    from ssamba.models.layers import fbank_to_image, unfold_patches

    x = torch.randn(3, frames, bins)
    want = torch.nn.functional.unfold(fbank_to_image(x), kernel_size=shape, stride=stride).transpose(1, 2)
    torch.testing.assert_close(unfold_patches(x, *shape, *stride), want, rtol=0, atol=0)


def test_cuda_backend_errors_clearly_without_kernels():
    from ssamba.ops import cuda_kernels

    if cuda_kernels() is not None:
        pytest.skip("mamba-ssm is installed here")
    encoder = ssamba.build_encoder("tiny", **SMALL, backend="cuda")
    with pytest.raises(ImportError, match=r"needs mamba-ssm and causal-conv1d, which do not import here \(\w+Error"):
        encoder(torch.randn(1, 64, 32))


def test_a_broken_kernel_build_leaves_auto_on_the_torch_path(monkeypatch):
    import builtins

    from ssamba.ops import backend

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):  # a build against another CUDA: the extension fails to load
        if name.startswith(("causal_conv1d", "mamba_ssm")):
            raise OSError("libcudart.so.11.0: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    backend._import_kernels.cache_clear()
    monkeypatch.setattr(builtins, "__import__", broken)
    try:
        assert backend.cuda_kernels() is None and backend.resolve_backend("auto", on_cuda=False) == "torch"
        with pytest.raises(ImportError, match="OSError: libcudart.so.11.0"):
            backend.resolve_backend("cuda", on_cuda=True)
    finally:
        backend._import_kernels.cache_clear()


# Not a speed measurement (bench/embed.py measures speed): a bound ten times what the full-size encoder took
# on 2 CPU cores shared with other work (30 s; 3-5 s on idle cores), so only a pathological slowdown fails.
CPU_TEN_SECOND_CLIP_BOUND_S = 300


def test_cpu_inference_of_a_ten_second_clip_finishes():
    import time

    encoder = ssamba.build_encoder("tiny").eval()
    start = time.perf_counter()
    with torch.no_grad():
        tokens = encoder(torch.randn(1, 1024, 128))
    assert tokens.shape == (1, 513, 192) and torch.isfinite(tokens).all()
    assert time.perf_counter() - start < CPU_TEN_SECOND_CLIP_BOUND_S
