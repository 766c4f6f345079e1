"""The AST/SSAST front end: waveform -> normalised 128-bin kaldi fbank, plus its augmentations.

Two equivalent paths compute the same numbers:
- per sample on the CPU (inside DataLoader workers): ``torchaudio.compliance.kaldi.fbank`` on kaldi's mel
  scale, ``batched_fbank`` of the one item on another (kaldi's code fixes the FFT at 512 points);
- batched on any device with plain torch ops (``batched_fbank``), used after the batch has been
  moved to the GPU so that workers only decode audio.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchaudio
from torchaudio.compliance import kaldi

from ssamba.constants import (
    AUDIOSET_MEAN,
    AUDIOSET_STD,
    FFT_SIZE,
    KALDI_MEL,
    MEL_BINS,
    MEL_HIGH_HZ,
    MEL_KEYS,
    MEL_LOW_HZ,
    SAMPLE_RATE,
)
from ssamba.errors import ConfigError

WINDOW_SAMPLES = 400  # 25 ms at 16 kHz
HOP_SAMPLES = 160  # 10 ms at 16 kHz
PREEMPHASIS = 0.97
RESAMPLE_GRID_HZ = 50  # every rate on this grid resamples to 16 kHz with a small filter (:func:`resampling_rate`)


@dataclass(frozen=True)
class MelScale:
    """Where the 128 mel filters lie (Hz) and the FFT they read. The default is kaldi's, the front end of
    AST, SSAST and every released checkpoint. A band-limited source can spend all 128 filters on the band
    it has: CirCor's phonocardiograms, recorded at 4 kHz, hold nothing above 2 kHz, where the default puts
    60 of its filters. A narrower band needs a longer (zero-padded) FFT, or some filters would fall
    between two FFT bins and read nothing; such a scale is refused."""

    low_hz: float = MEL_LOW_HZ
    high_hz: float = MEL_HIGH_HZ
    fft_size: int = FFT_SIZE

    def __post_init__(self):
        for key in ("low_hz", "high_hz"):  # 2000 from a config is 2000.0: one scale, one cache entry
            if isinstance(getattr(self, key), bool) or not isinstance(getattr(self, key), (int, float)):
                raise ConfigError(f"data.mel_{key}={getattr(self, key)!r}: a frequency in Hz")
            object.__setattr__(self, key, float(getattr(self, key)))
        if not 0 <= self.low_hz < self.high_hz <= SAMPLE_RATE / 2:
            raise ConfigError(f"data.mel_low_hz={self.low_hz:g}, data.mel_high_hz={self.high_hz:g}: need "
                              f"0 <= mel_low_hz < mel_high_hz <= {SAMPLE_RATE // 2} (the Nyquist frequency at 16 kHz)")
        size = self.fft_size
        if isinstance(size, bool) or not isinstance(size, int) or size < FFT_SIZE or size & (size - 1):
            raise ConfigError(f"data.fft_size={size!r}: a power of two >= {FFT_SIZE}")
        if not self.is_kaldi:  # kaldi's own scale has one empty filter, kept for the released checkpoints
            empty = int((mel_filters(self) == 0).all(dim=0).sum())
            if empty:
                raise ConfigError(f"data.mel_low_hz={self.low_hz:g} .. data.mel_high_hz={self.high_hz:g} with "
                                  f"data.fft_size={size}: {empty} of the {MEL_BINS} mel filters fall between FFT "
                                  f"bins and would read nothing; use data.fft_size={2 * size} or more")

    @property
    def is_kaldi(self) -> bool:
        return (self.low_hz, self.high_hz, self.fft_size) == KALDI_MEL

    def record(self) -> dict[str, float | int]:
        """The scale under the data config's and the checkpoint record's keys (``MEL_KEYS``)."""
        return dict(zip(MEL_KEYS, (self.low_hz, self.high_hz, self.fft_size)))

    @classmethod
    def from_record(cls, record) -> MelScale:
        """The scale of a mapping or object with ``MEL_KEYS`` (a checkpoint, a data config, a stats file);
        a key it lacks is kaldi's, as in records written before the scale could be set."""
        get = record.get if isinstance(record, Mapping) else lambda key, default: getattr(record, key, default)
        return cls(*(get(key, default) for key, default in zip(MEL_KEYS, KALDI_MEL)))


def _kaldi_mel_banks(mel: MelScale) -> tuple[torch.Tensor, torch.Tensor]:
    """kaldi's ``[128, fft_size // 2]`` filter weights and the filters' ``[128]`` centre frequencies (Hz)."""
    return kaldi.get_mel_banks(MEL_BINS, mel.fft_size, float(SAMPLE_RATE), mel.low_hz, mel.high_hz, 100.0, -500.0, 1.0)


