"""Known invalid combinations fail before training with one line that names the key and the allowed values."""
from __future__ import annotations

import json
from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_dir

from ssamba.tasks import build_task
from ssamba.errors import find_config_error
from ssamba.utils.config import validate_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["+model.depth=2", "+model.embed_dim=32", "model.backend=torch", "data.num_workers=0"]


def compose_train(*overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=["paths.output_dir=unused", *TINY, *overrides])


def first_error(*overrides) -> str:
    """The one-line message train.py would print, from validation or from building data and task."""
    cfg = compose_train(*overrides)
    try:
        validate_config(cfg)
        build_task(cfg, hydra.utils.instantiate(cfg.data))
    except Exception as error:
        config_error = find_config_error(error)
        assert config_error is not None, f"not a ConfigError: {error!r}"
        return str(config_error)
    raise AssertionError("no error")


def assert_one_line(message: str, key: str, allowed: str) -> None:
    assert message.startswith(key) and allowed in message and "\n" not in message, message


def test_mask_count_at_least_the_patch_count():
    # 64 frames, 16x16 patches: 8 x 4 = 32 patches
    assert_one_line(first_error("data.target_length=64", "mask.count=32"), "mask.count=32", "1..31")


def test_finetuning_without_a_head_size(tmp_path):
    manifest = tmp_path / "train.json"
    manifest.write_text(json.dumps({"data": [{"wav": "a.wav"}]}))
    message = first_error("task=finetune", "data=audioset", f"data.root={tmp_path}", "data.label_csv=null",
                          "data.val_manifest=null")
    assert_one_line(message, "data", "choose a labeled data=")


def test_earbud_variant_not_on_disk(tmp_path):
    (tmp_path / "filt").mkdir()
    (tmp_path / "labels.csv").write_text("filename,labels\n")
    (tmp_path / "class_labels_indices.csv").write_text("index,mid,display_name\n0,a,a\n1,b,b\n")
    message = first_error("task=finetune", "data=earbud", f"data.root={tmp_path}", "data.variant=lp")
    assert_one_line(message, "data.variant='lp'", "available: ['filt']")


def test_ddp_on_cpu_with_nccl():
    message = first_error("trainer=ddp_sim", "trainer.strategy.process_group_backend=nccl")
    assert_one_line(message, "trainer.strategy.process_group_backend=nccl", "gloo")


@pytest.mark.parametrize("overrides,key,allowed", [
    (["callbacks.nonfinite_guard.max_consecutive=0"], "callbacks.nonfinite_guard.max_consecutive=0", ">= 1"),
    (["callbacks.periodic_checkpoint.every_n_train_steps=0"], "callbacks.periodic_checkpoint.every_n_train_steps=0",
     ">= 1"),
])
def test_reliability_callback_settings(overrides, key, allowed):
    from ssamba.utils.instantiate import instantiate_named

    cfg = compose_train(*overrides)
    with pytest.raises(Exception) as error:
        instantiate_named(cfg.callbacks, "callbacks")
    config_error = find_config_error(error.value)
    assert config_error is not None
    assert_one_line(str(config_error), key, allowed)
