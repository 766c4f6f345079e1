"""Pieces shared by the encoder families: patch embedding, position-embedding adaptation, drop path."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def grid_shape(input_fdim: int, input_tdim: int, fshape: int, tshape: int, fstride: int, tstride: int) -> tuple[int, int]:
    """Number of patches along frequency and time for a conv with this kernel and stride."""
    if input_fdim < fshape or input_tdim < tshape:
        raise ValueError(f"input {input_fdim}x{input_tdim} (mel bins x frames) is smaller than the "
                         f"patch {fshape}x{tshape}")
    return (input_fdim - fshape) // fstride + 1, (input_tdim - tshape) // tstride + 1


class PatchEmbed(nn.Module):
    """Conv2d patchifier on the spectrogram laid out ``[B, 1, mel_bins, frames]``; tokens frequency-major."""

    def __init__(self, embed_dim: int, fshape: int, tshape: int, fstride: int, tstride: int):
        super().__init__()
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=(fshape, tshape), stride=(fstride, tstride))

    def set_stride(self, fstride: int, tstride: int) -> None:
        self.proj.stride = (fstride, tstride)

    def forward(self, spec: Tensor) -> Tensor:
        return self.proj(spec).flatten(2).transpose(1, 2)


def fbank_to_image(x: Tensor) -> Tensor:
    """``[B, frames, mel_bins]`` (the data pipeline's layout) -> ``[B, 1, mel_bins, frames]``."""
    if x.dim() != 3:
        raise ValueError(f"expected a fbank batch [batch, frames, mel_bins], got shape {tuple(x.shape)}")
    return x.transpose(1, 2).unsqueeze(1)


def unfold_patches(x: Tensor, fshape: int, tshape: int, fstride: int, tstride: int) -> Tensor:
    """Raw patch values ``[B, num_patches, fshape * tshape]`` in token order (the pretraining targets).

    Non-overlapping patches (the pretraining grid) are a reshape; ``F.unfold`` would launch one CUDA
    kernel per clip, ~5 ms per pretraining step at batch 64."""
    image = fbank_to_image(x)
    if (fstride, tstride) != (fshape, tshape):
        return F.unfold(image, kernel_size=(fshape, tshape), stride=(fstride, tstride)).transpose(1, 2)
    batch, channels, bins, frames = image.shape
    nf, nt = bins // fshape, frames // tshape  # like unfold, a partial last patch is dropped
    blocks = image[:, :, :nf * fshape, :nt * tshape].reshape(batch, channels, nf, fshape, nt, tshape)
    return blocks.permute(0, 2, 4, 1, 3, 5).reshape(batch, nf * nt, channels * fshape * tshape)


def _fit_axis(pos: Tensor, size: int, axis: int) -> Tensor:
    """Centre-cut a grid axis that shrinks; bilinearly stretch one that grows."""
    old = pos.shape[axis]
    if size == old:
        return pos
    if size < old:
        start = old // 2 - size // 2
        return pos.narrow(axis, start, size)
    target = list(pos.shape[2:])
    target[axis - 2] = size
    return F.interpolate(pos, size=tuple(target), mode="bilinear", align_corners=False)


def adapt_patch_pos_embed(pos: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Resize the patch part of a ``[1, N, D]`` position embedding from one (f, t) grid to another."""
    dim = pos.shape[-1]
    grid = pos.transpose(1, 2).reshape(1, dim, *old_grid)
    grid = _fit_axis(grid, new_grid[1], axis=3)
    grid = _fit_axis(grid, new_grid[0], axis=2)
    return grid.reshape(1, dim, -1).transpose(1, 2).contiguous()


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``p``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def sample_scale(self, batch: int, device: torch.device) -> Tensor | None:
        """Per-sample factors (0 or 1 / keep probability, fp32), or None when nothing is dropped; the
        fused residual-add kernels take these instead of the scaled tensor."""
        if self.p == 0.0 or not self.training:
            return None
        keep = 1.0 - self.p
        return torch.empty(batch, device=device).bernoulli_(keep).div_(keep)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.sample_scale(x.shape[0], x.device)
        if scale is None:
            return x
        return (x * scale.view((-1,) + (1,) * (x.dim() - 1))).to(x.dtype)  # the factor kept in fp32

    def extra_repr(self) -> str:
        return f"p={self.p}"


def apply_patch_mask(tokens: Tensor, mask: Tensor | None, mask_token: Tensor | None) -> Tensor:
    """Replace the patch embeddings where ``mask`` is True by ``mask_token`` (pretraining input)."""
    if mask is None:
        return tokens
    if mask_token is None:
        raise ValueError("a patch mask needs a mask_token to put in place of the masked patches")
    if mask.shape != tokens.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the patch grid {tuple(tokens.shape[:2])}")
    return torch.where(mask.unsqueeze(-1), mask_token.reshape(1, 1, -1).to(tokens.dtype), tokens)


class PatchTokenEncoder(nn.Module):
    """What every encoder family shares: the patch grid, its position embedding, masking and targets.

    It builds the patch embedding, the cls token and the position embedding (prefix positions first)
    from ``config`` (a dataclass with the grid fields); a family adds its blocks and implements
    ``prefix_tokens`` and ``forward_features``.
    """

    num_prefix_tokens: int
    layer_stack: str  # the attribute holding the family's layers (an nn.ModuleList, input side first)
    top_modules: tuple[str, ...]  # what runs after the layers (the final norm)

    def __init__(self, config):
        super().__init__()
        self.config = cfg = config
        self.embed_dim = cfg.embed_dim
        self.grid = grid_shape(cfg.input_fdim, cfg.input_tdim, cfg.fshape, cfg.tshape, cfg.fstride, cfg.tstride)
        self.patch_embed = PatchEmbed(cfg.embed_dim, cfg.fshape, cfg.tshape, cfg.fstride, cfg.tstride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.num_patches, cfg.embed_dim))

    def prefix_tokens(self) -> Tensor:
        """The learned tokens put before the patches, ``[1, num_prefix_tokens, D]``."""
        raise NotImplementedError

    def parameter_depths(self) -> dict[str, int]:
        """Each parameter's depth, for layer-wise learning rates: 0 for the patch embedding and the tokens,
        ``i + 1`` for layer ``i``, ``len(layers) + 1`` for :attr:`top_modules`."""
        stack = getattr(self, self.layer_stack)
        top = len(stack) + 1
        depths = {}
        for name, _ in self.named_parameters():
            root, _, rest = name.partition(".")
            if root == self.layer_stack:
                depths[name] = int(rest.partition(".")[0]) + 1
            else:
                depths[name] = top if root in self.top_modules else 0
        return depths

    def set_backend(self, backend: str) -> None:
        """Choose the kernels the encoder runs on (same weights for all); families with one
        implementation have nothing to choose."""

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def patch_shape(self) -> tuple[int, int]:
        return self.config.fshape, self.config.tshape

    def set_grid(self, input_fdim: int | None = None, input_tdim: int | None = None,
                 fstride: int | None = None, tstride: int | None = None) -> None:
        """Re-lay the patch grid (e.g. stride 10 for finetuning), adapting the position embedding."""
        cfg = self.config
        new = dataclasses.replace(cfg, input_fdim=input_fdim or cfg.input_fdim, input_tdim=input_tdim or cfg.input_tdim,
                                  fstride=fstride or cfg.fstride, tstride=tstride or cfg.tstride)
        new_grid = grid_shape(new.input_fdim, new.input_tdim, new.fshape, new.tshape, new.fstride, new.tstride)
        prefix = self.num_prefix_tokens
        with torch.no_grad():
            patch_pos = adapt_patch_pos_embed(self.pos_embed[:, prefix:], self.grid, new_grid)
            self.pos_embed = nn.Parameter(torch.cat([self.pos_embed[:, :prefix], patch_pos], dim=1))
        self.patch_embed.set_stride(new.fstride, new.tstride)
        for module in self.modules():  # submodules that keep the config see the new grid too
            if hasattr(module, "cfg"):
                module.cfg = new
        self.config, self.grid = new, new_grid

    def patchify(self, x: Tensor) -> Tensor:
        cfg = self.config
        return unfold_patches(x, cfg.fshape, cfg.tshape, cfg.fstride, cfg.tstride)

    def embed_tokens(self, x: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None) -> Tensor:
        """Prefix tokens + (masked) patch embeddings + position embedding, ``[B, P + N, D]``."""
        tokens = apply_patch_mask(self.patch_embed(fbank_to_image(x)), mask, mask_token)
        if tokens.shape[1] != self.num_patches:
            raise ValueError(f"input of {x.shape[1]} frames x {x.shape[2]} bins gives {tokens.shape[1]} patches, "
                             f"but the encoder is laid out for {self.num_patches} ({self.config.input_tdim} frames "
                             f"x {self.config.input_fdim} bins); call set_grid() or pad/cut the input")
        prefix = self.prefix_tokens().expand(x.shape[0], -1, -1).to(tokens.dtype)
        return torch.cat([prefix, tokens], dim=1) + self.pos_embed

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)
