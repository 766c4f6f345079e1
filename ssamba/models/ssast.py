"""SSAST: the ViT encoder of the self-supervised audio spectrogram transformer (arXiv 2110.09784).

The released SSAST models are DeiT-distilled ViTs: two prefix tokens (``cls_token``,
``dist_token``), a learnable position embedding over prefix + patches, pre-norm transformer
blocks and a final ``norm``. Parameter names follow the released checkpoints (``blocks.N.norm1``,
``blocks.N.attn.qkv``, ``blocks.N.attn.proj``, ``blocks.N.norm2``, ``blocks.N.mlp.fc1/fc2``) so
conversion is a prefix change, exactly as for SSAMBA. The encoder interface is the one of
docs/architecture.md, so both families run under the same pretraining and finetuning tasks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..constants import MEL_BINS
from . import released
from .layers import DropPath, PatchTokenEncoder, grid_shape
from .registry import config_overrides, register_model


@dataclass
class SSASTConfig:
    """Everything needed to rebuild an SSAST encoder; stored with every checkpoint."""

    name: str = "ssast_tiny"
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    fshape: int = 16
    tshape: int = 16
    fstride: int = 16
    tstride: int = 16
    input_fdim: int = MEL_BINS
    input_tdim: int = 1024
    drop_path_rate: float = 0.0  # the released models were trained without stochastic depth
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        grid_shape(self.input_fdim, self.input_tdim, self.fshape, self.tshape, self.fstride, self.tstride)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (bias), via scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, L, head_dim]
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, cfg: SSASTConfig, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg.embed_dim, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SSASTEncoder(PatchTokenEncoder):
    """Patch embedding + cls and distillation tokens + position embedding + ViT blocks + final norm."""

    num_prefix_tokens = 2
    layer_stack, top_modules = "blocks", ("norm",)

    def __init__(self, config: SSASTConfig):
        super().__init__(config)
        cfg = config
        self.dist_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(Block(cfg, rate) for rate in rates)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """ViT/DeiT initialisation: truncated normal (std 0.02) tokens and linear weights, zero biases."""
        for param in (self.pos_embed, self.cls_token, self.dist_token):
            nn.init.trunc_normal_(param, std=0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def prefix_tokens(self) -> Tensor:
        return torch.cat([self.cls_token, self.dist_token], dim=1)

    @property
    def num_hidden_states(self) -> int:
        """How many layer outputs ``forward_features(..., return_hidden_states=True)`` returns."""
        return len(self.blocks)

    def forward_features(self, x: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None,
                         return_hidden_states: bool = False):
        """Token features ``[B, 2 + num_patches, D]`` (cls, dist first) after the final norm.

        With ``return_hidden_states`` also returns every block's output (before the final norm).
        """
        hidden = self.embed_tokens(x, mask, mask_token)
        states = []
        for block in self.blocks:
            hidden = block(hidden)
            if return_hidden_states:
                states.append(hidden)
        out = self.norm(hidden)
        return (out, states) if return_hidden_states else out


SIZES = {"tiny": {"embed_dim": 192, "num_heads": 3}, "small": {"embed_dim": 384, "num_heads": 6},
         "base": {"embed_dim": 768, "num_heads": 12}}
RELEASED_MARKER = "v.blocks."  # a released file holding this key is an SSAST model


def released_config(encoder_state: dict[str, Tensor], **overrides) -> dict:
    """SSASTConfig fields read off a released encoder's tensors (keys after ``module.v.``); ``overrides`` win.
    The head count is not in the tensors: it comes from the size table, or ``num_heads`` for other widths."""
    fields = released.patch_fields("ssast", encoder_state, SIZES)
    width = fields["embed_dim"]
    heads = {size["embed_dim"]: size["num_heads"] for size in SIZES.values()}
    if width not in heads and "num_heads" not in overrides:
        raise released.ConversionError(
            f"{released.DATAPARALLEL_PREFIX}v.cls_token has width {width}, not one of the released SSAST widths "
            f"{sorted(heads)}: pass num_heads")
    hidden = released.require(encoder_state, "blocks.0.mlp.fc1.weight", "ssast").shape[0]
    fields.update(depth=released.count_indexed(encoder_state, "blocks"), num_heads=heads.get(width),
                  mlp_ratio=hidden / width)
    return released.complete_grid("ssast", encoder_state, fields, SSASTEncoder.num_prefix_tokens, overrides)


def _make_factory(size: str, width: int, heads: int):
    def factory(**overrides) -> SSASTEncoder:
        defaults = {"name": f"ssast_{size}", "embed_dim": width, "num_heads": heads}
        return SSASTEncoder(config_overrides(SSASTConfig, defaults, overrides))

    factory.__name__ = f"ssast_{size}"
    factory.__doc__ = f"SSAST-{size} (embed_dim {width}, {heads} heads, 12 transformer blocks)."
    return factory


for _size, _fields in SIZES.items():
    register_model(f"ssast_{_size}")(_make_factory(_size, _fields["embed_dim"], _fields["num_heads"]))
