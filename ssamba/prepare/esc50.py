"""ESC-50: a train/eval manifest pair per fold of the five-fold cross-validation.

The layout: ``meta/esc50.csv`` and ``audio/<fold>-<clip>-<take>-<target>.wav`` (44.1 kHz), 5 folds.

Writes ``fold<k>/train.json`` (the other four folds), ``fold<k>/eval.json`` (fold k) and a
``class_labels_indices.csv`` in every fold folder, so ``data.root=<dst>/fold<k>`` is one fold of
the cross-validation. Labels are the csv's ``category`` names, indexed by its ``target``.
"""

from __future__ import annotations

import argparse
import csv

from ssamba.prepare.common import (LABEL_CSV, Clip, LayoutError, Preparation, Training, require,
                                    require_listed)

FOLDS = (1, 2, 3, 4, 5)
TARGET_LENGTH = 512  # 5.12 s covers a 5 s clip
COLUMNS = ("filename", "fold", "target", "category")


def prepare(prep: Preparation, args: argparse.Namespace) -> Training:
    meta = require(prep.src / "meta" / "esc50.csv", "meta/esc50.csv")
    audio = require(prep.src / "audio", "audio folder")
    with open(meta, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not set(COLUMNS) <= set(rows[0]):
        raise LayoutError(f"{meta}: expected columns {','.join(COLUMNS)}")
    categories: dict[int, str] = {}
    folds: dict[int, list[Clip]] = {fold: [] for fold in FOLDS}
    for number, row in enumerate(rows, 2):
        try:
            fold, target = int(row["fold"]), int(row["target"])
        except ValueError:
            raise LayoutError(f"{meta} line {number}: fold and target must be integers") from None
        if fold not in folds:
            raise LayoutError(f"{meta} line {number}: fold {fold} is not one of {FOLDS}")
        if categories.setdefault(target, row["category"]) != row["category"]:
            raise LayoutError(f"{meta} line {number}: target {target} is both {categories[target]!r} "
                              f"and {row['category']!r}")
        folds[fold].append(Clip(str(audio / row["filename"]), (row["category"],)))
    empty = [fold for fold, clips in folds.items() if not clips]
    if empty:
        raise LayoutError(f"{meta}: no clips in fold(s) {empty}")
    if sorted(categories) != list(range(len(categories))):
        raise LayoutError(f"{meta}: targets must be 0..{len(categories) - 1} without gaps")
    require_listed((c.wav for clips in folds.values() for c in clips), "meta/esc50.csv", audio)
    labels = [(categories[target], categories[target]) for target in sorted(categories)]
    for fold in FOLDS:
        prep.write_label_csv(f"fold{fold}/{LABEL_CSV}", labels)
        prep.write_manifest(f"fold{fold}/train.json", [c for k in FOLDS if k != fold for c in folds[k]])
        prep.write_manifest(f"fold{fold}/eval.json", folds[fold])
    return [(f"fold{fold}/train.json", f"fold{fold}/{LABEL_CSV}") for fold in FOLDS]
