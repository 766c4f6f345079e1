"""Embeddings of audio of any length, from any layer (the command line is ``__main__.py`` here).

Audio longer than the encoder's input runs in one of two ways:
- ``window=False`` (SSAMBA's default): one pass over the whole recording on a re-laid patch grid,
  the patch position embedding stretched to the new length as in SSAST finetuning. Mamba's cost
  is linear in length, so memory grows linearly with the recording.
- ``window=True`` (SSAST's default, attention being quadratic): consecutive windows of the
  encoder's input length, run a few at a time, their patch columns concatenated in time.
Shorter audio is zero-padded to the input length (as in training) and the padded patch columns
are dropped from the result.

    python -m ssamba.embed AUDIO_DIR OUT.npz ckpt=model.ckpt [layer=-1] [frames=true] [device=cuda]
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..constants import MEL_BINS
from ..data.features import SAMPLE_RATE, WINDOW_SAMPLES, MelScale, batched_fbank, to_mono_16k
from ..models.ssamba import SSAMBAEncoder

FRAME_SECONDS = 0.01  # fbank frame shift
_LINEAR_IN_LENGTH = (SSAMBAEncoder,)


@dataclass
class Embeddings:
    """Embeddings of one recording; ``frames[i]`` covers the audio from ``i * hop_seconds`` on."""

    clip: Tensor  # [D]: mean over all patches (the pooling of the finetuning head)
    frames: Tensor  # [time_patches, D]: mean over the frequency patches of each time step
    patches: Tensor  # [freq_patches, time_patches, D]
    hop_seconds: float
    layer: int


@contextlib.contextmanager
def temporary_grid(encoder: nn.Module, input_tdim: int):
    """Lay the encoder out for ``input_tdim`` frames, restoring its exact weights afterwards."""
    original_tdim = encoder.config.input_tdim
    if input_tdim == original_tdim:
        yield encoder
        return
    pos_embed = encoder.pos_embed
    encoder.set_grid(input_tdim=input_tdim)
    try:
        yield encoder
    finally:
        encoder.set_grid(input_tdim=original_tdim)
        encoder.pos_embed = pos_embed


MAX_CHANNELS = 8  # a 2-D waveform with more rows than this, and this many columns or fewer, is [samples, channels]
PCM_SCALE = {torch.int8: 2.0**7, torch.int16: 2.0**15, torch.int32: 2.0**31}  # full scale of signed PCM


class AudioEmbedder(nn.Module):
    """An encoder with its input normalisation and mel scale, ready for inference on raw waveforms."""

    def __init__(self, encoder: nn.Module, norm_mean: float, norm_std: float, metadata: dict | None = None,
                 window_batch: int = 8, mel: MelScale = MelScale()):
        super().__init__()
        if encoder.config.input_fdim != MEL_BINS:
            raise ValueError(f"encoder expects {encoder.config.input_fdim} mel bins; the front end gives {MEL_BINS}")
        self.encoder = encoder
        self.norm_mean, self.norm_std = float(norm_mean), float(norm_std)
        self.mel = mel
        self.metadata = dict(metadata or {})
        self.window_batch = window_batch
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.encoder.pos_embed.device

    @functools.cached_property
    def num_layers(self) -> int:
        """How many layer outputs ``layer`` can pick from (SSAMBA's published pairing: one per pair)."""
        with torch.no_grad():
            return len(self.encoder.forward_features(self._silence(), return_hidden_states=True)[1])

    def _silence(self) -> Tensor:
        return self.normalise(torch.zeros(1, self.encoder.config.input_tdim, MEL_BINS, device=self.device))

    def normalise(self, fbank: Tensor) -> Tensor:
        return (fbank - self.norm_mean) / (2 * self.norm_std)

    def fbank(self, waveform: Tensor | np.ndarray, sample_rate: int) -> Tensor:
        """Waveform ``[n]`` or ``[channels, n]`` at any rate -> unnormalised fbank ``[frames, 128]``."""
        wav = torch.as_tensor(waveform).cpu()  # resampling runs where its cached kernel lives
        if wav.dim() not in (1, 2) or wav.numel() == 0:
            raise ValueError(f"expected a waveform [samples] or [channels, samples], got shape {tuple(wav.shape)}")
        if wav.dim() == 2 and wav.shape[1] <= MAX_CHANNELS < wav.shape[0]:
            raise ValueError(f"waveform of shape {tuple(wav.shape)} looks like [samples, channels] (soundfile's "
                             "layout); pass it transposed, [channels, samples]")
        if wav.dtype in PCM_SCALE:  # integer PCM (scipy.io.wavfile's default) as the [-1, 1] floats training read
            wav = wav.float() / PCM_SCALE[wav.dtype]
        elif not wav.is_floating_point():
            raise ValueError(f"waveform of dtype {wav.dtype}: expected floats in [-1, 1] or signed 8/16/32-bit PCM")
        if not torch.isfinite(wav).all():
            raise ValueError("waveform contains NaN or infinite samples")
        wav = to_mono_16k(wav, sample_rate)
        if wav.numel() < WINDOW_SAMPLES:
            raise ValueError(f"waveform too short: {wav.numel()} samples at 16 kHz, at least {WINDOW_SAMPLES} "
                             f"({1000 * WINDOW_SAMPLES / SAMPLE_RATE:.0f} ms) needed for one frame")
        return batched_fbank(wav.unsqueeze(0).to(self.device), mel=self.mel)[0]

    @torch.no_grad()
    def embed(self, waveform: Tensor | np.ndarray, sample_rate: int, layer: int = -1,
              window: bool | None = None) -> Embeddings:
        """Clip-, frame- and patch-level embeddings of one recording of any length.

        ``layer`` picks a layer output: ``-1`` (default) is the encoder output after its final
        norm (what finetuning sees); ``0 .. num_layers - 2`` or ``-num_layers .. -2`` are the
        intermediate layers' outputs (un-normalised residual stream). ``window`` chooses how
        audio longer than the encoder input runs (None: the family's default, see module doc).
        """
        return self.embed_fbank(self.fbank(waveform, sample_rate), layer, window)

    @torch.no_grad()
    def embed_fbank(self, fbank: Tensor, layer: int = -1, window: bool | None = None) -> Embeddings:
        """As :meth:`embed`, from an unnormalised fbank ``[frames, 128]``."""
        fbank = fbank.to(self.device, torch.float32)
        cfg = self.encoder.config
        if window is None:
            window = not isinstance(self.encoder, _LINEAR_IN_LENGTH)
        columns = math.ceil(fbank.shape[0] / cfg.tstride)  # patch columns starting inside the audio
        needed = (columns - 1) * cfg.tstride + cfg.tshape  # frames those columns span
        if fbank.shape[0] <= cfg.input_tdim:  # zero-padded to the input, as in training, on the trained grid
            patches = self._run(self._padded(fbank, 0, cfg.input_tdim).unsqueeze(0), layer)[0]
            columns = min(columns, self.encoder.grid[1])
        elif not window:
            with temporary_grid(self.encoder, needed):
                patches = self._run(self._padded(fbank, 0, needed).unsqueeze(0), layer)[0]
        else:
            t_dim = self.encoder.grid[1]
            hop = t_dim * cfg.tstride  # windows tile time with the same column spacing
            starts = [i * hop for i in range(math.ceil(columns / t_dim))]
            pieces = []
            for i in range(0, len(starts), self.window_batch):
                batch = torch.stack([self._padded(fbank, s, cfg.input_tdim) for s in starts[i:i + self.window_batch]])
                pieces.extend(self._run(batch, layer).unbind(0))
            patches = torch.cat(pieces, dim=1)
        patches = patches[:, :columns].float()
        frames_emb = patches.mean(0)
        return Embeddings(frames_emb.mean(0), frames_emb, patches, cfg.tstride * FRAME_SECONDS, layer)

    def _padded(self, fbank: Tensor, start: int, length: int) -> Tensor:
        """``length`` normalised frames from ``start``, zero-padded (before normalising) past the end."""
        piece = fbank[start:start + length]
        if piece.shape[0] < length:
            piece = torch.cat([piece, piece.new_zeros(length - piece.shape[0], piece.shape[1])])
        return self.normalise(piece)

    def _run(self, x: Tensor, layer: int) -> Tensor:
        """Patch tokens ``[B, f_dim, t_dim, D]`` of the chosen layer."""
        if layer == -1:
            tokens = self.encoder.forward_features(x)
        else:
            _, states = self.encoder.forward_features(x, return_hidden_states=True)
            if not -len(states) <= layer < len(states) - 1:
                raise IndexError(f"layer={layer} is out of range: this encoder has {len(states)} layer outputs "
                                 f"(-1 = final output, 0..{len(states) - 2} or {-len(states)}..-2 = intermediate)")
            tokens = states[layer]
        f_dim, t_dim = self.encoder.grid
        return tokens[:, self.encoder.num_prefix_tokens:].unflatten(1, (f_dim, t_dim))
