"""What every preparer shares: layout errors, header probing, change-only writing, stats, report.

A preparer turns an official download into AST-style manifests (``{"data": [{"wav", "labels"}]}``),
a ``class_labels_indices.csv`` and ``stats.json`` that :class:`ssamba.data.ManifestDataModule`
reads. Source audio is listed by absolute path (the resolved ``--src``), so a manifest folder
works from any ``data.root``; files a preparer writes itself are listed relative to ``--dst``.
Outputs are deterministic and a file is only written when its bytes change, so a second run
leaves every file (and its modification time) as it was.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ssamba.data.audio import SKIP_REASONS, BadAudio, audio_duration
from ssamba.data.manifest import ManifestDataModule
from ssamba.data.stats import fbank_stats

LABEL_CSV = "class_labels_indices.csv"
STATS_JSON = "stats.json"
SHOW = 3  # example paths named in an error line


# what a preparer returns: each training manifest (relative to --dst) to take stats of, with its label csv
Training = list[tuple[str, str | None]]


class LayoutError(Exception):
    """A download that is incomplete or in another layout; the message is one line."""


@dataclass(frozen=True, slots=True)
class Clip:
    """One manifest entry: an audio file (absolute, or relative to ``--dst``) and its label ids."""

    wav: str
    labels: tuple[str, ...] = ()


def require(path: Path, what: str) -> Path:
    """``path`` itself, or a :class:`LayoutError` naming ``what`` and where it was looked for."""
    if not path.exists():
        raise LayoutError(f"{what} not found: looked for {path}")
    return path


def require_listed(paths: Iterable[str], listed_in: str, looked_in: Path) -> None:
    """Files that an official list names must all be there (an incomplete download otherwise)."""
    paths = list(paths)
    missing = sorted(p for p in paths if not os.path.exists(p))
    if missing:
        examples = ", ".join(os.path.relpath(p, looked_in) for p in missing[:SHOW])
        raise LayoutError(f"{len(missing)} of {len(paths)} file(s) listed in {listed_in} are missing "
                          f"under {looked_in} (e.g. {examples}): incomplete download?")


def _seconds(path: str) -> float | str:
    try:
        return audio_duration(path)
    except BadAudio as error:
        return error.reason


class Preparation:
    """Writes one dataset's files under ``dst`` and collects the report.

    Clips pass through :meth:`usable` once: headers are read (``threads`` at a time) and files
    that are missing, unreadable or empty are counted by reason and left out of every manifest.
    """

    def __init__(self, dataset: str, src: str, dst: str, threads: int = 16):
        self.dataset = dataset
        self.src = Path(os.path.abspath(os.path.expanduser(src)))
        self.dst = Path(os.path.abspath(os.path.expanduser(dst)))
        self.threads = threads
        self.seconds: dict[str, float] = {}  # usable clip -> duration
        self.bad: dict[str, str] = {}  # unusable clip -> reason
        self.skipped: Counter = Counter()
        self.written: list[str] = []
        self.unchanged: list[str] = []
        self.manifests: dict[str, dict] = {}
        self.notes: dict = {}
        if not self.src.is_dir():
            raise LayoutError(f"--src is not a folder: {self.src}")

    # --- reading ------------------------------------------------------------------------------
    def usable(self, clips: list[Clip]) -> list[Clip]:
        """``clips`` whose audio header reads, in order; the rest counted by reason."""
        new = sorted({c.wav for c in clips} - self.seconds.keys() - self.bad.keys())
        with ThreadPoolExecutor(self.threads) as pool:
            for path, seconds in zip(new, pool.map(_seconds, [self.path(p) for p in new])):
                if isinstance(seconds, str):
                    self.count_bad(path, seconds)
                else:
                    self.seconds[path] = seconds
        return [c for c in clips if c.wav in self.seconds]

    def count_bad(self, path: str, reason: str) -> None:
        """Leave ``path`` out, counted under ``reason`` (one of ``SKIP_REASONS``) in the report."""
        self.bad[path] = reason
        self.skipped[reason] += 1

    def path(self, wav: str) -> str:
        """A manifest ``wav`` as a path on disk (relative ones start at ``dst``)."""
        return wav if os.path.isabs(wav) else str(self.dst / wav)

    # --- writing ------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``dst/rel`` unless it already holds exactly ``data``."""
        target = self.dst / rel
        if target.is_file() and target.read_bytes() == data:
            self.unchanged.append(rel)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        partial.write_bytes(data)
        os.replace(partial, target)
        self.written.append(rel)

    def write_manifest(self, rel: str, clips: list[Clip]) -> None:
        """An AST manifest of usable ``clips`` and its line in the report (items, hours, classes)."""
        clips = self.usable(clips)
        entries = [{"wav": c.wav, "labels": ",".join(c.labels)} for c in clips]
        self.write_bytes(rel, (json.dumps({"data": entries}, indent=1) + "\n").encode())
        self.manifests[rel] = {
            "items": len(clips),
            "hours": round(sum(self.seconds[c.wav] for c in clips) / 3600, 4),
            "classes": len({label for c in clips for label in c.labels}),
        }

    def write_label_csv(self, rel: str, labels: list[tuple[str, str]]) -> None:
        """``index,mid,display_name`` rows for ``(mid, display_name)`` pairs in index order."""
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["index", "mid", "display_name"])
        writer.writerows((index, mid, name) for index, (mid, name) in enumerate(labels))
        self.write_bytes(rel, text.getvalue().encode())

    def write_stats(self, manifest: str, label_csv: str | None, target_length: int, items: int) -> None:
        """``stats.json`` beside ``manifest``: fbank mean/std of up to ``items`` of its clips (seed 0), read
        through :class:`ManifestDataModule`, so they describe the features training computes. A fold's
        training manifest gets its own, so no fold's statistics include its evaluation clips."""
        datamodule = ManifestDataModule(
            train_manifest=str(self.dst / manifest),
            label_csv=None if label_csv is None else str(self.dst / label_csv),
            root=str(self.dst),
            target_length=target_length,
            num_workers=0,
        )
        stats = fbank_stats(datamodule, items=items, seed=0)
        stats.update(manifest=manifest, target_length=target_length)
        rel = str(Path(manifest).parent / STATS_JSON)  # "stats.json" for a manifest at the top of --dst
        self.write_bytes(rel, (json.dumps(stats, indent=1) + "\n").encode())
        self.notes.setdefault("stats", {})[rel] = stats

    # --- report -------------------------------------------------------------------------------
    def report(self) -> dict:
        """Counts per manifest, audio skipped by reason, dataset notes, files written/unchanged."""
        return {
            "dataset": self.dataset,
            "dst": str(self.dst),
            "manifests": self.manifests,
            "clips": len(self.seconds),
            "hours": round(sum(self.seconds.values()) / 3600, 4),
            "skipped": {reason: self.skipped[reason] for reason in SKIP_REASONS if self.skipped[reason]},
            **self.notes,
            "written": self.written,
            "unchanged": len(self.unchanged),
        }
