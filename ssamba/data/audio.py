"""Decoding audio files and the bad-input policy shared by every dataset."""

from __future__ import annotations

import io
import os

import numpy as np
import soundfile as sf
import torch

from ssamba.data.features import SAMPLE_RATE, WINDOW_SAMPLES, to_mono_16k
from ssamba.errors import MissingFileError

# Fixed so that every DDP rank logs the same keys.
SKIP_REASONS = ("missing", "unreadable", "empty", "too_short", "non_finite")


class BadAudio(Exception):
    """A file that cannot give a usable waveform; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, path: str | None, detail: str = ""):
        assert reason in SKIP_REASONS, reason
        self.reason = reason
        self.path = path
        super().__init__(f"{reason}: {path}" + (f" ({detail})" if detail else ""))


def read_audio(
    source: str | io.BytesIO, start: float = 0.0, duration: float | None = None, name: str | None = None
) -> tuple[torch.Tensor, int]:
    """Decode ``[channels, n]`` float32 audio (any bit depth / container libsndfile reads) from a
    path or from in-memory file bytes (``name`` labels errors)."""
    name = name or (source if isinstance(source, str) else "<bytes>")
    if isinstance(source, str) and not os.path.exists(source):
        raise BadAudio("missing", name)
    try:
        with sf.SoundFile(source) as f:
            rate = f.samplerate
            if start > 0:
                f.seek(min(round(start * rate), f.frames))
            frames = -1 if duration is None else round(duration * rate)
            data = f.read(frames=frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as error:
        raise BadAudio("unreadable", name, str(error)) from error
    return torch.from_numpy(np.ascontiguousarray(data.T)), rate


def audio_duration(path: str) -> float:
    """Duration in seconds from the file header; raises :class:`BadAudio` when unusable."""
    if not os.path.exists(path):
        raise BadAudio("missing", path)
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as error:
        raise BadAudio("unreadable", path, str(error)) from error
    if info.frames == 0:
        raise BadAudio("empty", path)
    return info.frames / info.samplerate


def check_decoded(wav: torch.Tensor, path: str | None) -> None:
    """:class:`BadAudio` for decoded audio that holds no samples or a non-finite one."""
    if wav.numel() == 0:
        raise BadAudio("empty", path)
    if not torch.isfinite(wav).all():
        raise BadAudio("non_finite", path)


def prepare_waveform(wav: torch.Tensor, rate: int, path: str | None, min_seconds: float) -> torch.Tensor:
    """Decoded audio -> mono 16 kHz mean-removed ``[n]``, or :class:`BadAudio` if unusable."""
    check_decoded(wav, path)
    wav = to_mono_16k(wav, rate)
    if wav.numel() < max(WINDOW_SAMPLES, int(min_seconds * SAMPLE_RATE)):
        raise BadAudio("too_short", path, f"{wav.numel() / SAMPLE_RATE:.3f} s")
    return wav


def check_files_exist(paths, what: str, show: int = 5) -> None:
    """One clear error listing the first few missing files, instead of failures mid-epoch."""
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        listing = "\n  ".join(missing[:show])
        more = f"\n  ... and {len(missing) - show} more" if len(missing) > show else ""
        raise MissingFileError(f"{len(missing)} file(s) listed in {what} do not exist:\n  {listing}{more}")
