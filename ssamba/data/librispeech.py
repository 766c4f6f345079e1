"""LibriSpeech for pretraining: ``<root>/LibriSpeech/<subset>/<speaker>/<chapter>/*.flac``, unlabeled.

Only the first ``target_length`` frames of each utterance are used (10.24 s at 1024 frames), as in
the SSAST recipe.
"""

from __future__ import annotations

import os
from pathlib import Path

from ssamba.data.base import UNLABELED, AudioDataModule, Item
from ssamba.errors import MissingFileError


def find_subset(root: str, subset: str) -> Path:
    """Accept ``root`` being the folder that holds ``LibriSpeech/`` or ``LibriSpeech/`` itself."""
    for candidate in (Path(root) / "LibriSpeech" / subset, Path(root) / subset):
        if candidate.is_dir():
            return candidate
    raise MissingFileError(f"LibriSpeech subset {subset!r} not found under data.root={root!r}")


def scan_subset(folder: Path) -> list[Item]:
    files = sorted(folder.glob("*/*/*.flac"))
    if not files:
        raise MissingFileError(f"no <speaker>/<chapter>/*.flac files in {folder}")
    return [Item(f.stem, str(f)) for f in files]


class LibriSpeechDataModule(AudioDataModule):
    """``data=librispeech``: utterances of the chosen subsets, one dummy class."""

    label_names = UNLABELED
    multilabel = False

    def __init__(
        self,
        root: str,
        train_subsets: list[str] = ("train-clean-100", "train-clean-360", "train-other-500"),
        val_subsets: list[str] = ("dev-clean",),
        test_subsets: list[str] = ("test-clean",),
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.root = os.path.expanduser(root)
        self.subsets = {"train": list(train_subsets), "val": list(val_subsets), "test": list(test_subsets)}

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(split for split, subsets in self.subsets.items() if subsets)

    def build_items(self, split: str) -> list[Item]:
        return [item for subset in self.subsets[split] for item in scan_subset(find_subset(self.root, subset))]
