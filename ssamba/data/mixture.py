"""Mixtures of corpora for pretraining (``data=asli``: AudioSet + LibriSpeech), labels ignored."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler, WeightedRandomSampler

from ssamba.data.base import UNLABELED, AudioDataModule, ClipDataset, Item
from ssamba.errors import ConfigError


class MixtureDataModule(AudioDataModule):
    """Concatenates the items of several datamodules and draws training items by source weight.

    ``weights`` (per source name) set the share of each source in a training epoch, sampled with
    replacement; ``null`` keeps every item once per epoch in natural proportions. Feature settings
    (target length, stats, augmentation) are the mixture's own; each source only lists items.
    """

    label_names = UNLABELED
    multilabel = False

    def __init__(
        self,
        sources: dict[str, AudioDataModule],
        weights: dict[str, float] | None = None,
        samples_per_epoch: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not sources:
            raise ConfigError("data.sources: give at least one source datamodule")
        if weights is not None:
            if set(weights) != set(sources) or any(w < 0 for w in weights.values()) or not any(weights.values()):
                raise ConfigError(f"data.weights: expected a non-negative weight for each of {sorted(sources)} "
                                  f"(0 leaves a source out), got {dict(weights)}")
        self.sources = dict(sources)
        self.weights = dict(weights) if weights is not None else None
        self.samples_per_epoch = samples_per_epoch
        self._item_counts: dict[str, int] = {}

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(s for s in ("train", "val", "test") if any(s in src.splits for src in self.sources.values()))

    def build_items(self, split: str) -> list[Item]:
        items = []
        for name, source in self.sources.items():
            if split not in source.splits:
                continue
            found = source.build_items(split)
            if split == "train":
                self._item_counts[name] = len(found)
            items += [Item(f"{name}/{i.id}", i.path, (), i.start, i.duration) for i in found]
        return items

    def reader(self, item: Item) -> tuple[torch.Tensor, int]:
        name, source_id = item.id.split("/", 1)
        return self.sources[name].reader(Item(source_id, item.path, (), item.start, item.duration))

    def train_sampler(self, dataset: ClipDataset) -> Sampler | None:
        if self.weights is None:
            return None
        per_item = [
            self.weights.get(name, 0.0) / count
            for name, count in self._item_counts.items()
            for _ in range(count)
        ]
        return WeightedRandomSampler(per_item, self.samples_per_epoch or len(dataset), replacement=True)
