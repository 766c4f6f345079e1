"""Audio data: the fbank front end, datasets and LightningDataModules (``data=<name>``)."""

from ssamba.data.base import AudioDataModule, ClipDataset, Collate, Item
from ssamba.data.features import AUDIOSET_MEAN, AUDIOSET_STD, FbankFrontEnd, batched_fbank, kaldi_fbank
from ssamba.data.report import SkippedAudioReport
from ssamba.data.synthetic import SyntheticDataModule

__all__ = [
    "AUDIOSET_MEAN",
    "AUDIOSET_STD",
    "AudioDataModule",
    "ClipDataset",
    "Collate",
    "FbankFrontEnd",
    "Item",
    "SkippedAudioReport",
    "SyntheticDataModule",
    "batched_fbank",
    "kaldi_fbank",
]
