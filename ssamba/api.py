"""``ssamba.load``: a checkpoint (ours or a released ``.pth``) -> a model ready for inference."""
from __future__ import annotations

import os

import torch


def load(checkpoint: str | os.PathLike, device: str | torch.device = "cpu", family: str | None = None,
         **config_overrides):
    """Load the encoder of ``checkpoint`` with its input normalisation, in eval mode on ``device``.

    Returns an :class:`ssamba.embed.AudioEmbedder`: ``model.embed(waveform, sample_rate, layer=-1)``.
    Released files are recognised by their keys (``family`` only double-checks it);
    ``config_overrides`` change encoder settings that do not touch the weights, e.g.
    ``backend="torch"`` for SSAMBA. Released files carry no normalisation statistics: they get the
    AudioSet ones their pretraining used.
    """
    # imported here so that ``import ssamba`` stays light (these pull in the data stack)
    from .convert import load_encoder_state
    from .embed import AudioEmbedder
    from .models import encoder_from_config

    config, state, extras = load_encoder_state(checkpoint, family, **config_overrides)
    encoder = encoder_from_config({**config, **config_overrides})
    encoder.load_state_dict(state)
    metadata = {k: v for k, v in extras.items() if k != "task_state"}
    return AudioEmbedder(encoder, extras["norm_mean"], extras["norm_std"], metadata).to(device)
