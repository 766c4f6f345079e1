"""SSAMBA: the Vision-Mamba style bidirectional Mamba encoder of arXiv 2405.11831, as released.

Parameter names follow the released checkpoints (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``layers.N.mixer.{in_proj,conv1d,x_proj,dt_proj,A_log,D,conv1d_b,x_proj_b,dt_proj_b,A_b_log,D_b,
out_proj}``, ``layers.N.norm``, ``norm_f``) so conversion is a prefix change. The defaults
reproduce the released architecture, quirks included (see docs/architecture.md); the cleaner
variants are config options.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..constants import MEL_BINS
from ..ops.backend import BACKENDS, resolve_backend, triton_or_fallback
from ..ops.bimamba import BranchWeights, bimamba_mixer, gluon_mixer_runs
from . import released
from .layers import DropPath, PatchTokenEncoder, grid_shape
from .registry import config_overrides, register_model


@dataclass
class SSAMBAConfig:
    """Everything needed to rebuild an SSAMBA encoder; stored with every checkpoint."""

    name: str = "ssamba_tiny"
    embed_dim: int = 192
    depth: int = 24
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    dt_rank: int | None = None  # None: ceil(embed_dim / 16), as released
    fshape: int = 16
    tshape: int = 16
    fstride: int = 16
    tstride: int = 16
    input_fdim: int = MEL_BINS
    input_tdim: int = 1024
    drop_path_rate: float = 0.1
    norm: str = "layernorm"  # or "rmsnorm"
    pairing: str = "published"  # layers 2i / 2i+1 run forward / flipped and are summed; or "stack"
    final_norm: str = "twice"  # the released code applies norm_f twice; "once" is the clean variant
    residual_in_fp32: bool = False
    norm_eps: float = 1e-5
    backend: str = "auto"  # selective-scan implementation: auto, torch, cuda, triton

    def __post_init__(self):
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.embed_dim / 16)
        choices = {"norm": ("layernorm", "rmsnorm"), "pairing": ("published", "stack"),
                   "final_norm": ("twice", "once"), "backend": BACKENDS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if self.pairing == "published" and self.depth % 2:
            raise ValueError(f"depth={self.depth} must be even with pairing='published' (layers run in pairs)")
        grid_shape(self.input_fdim, self.input_tdim, self.fshape, self.tshape, self.fstride, self.tstride)

    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim


def _branch_params(mixer: "BiMambaMixer", suffix: str) -> BranchWeights:
    conv = getattr(mixer, "conv1d" + suffix)
    dt_proj = getattr(mixer, "dt_proj" + suffix)
    return BranchWeights(conv.weight, conv.bias, getattr(mixer, "x_proj" + suffix).weight, dt_proj.weight,
                         dt_proj.bias, getattr(mixer, "A_b_log" if suffix else "A_log"),
                         getattr(mixer, "D" + suffix))


class BiMambaMixer(nn.Module):
    """Bidirectional Mamba mixer: shared in/out projections, separate conv/SSM per direction."""

    def __init__(self, cfg: SSAMBAConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        d_inner, d_state, dt_rank = cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.in_proj = nn.Linear(cfg.embed_dim, 2 * d_inner, bias=False)
        A_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)
        for suffix in ("", "_b"):
            self.add_module("conv1d" + suffix, nn.Conv1d(d_inner, d_inner, cfg.d_conv, groups=d_inner,
                                                         padding=cfg.d_conv - 1))
            self.add_module("x_proj" + suffix, nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False))
            self.add_module("dt_proj" + suffix, nn.Linear(dt_rank, d_inner, bias=True))
            self.register_parameter("A_b_log" if suffix else "A_log", nn.Parameter(A_log.clone()))
            self.register_parameter("D" + suffix, nn.Parameter(torch.ones(d_inner)))
        self.out_proj = nn.Linear(d_inner, cfg.embed_dim, bias=False)
        self._init_published(layer_idx)

    @torch.no_grad()
    def _init_published(self, layer_idx: int, dt_min=1e-3, dt_max=1e-1, dt_floor=1e-4) -> None:
        """Released initialisation, including the backward branch's zero dt bias."""
        cfg = self.cfg
        std = cfg.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(cfg.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.dt_proj_b.bias.zero_()  # the released code re-zeroes every Linear bias but dt_proj's
        nn.init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))
        self.out_proj.weight /= math.sqrt(cfg.depth)

    def forward(self, hidden: Tensor, reverse: bool = False) -> Tensor:
        """``reverse=True``: ``mixer(hidden.flip(1)).flip(1)`` without the flips. Reversing time turns
        each direction's scan (and conv) into the other's, so it is the mixer with the two branches'
        parameters swapped; everything else is per token."""
        return bimamba_mixer(hidden, self.in_proj.weight, self.out_proj.weight, *self.branches(reverse),
                             self.cfg.backend)

    def branches(self, reverse: bool = False) -> tuple[BranchWeights, BranchWeights]:
        """The two directions' parameters in the order ``forward(reverse=...)`` runs them."""
        branches = _branch_params(self, ""), _branch_params(self, "_b")
        return branches[::-1] if reverse else branches

    def flat_weights(self, reverse: bool = False) -> tuple[Tensor, ...]:
        """``(in_proj, out_proj, *branch, *branch)``, the mixer's tensors as ``ops.pair`` takes them."""
        first, second = self.branches(reverse)
        return self.in_proj.weight, self.out_proj.weight, *first, *second


