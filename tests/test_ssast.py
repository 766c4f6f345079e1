"""SSAST encoder, and the encoder interface checked on every registered model."""
import dataclasses

import pytest
import torch

from ssamba.models import build_encoder, encoder_from_config, list_models
from ssamba.models.ssast import SSASTEncoder

# Small overrides per family so every registered model runs in well under a second on CPU.
_TINY = {
    "ssamba": {"embed_dim": 32, "depth": 2, "d_state": 4, "input_tdim": 64, "backend": "torch"},
    "ssast": {"embed_dim": 32, "depth": 2, "num_heads": 4, "input_tdim": 64},
}


def small_encoder(name: str, **extra):
    return build_encoder(name, **{**_TINY[name.split("_")[0]], **extra})


@pytest.mark.parametrize("name", list_models())
def test_registered_model_shapes_and_grads(name):
    torch.manual_seed(0)
    enc = small_encoder(name)
    assert enc.grid == (8, 4) and enc.num_patches == 32
    x = torch.randn(2, 64, 128)
    out, states = enc.forward_features(x, return_hidden_states=True)
    assert out.shape == (2, enc.num_prefix_tokens + 32, enc.embed_dim)
    assert len(states) >= 1 and all(s.shape == out.shape for s in states)
    assert enc.patchify(x).shape == (2, 32, 256)
    out.square().mean().backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no/non-finite gradient for {missing}"


@pytest.mark.parametrize("name", list_models())
def test_registered_model_mask_and_set_grid(name):
    torch.manual_seed(0)
    enc = small_encoder(name).eval()
    x = torch.randn(1, 64, 128)
    mask = torch.zeros(1, enc.num_patches, dtype=torch.bool)
    mask[0, :5] = True
    token = torch.randn(enc.embed_dim)
    masked = enc.forward_features(x, mask=mask, mask_token=token)
    x_changed = x.clone()
    x_changed[:, :16, :16] += 5.0  # only patch 0 (f=0, t=0) sees this, and it is masked
    assert torch.allclose(masked, enc.forward_features(x_changed, mask=mask, mask_token=token), atol=1e-5)
    assert not torch.allclose(masked, enc(x), atol=1e-3)

    prefix = enc.pos_embed[:, : enc.num_prefix_tokens].detach().clone()
    enc.set_grid(input_tdim=100, fstride=10, tstride=10)
    assert enc.grid == (12, 9)
    assert enc.pos_embed.shape == (1, enc.num_prefix_tokens + 108, enc.embed_dim)
    assert torch.equal(enc.pos_embed[:, : enc.num_prefix_tokens], prefix)
    assert enc(torch.randn(1, 100, 128)).shape == (1, enc.num_prefix_tokens + 108, enc.embed_dim)
    with pytest.raises(ValueError, match="set_grid"):
        enc(torch.randn(1, 64, 128))
    rebuilt = encoder_from_config(dataclasses.asdict(enc.config))
    assert rebuilt.grid == enc.grid and type(rebuilt) is type(enc)


def _attention_by_hand(attn, x):
    batch, length, dim = x.shape
    heads = attn.num_heads
    q, k, v = attn.qkv(x).view(batch, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) * (dim // heads) ** -0.5).softmax(-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(batch, length, dim))


def test_ssast_block_matches_explicit_vit_computation():
    torch.manual_seed(0)
    enc = small_encoder("ssast_tiny")
    block = enc.blocks[0]
    x = torch.randn(2, 10, 32)
    h = x + _attention_by_hand(block.attn, block.norm1(x))
    expected = h + block.mlp.fc2(torch.nn.functional.gelu(block.mlp.fc1(block.norm2(h))))
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size,width,heads", [("tiny", 192, 3), ("small", 384, 6), ("base", 768, 12)])
def test_ssast_sizes_follow_the_released_models(size, width, heads):
    enc = build_encoder(f"ssast_{size}", input_tdim=32)
    assert isinstance(enc, SSASTEncoder)
    assert (enc.embed_dim, enc.config.num_heads, len(enc.blocks), enc.num_prefix_tokens) == (width, heads, 12, 2)
    assert enc.blocks[0].norm1.eps == 1e-6 and enc.blocks[0].mlp.fc1.out_features == 4 * width
    assert enc.pos_embed.shape == (1, 2 + enc.num_patches, width)


def test_ssast_rejects_bad_config():
    with pytest.raises(ValueError, match="num_heads"):
        build_encoder("ssast_tiny", num_heads=5)
    with pytest.raises(TypeError, match="d_state"):
        build_encoder("ssast_tiny", d_state=16)
