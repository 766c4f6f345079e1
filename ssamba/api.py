"""``ssamba.load``: a checkpoint (ours, a released ``.pth`` or a model folder) -> a model ready for inference;
``ssamba.save_pretrained``: a checkpoint or loaded model -> a model folder."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoints import Checkpoint, load_checkpoint
from .checkpoints import save_pretrained as save_folder
from .models import encoder_record


def load(checkpoint: str | os.PathLike, device: str | torch.device = "cpu", family: str | None = None,
         backend: str | None = None, **config_overrides):
    """Load the encoder of ``checkpoint`` with its input normalisation and mel scale, in eval mode on ``device``.

    ``checkpoint``: our ``.ckpt``, a released ``.pth``, a model folder (:func:`save_pretrained`), or
    ``hf://<repo id>`` for a model folder on the Hugging Face Hub (needs huggingface_hub).

    Returns an :class:`ssamba.embed.AudioEmbedder`: ``model.embed(waveform, sample_rate, layer=-1)``.
    Released files are recognised by their keys (``family`` only double-checks it); ``backend``
    chooses the selective-scan kernels of an SSAMBA encoder (``auto``, ``torch``, ``cuda``,
    ``triton``); ``config_overrides`` change encoder settings that do not touch the weights.
    Released files carry no normalisation statistics: they get the AudioSet ones their
    pretraining used.
    """
    from .data.features import MelScale  # here so that ``import ssamba`` does not pull in the audio front end
    from .embed import AudioEmbedder

    loaded = load_checkpoint(checkpoint, family, **config_overrides)
    metadata = {k: v for k, v in loaded.record().items() if k != "encoder"}
    metadata.update(unused_keys=loaded.unused_keys, source_format=loaded.source_format)
    return AudioEmbedder(loaded.build_encoder(backend), loaded.norm_mean, loaded.norm_std, metadata,
                         mel=MelScale.from_record(loaded)).to(device)


def save_pretrained(model_or_checkpoint, directory: str | os.PathLike) -> Path:
    """Write a model folder (``config.json`` + ``model.safetensors``) that :func:`load` reads back.

    ``model_or_checkpoint``: a checkpoint path (ours, a released ``.pth``, a folder), a
    :class:`ssamba.checkpoints.Checkpoint`, or a model returned by :func:`load`.
    """
    from .embed import AudioEmbedder

    source = model_or_checkpoint
    if isinstance(source, (str, os.PathLike)):
        checkpoint = load_checkpoint(source)
    elif isinstance(source, Checkpoint):
        checkpoint = source
    elif isinstance(source, AudioEmbedder):
        meta = source.metadata
        # the model holds the encoder only: a finetuned source's head, and so its task and labels, stay behind
        headless = meta.get("head") is None
        checkpoint = Checkpoint(encoder_record(source.encoder), source.encoder.state_dict(),
                                norm_mean=source.norm_mean, norm_std=source.norm_std,
                                target_length=meta.get("target_length", source.encoder.config.input_tdim),
                                **source.mel.record(), task=meta.get("task") if headless else None,
                                label_names=list(meta.get("label_names") or []) if headless else [],
                                converted_from=meta.get("converted_from"))
    else:
        raise TypeError(f"save_pretrained takes a checkpoint path, a Checkpoint or a model from ssamba.load, "
                        f"not {type(source).__name__}")
    return save_folder(checkpoint, directory)