def mel_filters(mel: MelScale) -> torch.Tensor:
    """``[fft_size // 2 + 1, 128]`` float32: the FFT bins' weights in each mel filter, as kaldi builds them."""
    banks, _ = _kaldi_mel_banks(mel)
    return F.pad(banks.float(), (0, 1)).T.contiguous()  # the Nyquist bin gets no weight, as in kaldi


def mel_centres_hz(mel: MelScale) -> torch.Tensor:
    """``[128]``: the centre frequency of each mel filter, in Hz."""
    return _kaldi_mel_banks(mel)[1]


def samples_for_frames(frames: int) -> int:
    """Number of 16 kHz samples that yields exactly ``frames`` fbank frames (kaldi snip_edges)."""
    return (frames - 1) * HOP_SAMPLES + WINDOW_SAMPLES


def frames_for_samples(samples: int) -> int:
    return 0 if samples < WINDOW_SAMPLES else 1 + (samples - WINDOW_SAMPLES) // HOP_SAMPLES


@functools.lru_cache(maxsize=16)
def _resampler(orig_rate: int, new_rate: int) -> torchaudio.transforms.Resample:
    return torchaudio.transforms.Resample(orig_rate, new_rate)


def resampling_rate(sample_rate: int) -> int:
    """The rate audio recorded at ``sample_rate`` is resampled from: itself, unless it shares less than
    ``RESAMPLE_GRID_HZ`` with 16 kHz (8001 Hz, 22051 Hz), where torchaudio's polyphase filter would take tens of
    seconds and GBs per file (and stay cached in every loader worker); then the nearest multiple of it, a pitch
    change of at most 0.3% at 8 kHz and less above."""
    rate = int(sample_rate)
    if math.gcd(rate, SAMPLE_RATE) >= RESAMPLE_GRID_HZ:
        return rate
    return max(RESAMPLE_GRID_HZ, RESAMPLE_GRID_HZ * round(rate / RESAMPLE_GRID_HZ))


