"""Heart sounds recorded with earbuds, in three processing variants (``filt``, ``lp``, ``wavs``).

Two layouts are read, both ``root/<variant>/{train,eval}/*.{wav,flac}``:

* the heart-murmur fork's: per folder a manifest ``a.json``, a bare JSON list (or AST-style
  ``{"data": [...]}``) of ``{"wav": path, "labels": "present-holosystolic"}``, and per variant a
  ``class_labels_indices.csv``. Manifest paths are absolute paths of the machine that wrote them;
  one that does not exist here is taken from the manifest's own folder (same file name).
* one label file shared by all variants, keyed by file stem: a csv ``filename,labels`` or a JSON
  manifest, with ``root/class_labels_indices.csv``; items are the audio files of each folder.

Labels are ``mid``s or display names of the label csv. ``wav`` and ``wavs`` name the same variant
(the fork's folder is ``wavs``). File names start with the subject (``Umich09b_eb2_t03_s02_v02_filt``:
subject ``Umich09``, its second session ``b``); items carry it as their ``patient`` so recordings
can be scored per subject, as CirCor patients are.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import Counter
from pathlib import Path

import torch

from ssamba.data.base import AudioDataModule, Item
from ssamba.data.manifest import read_json_entries, read_label_csv
from ssamba.errors import ConfigError, MissingFileError

AUDIO_EXTENSIONS = (".wav", ".flac")
VARIANTS = ("filt", "lp", "wavs")
VARIANT_ALIASES = {"wav": "wavs", "wavs": "wav"}  # the fork's folder is wavs; older trees have wav
MANIFEST = "a.json"  # the fork's manifest name in every train/eval folder
LABEL_CSV = "class_labels_indices.csv"
SPLITS = {
    "fork": "the fork's folders: train/ trains, eval/ validates and tests (a subject can be on both sides)",
    "subject": "subject-disjoint: subjects of train/ and eval/ pooled and drawn, stratified by label",
}
_SUBJECT = re.compile(r"^(.*?\d+)[A-Za-z]*$")

log = logging.getLogger(__name__)


def subject_of(stem: str) -> str:
    """The subject of a recording: its name's first field without a session letter (Umich09b -> Umich09)."""
    head = stem.split("_", 1)[0]
    match = _SUBJECT.match(head)
    return match.group(1) if match else head


def read_entries(path: str) -> list[tuple[str, str]]:
    """(file, labels) pairs of a JSON manifest (a bare list or ``{"data": [...]}``) or a ``filename,labels`` csv."""
    if path.endswith(".json"):
        return [(entry["wav"], str(entry.get("labels", ""))) for entry in read_json_entries(path)]
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"filename", "labels"} <= set(rows[0]):
        raise ValueError(f"{path}: expected columns filename,labels")
    return [(row["filename"], row["labels"]) for row in rows]


def read_label_file(path: str) -> dict[str, list[str]]:
    """File stem -> label ids, from a ``filename,labels`` csv or a JSON manifest."""
    return {Path(name).stem: _split_labels(labels) for name, labels in read_entries(path)}


def _split_labels(labels: str) -> list[str]:
    return [x.strip() for x in labels.split(",") if x.strip()]


def local_path(path: str, manifest: str) -> str:
    """``path`` (a relative one from the manifest's folder) where it exists, else the file of that
    name beside ``manifest``: the fork's manifests hold absolute paths of another machine."""
    base = os.path.dirname(os.path.abspath(manifest))
    candidate = os.path.join(base, os.path.expanduser(path))  # an absolute path stays as it is
    return candidate if os.path.exists(candidate) else os.path.join(base, os.path.basename(path))


