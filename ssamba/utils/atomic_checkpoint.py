"""Checkpoint files that are either the old or the new version, never half written, and that load without
running code.

Lightning's default IO writes through a temporary file in the system temp folder and then moves it over; when that
folder is another filesystem (the usual case on clusters) the move is a copy, and a kill in the middle leaves a
truncated ``last.ckpt``. Here the bytes go to a temporary file in the checkpoint's own folder, are flushed to disk
(``fsync``), and replace the target with ``os.replace`` (atomic on POSIX and Windows), after which the folder entry
is flushed too. Loading always uses ``torch.load(weights_only=True)``: a checkpoint holds tensors and plain values,
so a tampered file can fail to load but cannot execute code.
"""
from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import CheckpointIO

TEMP_PREFIX = ".tmp-"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` through a synced temporary file in the same folder and an atomic rename."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # serialise first: an error here leaves no file behind at all
    atomic_write_bytes(buffer.getbuffer(), path)


def atomic_write_bytes(data: bytes | memoryview, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); folders cannot be opened for syncing on Windows."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class AtomicCheckpointIO(CheckpointIO):
    """Lightning CheckpointIO plugin (``conf/trainer/default.yaml`` uses it): atomic saves, safe loads.

    Local paths only; remote URLs (``s3://``...) are refused with a clear error rather than half supported.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_torch_save(checkpoint, _local(path))

    def load_checkpoint(self, path: str | os.PathLike, map_location: Callable | Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError("checkpoints are loaded with weights_only=True only (they hold tensors and plain "
                             "values; unpickling arbitrary objects could execute code)")
        path = _local(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        _local(path).unlink(missing_ok=True)


def _local(path: str | os.PathLike) -> Path:
    text = os.fspath(path)
    if "://" in text and not text.startswith("file://"):
        raise ValueError(f"{text}: AtomicCheckpointIO writes local files only; for object storage remove "
                         "trainer.plugins to use Lightning's own IO")
    return Path(text.removeprefix("file://"))
