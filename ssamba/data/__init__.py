"""Audio data: the fbank front end, datasets and LightningDataModules (``data=<name>``)."""

from ssamba.data.base import AudioDataModule, ClipDataset, Collate, Item
from ssamba.data.circor import MURMUR_CLASSES, OUTCOME_CLASSES, CirCorDataModule
from ssamba.data.earbud import EarbudDataModule
from ssamba.data.features import (
    AUDIOSET_MEAN,
    AUDIOSET_STD,
    FbankFrontEnd,
    batched_fbank,
    kaldi_fbank,
)
from ssamba.data.librispeech import LibriSpeechDataModule
from ssamba.data.manifest import ManifestDataModule
from ssamba.data.mixture import MixtureDataModule
from ssamba.data.report import SkippedAudioReport
from ssamba.data.synthetic import SyntheticDataModule

__all__ = [
    "AUDIOSET_MEAN",
    "AUDIOSET_STD",
    "MURMUR_CLASSES",
    "OUTCOME_CLASSES",
    "AudioDataModule",
    "CirCorDataModule",
    "ClipDataset",
    "Collate",
    "EarbudDataModule",
    "FbankFrontEnd",
    "Item",
    "LibriSpeechDataModule",
    "ManifestDataModule",
    "MixtureDataModule",
    "SkippedAudioReport",
    "SyntheticDataModule",
    "batched_fbank",
    "kaldi_fbank",
]
