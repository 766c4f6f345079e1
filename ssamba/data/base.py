"""Machinery shared by every datamodule: items, the clip dataset, collation and skip accounting.

A datamodule only has to say which items each split holds (:meth:`AudioDataModule.build_items`);
decoding, the bad-input policy, mixup, features (CPU per sample or batched on the device) and
the dict batch format of ``docs/architecture.md`` live here.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ssamba.constants import FFT_SIZE, MEL_BINS, MEL_HIGH_HZ, MEL_LOW_HZ, UNLABELED
from ssamba.data.audio import (
    SKIP_REASONS,
    BadAudio,
    check_files_exist,
    prepare_waveform,
    read_audio,
)
from ssamba.data.features import (
    AUDIOSET_MEAN,
    AUDIOSET_STD,
    SAMPLE_RATE,
    FbankFrontEnd,
    MelScale,
    mix_waveforms,
    sample_mixup_lambda,
)
from ssamba.data.resumable import ResumableDataLoader
from ssamba.errors import ConfigError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SUBSTITUTE_TRIES = 10


@dataclass(slots=True)
class Item:
    """One example: a file (or a window of it) and its label indices."""

    id: str
    path: str | None
    labels: tuple[int, ...] = ()
    start: float = 0.0
    duration: float | None = None
    meta: dict[str, str] = field(default_factory=dict)  # extra batch keys, e.g. patient/recording


def read_item(item: Item) -> tuple[torch.Tensor, int]:
    return read_audio(item.path, item.start, item.duration)


class ClipDataset(Dataset):
    """Items -> dicts with ``fbank`` (CPU path) or ``wav`` (device path), ``target``, ``id``, meta.

    Unusable audio raises :class:`BadAudio` inside; with ``on_error="skip"`` a training item is
    replaced by a random other one and an evaluation item is dropped by the collate, and either
    way the reason travels with the batch (key ``skipped``) to be counted by the datamodule. A
    replacement is drawn by ``draw_weights`` where the training sampler weights its items (a
    weighted mixture, balanced sampling), so that it comes from the distribution the sampler draws,
    never from an item weighted 0; uniformly otherwise.
    """

    def __init__(
        self,
        items: list[Item],
        num_classes: int,
        front_end: FbankFrontEnd,
        train: bool,
        features_on_device: bool = False,
        mixup: float = 0.0,
        mixup_alpha: float = 10.0,
        on_error: str = "skip",
        min_seconds: float = 0.1,
        reader: Callable[[Item], tuple[torch.Tensor, int]] = read_item,
    ):
        if on_error not in ("skip", "raise"):
            raise ConfigError(f"data.on_error must be 'skip' or 'raise', got {on_error!r}")
        self.items = items
        self.num_classes = num_classes
        self.front_end = front_end
        self.train = train
        self.features_on_device = features_on_device
        self.mixup = mixup if train else 0.0
        self.mixup_alpha = mixup_alpha
        self.on_error = on_error
        self.min_seconds = min_seconds
        self.reader = reader
        self.draw_weights: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.items)

    def target(self, item: Item) -> torch.Tensor:
        target = torch.zeros(self.num_classes)
        if item.labels:
            target[list(item.labels)] = 1.0
        return target

    def read(self, index: int) -> tuple[torch.Tensor, int]:
        """The item's mono 16 kHz waveform, and the rate its file was recorded at."""
        item = self.items[index]
        try:
            wav, rate = self.reader(item)
        except BadAudio:
            raise
        except Exception as error:  # any decoder failure is an unreadable file, not a crash
            raise BadAudio("unreadable", item.path, repr(error)) from error
        return prepare_waveform(wav, rate, item.path, self.min_seconds), rate

    def waveform(self, index: int) -> torch.Tensor:
        wav, _ = self.read(index)
        return wav[: self.front_end.max_samples] if not self.mixup else wav

    def __getitem__(self, index: int) -> dict:
        skipped = []
        for _ in range(SUBSTITUTE_TRIES if self.train else 1):
            try:
                wav = self.waveform(index)
                break
            except BadAudio as error:
                if self.on_error == "raise":
                    raise
                skipped.append((error.reason, error.path))
                if not self.train:
                    return {"_skipped": skipped}
                index = self.substitute()
        else:
            raise RuntimeError(f"{SUBSTITUTE_TRIES} unusable files in a row, last: {skipped[-1]}")
        return self.finish(self.items[index], wav, skipped)

    def substitute(self) -> int:
        """The index of a training item to use in place of an unusable one."""
        if self.draw_weights is None:
            return int(torch.randint(len(self.items), ()))
        return int(torch.multinomial(self.draw_weights, 1))

    def finish(self, item: Item, wav: torch.Tensor, skipped: list) -> dict:
        """Mixup (training), cut, features or raw waveform, and the item's batch fields."""
        target = self.target(item)
        if self.mixup and torch.rand(()) < self.mixup:
            partner = int(torch.randint(len(self.items), ()))
            try:
                other = self.waveform(partner)
                lam = sample_mixup_lambda(self.mixup_alpha)
                wav = mix_waveforms(wav, other, lam)
                target = lam * target + (1 - lam) * self.target(self.items[partner])
            except BadAudio as error:
                if self.on_error == "raise":
                    raise
                skipped.append((error.reason, error.path))
        wav = wav[: self.front_end.max_samples]
        out = {"target": target, "id": item.id, **item.meta, "_skipped": skipped}
        if self.features_on_device:
            out["wav"] = wav
        else:
            out["fbank"] = self.front_end(wav, self.train)
        return out


