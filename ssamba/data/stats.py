"""``python -m ssamba.data.stats data=<name> [overrides] [--items N] [--seed S]``

Mean and standard deviation of the (un-normalised) fbank of a dataset's training split, for its
``norm_mean`` / ``norm_std``. Frames are taken as the model sees them (padded or cut to
``target_length``), as in the AST recipe; a random subset of ``--items`` items keeps it quick.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch

from ssamba.data.audio import BadAudio
from ssamba.data.base import AudioDataModule
from ssamba.data.cli import instantiate_data


def fbank_stats(datamodule: AudioDataModule, items: int = 2000, seed: int = 0, split: str = "train") -> dict:
    """Mean/std over all fbank values of up to ``items`` randomly chosen items (float64 sums)."""
    dataset = datamodule.make_dataset(split)
    dataset.mixup = 0.0
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:items].tolist()
    total = squares = count = 0.0
    skipped: Counter = Counter()
    for index in order:
        try:
            wav = dataset.waveform(index)
        except BadAudio as error:
            if datamodule.on_error == "raise":
                raise
            skipped[error.reason] += 1
            continue
        fbank = datamodule.eval_front_end.raw(wav).double()
        total += fbank.sum().item()
        squares += fbank.square().sum().item()
        count += fbank.numel()
    if not count:
        raise RuntimeError(f"no usable audio among {len(order)} items of the {split} split")
    mean = total / count
    std = max(squares / count - mean * mean, 0.0) ** 0.5
    return {"norm_mean": round(mean, 4), "norm_std": round(std, 4), "items": len(order) - sum(skipped.values()),
            "skipped": dict(skipped)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=2000, help="items to sample (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train")
    args, overrides = parser.parse_known_args(argv)
    stats = fbank_stats(instantiate_data(overrides), args.items, args.seed, args.split)
    print(json.dumps(stats))
    print(f"use: data.norm_mean={stats['norm_mean']} data.norm_std={stats['norm_std']}")


if __name__ == "__main__":
    main()