def to_mono_16k(wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """``[channels, n]`` or ``[n]`` float audio at any rate -> mono ``[n]`` at 16 kHz, mean removed."""
    if wav.dim() == 2:
        wav = wav.mean(dim=0)
    wav = wav.float()
    if sample_rate != SAMPLE_RATE:
        wav = _resampler(resampling_rate(sample_rate), SAMPLE_RATE)(wav)
    return wav - wav.mean()


def kaldi_fbank(wav: torch.Tensor) -> torch.Tensor:
    """Reference fbank of one mono 16 kHz waveform ``[n]`` -> ``[frames, 128]`` (unnormalised)."""
    return kaldi.fbank(
        wav.unsqueeze(0),
        htk_compat=True,
        sample_frequency=SAMPLE_RATE,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=MEL_BINS,
        dither=0.0,
        frame_shift=10,
    )


@functools.lru_cache(maxsize=8)
def _fbank_constants(device: torch.device, mel: MelScale) -> tuple[torch.Tensor, torch.Tensor]:
    """Hann window and mel matrix exactly as kaldi.fbank builds them (float32)."""
    window = torch.hann_window(WINDOW_SAMPLES, periodic=False, dtype=torch.float32)
    return window.to(device), mel_filters(mel).to(device)


def batched_fbank(wavs: torch.Tensor, lengths: torch.Tensor | None = None, mel: MelScale = MelScale()) -> torch.Tensor:
    """Kaldi fbank of a batch of zero-padded mono 16 kHz waveforms ``[B, n]`` -> ``[B, frames, 128]``.

    Same numbers as :func:`kaldi_fbank` per item (with the default ``mel``); frames past an item's own
    length (``lengths``, in samples) are set to zero, which is what padding the per-item fbank does.
    """
    wavs = wavs.float()
    window, filters = _fbank_constants(wavs.device, mel)
    if wavs.shape[-1] < WINDOW_SAMPLES:
        wavs = F.pad(wavs, (0, WINDOW_SAMPLES - wavs.shape[-1]))
    frames = wavs.unfold(-1, WINDOW_SAMPLES, HOP_SAMPLES)  # [B, T, 400]
    frames = frames - frames.mean(dim=-1, keepdim=True)
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
    frames = (frames - PREEMPHASIS * previous) * window
    spectrum = torch.fft.rfft(frames, n=mel.fft_size).abs().pow(2.0)
    fbank = (spectrum @ filters).clamp_min(torch.finfo(torch.float32).eps).log()
    if lengths is not None:
        valid = torch.where(
            lengths >= WINDOW_SAMPLES, 1 + (lengths - WINDOW_SAMPLES) // HOP_SAMPLES, torch.zeros_like(lengths)
        )
        valid = valid.to(wavs.device, non_blocking=True)  # a blocking copy would wait for the queued work first
        keep = torch.arange(fbank.shape[1], device=wavs.device)[None, :] < valid[:, None]
        fbank = fbank * keep[..., None]
    return fbank


def pad_or_cut(fbank: torch.Tensor, target_length: int) -> torch.Tensor:
    """Zero-pad or cut the frame axis (second to last) to ``target_length``."""
    frames = fbank.shape[-2]
    if frames < target_length:
        return F.pad(fbank, (0, 0, 0, target_length - frames))
    return fbank[..., :target_length, :]


class FbankFrontEnd:
    """Fbank, SpecAugment, normalisation and noise, for single items or whole batches.

    The order follows the reference recipe: masks are applied to the raw log-mel values (so a
    masked bin becomes ``(0 - mean) / (2 std)`` after normalisation), then normalisation, then
    the optional noise and time roll.
    """

    def __init__(
        self,
        target_length: int = 1024,
        norm_mean: float = AUDIOSET_MEAN,
        norm_std: float = AUDIOSET_STD,
        freqm: int = 0,
        timem: int = 0,
        noise: bool = False,
        mel: MelScale = MelScale(),
    ):
        self.target_length = target_length
        self.norm_mean = norm_mean
        self.norm_std = norm_std
        self.freqm = freqm
        self.timem = timem
        self.noise = noise
        self.mel = mel
        self.max_samples = samples_for_frames(target_length)
        self._freq_mask = torchaudio.transforms.FrequencyMasking(freqm, iid_masks=True) if freqm else None
        self._time_mask = torchaudio.transforms.TimeMasking(timem, iid_masks=True) if timem else None

    def __call__(self, wav: torch.Tensor, train: bool) -> torch.Tensor:
        """One mono 16 kHz waveform ``[n]`` -> ``[target_length, 128]`` (CPU path)."""
        return self.finish(self.raw(wav).unsqueeze(0), train).squeeze(0)

    def raw(self, wav: torch.Tensor) -> torch.Tensor:
        """The unnormalised ``[target_length, 128]`` fbank of one waveform: kaldi's own code for its scale."""
        wav = wav[: self.max_samples]
        fbank = kaldi_fbank(wav) if self.mel.is_kaldi else batched_fbank(wav.unsqueeze(0), mel=self.mel)[0]
        return pad_or_cut(fbank, self.target_length)

    def batch(self, wavs: torch.Tensor, lengths: torch.Tensor, train: bool) -> torch.Tensor:
        """Zero-padded waveforms ``[B, n]`` on any device -> ``[B, target_length, 128]``."""
        fbank = pad_or_cut(batched_fbank(wavs[:, : self.max_samples], lengths, self.mel), self.target_length)
        return self.finish(fbank, train)

    def finish(self, fbank: torch.Tensor, train: bool) -> torch.Tensor:
        """Augment (when training) and normalise a ``[B, T, 128]`` fbank batch."""
        if train and (self._freq_mask or self._time_mask):
            spec = fbank.transpose(1, 2).unsqueeze(1)  # [B, 1, F, T], the layout torchaudio masks
            if self._freq_mask:
                spec = self._freq_mask(spec)
            if self._time_mask:
                spec = self._time_mask(spec)
            fbank = spec.squeeze(1).transpose(1, 2)
        fbank = (fbank - self.norm_mean) / (2 * self.norm_std)
        if train and self.noise:
            batch = fbank.shape[0]
            scale = torch.rand(batch, 1, 1, device=fbank.device) / 10
            fbank = fbank + torch.rand_like(fbank) * scale
            shifts = torch.randint(-10, 10, (batch,)).tolist()
            fbank = torch.stack([torch.roll(item, shift, dims=0) for item, shift in zip(fbank, shifts)])
        return fbank


def mix_waveforms(first: torch.Tensor, second: torch.Tensor, lam: float) -> torch.Tensor:
    """Waveform mixup as in the reference: fit ``second`` to ``first``'s length, mix, re-centre."""
    if second.numel() < first.numel():
        second = F.pad(second, (0, first.numel() - second.numel()))
    mixed = lam * first + (1 - lam) * second[: first.numel()]
    return mixed - mixed.mean()


def sample_mixup_lambda(alpha: float) -> float:
    """lambda ~ Beta(alpha, alpha), drawn with torch so DataLoader worker seeding applies."""
    return float(torch.distributions.Beta(alpha, alpha).sample())