def spread_pick(keys: list[str], strata: dict[str, tuple], fraction: float, seed: int) -> set[str]:
    """Evenly spaced picks of ``keys`` ordered by stratum (shuffled within): stratified and seeded. A fraction
    above 0 picks at least one key and leaves at least one (a split it rounds to nothing would go unscored)."""
    generator = torch.Generator().manual_seed(seed)
    shuffled = [keys[i] for i in torch.randperm(len(keys), generator=generator).tolist()]
    ordered = sorted(shuffled, key=lambda key: strata[key])
    n = len(ordered)
    count = min(n - 1, max(1, round(fraction * n))) if fraction > 0 else 0
    return {ordered[k] for k in range(n) if (k + 1) * count // n > k * count // n}


class EarbudDataModule(AudioDataModule):
    """``data=earbud``: one variant's recordings, split as the fork does or subject-disjoint.

    ``split=fork``: ``train`` trains, ``eval`` validates and tests; with ``val_fraction > 0`` a
    label-stratified, seeded part of ``train`` validates instead. ``split=subject``: the subjects of
    both folders are pooled and ``eval_fraction`` of them (stratified by their most common label,
    seeded) are evaluated; ``val_fraction > 0`` then validates on a share of the other subjects.
    """

    meta_keys = ("patient", "recording")

    def __init__(
        self,
        root: str,
        variant: str,
        labels: str | None = None,
        label_csv: str | None = None,
        multilabel: bool = False,
        split: str = "fork",
        eval_fraction: float = 0.25,
        val_fraction: float = 0.0,
        split_seed: int = 0,
        aggregation: str = "mean",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.root = os.path.expanduser(root)
        self.variant = variant
        self.variant_dir = self._variant_dir(variant)
        if split not in SPLITS:
            raise ConfigError(f"data.split={split!r}: allowed values are {', '.join(SPLITS)}")
        if not 0.0 < eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction={eval_fraction}: must be between 0 and 1")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={val_fraction}: must be in [0, 1) (0: validate on the evaluated "
                              "recordings)")
        self.label_csv = label_csv or self._default_label_csv()
        for key, path in (("labels", labels), ("label_csv", self.label_csv)):
            if path is not None and not os.path.isfile(path):
                raise MissingFileError(f"data.{key}: no such file: {path}")
        self.label_names, mid_index = read_label_csv(self.label_csv)
        self.label_index = {**{name: i for i, name in enumerate(self.label_names)}, **mid_index}
        self.labels_path = labels or self._default_labels()
        self.labels = None if self.labels_path is None else read_label_file(self.labels_path)
        self.multilabel = multilabel
        self.split = split
        self.eval_fraction = eval_fraction
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.aggregation = aggregation  # checked against the classes where the subject metric is built
        self._subjects: dict[str, str] | None = None
        self._unlisted_told: set[str] = set()  # folders whose unlisted audio was reported
        log.info("earbud %s, split %s", self.variant_dir, self.split_description)  # scores depend on it

    # --- where things are -------------------------------------------------------------------
    def _variant_dir(self, variant: str) -> Path:
        for name in (variant, VARIANT_ALIASES.get(variant)):
            if name and Path(self.root, name).is_dir():
                return Path(self.root, name)
        names = (*VARIANTS, *VARIANT_ALIASES)
        on_disk = sorted({v for v in names if os.path.isdir(os.path.join(self.root, v))})
        raise ConfigError(f"data.variant={variant!r} is not on disk under {self.root!r}; available: {on_disk}")

    def _default_label_csv(self) -> str:
        for folder in (self.variant_dir, Path(self.root)):
            if (folder / LABEL_CSV).is_file():
                return str(folder / LABEL_CSV)
        raise MissingFileError(f"data.label_csv: not set and no {LABEL_CSV} in {self.variant_dir} or {self.root}")

    def _default_labels(self) -> str | None:
        """None: the fork's per-folder manifests; else the shared ``root/labels.csv``."""
        if all((self.variant_dir / folder / MANIFEST).is_file() for folder in ("train", "eval")):
            return None
        shared = Path(self.root, "labels.csv")
        if shared.is_file():
            return str(shared)
        raise MissingFileError(f"data.labels: not set, and neither {self.variant_dir}/{{train,eval}}/{MANIFEST} "
                               f"nor {shared} exists")

    @property
    def split_description(self) -> str:
        return f"{self.split}: {SPLITS[self.split]}"

    # --- items --------------------------------------------------------------------------------
    def _item(self, stem: str, path: str, names: list[str], source: str) -> Item:
        unknown = [x for x in names if x not in self.label_index]
        if unknown:
            raise ValueError(f"{source}: label(s) not in {self.label_csv}: {unknown[:5]}")
        labels = tuple(sorted({self.label_index[x] for x in names}))
        return Item(stem, path, labels, meta={"patient": subject_of(stem), "recording": stem})

    def folder_items(self, folder: str) -> list[Item]:
        path = self.variant_dir / folder
        if self.labels is None:  # the fork's manifest lists the folder's recordings
            manifest = str(path / MANIFEST)
            items = [self._item(Path(wav).stem, local_path(wav, manifest), _split_labels(labels), manifest)
                     for wav, labels in read_entries(manifest)]
            listed = {Path(item.path).name for item in items}
            unlisted = sorted(f.name for f in path.glob("*") if f.suffix.lower() in AUDIO_EXTENSIONS
                              and f.name not in listed)
            if unlisted and folder not in self._unlisted_told:
                self._unlisted_told.add(folder)
                log.warning("%d audio file(s) in %s are not in its %s and are not used, e.g. %s", len(unlisted),
                            path, MANIFEST, ", ".join(unlisted[:3]))
            return items
        files = sorted(f for f in path.glob("*") if f.suffix.lower() in AUDIO_EXTENSIONS)
        if not files:
            raise MissingFileError(f"no .wav/.flac files in {path}")
        unlabeled = [f.name for f in files if f.stem not in self.labels]
        if unlabeled:
            raise ValueError(f"{len(unlabeled)} file(s) in {path} have no row in {self.labels_path}: {unlabeled[:5]}")
        return [self._item(f.stem, str(f), self.labels[f.stem], self.labels_path) for f in files]

    def build_items(self, split: str) -> list[Item]:
        if self.split == "subject":
            items = self.folder_items("train") + self.folder_items("eval")
            return [i for i in items if self.subject_split[i.meta["patient"]] in self._sources(split)]
        if split == "test" or (split == "val" and not self.val_fraction):
            return self.folder_items("eval")
        items = self.folder_items("train")
        strata = {i.id: i.labels for i in items}
        held_out = spread_pick(list(strata), strata, self.val_fraction, self.split_seed) if self.val_fraction else set()
        return [i for i in items if (i.id in held_out) == (split == "val")]

    def _sources(self, split: str) -> tuple[str, ...]:
        """Which subject groups a split draws from (val is the evaluated group unless val_fraction > 0)."""
        if split == "val":
            return ("val",) if self.val_fraction else ("eval",)
        return ("eval",) if split == "test" else ("train",)

    @property
    def subject_split(self) -> dict[str, str]:
        """Subject -> train / val / eval for ``split=subject``."""
        if self._subjects is None:
            labels: dict[str, Counter] = {}
            for item in self.folder_items("train") + self.folder_items("eval"):
                labels.setdefault(item.meta["patient"], Counter())[item.labels] += 1
            strata = {s: min(c, key=lambda lab: (-c[lab], lab)) for s, c in labels.items()}
            subjects = sorted(strata)
            chosen = spread_pick(subjects, strata, self.eval_fraction, self.split_seed)
            rest = [s for s in subjects if s not in chosen]
            held = spread_pick(rest, strata, self.val_fraction, self.split_seed) if self.val_fraction else set()
            self._subjects = {s: "eval" if s in chosen else "val" if s in held else "train" for s in subjects}
        return self._subjects

    def extra_metrics(self) -> dict:
        """Subject-level scores (recordings aggregated per subject by ``data.aggregation``), single-label only."""
        if self.multilabel:
            return {}
        return {"subjects": {"_target_": "ssamba.metrics.patient_metrics", "class_names": list(self.label_names),
                             "rule": self.aggregation}}
