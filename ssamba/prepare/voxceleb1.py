"""VoxCeleb1 speaker identification: train/valid/test from ``iden_split.txt``.

The layout: ``wav/<speaker>/<video>/<n>.wav`` and ``iden_split.txt``.

Each line of ``iden_split.txt`` is ``<set> <speaker>/<video>/<n>.wav`` with set 1 = train,
2 = validation, 3 = test; writes ``train.json``, ``valid.json``, ``test.json`` and a label csv of
the speakers the split file names (1,251 in the official one), sorted by id.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ssamba.prepare.common import (LABEL_CSV, Clip, LayoutError, Preparation, Training, require,
                                    require_listed)

SETS = {"1": "train", "2": "valid", "3": "test"}
TARGET_LENGTH = 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split-file", help="iden_split.txt (default: <src>/iden_split.txt)")


def prepare(prep: Preparation, args: argparse.Namespace) -> Training:
    given = args.split_file
    split_file = require(prep.src / "iden_split.txt" if given is None else Path(given).expanduser().absolute(),
                         "iden_split.txt")
    wav = require(prep.src / "wav", "wav folder")
    splits: dict[str, list[Clip]] = {name: [] for name in SETS.values()}
    with open(split_file) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2 or fields[0] not in SETS or fields[1].count("/") != 2:
                raise LayoutError(f"{split_file} line {number}: expected '<1|2|3> <speaker>/<video>/<n>.wav'")
            speaker = fields[1].split("/")[0]
            splits[SETS[fields[0]]].append(Clip(str(wav / fields[1]), (speaker,)))
    empty = [name for name, clips in splits.items() if not clips]
    if empty:
        raise LayoutError(f"{split_file}: no lines for {', '.join(empty)}")
    require_listed((c.wav for clips in splits.values() for c in clips), split_file.name, wav)
    speakers = sorted({c.labels[0] for clips in splits.values() for c in clips})
    prep.write_label_csv(LABEL_CSV, [(s, s) for s in speakers])
    for name, clips in splits.items():
        prep.write_manifest(f"{name}.json", sorted(clips, key=lambda c: c.wav))
    return [("train.json", LABEL_CSV)]
