"""Signal-quality statistics of heart-sound recordings, per recording and per patient.

CirCor's ``Unknown`` murmur class marks patients whose recordings the annotators could not grade
(noise, rubbing, clipping, a faint signal). A few level and spectral statistics of the raw signal
separate those patients from the others about as well as a trained murmur model's ``Unknown``
probability does (docs/heart-murmurs.md, "Recipe screens"), so they can gate a model's patient
predictions without any training of the model.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from ssamba.data.audio import BadAudio, check_decoded, read_audio

RECORDING_FEATURES = (
    "log_rms",  # level
    "crest",  # peak over RMS: clicks and knocks
    "share_below_25hz",  # energy shares of bands: drift and handling noise below heart sounds,
    "share_25_150hz",  # the heart sounds' own band,
    "share_above_400hz",  # hiss, speech and rubbing above it
    "centroid_khz",
    "frame_level_spread",  # std of the log RMS of 0.1 s frames: steady noise is flat
    "flatness",  # geometric over arithmetic mean of the power spectrum: 1 for white noise
    "clipped_percent",  # samples within 1% of the peak magnitude
)
PATIENT_FEATURES = tuple(f"{stat}_{name}" for stat in ("mean", "min", "max") for name in RECORDING_FEATURES) + (
    "recordings",)
FRAME_SECONDS = 0.1
WINDOW_SECONDS = 10.0  # circor-dev's recordings are their first 10 s, what the gate's statistics were fitted on
TINY = 1e-12


def recording_quality(wave: Tensor, rate: int) -> Tensor:
    """:data:`RECORDING_FEATURES` of a mono recording ``[samples]`` at ``rate`` Hz, float64: the mean over its
    consecutive :data:`WINDOW_SECONDS` windows (a last, shorter window counts if it holds at least half a
    window, or is the whole recording). Peak-based statistics (crest factor, clipping) grow with the length
    they are taken over, so a full-length recording is measured on the scale of the 10 s cuts."""
    if wave.dim() != 1 or wave.numel() < 2:
        raise ValueError(f"recording_quality needs a mono recording of at least 2 samples, got {tuple(wave.shape)}")
    window = round(WINDOW_SECONDS * rate)
    starts = range(0, wave.numel(), window)
    pieces = [wave[start:start + window] for start in starts]
    pieces = [p for i, p in enumerate(pieces) if i == 0 or 2 * p.numel() >= window]
    return torch.stack([_window_quality(piece, rate) for piece in pieces]).mean(dim=0)


def _window_quality(wave: Tensor, rate: int) -> Tensor:
    x = wave.to(torch.float64)
    x = x - x.mean()
    rms = x.square().mean().sqrt() + TINY
    power = torch.fft.rfft(x).abs().square()
    freqs = torch.fft.rfftfreq(x.numel(), 1 / rate, dtype=torch.float64)
    total = power.sum() + TINY

    def share(low: float, high: float) -> Tensor:
        return power[(freqs >= low) & (freqs < high)].sum() / total

    frame = max(1, round(FRAME_SECONDS * rate))
    frames = x[: x.numel() // frame * frame].view(-1, frame) if x.numel() >= frame else x.view(1, -1)
    frame_rms = frames.square().mean(dim=1).sqrt() + TINY
    positive = power[1:] + TINY
    peak = x.abs().max()
    return torch.stack([
        rms.log(),
        peak / rms,
        share(0.0, 25.0),
        share(25.0, 150.0),
        share(400.0, float("inf")),
        (power * freqs).sum() / total / 1000,
        frame_rms.log().std(unbiased=False),
        positive.log().mean().exp() / positive.mean(),
        (x.abs() >= 0.99 * peak).to(torch.float64).mean() * 100,
    ])  # fmt: skip


def patient_quality(recordings: Sequence[Tensor]) -> Tensor:
    """:data:`PATIENT_FEATURES` from the :func:`recording_quality` rows of one patient's recordings."""
    if not recordings:
        raise ValueError("patient_quality needs at least one recording")
    rows = torch.stack(list(recordings))
    count = torch.tensor([float(len(recordings))], dtype=torch.float64)
    return torch.cat([rows.mean(dim=0), rows.min(dim=0).values, rows.max(dim=0).values, count])


def readable_recordings(patient, skipped: list[str]) -> Iterator[tuple[Tensor, int]]:
    """Each readable recording of ``patient`` (``ssamba.data.circor.Patient``) as a mono waveform and its
    rate; one that cannot be read, or is empty, not finite or shorter than a frame (``FRAME_SECONDS``), as
    training would skip it, is skipped and named in ``skipped`` ("reason: id")."""
    for recording in patient.recordings:
        try:
            wave, rate = read_audio(recording.path)
            check_decoded(wave, recording.path)
            if wave.shape[-1] < FRAME_SECONDS * rate:  # at its own rate: the quality features are taken there
                raise BadAudio("too_short", recording.path)
        except BadAudio as error:
            skipped.append(f"{error.reason}: {recording.id}")
            continue
        yield wave.mean(dim=0), rate


def patients_quality(patients: Iterable) -> tuple[dict[str, Tensor], list[str]]:
    """:data:`PATIENT_FEATURES` of each patient (``ssamba.data.circor.Patient``: ``id`` and ``recordings``
    with ``id`` and ``path``) by patient id, and the recordings that could not be read ("reason: id"),
    skipped. A patient none of whose recordings can be read is left out."""
    table, skipped = {}, []
    for patient in patients:
        rows = [recording_quality(mono, rate) for mono, rate in readable_recordings(patient, skipped)]
        if rows:
            table[patient.id] = patient_quality(rows)
    return table, skipped
