"""Heart sounds recorded with earbuds, in three processing variants (``filt``, ``lp``, ``wav``).

Layout: ``root/<variant>/{train,eval}/*.{wav,flac}``; labels come from one file shared by all
variants, keyed by file stem: a csv with columns ``filename,labels`` or an AST-style manifest
(``{"data": [{"wav": ..., "labels": "mid1,mid2"}]}``). Labels are ``mid``s (or display names) of
``class_labels_indices.csv``.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import torch

from ssamba.data.base import AudioDataModule, Item
from ssamba.data.manifest import read_label_csv
from ssamba.errors import ConfigError

AUDIO_EXTENSIONS = (".wav", ".flac")


def read_label_file(path: str) -> dict[str, list[str]]:
    """File stem -> label ids, from a ``filename,labels`` csv or an AST-style JSON manifest."""
    if path.endswith(".json"):
        with open(path) as f:
            entries = json.load(f)["data"]
        pairs = [(entry["wav"], entry.get("labels", "")) for entry in entries]
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"filename", "labels"} <= set(rows[0]):
            raise ValueError(f"{path}: expected columns filename,labels")
        pairs = [(row["filename"], row["labels"]) for row in rows]
    return {Path(name).stem: [x.strip() for x in str(labels).split(",") if x.strip()] for name, labels in pairs}


class EarbudDataModule(AudioDataModule):
    """``data=earbud``: one variant's ``train`` folder for training, ``eval`` for val and test.

    With ``val_fraction > 0`` a label-stratified, seeded part of ``train`` becomes the validation
    split instead, keeping ``eval`` for testing only.
    """

    VARIANTS = ("filt", "lp", "wav")

    def __init__(
        self,
        root: str,
        variant: str,
        labels: str,
        label_csv: str,
        multilabel: bool = False,
        val_fraction: float = 0.0,
        split_seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.root = os.path.expanduser(root)
        on_disk = sorted(v for v in self.VARIANTS if os.path.isdir(os.path.join(self.root, v)))
        if variant not in on_disk:
            raise ConfigError(f"data.variant={variant!r} is not on disk under {self.root!r}; available: {on_disk}")
        for key, path in (("labels", labels), ("label_csv", label_csv)):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"data.{key}: no such file: {path}")
        self.variant = variant
        self.label_names, mid_index = read_label_csv(label_csv)
        self.label_index = {**{name: i for i, name in enumerate(self.label_names)}, **mid_index}
        self.labels = read_label_file(labels)
        self.labels_path = labels
        self.multilabel = multilabel
        self.val_fraction = val_fraction
        self.split_seed = split_seed

    def folder_items(self, folder: str) -> list[Item]:
        path = Path(self.root, self.variant, folder)
        files = sorted(f for f in path.glob("*") if f.suffix.lower() in AUDIO_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"no .wav/.flac files in {path}")
        unlabeled = [f.name for f in files if f.stem not in self.labels]
        if unlabeled:
            raise ValueError(f"{len(unlabeled)} file(s) in {path} have no row in {self.labels_path}: {unlabeled[:5]}")
        unknown = sorted({x for f in files for x in self.labels[f.stem] if x not in self.label_index})
        if unknown:
            raise ValueError(f"{self.labels_path}: label(s) not in the label csv: {unknown[:5]}")
        return [Item(f.stem, str(f), tuple(sorted({self.label_index[x] for x in self.labels[f.stem]}))) for f in files]

    def build_items(self, split: str) -> list[Item]:
        if split == "test" or (split == "val" and not self.val_fraction):
            return self.folder_items("eval")
        items = self.folder_items("train")
        held_out = self._validation_ids(items) if self.val_fraction else set()
        return [i for i in items if (i.id in held_out) == (split == "val")]

    def _validation_ids(self, items: list[Item]) -> set[str]:
        """Evenly spaced picks from items ordered by label (shuffled within): stratified, seeded."""
        generator = torch.Generator().manual_seed(self.split_seed)
        shuffled = [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]
        ordered = sorted(shuffled, key=lambda item: item.labels)
        count = round(self.val_fraction * len(ordered))
        n = len(ordered)
        return {ordered[k].id for k in range(n) if (k + 1) * count // n > k * count // n}
