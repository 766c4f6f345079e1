"""AST-style manifests (AudioSet, ESC-50, Speech Commands, ...).

A manifest is ``{"data": [{"wav": path, "labels": "mid1,mid2"}, ...]}`` and the label set is a
``class_labels_indices.csv`` with columns ``index,mid,display_name``. Paths in a manifest may be
absolute or relative to ``root`` (or, with no ``root``, to the manifest's own folder), so moving a
dataset only means changing ``data.root``. ``stats_file`` reads ``norm_mean``/``norm_std`` from the
``stats.json`` that ``python -m ssamba.prepare`` writes; ``balanced_sampling`` draws training clips
by label frequency (AudioSet-2M, :mod:`ssamba.data.sampling`).
"""

from __future__ import annotations

import csv
import json
import os

from torch.utils.data import Sampler

from ssamba.data.base import UNLABELED, AudioDataModule, ClipDataset, Item
from ssamba.data.features import MelScale
from ssamba.data.sampling import BalancedSampler, label_balanced_weights
from ssamba.errors import ConfigError, MissingFileError


def read_label_csv(path: str) -> tuple[list[str], dict[str, int]]:
    """``class_labels_indices.csv`` -> (display names in index order, mid -> index)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"index", "mid", "display_name"} <= set(rows[0]):
        raise ValueError(f"{path}: expected columns index,mid,display_name")
    rows.sort(key=lambda row: int(row["index"]))
    if [int(row["index"]) for row in rows] != list(range(len(rows))):
        raise ValueError(f"{path}: indices must be 0..{len(rows) - 1} without gaps")
    return [row["display_name"] for row in rows], {row["mid"]: int(row["index"]) for row in rows}


def read_stats_file(path: str, mel: MelScale = MelScale()) -> dict[str, float]:
    """``norm_mean``/``norm_std`` of a prepared dataset's ``stats.json``; one clear line otherwise, also when
    the file's statistics were computed on another mel scale than ``mel`` (one without a scale: kaldi's)."""
    if not os.path.isfile(path):
        raise MissingFileError(f"data.stats_file: no such file: {path} (python -m ssamba.prepare writes it; "
                                "or set data.stats_file=null and give data.norm_mean / data.norm_std)")
    with open(path) as f:
        try:
            stats = json.load(f)
            norm = {"norm_mean": float(stats["norm_mean"]), "norm_std": float(stats["norm_std"])}
            scale = MelScale.from_record(stats)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ConfigError(f"data.stats_file={path}: expected a JSON object with norm_mean and norm_std") from None
    if scale != mel:
        theirs = " ".join(f"{key}={value:g}" for key, value in scale.record().items())
        ours = " ".join(f"data.{key}={value:g}" for key, value in mel.record().items())
        raise ConfigError(f"data.stats_file={path} holds the statistics of another mel scale ({theirs}); for {ours} "
                          "compute them (python -m ssamba.data.stats with these overrides and data.stats_file=null) "
                          "and give data.stats_file=null data.norm_mean=... data.norm_std=...")
    return norm


def resolve(path: str, root: str) -> str:
    return os.path.normpath(os.path.join(root, os.path.expanduser(path)))


def read_json_entries(path: str) -> list[dict]:
    """Entries of a JSON manifest: AST's ``{"data": [...]}`` or the heart-murmur fork's bare list, each with a ``wav``."""
    with open(path) as f:
        try:
            entries = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not JSON ({error})") from error
    entries = entries.get("data") if isinstance(entries, dict) else entries
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list (or {{'data': [...]}}) of {{'wav': ..., 'labels': ...}}")
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or "wav" not in entry:
            raise ValueError(f"{path}: entry {number} has no 'wav' key")
    return entries


def read_manifest(path: str, root: str | None, label_index: dict[str, int] | None) -> list[Item]:
    """Items of an AST manifest; unknown label ids are one clear error naming the manifest."""
    entries = read_json_entries(path)
    base = root if root is not None else os.path.dirname(os.path.abspath(path))
    items, unknown = [], set()
    for entry in entries:
        labels: tuple[int, ...] = ()
        if label_index is not None:
            mids = [m.strip() for m in str(entry.get("labels", "")).split(",") if m.strip()]
            unknown.update(m for m in mids if m not in label_index)
            labels = tuple(sorted({label_index[m] for m in mids if m in label_index}))
        items.append(Item(entry["wav"], resolve(entry["wav"], base), labels))
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} label id(s) not in the label csv, e.g. {sorted(unknown)[:5]}")
    return items


class ManifestDataModule(AudioDataModule):
    """``data=audioset`` (or any AST manifest): multi-hot labels from the label csv.

    With ``label_csv: null`` the data is unlabeled (one class, zero targets) for pretraining.
    ``stats_file`` (a prepared ``stats.json``) replaces ``norm_mean``/``norm_std``;
    ``balanced_sampling`` draws ``samples_per_epoch`` training clips (None: as many as there are)
    with replacement by label frequency, seeded by ``sampling_seed`` and the epoch.
    """

    def __init__(
        self,
        train_manifest: str | None = None,
        val_manifest: str | None = None,
        test_manifest: str | None = None,
        label_csv: str | None = None,
        root: str | None = None,
        multilabel: bool = True,
        stats_file: str | None = None,
        balanced_sampling: bool = False,
        samples_per_epoch: int | None = None,
        sampling_seed: int = 0,
        **kwargs,
    ):
        if stats_file is not None:
            kwargs.update(read_stats_file(stats_file, MelScale.from_record(kwargs)))
        super().__init__(**kwargs)
        self.balanced_sampling = balanced_sampling
        self.samples_per_epoch = samples_per_epoch
        self.sampling_seed = sampling_seed
        self.manifests = {"train": train_manifest, "val": val_manifest, "test": test_manifest}
        if not any(self.manifests.values()):
            raise ValueError("data: set at least one of train_manifest, val_manifest, test_manifest")
        for split, manifest in self.manifests.items():
            if manifest is not None and not os.path.isfile(manifest):
                raise MissingFileError(f"data.{split}_manifest: no such file: {manifest}")
        self.root = root
        if label_csv is None:
            self.label_names, self.label_index, self.multilabel = UNLABELED, None, False
        else:
            if not os.path.isfile(label_csv):
                raise MissingFileError(f"data.label_csv: no such file: {label_csv}")
            self.label_names, self.label_index = read_label_csv(label_csv)
            self.multilabel = multilabel

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(split for split, manifest in self.manifests.items() if manifest)

    def split_source(self, split: str) -> str:
        return f"data.{split}_manifest={self.manifests[split]}"

    def build_items(self, split: str) -> list[Item]:
        return read_manifest(self.manifests[split], self.root, self.label_index)

    def train_sampler(self, dataset: ClipDataset) -> Sampler | None:
        if not self.balanced_sampling:
            return None
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        return BalancedSampler(label_balanced_weights([item.labels for item in dataset.items]),
                               self.samples_per_epoch, self.sampling_seed, world_size, rank)
