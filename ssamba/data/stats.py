"""``python -m ssamba.data.stats data=<name> [overrides] [--items N] [--seed S]``

Mean and standard deviation of the (un-normalised) fbank of a dataset's training split, for its
``norm_mean`` / ``norm_std``. Frames are taken as the model sees them (padded or cut to
``target_length``), as in the AST recipe; a random subset of ``--items`` items keeps it quick.

It also counts the rates the files were recorded at: audio recorded below 16 kHz holds nothing above
half its rate, where the default mel scale may put many of its filters (``data.mel_high_hz``,
docs/data.md, "Mel range").
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch

from ssamba.constants import MEL_BINS
from ssamba.data.audio import BadAudio
from ssamba.data.base import AudioDataModule
from ssamba.data.cli import instantiate_data
from ssamba.data.features import MelScale, mel_centres_hz


def fbank_stats(datamodule: AudioDataModule, items: int = 2000, seed: int = 0, split: str = "train") -> dict:
    """Mean/std over all fbank values of up to ``items`` randomly chosen items (float64 sums)."""
    dataset = datamodule.make_dataset(split)
    dataset.mixup = 0.0
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:items].tolist()
    total = squares = count = 0.0
    skipped: Counter = Counter()
    rates: Counter = Counter()
    for index in order:
        try:
            wav, rate = dataset.read(index)
        except BadAudio as error:
            if datamodule.on_error == "raise":
                raise
            skipped[error.reason] += 1
            continue
        rates[rate] += 1
        fbank = datamodule.eval_front_end.raw(wav).double()
        total += fbank.sum().item()
        squares += fbank.square().sum().item()
        count += fbank.numel()
    if not count:
        raise RuntimeError(f"no usable audio among {len(order)} items of the {split} split")
    mean = total / count
    std = max(squares / count - mean * mean, 0.0) ** 0.5
    nyquist = min(rates) / 2
    above = int((mel_centres_hz(datamodule.mel) > nyquist).sum())
    return {"norm_mean": round(mean, 4), "norm_std": round(std, 4), "items": len(order) - sum(skipped.values()),
            "skipped": dict(skipped), "sample_rates": {str(r): n for r, n in sorted(rates.items())},
            "mel_filters_above_nyquist": above, **datamodule.mel.record()}


def band_hint(mel: MelScale, rate: int, above: int) -> str:
    """What to set for audio recorded at ``rate``: its band, with the shortest FFT that leaves no filter empty."""
    text = (f"audio recorded at {rate} Hz holds nothing above {rate // 2} Hz, where {above} of the {MEL_BINS} mel "
            "filters lie")
    for size in (mel.fft_size * 2**k for k in range(8)):
        try:
            MelScale(mel.low_hz, rate // 2, size)
        except ValueError:
            continue
        return (f"{text}: data.mel_high_hz={rate // 2} data.fft_size={size} puts them all on the band (docs/data.md, "
                "'Mel range'; then compute these stats again with it)")
    return f"{text} (docs/data.md, 'Mel range')"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=2000, help="items to sample (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train")
    args, overrides = parser.parse_known_args(argv)
    datamodule = instantiate_data(overrides)
    stats = fbank_stats(datamodule, args.items, args.seed, args.split)
    print(json.dumps(stats))
    print(f"use: data.norm_mean={stats['norm_mean']} data.norm_std={stats['norm_std']}")
    if stats["mel_filters_above_nyquist"]:
        print(band_hint(datamodule.mel, min(map(int, stats["sample_rates"])), stats["mel_filters_above_nyquist"]))


if __name__ == "__main__":
    main()