class Collate:
    """Stacks tensors, lists strings, pads waveforms (``wav`` + ``wav_length``), gathers skips."""

    def __init__(self, target_length: int, num_classes: int, features_on_device: bool, meta_keys=()):
        self.target_length = target_length
        self.num_classes = num_classes
        self.features_on_device = features_on_device
        self.meta_keys = tuple(meta_keys)

    def __call__(self, items: list[dict]) -> dict:
        skipped = [s for item in items for s in item.pop("_skipped", [])]
        items = [item for item in items if "id" in item]
        batch = {"skipped": skipped}
        if not items:  # every item of an evaluation batch was unusable
            if self.features_on_device:
                batch.update(wav=torch.zeros(0, 0), wav_length=torch.zeros(0, dtype=torch.long))
            else:
                batch["fbank"] = torch.zeros(0, self.target_length, MEL_BINS)
            batch.update(target=torch.zeros(0, self.num_classes), id=[], **{k: [] for k in self.meta_keys})
            return batch
        for key in items[0]:
            values = [item[key] for item in items]
            if key == "wav":
                lengths = torch.tensor([v.numel() for v in values])
                wav = torch.zeros(len(values), int(lengths.max()))
                for row, v in enumerate(values):
                    wav[row, : v.numel()] = v
                batch.update(wav=wav, wav_length=lengths)
            elif isinstance(values[0], torch.Tensor):
                batch[key] = torch.stack(values)
            else:
                batch[key] = values
        return batch


