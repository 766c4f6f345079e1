"""``python -m ssamba.embed AUDIO_DIR OUT.npz ckpt=... [key=value ...]``: embed every audio file of a folder.

Kept out of the package's ``__init__`` (the embeddings API, which ``ssamba.load`` returns) so that
the API does not import ``ssamba.api``: the command uses ``load``, ``load`` uses the API, no circle.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from ..api import load
from ..data.features import SAMPLE_RATE
from ..models.released import ConversionError
from . import FRAME_SECONDS, AudioEmbedder


@dataclass
class EmbedCommand:
    """Options of ``python -m ssamba.embed AUDIO_DIR OUT.npz key=value ...``."""

    ckpt: str = "???"  # our .ckpt or a released .pth
    layer: int = -1
    window: bool | None = None  # None: the family's default
    frames: bool = False  # also store frame-level embeddings (concatenated, with offsets)
    device: str = "auto"  # auto: cuda when available
    backend: str | None = None  # SSAMBA selective-scan backend: auto, torch, cuda, triton; None: auto
    extensions: list[str] = field(default_factory=lambda: [".wav", ".flac", ".ogg", ".mp3"])
    on_error: str = "skip"  # skip (count and list unusable files) or raise


def find_audio(root: str, extensions: list[str]) -> list[str]:
    """Audio files below ``root`` (relative paths, sorted) with one of ``extensions``."""
    if not os.path.isdir(root):
        raise NotADirectoryError(f"audio directory {root!r} does not exist")
    wanted = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    found = [os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
             if f.lower().endswith(wanted)]
    return sorted(found)


def embed_directory(model: AudioEmbedder, root: str, options: EmbedCommand) -> dict[str, np.ndarray]:
    """Embed every audio file below ``root``; the arrays written to the ``.npz``."""
    from rich.progress import track

    from ..data.audio import BadAudio, prepare_waveform, read_audio

    files = find_audio(root, list(options.extensions))
    if not files:
        raise FileNotFoundError(f"no audio files ({', '.join(options.extensions)}) below {root!r}")
    names, clips, frames, skipped = [], [], [], []
    for name in track(files, description="embedding", transient=False):
        path = os.path.join(root, name)
        try:
            wav, rate = read_audio(path)
            wav = prepare_waveform(wav, rate, path, min_seconds=0.0)
        except BadAudio as error:
            if options.on_error == "raise":
                raise
            skipped.append(f"{name}: {error.reason}")
            continue
        result = model.embed(wav, SAMPLE_RATE, layer=options.layer, window=options.window)
        names.append(name)
        clips.append(result.clip.cpu().numpy())
        if options.frames:
            frames.append(result.frames.cpu().numpy())
    if not names:
        raise RuntimeError(f"none of the {len(files)} audio files below {root!r} could be used: {skipped[:5]}")
    out = {"names": np.array(names), "clip": np.stack(clips), "layer": np.array(options.layer),
           "skipped": np.array(skipped, dtype=str)}
    if options.frames:
        out["frames"] = np.concatenate(frames)
        out["frame_offsets"] = np.cumsum([0] + [len(f) for f in frames])
        out["hop_seconds"] = np.array(model.encoder.config.tstride * FRAME_SECONDS)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    from omegaconf import OmegaConf

    parser = argparse.ArgumentParser(prog="python -m ssamba.embed", description="Embed every audio file of a folder.")
    parser.add_argument("audio_dir")
    parser.add_argument("output", help=".npz with names, clip [N, D] (and frames, frame_offsets if frames=true)")
    parser.add_argument("options", nargs="*", help="key=value: " + ", ".join(EmbedCommand.__dataclass_fields__)
                        + "; backend=auto takes triton, then mamba-ssm's cuda kernels on a GPU, torch on CPU")
    args = parser.parse_args(argv)
    options = OmegaConf.merge(OmegaConf.structured(EmbedCommand), OmegaConf.from_dotlist(args.options))
    if OmegaConf.is_missing(options, "ckpt"):
        parser.error("ckpt=PATH is required")
    if options.on_error not in ("skip", "raise"):
        parser.error(f"on_error must be skip or raise, got {options.on_error!r}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if options.device == "auto" else options.device
    try:
        model = load(options.ckpt, device=device, backend=options.backend)
    except (FileNotFoundError, ConversionError) as error:  # a mistyped path, or no checkpoint of ours
        parser.exit(2, f"{parser.prog}: ckpt={options.ckpt}: {error}\n")
    try:
        arrays = embed_directory(model, args.audio_dir, options)
    except (FileNotFoundError, NotADirectoryError) as error:  # a mistyped folder, or one without audio
        parser.exit(2, f"{parser.prog}: {error}\n")
    np.savez(args.output, **arrays)
    print(f"wrote {len(arrays['names'])} embeddings of width {arrays['clip'].shape[1]} to {args.output}")
    if len(arrays["skipped"]):
        print(f"skipped {len(arrays['skipped'])} unusable file(s):", *arrays["skipped"], sep="\n  ", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
