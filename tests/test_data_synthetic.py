"""The synthetic datamodule: batch format, determinism, learnable class structure, Hydra config."""

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ssamba.data import SyntheticDataModule

CONF = Path(__file__).resolve().parents[1] / "conf"


def small(**overrides):
    kwargs = {"num_classes": 4, "num_train": 32, "num_val": 8, "num_test": 8, "batch_size": 8, "target_length": 128}
    kwargs.update(overrides)
    return SyntheticDataModule(**kwargs)


def test_batch_format_matches_the_architecture_contract():
    dm = small()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["fbank"].shape == (8, 128, 128) and batch["fbank"].dtype == torch.float32
    assert batch["target"].shape == (8, 4)
    assert torch.equal(batch["target"].sum(1), torch.ones(8))
    assert len(batch["id"]) == 8 and all(isinstance(i, str) for i in batch["id"])
    assert (dm.num_classes, dm.multilabel, dm.target_length) == (4, False, 128)
    assert len(dm.label_names) == 4


def test_clips_are_deterministic_per_index_and_splits_differ():
    a, b = small(), small()
    assert torch.equal(a.generator.clip("train", 3), b.generator.clip("train", 3))
    assert not torch.equal(a.generator.clip("train", 3), a.generator.clip("val", 3))
    assert not torch.equal(a.generator.clip("train", 3), small(seed=1).generator.clip("train", 3))


def test_multilabel_targets_are_multi_hot():
    dm = small(multilabel=True, num_classes=6)
    dm.setup("fit")
    targets = next(iter(dm.train_dataloader()))["target"]
    assert dm.multilabel and ((targets == 0) | (targets == 1)).all()
    assert (targets.sum(1) >= 1).all() and (targets.sum(1) > 1).any()


def test_classes_are_separable_by_a_nearest_centroid_rule():
    """Finetuning must be learnable: even mean spectra per clip separate the classes."""
    dm = small(num_train=60, num_val=30, target_length=100, batch_size=60)
    dm.setup("fit")
    train = next(iter(dm.dataloader("train", shuffle=False)))
    val = next(iter(dm.val_dataloader()))
    profile = lambda b: b["fbank"].mean(1)
    labels = train["target"].argmax(1)
    centroids = torch.stack([profile(train)[labels == c].mean(0) for c in range(4)])
    predicted = torch.cdist(profile(val), centroids).argmin(1)
    accuracy = (predicted == val["target"].argmax(1)).float().mean()
    assert accuracy > 0.7, accuracy


def test_device_feature_path_gives_the_same_batch():
    cpu, device = small(), small(features_on_device=True)
    cpu.setup("validate")
    device.setup("validate")
    expected = next(iter(cpu.val_dataloader()))["fbank"]
    batch = next(iter(device.val_dataloader()))
    batch = device.on_after_batch_transfer(device.on_before_batch_transfer(batch, 0), 0)
    assert "wav" not in batch
    torch.testing.assert_close(batch["fbank"], expected, atol=1e-4, rtol=0)


def test_hydra_config_instantiates(tmp_path):
    (tmp_path / "root.yaml").write_text("defaults:\n  - data: synthetic\n  - _self_\n")
    (tmp_path / "data").symlink_to(CONF / "data")
    with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
        cfg = compose("root", overrides=["data.num_train=8", "data.num_classes=3", "data.target_length=64"])
    dm = instantiate(cfg.data)
    assert isinstance(dm, SyntheticDataModule)
    assert (dm.num_classes, dm.target_length) == (3, 64)
