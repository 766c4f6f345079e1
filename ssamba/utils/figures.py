"""Diagnostic figures and logging them to whichever loggers a run has."""
from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in DDP workers
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

log = logging.getLogger(__name__)


def fold_patches(patches: Tensor, size: tuple[int, int], shape: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """Inverse of ``encoder.patchify`` for one clip: ``[N, fshape * tshape]`` -> ``[mel_bins, frames]``.

    Overlapping patches (stride < shape) are averaged; frames no patch covers are NaN.
    """
    columns = patches.detach().float().T[None]  # [1, fshape*tshape, N]
    summed = F.fold(columns, size, kernel_size=shape, stride=stride)
    counts = F.fold(torch.ones_like(columns), size, kernel_size=shape, stride=stride)
    return (summed / counts)[0, 0]


def reconstruction_figure(fbank: Tensor, mask_grid: Tensor, patches: Tensor, shape: tuple[int, int],
                          stride: tuple[int, int]):
    """Three panels: the input spectrogram, the patch mask, the input with masked patches predicted."""
    spec = fbank.detach().float().T.cpu()  # [mel_bins, frames]
    recon = fold_patches(patches.cpu(), tuple(spec.shape), shape, stride)
    low, high = float(spec.min()), float(spec.max())
    figure, axes = plt.subplots(3, 1, figsize=(10, 7), sharex=False, constrained_layout=True)
    axes[0].imshow(spec.numpy(), origin="lower", aspect="auto", vmin=low, vmax=high)
    axes[0].set_title("input (normalised fbank)")
    axes[1].imshow(mask_grid.detach().float().cpu().numpy(), origin="lower", aspect="auto", cmap="gray_r")
    axes[1].set_title(f"mask ({int(mask_grid.sum())} of {mask_grid.numel()} patches)")
    axes[2].imshow(recon.numpy(), origin="lower", aspect="auto", vmin=low, vmax=high)
    axes[2].set_title("masked patches replaced by the generative head's prediction")
    for axis in axes:
        axis.set_ylabel("mel bin" if axis is not axes[1] else "freq patch")
    axes[1].set_xlabel("time patch")
    axes[2].set_xlabel("frame")
    return figure


def log_figure(loggers, key: str, figure, step: int) -> None:
    """W&B gets an image, TensorBoard a figure, the CSV logger a PNG next to its metrics file."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    try:
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key, [figure], step=step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(key, figure, global_step=step, close=False)
            elif isinstance(logger, CSVLogger):
                folder = Path(logger.log_dir) / "figures"
                folder.mkdir(parents=True, exist_ok=True)
                figure.savefig(folder / f"{key.replace('/', '_')}_step{step:07d}.png", dpi=80)
    except Exception as error:  # a figure must never stop training
        log.warning("could not log figure %s at step %d: %r", key, step, error)
    finally:
        plt.close(figure)
