"""The heart-sound recipes compose, pass the config checks and build their task on the CirCor fixture."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from ssamba.tasks import build_task
from ssamba.utils.config import ConfigError, validate_config

REPO = Path(__file__).resolve().parents[1]
CIRCOR_MINI = REPO / "tests" / "data" / "circor-mini"
TINY = ["+model.depth=2", "+model.embed_dim=16", "model.backend=torch", "data.num_workers=0"]


def recipe(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"experiment={name}", *overrides])


@pytest.mark.parametrize("variant", ["filt", "lp", "wav"])
def test_earbud_recipes_pick_their_variant_and_check_the_checkpoint(variant):
    cfg = recipe(f"earbud_{variant}", "data.root=/earbud", "task.pretrained=/no/such.ckpt")
    assert cfg.data.variant == variant and cfg.task.name == "finetune" and cfg.model.name == "tiny"
    assert cfg.name == f"earbud_{variant}_tiny"
    with pytest.raises(ConfigError, match="task.pretrained"):
        validate_config(cfg)


def test_circor_pretrain_masks_fit_the_five_second_grid():
    cfg = recipe("circor_pretrain", f"data.root={CIRCOR_MINI}", *TINY)
    validate_config(cfg)
    task = build_task(cfg, _datamodule(cfg))
    assert task.encoder.num_patches == 8 * 32
    assert cfg.mask.count < task.encoder.num_patches and cfg.mask.val_count < task.encoder.num_patches


def test_circor_murmur_weights_the_loss_and_reports_patient_scores():
    cfg = recipe("circor_murmur", f"data.root={CIRCOR_MINI}", *TINY)
    validate_config(cfg)
    datamodule = _datamodule(cfg)
    task = build_task(cfg, datamodule)
    assert "challenge" in task.val_extra  # patient-level Challenge scores on val and test
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.0, 1.0]])
    target = torch.eye(3)
    weights = torch.tensor([5.0, 3.0, 1.0])
    # soft (mixup-able) targets: each item's loss scaled by its class weight, averaged over items
    expected = (weights * F.cross_entropy(logits, target.argmax(1), reduction="none")).mean()
    assert task.loss(logits, target).item() == pytest.approx(expected.item())


def _datamodule(cfg):
    from hydra.utils import instantiate

    return instantiate(cfg.data)
