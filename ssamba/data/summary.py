"""What a data config would load, without training: items, hours, labels, skipped files."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from ssamba.data.audio import SKIP_REASONS, BadAudio, audio_duration
from ssamba.data.base import AudioDataModule, Item


def _file_seconds(path: str) -> float | str:
    try:
        return audio_duration(path)
    except BadAudio as error:
        return error.reason


def split_summary(datamodule: AudioDataModule, split: str | None, items: list[Item], threads: int = 16,
                  probed: dict[str, float | str] | None = None) -> dict:
    """Counts for one split's ``items`` (``split`` None: items of several splits). ``hours`` is the audio the
    items draw from: every file once (crops of one recording count its duration once); generated items
    count their own length. ``probed`` keeps the files' durations (or why unusable) across calls."""
    probed = {} if probed is None else probed
    paths = sorted({item.path for item in items if item.path is not None})
    new = [path for path in paths if path not in probed]
    with ThreadPoolExecutor(threads) as pool:
        probed.update(zip(new, pool.map(_file_seconds, new)))
    seconds = {path: probed[path] for path in paths}
    skipped = Counter(getattr(datamodule, "setup_skipped", {}).get(split, {}))
    skipped.update(s for s in seconds.values() if isinstance(s, str))
    usable = [i for i in items if i.path is None or not isinstance(seconds[i.path], str)]
    total = sum(s for s in seconds.values() if not isinstance(s, str))
    total += sum(i.duration or 0.0 for i in usable if i.path is None)
    labels = Counter(datamodule.label_names[k] for item in usable for k in item.labels)
    out = {
        "items": len(usable),
        "hours": total / 3600,
        "labels": dict(sorted(labels.items())),
        "skipped": {r: skipped[r] for r in SKIP_REASONS if skipped[r]},
    }
    if hasattr(datamodule, "split_patients"):
        splits = datamodule.splits if split is None else (split,)
        patients = {p.id: p for name in splits for p in datamodule.split_patients(name)}.values()
        out["patients"] = len(patients)
        out["recordings"] = len({i.meta["recording"] for i in usable})
        out["patient_labels"] = dict(sorted(Counter(str(datamodule.patient_label(p)) for p in patients).items()))
    elif any("patient" in i.meta for i in usable):  # e.g. earbud subjects
        out["patients"] = len({i.meta["patient"] for i in usable})
    return out


def patients_shared_with_train(items: dict[str, list[Item]]) -> int:
    """Patients (subjects) with items in train and in val or test: 0 for a patient-disjoint split."""
    patients = {split: {str(i.meta["patient"]) for i in part if "patient" in i.meta} for split, part in items.items()}
    evaluated = set().union(*(ids for split, ids in patients.items() if split != "train"))
    return len(patients.get("train", set()) & evaluated)


def summarize(datamodule: AudioDataModule) -> dict:
    """Per split and in total; ``split`` says how the splits were made where the datamodule tells."""
    items = {split: datamodule.build_items(split) for split in datamodule.splits}
    probed: dict[str, float | str] = {}  # each file's header read once, for its split and for the total
    splits = {split: split_summary(datamodule, split, part, probed=probed) for split, part in items.items()}
    # every item, patient and file once: splits may share them (earbud's val and test can be one folder)
    unique = {(i.id, i.path, i.start, i.duration): i for part in items.values() for i in part}
    total = split_summary(datamodule, None, list(unique.values()), probed=probed)
    skipped = Counter(total["skipped"])
    for split in splits:
        skipped.update(getattr(datamodule, "setup_skipped", {}).get(split, {}))
    total["skipped"] = {r: skipped[r] for r in SKIP_REASONS if skipped[r]}
    for part in (*splits.values(), total):
        part["hours"] = round(part["hours"], 4)
    out = {"splits": splits, "total": total}
    if hasattr(datamodule, "split_description"):
        out["split"] = datamodule.split_description
        out["patients_shared_with_train"] = patients_shared_with_train(items)
    return out
