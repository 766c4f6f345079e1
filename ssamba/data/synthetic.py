"""Generated audio for zero-download runs and tests.

Every class has a fixed recipe (drawn from the seed): a harmonic stack with its own pitch range
and number of partials, a noise band with its own centre and width, and an amplitude-modulation
rate. Each clip renders its class recipe with per-clip randomness (pitch jitter, event timing,
gain, background noise level), so a classifier has something real to learn and masked patch
prediction has structure to exploit. Clip ``i`` of a split is the same on every call.
"""

from __future__ import annotations

import hashlib
import math

import torch

from ssamba.data.base import AudioDataModule, Item
from ssamba.data.features import SAMPLE_RATE, samples_for_frames
from ssamba.errors import ConfigError


class ClassRecipe:
    """Sound parameters of one class, and a few pre-rendered one-second loops of its texture."""

    PITCH_VARIANTS = (0.94, 1.0, 1.06)

    def __init__(self, generator: torch.Generator, pitch_slot: float, band_slot: float):
        """``pitch_slot``/``band_slot`` in [0, 1) spread pitches and noise bands across classes."""

        def uniform(low: float, high: float) -> float:
            return low + (high - low) * float(torch.rand((), generator=generator))

        self.f0 = math.exp(math.log(90.0) + pitch_slot * math.log(1200.0 / 90.0))
        self.partials = int(torch.randint(1, 8, (), generator=generator))
        self.partial_decay = uniform(0.3, 0.9)
        self.noise_centre = math.exp(math.log(300.0) + band_slot * math.log(6000.0 / 300.0))
        self.noise_width = uniform(0.1, 0.6)  # relative to the centre
        self.am_rate = uniform(0.5, 14.0)
        self.tonal_weight = uniform(0.3, 0.9)
        self.loops = torch.stack([self._render(factor, generator) for factor in self.PITCH_VARIANTS])

    def _render(self, pitch_factor: float, generator: torch.Generator) -> torch.Tensor:
        """One second that loops seamlessly: integer-Hz partials plus a circular noise band."""
        t = torch.arange(SAMPLE_RATE) / SAMPLE_RATE
        f0 = max(1, round(self.f0 * pitch_factor))
        tonal = torch.zeros(SAMPLE_RATE)
        for k in range(1, self.partials + 1):
            if f0 * k < SAMPLE_RATE / 2 - 200:
                phase = 2 * math.pi * float(torch.rand((), generator=generator))
                tonal += self.partial_decay ** (k - 1) * torch.sin(2 * math.pi * f0 * k * t + phase)
        tonal = tonal / tonal.std().clamp_min(1e-6)
        freqs = torch.fft.rfftfreq(SAMPLE_RATE, 1 / SAMPLE_RATE)
        width = self.noise_centre * self.noise_width
        spectrum = torch.fft.rfft(torch.randn(SAMPLE_RATE, generator=generator))
        spectrum *= torch.exp(-0.5 * ((freqs - self.noise_centre) / width) ** 2)
        band = torch.fft.irfft(spectrum, SAMPLE_RATE)
        band = band / band.std().clamp_min(1e-6)
        return self.tonal_weight * tonal + (1 - self.tonal_weight) * band


