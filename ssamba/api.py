"""``ssamba.load``: a checkpoint (ours or a released ``.pth``) -> a model ready for inference."""
from __future__ import annotations

import os

import torch

from .checkpoints import load_checkpoint


def load(checkpoint: str | os.PathLike, device: str | torch.device = "cpu", family: str | None = None,
         backend: str | None = None, **config_overrides):
    """Load the encoder of ``checkpoint`` with its input normalisation, in eval mode on ``device``.

    Returns an :class:`ssamba.embed.AudioEmbedder`: ``model.embed(waveform, sample_rate, layer=-1)``.
    Released files are recognised by their keys (``family`` only double-checks it); ``backend``
    chooses the selective-scan kernels of an SSAMBA encoder (``auto``, ``torch``, ``cuda``,
    ``triton``); ``config_overrides`` change encoder settings that do not touch the weights.
    Released files carry no normalisation statistics: they get the AudioSet ones their
    pretraining used.
    """
    from .embed import AudioEmbedder  # here so that ``import ssamba`` does not pull in the audio front end

    loaded = load_checkpoint(checkpoint, family, **config_overrides)
    metadata = {k: v for k, v in loaded.record().items() if k != "encoder"}
    metadata.update(unused_keys=loaded.unused_keys, source_format=loaded.source_format)
    return AudioEmbedder(loaded.build_encoder(backend), loaded.norm_mean, loaded.norm_std, metadata).to(device)
