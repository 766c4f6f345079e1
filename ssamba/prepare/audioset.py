"""AudioSet: manifests for AS-20K and AS-2M from the segment csvs and downloaded clips.

The layout: the official segment csvs (``balanced_train_segments.csv`` and ``eval_segments.csv``
required, ``unbalanced_train_segments.csv`` optional) and ``class_labels_indices.csv`` in
``--src``; clips anywhere under ``--audio`` (default ``--src``) as ``.wav``, ``.flac``, ``.ogg``
or ``.mp3`` named ``<YTID>``, ``Y<YTID>`` or ``<YTID>_<start>_<end>`` (also with a ``Y``), where a
start with a decimal point is seconds (``30.000``) and an integer is milliseconds (``30000``).
A clip is matched by YTID; the start only chooses between several files of one YTID. Clips that
were not downloaded are counted as missing per csv, not an error.

Writes ``balanced_train.json`` (AS-20K), ``eval.json`` and, with the unbalanced csv,
``unbalanced_train.json`` and ``full_train.json`` (balanced + unbalanced: AS-2M), plus the label csv.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
from collections import defaultdict
from pathlib import Path

from ssamba.data.manifest import read_label_csv
from ssamba.prepare.common import LABEL_CSV, Clip, LayoutError, Preparation, Training, require

SEGMENTS = {"balanced_train": "balanced_train_segments.csv", "eval": "eval_segments.csv"}
OPTIONAL_SEGMENTS = {"unbalanced_train": "unbalanced_train_segments.csv"}
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
NAME = re.compile(r"(?P<ytid>[A-Za-z0-9_-]{11})(?:_(?P<start>\d+(?:\.\d+)?)_\d+(?:\.\d+)?)?")
TARGET_LENGTH = 1024
START_TOLERANCE = 1e-3  # seconds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--audio", nargs="+", help="folder(s) searched for clips (default: --src)")


def name_keys(stem: str) -> list[tuple[str, float | None]]:
    """Every (YTID, start seconds) a file stem can mean: with and without a leading ``Y``."""
    keys = []
    for candidate in (stem, stem[1:]) if stem.startswith("Y") else (stem,):
        match = NAME.fullmatch(candidate)
        if match:
            start = match["start"]
            seconds = None if start is None else float(start) if "." in start else int(start) / 1000
            keys.append((match["ytid"], seconds))
    return keys


def index_clips(folders: list[Path]) -> dict[str, list[tuple[float | None, str]]]:
    """YTID -> [(start, path)] of every audio file under ``folders``."""
    index: dict[str, list[tuple[float | None, str]]] = defaultdict(list)
    for folder in folders:
        for parent, _, names in os.walk(folder):
            for name in names:
                stem, suffix = os.path.splitext(name)
                if suffix.lower() in AUDIO_SUFFIXES:
                    for ytid, start in name_keys(stem):
                        index[ytid].append((start, os.path.join(parent, name)))
    return index


def pick(candidates: list[tuple[float | None, str]], start: float) -> str:
    """The file whose name states ``start``, else the first by path."""
    return min(candidates, key=lambda c: (c[0] is None or abs(c[0] - start) > START_TOLERANCE, c[1]))[1]


def read_segments(path: Path, label_index: dict[str, int]) -> list[tuple[str, float, tuple[str, ...]]]:
    """``YTID, start_seconds, end_seconds, "mid1,mid2"`` rows (``#`` lines are comments)."""
    rows = []
    with open(path, newline="") as f:
        for number, row in enumerate(csv.reader(f, skipinitialspace=True), 1):
            if not row or row[0].startswith("#"):
                continue
            try:
                ytid, start, _, labels = row
                start = float(start)
            except ValueError:
                raise LayoutError(f"{path} line {number}: expected YTID, start_seconds, end_seconds, "
                                  "positive_labels") from None
            mids = tuple(m for m in labels.split(",") if m)
            unknown = [m for m in mids if m not in label_index]
            if unknown:
                raise LayoutError(f"{path} line {number}: label {unknown[0]} is not in {LABEL_CSV}")
            rows.append((ytid, start, mids))
    return rows


def prepare(prep: Preparation, args: argparse.Namespace) -> Training:
    label_csv = require(prep.src / LABEL_CSV, LABEL_CSV)
    try:
        names, label_index = read_label_csv(str(label_csv))
    except (ValueError, KeyError) as error:
        raise LayoutError(str(error).splitlines()[0]) from None
    segments = {split: require(prep.src / name, name) for split, name in SEGMENTS.items()}
    segments.update((split, prep.src / name) for split, name in OPTIONAL_SEGMENTS.items()
                    if (prep.src / name).is_file())
    folders = [Path(a).expanduser().absolute() for a in args.audio] if args.audio else [prep.src]
    for folder in folders:
        require(folder, "--audio folder")
    index = index_clips(folders)
    clips: dict[str, list[Clip]] = {}
    missing: dict[str, int] = {}
    for split, path in segments.items():
        rows = read_segments(path, label_index)
        clips[split] = [Clip(pick(index[y], s), mids) for y, s, mids in rows if y in index]
        missing[path.name] = len(rows) - len(clips[split])
        prep.skipped["missing"] += missing[path.name]
    prep.notes["missing"] = missing
    mids = sorted(label_index, key=label_index.get)
    prep.write_label_csv(LABEL_CSV, list(zip(mids, names)))
    for split, split_clips in clips.items():
        prep.write_manifest(f"{split}.json", split_clips)
    if "unbalanced_train" in clips:
        prep.write_manifest("full_train.json", clips["balanced_train"] + clips["unbalanced_train"])
    return [("balanced_train.json", LABEL_CSV)]
