"""Self-supervised masked spectrogram patch modeling (the SSAST joint objective used by SSAMBA).

Masked patch embeddings are replaced by ``mask_embed``; the encoder's output at each masked
position feeds two heads. ``cpred`` solves a per-clip InfoNCE problem (which of the clip's masked
patches is mine? negatives are the other masked patches of the same clip), ``gpred`` regresses
the raw patch values (MSE). Loss ``nce_weight * nce + mse_weight * mse`` (1 and 10 by default).

``joint_passes=2`` (default, as released) runs one encoder pass per head with independent masks;
``joint_passes=1`` feeds both heads from one pass, halving the encoder compute.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssamba.errors import ConfigError
from ssamba.models.heads import prediction_head
from ssamba.tasks.base import EncoderTask
from ssamba.tasks.masking import STYLES, fit_count_to_grid, make_mask

log = logging.getLogger(__name__)

JOINT_PASSES = (1, 2)  # encoder passes per step: one shared by both heads, or one per head
# grid_patches: the patch count that count/val_count are stated for (512: 16 x 16 patches on 1024 frames);
# fit_to_grid: scale them to the model's grid when it has another size (the CPU quick start's 64 patches).
MASK_DEFAULTS = {"count": 400, "style": "cluster", "cluster_sizes": [3, 4, 5], "reference_quirks": False,
                 "val_count": None, "grid_patches": None, "fit_to_grid": False}


def masked_patch_nce(preds: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """InfoNCE and accuracy over the masked patches of each clip, batched.

    ``preds``/``targets`` are ``[B, M, P]``. ``scores[b, i, j] = targets[b, i] . preds[b, j]``;
    the loss is the mean of ``-log_softmax(scores, -1)`` on the diagonal. As the released code counts
    it, prediction ``j`` is correct when, of each target's softmax over the predictions, its own
    target's gives ``j`` the most (argmax over dim 1 of the row-normalised scores, not of the raw ones).
    """
    scores = torch.bmm(targets.float(), preds.float().transpose(1, 2))  # [B, M, M]
    log_probs = F.log_softmax(scores, dim=-1)
    nce = -torch.diagonal(log_probs, dim1=1, dim2=2).mean()
    own = torch.arange(scores.shape[1], device=scores.device)
    acc = (log_probs.argmax(dim=1) == own).float().mean()
    return nce, acc


def masked_positions(mask: Tensor, count: int) -> Tensor:
    """``[B, count]`` patch indices where ``mask [B, num_patches]`` (``count`` True per row) is True,
    ascending: the order of ``x[mask]``, without the host sync boolean indexing costs."""
    return torch.sort(mask.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :count]


def _rows_at(x: Tensor, index: Tensor) -> Tensor:
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class MaskedPatchPretraining(EncoderTask):
    """Joint discriminative + generative masked patch modeling on an encoder of ``ssamba.models``."""

    task_name = "pretrain"

    def __init__(self, encoder: nn.Module | Any, optimizer, scheduler=None, scheduler_config: dict | None = None,
                 warmup_steps: int = 1000, mask: dict | None = None, joint_passes: int = 2, nce_weight: float = 1.0,
                 mse_weight: float = 10.0, figure_every_n_steps: int = 0, cuda_graphs: bool | str = "auto",
                 data: dict | None = None):
        if not isinstance(encoder, nn.Module):
            encoder = encoder()  # a factory from the config (model with _partial_)
        super().__init__(encoder, optimizer, scheduler, scheduler_config, warmup_steps, data)
        self.save_hyperparameters(ignore=["encoder", "optimizer", "scheduler"])
        unknown = sorted(set(mask or {}) - set(MASK_DEFAULTS))
        if unknown:
            raise ConfigError(f"unknown mask key(s) {unknown}; allowed: {sorted(MASK_DEFAULTS)}")
        self.mask_cfg = {**MASK_DEFAULTS, **(mask or {})}
        if self.mask_cfg["val_count"] is None:
            self.mask_cfg["val_count"] = self.mask_cfg["count"]
        if self.mask_cfg["style"] not in STYLES:
            raise ConfigError(f"mask.style={self.mask_cfg['style']!r} is not one of {', '.join(STYLES)}")
        num_patches = self.encoder.num_patches
        grid = "x".join(map(str, self.encoder.grid))
        stated = self.mask_cfg["grid_patches"]
        stated_for_another_grid = bool(stated) and stated != num_patches
        if self.mask_cfg["fit_to_grid"] and stated_for_another_grid:
            fitted = {key: fit_count_to_grid(self.mask_cfg[key], stated, num_patches) for key in ("count", "val_count")}
            log.info("mask.fit_to_grid: mask.count=%d and mask.val_count=%d, stated for %d patches, scaled to %d and "
                     "%d of this model's %s = %d patches", self.mask_cfg["count"], self.mask_cfg["val_count"], stated,
                     fitted["count"], fitted["val_count"], grid, num_patches)
            self.mask_cfg.update(fitted)
        for key in ("count", "val_count"):
            if not 0 < self.mask_cfg[key] < num_patches:
                hint = (f"; or mask.fit_to_grid=true to scale counts stated for mask.grid_patches={stated}"
                        if stated_for_another_grid else "")
                raise ConfigError(f"mask.{key}={self.mask_cfg[key]} must be in 1..{num_patches - 1}: the model's "
                                 f"patch grid is {grid} = {num_patches} patches for "
                                 f"{self.encoder.config.input_tdim} frames (data.target_length){hint}")
        if joint_passes not in JOINT_PASSES:
            raise ConfigError(f"task.joint_passes={joint_passes} is not one of {', '.join(map(str, JOINT_PASSES))}")
        self.joint_passes = joint_passes
        self.use_cuda_graphs(cuda_graphs, joint_passes)
        self.nce_weight = nce_weight
        self.mse_weight = mse_weight
        self.figure_every_n_steps = figure_every_n_steps
        dim = self.encoder.embed_dim
        patch_values = self.encoder.patch_shape[0] * self.encoder.patch_shape[1]
        self.mask_embed = nn.Parameter(torch.empty(1, 1, dim))
        nn.init.xavier_normal_(self.mask_embed)
        self.cpred = prediction_head(dim, patch_values)
        self.gpred = prediction_head(dim, patch_values)

    # --- masked passes ------------------------------------------------------------------------
    def sample_mask(self, batch: int, count: int, generator: torch.Generator | None = None) -> Tensor:
        cfg = self.mask_cfg
        return make_mask(cfg["style"], batch, self.encoder.grid, count, cfg["cluster_sizes"],
                         cfg["reference_quirks"], device=self.device, generator=generator)

    def masked_pass(self, fbank: Tensor, count: int, generator=None, index: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Encode with ``count`` masked patches per clip: (features, targets ``[B, M, ...]``, mask).

        ``index`` numbers the passes of one step (each has its own CUDA graph with ``cuda_graphs``)."""
        batch = fbank.shape[0]
        mask = self.sample_mask(batch, count, generator)
        tokens = self.encode(fbank, mask, self.mask_embed, index=index)
        positions = masked_positions(mask, count)
        hidden = _rows_at(tokens, positions + self.encoder.num_prefix_tokens)
        targets = _rows_at(self.encoder.patchify(fbank), positions)
        return hidden, targets, mask

    def objective(self, fbank: Tensor, count: int, generator=None) -> dict[str, Tensor]:
        hidden, targets, mask = self.masked_pass(fbank, count, generator)
        nce, acc = masked_patch_nce(self.cpred(hidden), targets)
        if self.joint_passes == 2:
            hidden, targets, mask = self.masked_pass(fbank, count, generator, index=1)
        reconstruction = self.gpred(hidden)
        mse = F.mse_loss(reconstruction.float(), targets.float())
        loss = self.nce_weight * nce + self.mse_weight * mse
        return {"loss": loss, "nce": nce, "mse": mse, "acc": acc,
                "mask": mask, "reconstruction": reconstruction.detach()}

    # --- steps ------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        out = self.objective(batch["fbank"], self.mask_cfg["count"])
        self.log_training({f"train/{k}": out[k] for k in ("loss", "nce", "mse", "acc")}, batch["fbank"].shape[0])
        if self.figure_every_n_steps and self.global_step % self.figure_every_n_steps == 0:
            self.log_reconstruction(batch["fbank"][0], out["mask"][0], out["reconstruction"][0])
        return out["loss"]

    def evaluation_step(self, batch: dict, batch_idx: int, stage: str) -> None:
        if batch["fbank"].shape[0] == 0:  # every item of the batch was unusable (counted by the data)
            return
        # Fixed masks per batch: validation curves compare like with like across epochs.
        generator = torch.Generator(self.device).manual_seed(1_000_003 * self.global_rank + batch_idx)
        out = self.objective(batch["fbank"], self.mask_cfg["val_count"], generator)
        self.log_dict({f"{stage}/{k}": out[k] for k in ("loss", "nce", "mse", "acc")}, on_epoch=True,
                      prog_bar=stage == "val", sync_dist=True, batch_size=batch["fbank"].shape[0])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluation_step(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluation_step(batch, batch_idx, "test")

    # --- figures ------------------------------------------------------------------------------------
    def log_reconstruction(self, fbank: Tensor, mask: Tensor, reconstruction: Tensor) -> None:
        """Spectrogram, mask and the gpred reconstruction of one clip, to every logger (rank 0)."""
        if self.global_rank != 0 or not self.loggers:
            return
        from ssamba.utils.figures import log_figure, reconstruction_figure

        patches = self.encoder.patchify(fbank[None])[0].clone()
        patches[mask] = reconstruction.to(patches.dtype)
        cfg = self.encoder.config
        figure = reconstruction_figure(fbank, mask.view(self.encoder.grid), patches, (cfg.fshape, cfg.tshape),
                                       (cfg.fstride, cfg.tstride))
        log_figure(self.loggers, "train/reconstruction", figure, self.global_step)
