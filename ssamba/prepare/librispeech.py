"""LibriSpeech: one unlabeled manifest per subset.

The layout: ``<subset>/<speaker>/<chapter>/*.flac`` with ``<speaker>-<chapter>.trans.txt``, any
subsets, under ``--src`` or ``--src/LibriSpeech``.

Writes ``<subset>.json`` (read it with ``data.label_csv=null``).
Every utterance a transcript names must have its flac (a truncated extraction fails here).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ssamba.prepare.common import Clip, LayoutError, Preparation, Training, require_listed

TARGET_LENGTH = 1024  # SSAST pretraining uses the first 10.24 s of each utterance


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subsets", nargs="+", help="only these subsets (default: every one found)")


def find_subsets(prep: Preparation, wanted: list[str] | None) -> list[Path]:
    root = prep.src / "LibriSpeech" if (prep.src / "LibriSpeech").is_dir() else prep.src
    found = {d.name: d for d in sorted(root.iterdir()) if d.is_dir() and next(d.glob("*/*/*.flac"), None)}
    if not found:
        raise LayoutError(f"no <subset>/<speaker>/<chapter>/*.flac under {root}")
    missing = [name for name in wanted or () if name not in found]
    if missing:
        raise LayoutError(f"subset(s) {', '.join(missing)} not found in {root} (found: {', '.join(found)})")
    return [found[name] for name in (wanted or found)]


def read_subset(folder: Path) -> list[Clip]:
    """The subset's flacs; each chapter's transcript must exist and all its utterances too."""
    listed = []
    for chapter in sorted(p for p in folder.glob("*/*") if p.is_dir()):
        transcript = chapter / f"{chapter.parent.name}-{chapter.name}.trans.txt"
        if not transcript.is_file():
            raise LayoutError(f"transcript not found: looked for {transcript}")
        with open(transcript) as f:
            listed += [str(chapter / f"{line.split()[0]}.flac") for line in f if line.strip()]
    require_listed(listed, f"{folder.name}/*/*/*.trans.txt", folder)
    return [Clip(str(path)) for path in sorted(folder.glob("*/*/*.flac"))]


def prepare(prep: Preparation, args: argparse.Namespace) -> Training:
    subsets = find_subsets(prep, args.subsets)
    for folder in subsets:
        prep.write_manifest(f"{folder.name}.json", read_subset(folder))
    train = [folder.name for folder in subsets if folder.name.startswith("train")]
    return [(f"{(train or [subsets[0].name])[0]}.json", None)]
