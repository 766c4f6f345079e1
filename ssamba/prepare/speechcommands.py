"""Speech Commands V2, V1 or SUPERB's 12 classes: train/valid/test from the official lists.

The layout: ``<word>/*.wav``, ``_background_noise_/``, ``validation_list.txt``,
``testing_list.txt``; V2 (35 words), V1 (30 words) or SUPERB's 12 classes on V1.

Writes ``train.json`` (every clip in neither list), ``valid.json``, ``test.json`` and the label csv.
``--variant superb12`` keeps ten words, maps the other twenty to ``_unknown_`` and adds
``_silence_``: every ``_background_noise_`` file is cut into non-overlapping 1 s pieces (a shorter
rest is dropped), written to ``<dst>/_silence_/<file>_<n>.wav``; of a file's ``n`` pieces the last
``n // 10`` go to test, the ``n // 10`` before them to valid and the rest to train, so no noise
is shared between splits.
"""

from __future__ import annotations

import argparse
import io

import soundfile as sf

from ssamba.prepare.common import (LABEL_CSV, Clip, LayoutError, Preparation, Training, require,
                                    require_listed)

V1_WORDS = ("bed", "bird", "cat", "dog", "down", "eight", "five", "four", "go", "happy", "house", "left",
            "marvin", "nine", "no", "off", "on", "one", "right", "seven", "sheila", "six", "stop", "three",
            "tree", "two", "up", "wow", "yes", "zero")
V2_WORDS = tuple(sorted(V1_WORDS + ("backward", "follow", "forward", "learn", "visual")))
SUPERB_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN, SILENCE = "_unknown_", "_silence_"
NOISE = "_background_noise_"
LISTS = {"valid": "validation_list.txt", "test": "testing_list.txt"}
TARGET_LENGTH = 128  # 1.28 s covers a 1 s clip
VARIANTS = {"v2": V2_WORDS, "v1": V1_WORDS, "superb12": V1_WORDS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", choices=tuple(VARIANTS), default="v2",
                        help="v2: 35 words (V2 download); v1: 30 words, superb12: SUPERB's 12 classes "
                             "(both from the V1 download). Default v2")


def word_folders(prep: Preparation, variant: str) -> tuple[str, ...]:
    """The variant's words, checked against the word folders of the download. Folders holding ``--dst``
    or an earlier output of this command (a label csv) are not the download's."""
    words = VARIANTS[variant]
    present = {d.name for d in prep.src.iterdir() if d.is_dir() and d.name[0] not in "._"
               and d != prep.dst and d not in prep.dst.parents and not (d / LABEL_CSV).is_file()}
    missing, extra = sorted(set(words) - present), sorted(present - set(words))
    if missing:
        hint = " (a V1 download? use --variant v1 or superb12)" if variant == "v2" and len(missing) == 5 else ""
        raise LayoutError(f"{len(missing)} word folder(s) of --variant {variant} not found in {prep.src}: "
                          f"{', '.join(missing[:5])}{hint}")
    if extra:
        hint = " (a V2 download? use --variant v2)" if variant != "v2" else ""
        raise LayoutError(f"{len(extra)} folder(s) in {prep.src} are not words of --variant {variant}: "
                          f"{', '.join(extra[:5])}{hint}")
    return words


def silence_pieces(prep: Preparation) -> dict[str, list[Clip]]:
    """1 s pieces of the background noise, written under ``dst``, dealt out train/valid/test."""
    noise = require(prep.src / NOISE, f"{NOISE} folder")
    files = sorted(p for p in noise.glob("*.wav") if not p.name.startswith("."))
    if not files:
        raise LayoutError(f"no .wav files in {noise}")
    splits: dict[str, list[Clip]] = {"train": [], "valid": [], "test": []}
    for path in files:
        try:
            data, rate = sf.read(path, dtype="float32")
        except RuntimeError:  # soundfile's error for a file it cannot decode
            prep.count_bad(str(path), "unreadable")
            continue
        n = len(data) // rate
        holdout = n // 10
        for k in range(n):
            buffer = io.BytesIO()
            sf.write(buffer, data[k * rate:(k + 1) * rate], rate, subtype="PCM_16", format="WAV")
            rel = f"{SILENCE}/{path.stem}_{k:03d}.wav"
            prep.write_bytes(rel, buffer.getvalue())
            split = "train" if k < n - 2 * holdout else "valid" if k < n - holdout else "test"
            splits[split].append(Clip(rel, (SILENCE,)))
    return splits


def prepare(prep: Preparation, args: argparse.Namespace) -> Training:
    words = word_folders(prep, args.variant)
    listed: dict[str, set[str]] = {}
    for split, name in LISTS.items():
        with open(require(prep.src / name, name)) as f:
            listed[split] = {line.strip() for line in f if line.strip()}
    require_listed((str(prep.src / rel) for rel in sorted(listed["valid"] | listed["test"])),
                   " and ".join(LISTS.values()), prep.src)
    superb = args.variant == "superb12"
    splits: dict[str, list[Clip]] = {"train": [], "valid": [], "test": []}
    for word in sorted(words):
        label = word if not superb or word in SUPERB_WORDS else UNKNOWN
        for path in sorted((prep.src / word).glob("*.wav")):
            rel = f"{word}/{path.name}"
            split = "valid" if rel in listed["valid"] else "test" if rel in listed["test"] else "train"
            splits[split].append(Clip(str(path), (label,)))
    if superb:
        for split, clips in silence_pieces(prep).items():
            splits[split] += clips
        prep.notes["silence"] = {split: sum(c.labels == (SILENCE,) for c in clips) for split, clips in splits.items()}
    classes = (*SUPERB_WORDS, UNKNOWN, SILENCE) if superb else sorted(words)
    prep.write_label_csv(LABEL_CSV, [(c, c) for c in classes])
    for split, clips in splits.items():
        prep.write_manifest(f"{split}.json", clips)
    return [("train.json", LABEL_CSV)]