class MambaBlock(nn.Module):
    """Add -> norm -> mixer; returns ``(hidden, residual)`` like the released Vim block."""

    def __init__(self, cfg: SSAMBAConfig, layer_idx: int, drop_path: float):
        super().__init__()
        self.cfg = cfg
        norm_cls = nn.LayerNorm if cfg.norm == "layernorm" else nn.RMSNorm
        self.norm = norm_cls(cfg.embed_dim, eps=cfg.norm_eps)
        self.mixer = BiMambaMixer(cfg, layer_idx)
        self.drop_path = DropPath(drop_path)

    def forward(self, hidden: Tensor, residual: Tensor | None, reverse: bool = False) -> tuple[Tensor, Tensor]:
        """``reverse``: the block applied to the time-reversed stream, output in the original order
        (what the published pairing's second layer computes, see ``BiMambaMixer.forward``)."""
        if hidden.is_cuda and resolve_backend(self.cfg.backend, on_cuda=True) == "triton":
            normed, residual = triton_or_fallback(self.cfg.backend, lambda: self._add_norm_triton(hidden, residual),
                                                  lambda: self._add_norm(hidden, residual))
        else:
            normed, residual = self._add_norm(hidden, residual)
        return self.mixer(normed, reverse), residual

    def norm_weights(self) -> tuple[Tensor, Tensor | None]:
        """``(weight, bias)`` of the norm; bias None for RMSNorm."""
        return self.norm.weight, self.norm.bias if isinstance(self.norm, nn.LayerNorm) else None

    def residual_dtype(self, hidden: Tensor, residual: Tensor | None) -> torch.dtype:
        """The dtype of the residual stream this block returns."""
        if self.cfg.residual_in_fp32:
            return torch.float32
        return hidden.dtype if residual is None else torch.result_type(hidden, residual)

    def _add_norm(self, hidden: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        normed = self.norm(residual.to(self.norm.weight.dtype))
        return normed, residual.float() if self.cfg.residual_in_fp32 else residual

    def _add_norm_triton(self, hidden: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        """The same in one Triton kernel each way (``ops.triton_norm``)."""
        from ..ops.triton_norm import add_norm

        scale = None if residual is None else self.drop_path.sample_scale(hidden.shape[0], hidden.device)
        return add_norm(hidden, residual, *self.norm_weights(), self.cfg.norm_eps, scale,
                        self.residual_dtype(hidden, residual))


class SSAMBAEncoder(PatchTokenEncoder):
    """Patch embedding + cls token + position embedding + bidirectional Mamba layers + final norm."""

    num_prefix_tokens = 1
    layer_stack, top_modules = "layers", ("norm_f",)
    # 24 layers of ~20 small kernels each: at the tiny width an eager training step waits on the
    # host's launches, and replaying the encoder as CUDA graphs trains ~1.6x faster
    # (docs/performance.md); task.cuda_graphs=auto turns it on for this family on a GPU
    prefers_cuda_graphs = True

    def __init__(self, config: SSAMBAConfig):
        super().__init__(config)
        cfg = config
        rates = [0.0] + torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.layers = nn.ModuleList(MambaBlock(cfg, i, rates[i]) for i in range(cfg.depth))
        norm_cls = nn.LayerNorm if cfg.norm == "layernorm" else nn.RMSNorm
        self.norm_f = norm_cls(cfg.embed_dim, eps=cfg.norm_eps)
        self.drop_path = DropPath(cfg.drop_path_rate)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def prefix_tokens(self) -> Tensor:
        return self.cls_token

    @property
    def num_hidden_states(self) -> int:
        """How many layer outputs ``forward_features(..., return_hidden_states=True)`` returns."""
        return len(self.layers) // 2 if self.config.pairing == "published" else len(self.layers)

    def set_backend(self, backend: str) -> None:
        """Switch the selective-scan implementation; the weights are the same for all of them."""
        self.config.backend = backend
        SSAMBAConfig.__post_init__(self.config)

    def forward_features(self, x: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None,
                         return_hidden_states: bool = False):
        """Token features ``[B, 1 + num_patches, D]`` (cls first) after the final norm.

        With ``return_hidden_states`` also returns the residual stream after every layer (every
        pair of layers with the published pairing).
        """
        hidden = self.embed_tokens(x, mask, mask_token)
        residual, states = None, []
        if self.config.pairing == "published":
            # layer 2i+1 runs on the time-reversed stream and its outputs are flipped back; every op
            # but the mixer is per token, so it runs in the original order with reverse=True
            for fwd, bwd in zip(self.layers[0::2], self.layers[1::2]):
                hidden, residual = self._pair(fwd, bwd, hidden, residual)
                if return_hidden_states:
                    states.append(residual + hidden)
        else:
            for layer in self.layers:
                hidden, residual = layer(hidden, residual)
                if return_hidden_states:
                    states.append(residual + hidden)
        out = self.norm_f((residual + self.drop_path(hidden)).to(self.norm_f.weight.dtype))
        if self.config.final_norm == "twice":
            out = self.norm_f(out)
        return (out, states) if return_hidden_states else out

    def _pair(self, fwd: MambaBlock, bwd: MambaBlock, hidden: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        """One pair of the published pairing; where the Gluon scan runs, as one Function that keeps only
        the pair's inputs for the backward (``ops.pair``), else as two blocks."""
        cfg = self.config
        if gluon_mixer_runs(cfg.backend, hidden.device, cfg.d_state, cfg.d_inner):
            return triton_or_fallback(cfg.backend, lambda: self._pair_fused(fwd, bwd, hidden, residual),
                                      lambda: self._pair_blocks(fwd, bwd, hidden, residual))
        return self._pair_blocks(fwd, bwd, hidden, residual)

    @staticmethod
    def _pair_blocks(fwd: MambaBlock, bwd: MambaBlock, hidden: Tensor, residual: Tensor | None):
        h_f, r_f = fwd(hidden, residual)
        h_b, r_b = bwd(hidden, residual, reverse=True)
        return h_f + h_b, r_f + r_b

    def _pair_fused(self, fwd: MambaBlock, bwd: MambaBlock, hidden: Tensor, residual: Tensor | None):
        from ..ops.pair import published_pair

        batch = hidden.shape[0]
        scales = (None, None) if residual is None else tuple(
            block.drop_path.sample_scale(batch, hidden.device) for block in (fwd, bwd))
        return published_pair(hidden, residual, scales, (fwd.norm_weights(), bwd.norm_weights()), self.config.norm_eps,
                              fwd.residual_dtype(hidden, residual),
                              (fwd.mixer.flat_weights(), bwd.mixer.flat_weights(reverse=True)))


SIZES = {"tiny": {"embed_dim": 192}, "small": {"embed_dim": 384}, "base": {"embed_dim": 768}}
RELEASED_MARKER = "v.layers."  # a released file holding this key is an SSAMBA model


def released_config(encoder_state: dict[str, Tensor], **overrides) -> dict:
    """SSAMBAConfig fields read off a released encoder's tensors (keys after ``module.v.``); ``overrides`` win."""
    fields = released.patch_fields("ssamba", encoder_state, SIZES)
    mixer = "layers.0.mixer."
    d_inner, d_state = released.require(encoder_state, mixer + "A_log", "ssamba").shape
    fields.update(depth=released.count_indexed(encoder_state, "layers"), d_state=d_state,
                  expand=d_inner // fields["embed_dim"],
                  d_conv=released.require(encoder_state, mixer + "conv1d.weight", "ssamba").shape[-1],
                  dt_rank=released.require(encoder_state, mixer + "dt_proj.weight", "ssamba").shape[1],
                  norm="layernorm" if "layers.0.norm.bias" in encoder_state else "rmsnorm")
    return released.complete_grid("ssamba", encoder_state, fields, SSAMBAEncoder.num_prefix_tokens, overrides)


def _make_factory(size: str, width: int):
    def factory(**overrides) -> SSAMBAEncoder:
        return SSAMBAEncoder(config_overrides(SSAMBAConfig, {"name": f"ssamba_{size}", "embed_dim": width}, overrides))

    factory.__name__ = f"ssamba_{size}"
    factory.__doc__ = f"SSAMBA-{size} (embed_dim {width}, 24 bidirectional Mamba layers)."
    return factory


for _size, _fields in SIZES.items():
    register_model(f"ssamba_{_size}")(_make_factory(_size, _fields["embed_dim"]))