class SyntheticAudio:
    """Deterministic clip generator: ``clip(split, index) -> waveform [1, n]`` and ``labels``."""

    def __init__(self, num_classes: int, seconds: float, seed: int, multilabel: bool):
        self.num_classes = num_classes
        self.samples = round(seconds * SAMPLE_RATE)
        self.seed = seed
        self.multilabel = multilabel
        self._recipes: dict[int, ClassRecipe] = {}
        order = torch.Generator().manual_seed(self._hash(f"{seed}/slots"))
        self._pitch_slots = torch.randperm(num_classes, generator=order)
        self._band_slots = torch.randperm(num_classes, generator=order)

    @staticmethod
    def _hash(key: str) -> int:
        """32-bit seed from a string (torch's CPU generator keeps only 32 bits of a seed)."""
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "little")

    def recipe(self, label: int) -> ClassRecipe:
        if label not in self._recipes:  # built lazily: large label sets stay cheap
            g = torch.Generator().manual_seed(self._hash(f"{self.seed}/class/{label}"))
            jitter = torch.rand(2, generator=g).tolist()
            pitch = (int(self._pitch_slots[label]) + jitter[0]) / self.num_classes
            band = (int(self._band_slots[label]) + jitter[1]) / self.num_classes
            self._recipes[label] = ClassRecipe(g, pitch, band)
        return self._recipes[label]

    def _generator(self, split: str, index: int, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(self._hash(f"{self.seed}/{split}/{index}/{stream}"))

    def labels(self, split: str, index: int) -> tuple[int, ...]:
        g = self._generator(split, index, 0)
        if not self.multilabel:
            return (int(torch.randint(self.num_classes, (), generator=g)),)
        count = int(torch.randint(1, min(3, self.num_classes) + 1, (), generator=g))
        return tuple(sorted(torch.randperm(self.num_classes, generator=g)[:count].tolist()))

    def clip(self, split: str, index: int) -> torch.Tensor:
        g = self._generator(split, index, 1)
        wav = 0.02 * float(torch.rand((), generator=g)) * torch.randn(self.samples, generator=g)
        for label in self.labels(split, index):
            wav += self._event(self.recipe(label), g)
        return (wav / wav.abs().max().clamp_min(1e-6) * 0.5).unsqueeze(0)

    def _event(self, recipe: ClassRecipe, g: torch.Generator) -> torch.Tensor:
        """The class texture at a random pitch variant and offset, amplitude-modulated, gated."""
        n = self.samples
        r = torch.rand(5, generator=g).tolist()
        loop = recipe.loops[int(r[0] * len(recipe.loops))]
        sound = loop[(int(r[1] * SAMPLE_RATE) + torch.arange(n)) % SAMPLE_RATE]
        steps = n // 160 + 2  # the envelope is smooth: compute it at 100 Hz and interpolate
        coarse = 0.6 + 0.4 * torch.sin(2 * math.pi * (recipe.am_rate * torch.arange(steps) / 100 + r[2]))
        envelope = torch.nn.functional.interpolate(coarse[None, None], size=n, mode="linear")[0, 0]
        start, stop = int(r[3] * 0.2 * n), n - int(r[4] * 0.2 * n)
        envelope[:start] = 0
        envelope[stop:] = 0
        return (0.5 + r[2]) * 0.1 * sound * envelope


class SyntheticDataModule(AudioDataModule):
    """Generated clips through the same fbank front end as real audio (``data=synthetic``)."""

    def __init__(
        self,
        num_classes: int = 10,
        num_train: int = 2000,
        num_val: int = 200,
        num_test: int = 200,
        clip_seconds: float | None = None,
        multilabel: bool = False,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ConfigError(f"data.num_classes must be >= 1, got {num_classes}")
        # Default length: exactly enough audio for target_length frames.
        seconds = clip_seconds if clip_seconds is not None else samples_for_frames(self.target_length) / SAMPLE_RATE
        self.clip_seconds = seconds
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.multilabel = multilabel
        self.label_names = [f"class_{c:02d}" for c in range(num_classes)]
        self.generator = SyntheticAudio(num_classes, seconds, seed, multilabel)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(split for split, size in self.sizes.items() if size > 0)

    def build_items(self, split: str) -> list[Item]:
        return [
            Item(f"synthetic-{split}-{i}", None, self.generator.labels(split, i), duration=self.clip_seconds)
            for i in range(self.sizes[split])
        ]

    def reader(self, item: Item) -> tuple[torch.Tensor, int]:
        _, split, index = item.id.rsplit("-", 2)
        return self.generator.clip(split, int(index)), SAMPLE_RATE