class AudioDataModule(L.LightningDataModule):
    """Base of every datamodule: subclasses set ``label_names``/``multilabel`` and build items.

    ``features_on_device=True`` makes workers return waveforms only; the fbank, SpecAugment and
    normalisation then run batched on the device in :meth:`on_after_batch_transfer`.
    """

    label_names: list[str] = UNLABELED
    multilabel: bool = False
    meta_keys: tuple[str, ...] = ()

    def __init__(
        self,
        batch_size: int = 32,
        num_workers: int = 0,
        target_length: int = 1024,
        norm_mean: float = AUDIOSET_MEAN,
        norm_std: float = AUDIOSET_STD,
        mel_low_hz: float = MEL_LOW_HZ,
        mel_high_hz: float = MEL_HIGH_HZ,
        fft_size: int = FFT_SIZE,
        freqm: int = 0,
        timem: int = 0,
        mixup: float = 0.0,
        mixup_alpha: float = 10.0,
        noise: bool = False,
        features_on_device: bool = False,
        on_error: str = "skip",
        min_seconds: float = 0.1,
        pin_memory: bool = False,
        drop_last: bool = False,
        eval_batch_size: int | None = None,
    ):
        super().__init__()
        if on_error not in ("skip", "raise"):
            raise ConfigError(f"data.on_error must be 'skip' or 'raise', got {on_error!r}")
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"data.{key}={value!r}: must be an integer >= 1")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers!r}: must be an integer >= 0 (0: the main process loads)")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.target_length = target_length
        self.norm_mean = norm_mean
        self.norm_std = norm_std
        self.mixup = mixup
        self.mixup_alpha = mixup_alpha
        self.features_on_device = features_on_device
        self.on_error = on_error
        self.min_seconds = min_seconds
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.mel = MelScale(mel_low_hz, mel_high_hz, fft_size)
        self.train_front_end = FbankFrontEnd(target_length, norm_mean, norm_std, freqm, timem, noise, self.mel)
        self.eval_front_end = FbankFrontEnd(target_length, norm_mean, norm_std, mel=self.mel)
        self.datasets: dict[str, ClipDataset] = {}
        self.skipped: Counter = Counter()
        self.skipped_examples: list[tuple[str, str]] = []

    # --- what subclasses provide -------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def splits(self) -> tuple[str, ...]:
        """Splits this configuration provides (a subset of train/val/test)."""
        return SPLITS

    def build_items(self, split: str) -> list[Item]:
        raise NotImplementedError

    def split_source(self, split: str) -> str:
        """Where a split's items come from, for error messages."""
        return f"the {split} split"

    def reader(self, item: Item) -> tuple[torch.Tensor, int]:
        return read_item(item)

    def train_sampler(self, dataset: ClipDataset) -> Sampler | None:
        """A custom sampler for training (None: plain shuffling)."""
        return None

    # --- Lightning hooks --------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, self.splits) if stage else self.splits:
            if split in self.splits and split not in self.datasets:
                self.datasets[split] = self.make_dataset(split)
        self._attach_skip_report()

    def make_dataset(self, split: str) -> ClipDataset:
        items = self.build_items(split)
        check_files_exist(sorted({i.path for i in items if i.path is not None}), self.split_source(split))
        if not self.multilabel and self.label_names != UNLABELED:
            # no label would train as an all-zero target (no loss) and score as class 0; two, as whichever argmax
            # picks: single-label data means one label per item
            odd = [item for item in items if len(item.labels) != 1]
            if odd:
                examples = ", ".join(f"{item.id} ({len(item.labels)})" for item in odd[:3])
                raise ConfigError(f"{self.split_source(split)}: {len(odd)} of {len(items)} {split} items have no "
                                  f"label or several, in single-label data (e.g. {examples}); give each one label, "
                                  "or set data.multilabel=true where the data allows it")
        train = split == "train"
        return ClipDataset(
            items,
            self.num_classes,
            self.train_front_end if train else self.eval_front_end,
            train=train,
            features_on_device=self.features_on_device,
            mixup=self.mixup,
            mixup_alpha=self.mixup_alpha,
            on_error=self.on_error,
            min_seconds=self.min_seconds,
            reader=self.reader,
        )

    def dataloader(self, split: str, shuffle: bool | None = None) -> DataLoader:
        if split not in self.splits:
            raise ValueError(f"{type(self).__name__} has no {split!r} split (has: {', '.join(self.splits)})")
        if split not in self.datasets:
            self.datasets[split] = self.make_dataset(split)
        train = split == "train"
        sampler = self.train_sampler(self.datasets[split]) if train else None
        if sampler is not None:  # a weighted sampler's weights (mixture, balanced) also draw unusable items' stand-ins
            weights = getattr(sampler, "weights", None)
            self.datasets[split].draw_weights = None if weights is None else torch.as_tensor(weights).double()
        options = dict(
            batch_size=self.batch_size if train else self.eval_batch_size,
            num_workers=self.num_workers,
            collate_fn=Collate(self.target_length, self.num_classes, self.features_on_device, self.meta_keys),
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            drop_last=self.drop_last and train,
            persistent_workers=self.num_workers > 0,
        )
        if train and sampler is None:  # seeded order that a resumed run continues mid-epoch
            shuffle = True if shuffle is None else shuffle
            return ResumableDataLoader(self.datasets[split], shuffle=shuffle, trainer=self.trainer, **options)
        shuffle = (train if shuffle is None else shuffle) and sampler is None
        return DataLoader(self.datasets[split], shuffle=shuffle, sampler=sampler, **options)

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train")

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        self.count_skipped(batch.pop("skipped", []))
        return batch

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if "wav" in batch:
            training = self.trainer is not None and self.trainer.training
            front_end = self.train_front_end if training else self.eval_front_end
            batch["fbank"] = front_end.batch(batch.pop("wav"), batch.pop("wav_length"), training)
        return batch

    # --- skip accounting ----------------------------------------------------------------------
    def _stage(self) -> str:
        trainer = self.trainer
        if trainer is None:
            return "other"
        if trainer.training:
            return "train"
        if trainer.validating or trainer.sanity_checking:
            return "val"
        return "test" if trainer.testing else "other"

    def count_skipped(self, skipped: list[tuple[str, str]]) -> None:
        if self.trainer is not None and self.trainer.sanity_checking:
            return  # the first validation epoch reads these items again and counts them then
        stage = self._stage()
        for reason, path in skipped:
            self.skipped[stage, reason] += 1
            if len(self.skipped_examples) < 5:
                self.skipped_examples.append((reason, path))

    def pop_skip_report(self, stage: str) -> dict[str, int]:
        """Counts of ``stage`` since the last call (every reason, zeros included), then reset."""
        report = {reason: self.skipped.pop((stage, reason), 0) for reason in SKIP_REASONS}
        if any(report.values()):
            examples = "; ".join(f"{r}: {p}" for r, p in self.skipped_examples)
            summary = ", ".join(f"{r}={n}" for r, n in report.items() if n)
            log.warning("%s: skipped %d unusable audio item(s): %s (e.g. %s)", stage, sum(report.values()),
                        summary, examples)
            self.skipped_examples.clear()
        return report

    def _attach_skip_report(self) -> None:
        from ssamba.data.report import SkippedAudioReport

        trainer = self.trainer
        if trainer is not None and not any(isinstance(c, SkippedAudioReport) for c in trainer.callbacks):
            trainer.callbacks.append(SkippedAudioReport())

    def features(self, wav: torch.Tensor) -> torch.Tensor:
        """Evaluation features of one mono 16 kHz waveform, for inference code outside a loader."""
        return self.eval_front_end(wav, train=False)


__all__ = ["SAMPLE_RATE", "UNLABELED", "AudioDataModule", "ClipDataset", "Collate", "Item"]
