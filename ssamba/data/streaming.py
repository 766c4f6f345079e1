"""Sharded streaming for AudioSet-scale corpora, with litdata.

``python -m ssamba.data.streaming data=<name> [overrides] --split train --out DIR`` packs the items
of any data config into litdata chunks (the original encoded file bytes, so shards stay as small
as the source audio) plus ``ssamba.json`` with the label set. ``data=shards`` streams them back:
litdata gives every DDP rank and DataLoader worker a disjoint part of each epoch, and shards can
live on local disk or object storage (``s3://...``).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing
import os
from collections.abc import Callable
from functools import partial

import litdata
import torch

from ssamba.data.audio import BadAudio, prepare_waveform, read_audio
from ssamba.data.base import AudioDataModule, ClipDataset, Collate, Item
from ssamba.data.cli import instantiate_data
from ssamba.data.resumable import epoch_to_run, run_seed, worker_seed
from ssamba.errors import ConfigError, MissingFileError, config_errors_exit_cli

SIDECAR = "ssamba.json"
log = logging.getLogger(__name__)


def _pack(item: Item, reader_module: AudioDataModule | None = None) -> dict:
    """One shard sample: file bytes (or, for generated audio, a FLAC rendering) and the item."""
    if item.path is None:  # generated audio has no file: store it encoded
        import soundfile as sf

        wav, rate = reader_module.reader(item)
        buffer = io.BytesIO()
        sf.write(buffer, wav.T.numpy(), rate, format="FLAC")
        audio = buffer.getvalue()
    else:
        with open(item.path, "rb") as f:
            audio = f.read()
    meta = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in item.meta.items()}
    tensor_keys = [k for k, v in item.meta.items() if isinstance(v, torch.Tensor)]
    return {
        "id": item.id,
        "audio": audio,
        "labels": ",".join(map(str, item.labels)),
        "start": float(item.start),
        "duration": -1.0 if item.duration is None else float(item.duration),
        "meta": json.dumps({"values": meta, "tensors": tensor_keys}),
    }


def write_shards(
    datamodule: AudioDataModule, split: str, output_dir: str, chunk_bytes: str = "64MB", workers: int = 1,
    sidecar_path: str | None = None,
) -> int:
    """Pack one split of a datamodule into litdata chunks under ``output_dir``; returns item count.

    ``sidecar_path``: where ``ssamba.json`` goes (default: ``output_dir``; a local path is needed for remote shards,
    and ``data.sidecar`` then names it).
    """
    remote = "://" in output_dir
    if sidecar_path is None and remote:
        raise ValueError(f"shards written to {output_dir}: give a local path for {SIDECAR} (--sidecar), which "
                         "data=shards reads through data.sidecar")
    items = datamodule.build_items(split)
    if not items:
        raise ValueError(f"the {split} split has no items")
    if split == "train" and getattr(datamodule, "weights", None) is not None:
        log.warning("data.weights (and data.samples_per_epoch) are not packed: the shards hold every item of the "
                    "mixture once, and data=shards streams them in their natural proportions. For weighted "
                    "sources, pack each source to its own shards and train on the mixture's own config")
    generated = any(item.path is None for item in items)
    # litdata forks its workers when ipykernel is loaded (a notebook, or a test run that ran one), and a
    # fork of a process with live threads can hang in the child; spawn always works here (the packing
    # function is importable). litdata sets the start method for the whole process: put it back after.
    start_method = multiprocessing.get_start_method(allow_none=True)
    try:
        litdata.optimize(
            fn=partial(_pack, reader_module=datamodule if generated else None),
            inputs=items,
            output_dir=output_dir,
            chunk_bytes=chunk_bytes,
            num_workers=workers,
            reorder_files=False,
            verbose=False,
            start_method="spawn",
        )
    finally:
        multiprocessing.set_start_method(start_method, force=True)
    if not remote:  # litdata reports worker failures only in their own logs
        with open(os.path.join(output_dir, "index.json")) as f:
            if not json.load(f).get("chunks"):
                raise RuntimeError(f"writing shards to {output_dir} failed: no chunks were written")
    record = {
        "label_names": list(datamodule.label_names),
        "multilabel": bool(datamodule.multilabel),
        "meta_keys": list(datamodule.meta_keys),
        "items": len(items),
        "split": split,
        "input": input_settings(datamodule),
    }
    with open(sidecar_path or os.path.join(output_dir, SIDECAR), "w") as f:
        json.dump(record, f, indent=2)
    return len(items)


def input_settings(datamodule: AudioDataModule) -> dict:
    """The feature settings of a data config (frames, normalisation, mel scale): the shards keep the audio
    only, so ``data=shards`` compares its own with those of the config they were packed from."""
    return {"target_length": datamodule.target_length, "norm_mean": datamodule.norm_mean,
            "norm_std": datamodule.norm_std, **datamodule.mel.record()}


class ShardDataset(litdata.StreamingDataset):
    """Streams packed samples and turns them into batch items like :class:`ClipDataset`.

    Unusable audio is dropped from its batch and counted (no substitution: a stream has no
    random access to draw a replacement from).
    """

    def __init__(self, input_dir: str, clip: ClipDataset, shuffle: bool, seed: int = 42, **kwargs):
        super().__init__(input_dir, shuffle=shuffle, seed=seed, **kwargs)
        self.clip = clip

    def __getitem__(self, index) -> dict:
        sample = super().__getitem__(index)
        meta = json.loads(sample["meta"])
        values = {k: (torch.tensor(v) if k in meta["tensors"] else v) for k, v in meta["values"].items()}
        labels = tuple(int(x) for x in sample["labels"].split(",") if x)
        duration = None if sample["duration"] < 0 else sample["duration"]
        item = Item(sample["id"], None, labels, sample["start"], duration, values)
        try:
            wav, rate = read_audio(io.BytesIO(sample["audio"]), item.start, item.duration, name=item.id)
            wav = prepare_waveform(wav, rate, item.id, self.clip.min_seconds)
        except BadAudio as error:
            if self.clip.on_error == "raise":
                raise
            return {"_skipped": [(error.reason, error.path)]}
        return self.clip.finish(item, wav, [])


def _not_drop_last_warning(record: logging.LogRecord) -> bool:
    return "disabled the `drop_last` option" not in record.getMessage()


class ShardLoader(litdata.StreamingDataLoader):
    """litdata's loader, whose state (epoch, items yielded) Lightning saves in checkpoints and restores on a
    mid-epoch resume, with a base seed of ``(run seed, epoch)`` for its iterators.

    A plain DataLoader draws that seed from the global torch RNG whenever an iterator starts; a resumed run starts
    one more than the interrupted run did, which would shift every mask drawn after the resume. ``run_epoch``
    gives the epoch the trainer is about to run: a run resumed from an epoch's end (where Lightning restores no
    loader state) would otherwise count litdata's epochs from the start again and repeat their shuffles.
    """

    def __init__(self, dataset: ShardDataset, run_epoch: Callable[[], int | None] = lambda: None, **kwargs):
        super().__init__(dataset, generator=torch.Generator(), **kwargs)
        self.run_epoch = run_epoch

    def __iter__(self):
        epoch = self.run_epoch()
        if epoch is not None and not self.restore:  # litdata counts epochs from 1: it adds one as it starts
            self.current_epoch = epoch
        return super().__iter__()

    def _get_iterator(self):
        self.generator.manual_seed(worker_seed(run_seed(), self.current_epoch))
        return super()._get_iterator()


class ShardDataModule(AudioDataModule):
    """``data=shards``: streams the shard folders written by :func:`write_shards`.

    Waveform mixup needs random access to a partner clip, so it is not available here.
    """

    def __init__(
        self,
        train_dir: str | None = None,
        val_dir: str | None = None,
        test_dir: str | None = None,
        shuffle: bool = True,
        seed: int = 42,
        max_cache_size: str = "50GB",
        sidecar: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if self.mixup:
            raise ConfigError("data.mixup must be 0 with data=shards (mixup needs random access)")
        self.dirs = {"train": train_dir, "val": val_dir, "test": test_dir}
        first = next((d for d in self.dirs.values() if d), None)
        if first is None:
            raise ValueError("data: set at least one of train_dir, val_dir, test_dir")
        sidecar = self._sidecar(sidecar or os.path.join(first, SIDECAR))
        self.label_names = sidecar["label_names"]
        self.multilabel = sidecar["multilabel"]
        self.meta_keys = tuple(sidecar["meta_keys"])
        packed, own = sidecar.get("input", {}), input_settings(self)
        differ = {key: value for key, value in packed.items() if key in own and own[key] != value}
        if differ:
            log.warning("data=shards: these shards were packed from a data config with %s; this one gives %s "
                        "(set data.<key> to train on the features that config computes)",
                        " ".join(f"{k}={v}" for k, v in differ.items()),
                        " ".join(f"{k}={own[k]}" for k in differ))
        self.shuffle = shuffle
        self.seed = seed
        self.max_cache_size = max_cache_size

    @staticmethod
    def _sidecar(path: str) -> dict:
        if "://" in path:
            raise ConfigError(f"data.sidecar must be a local copy of {SIDECAR} for remote shards, got {path}")
        if not os.path.isfile(path):
            raise MissingFileError(f"{path} not found: shards are written by `python -m ssamba.data.streaming`")
        with open(path) as f:
            return json.load(f)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(split for split, directory in self.dirs.items() if directory)

    def make_dataset(self, split: str) -> ShardDataset:
        train = split == "train"
        clip = ClipDataset(
            [], self.num_classes, self.train_front_end if train else self.eval_front_end, train=train,
            features_on_device=self.features_on_device, on_error=self.on_error, min_seconds=self.min_seconds,
        )
        if train:
            return ShardDataset(self.dirs[split], clip, shuffle=self.shuffle, seed=self.seed,
                                max_cache_size=self.max_cache_size)
        # litdata drops the last items of a split under DDP unless told not to, which would leave the same items
        # out of every score; its warning about that choice concerns training (ranks may then run a batch more or
        # less, and evaluation syncs only at its end)
        litdata_log = logging.getLogger("litdata.streaming.dataset")
        litdata_log.addFilter(_not_drop_last_warning)
        try:
            return ShardDataset(self.dirs[split], clip, shuffle=False, seed=self.seed,
                                max_cache_size=self.max_cache_size, drop_last=False)
        finally:
            litdata_log.removeFilter(_not_drop_last_warning)

    def dataloader(self, split: str, shuffle: bool | None = None) -> ShardLoader:
        if split not in self.splits:
            raise ValueError(f"{type(self).__name__} has no {split!r} split (has: {', '.join(self.splits)})")
        if split not in self.datasets:
            self.datasets[split] = self.make_dataset(split)
        train = split == "train"
        return ShardLoader(
            self.datasets[split],
            batch_size=self.batch_size if train else self.eval_batch_size,
            num_workers=self.num_workers,
            collate_fn=Collate(self.target_length, self.num_classes, self.features_on_device, self.meta_keys),
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            run_epoch=lambda: epoch_to_run(self.trainer),
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="train", help="split of the data config to pack")
    parser.add_argument("--out", required=True, help="output folder (local path or s3://...)")
    parser.add_argument("--chunk-bytes", default="64MB")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sidecar", help=f"local path for {SIDECAR} (default: in --out; needed for s3://...)")
    args, overrides = parser.parse_known_args(argv)
    if "://" in args.out and not args.sidecar:
        parser.error(f"--out {args.out} is remote: give --sidecar <local path> for {SIDECAR} (data.sidecar reads it)")
    with config_errors_exit_cli("python -m ssamba.data.streaming"):
        count = write_shards(instantiate_data(overrides), args.split, args.out, args.chunk_bytes, args.workers,
                             args.sidecar)
    print(f"wrote {count} items of the {args.split} split to {args.out}"
          + (f"; {SIDECAR} to {args.sidecar}" if args.sidecar else ""))


if __name__ == "__main__":
    main()
