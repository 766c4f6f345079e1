"""The LightningModules on a tiny encoder, without a Trainer where possible."""
import functools

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.demos.boring_classes import BoringModel

import ssamba
from ssamba.models import ClassificationHead
from ssamba.tasks import (EpochRangeAveraging, Finetuning, MaskedPatchPretraining,
                          load_pretrained_encoder, masked_patch_nce)
from ssamba.utils.config import ConfigError

TINY = {"depth": 2, "embed_dim": 32, "input_tdim": 64, "backend": "torch"}  # 8 x 4 = 32 patches
DATA = {"target_length": 64, "norm_mean": -4.0, "norm_std": 4.0, "label_names": ["a", "b", "c"], "multilabel": False}
ADAMW = functools.partial(torch.optim.AdamW, lr=1e-3)


def tiny_encoder(**overrides):
    return ssamba.build_encoder("tiny", **{**TINY, **overrides})


def pretraining(**kwargs):
    kwargs = {"mask": {"count": 12, "val_count": 12}, "data": DATA, "warmup_steps": 0, **kwargs}
    return MaskedPatchPretraining(tiny_encoder(), ADAMW, **kwargs)


def reference_nce(preds, targets):
    """The released per-clip loop: scores = targets @ preds.T, softmax over dim 0, log-softmax over dim -1."""
    correct, total = 0, 0.0
    for p, t in zip(preds, targets):
        scores = t @ p.T
        correct += (torch.argmax(torch.softmax(scores, dim=0), dim=0) == torch.arange(len(p))).sum()
        total += torch.diag(torch.log_softmax(scores, dim=-1)).sum()
    count = preds.shape[0] * preds.shape[1]
    return -total / count, correct / count


def test_batched_nce_matches_the_per_clip_loop():
    torch.manual_seed(0)
    preds, targets = torch.randn(5, 17, 256), torch.randn(5, 17, 256)
    nce, acc = masked_patch_nce(preds, targets)
    ref_nce, ref_acc = reference_nce(preds, targets)
    assert torch.allclose(nce, ref_nce, atol=1e-5) and torch.allclose(acc, ref_acc.float())
    perfect_nce, perfect_acc = masked_patch_nce(10 * targets, targets)
    assert perfect_acc == 1.0 and perfect_nce < 1e-3


@pytest.mark.parametrize("joint_passes", [1, 2])
def test_pretraining_objective_trains_every_parameter(joint_passes):
    torch.manual_seed(0)
    task = pretraining(joint_passes=joint_passes)
    assert task.mask_embed.shape == (1, 1, 32)
    out = task.objective(torch.randn(3, 64, 128), 12)
    assert set(out) >= {"loss", "nce", "mse", "acc"} and torch.isfinite(out["loss"])
    assert torch.allclose(out["loss"], out["nce"] + 10 * out["mse"])
    out["loss"].backward()
    missing = [name for name, p in task.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_joint_passes_sets_the_number_of_encoder_passes():
    for passes in (1, 2):
        task = pretraining(joint_passes=passes)
        calls = []
        original = task.encoder.forward_features
        task.encoder.forward_features = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
        task.objective(torch.randn(2, 64, 128), 12)
        assert len(calls) == passes


def test_mask_count_must_fit_the_grid():
    with pytest.raises(ConfigError, match=r"mask.count=32 must be in 1..31.*8x4 = 32 patches.*data.target_length"):
        pretraining(mask={"count": 32})
    with pytest.raises(ConfigError, match="mask.val_count=400"):
        pretraining(mask={"count": 10, "val_count": 400})
    with pytest.raises(ConfigError, match="task.joint_passes=3"):
        pretraining(joint_passes=3)
    with pytest.raises(ConfigError, match="unknown mask key"):
        pretraining(mask={"count": 10, "size": 3})


def test_warmup_scales_only_the_step_and_restores_the_scheduled_lr():
    task = pretraining(warmup_steps=4)
    optimizer = task.configure_optimizers()
    seen = []

    class Trainer:
        global_step = 1

    task._trainer = Trainer()  # second optimizer step of a 4-step warm-up
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", lambda self, closure=None: seen.append(self.param_groups[0]["lr"]))
        task.optimizer_step(0, 0, optimizer, None)
    assert seen == [pytest.approx(1e-3 * 2 / 4)]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    Trainer.global_step = 4
    assert task.warmup_factor() == 1.0


def test_checkpoint_record_rebuilds_the_encoder():
    task = pretraining()
    checkpoint = {}
    task.on_save_checkpoint(checkpoint)
    record = checkpoint["ssamba"]
    assert record["task"] == "pretrain" and record["target_length"] == 64 and record["label_names"] == ["a", "b", "c"]
    assert record["norm_mean"] == -4.0 and record["norm_std"] == 4.0
    rebuilt = ssamba.encoder_from_config(record["encoder"])
    rebuilt.load_state_dict(task.encoder.state_dict())
    assert rebuilt.grid == task.encoder.grid


def test_pretrained_encoder_loads_weights_only_and_adapts_the_grid(tmp_path):
    task = pretraining()
    checkpoint = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(checkpoint)
    path = tmp_path / "pretrain.ckpt"
    torch.save(checkpoint, path)
    encoder, record = load_pretrained_encoder(str(path))
    assert torch.equal(encoder.layers[0].mixer.in_proj.weight, task.encoder.layers[0].mixer.in_proj.weight)
    finetune = Finetuning(ADAMW, pretrained=str(path), fstride=10, tstride=10, data={**DATA, "target_length": 80})
    assert finetune.encoder.grid == (12, 7)
    assert torch.equal(finetune.encoder.layers[1].mixer.out_proj.weight, task.encoder.layers[1].mixer.out_proj.weight)
    logits = finetune(torch.randn(2, 80, 128))
    assert logits.shape == (2, 3)


def test_pretrained_must_be_our_checkpoint(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ConfigError, match="task.pretrained=.*not an ssamba checkpoint"):
        Finetuning(ADAMW, pretrained=str(path), data=DATA)


def test_finetune_head_lr_multiplier_makes_two_groups():
    task = Finetuning(ADAMW, encoder=tiny_encoder(), head_lr_multiplier=3.0, data=DATA, fstride=16, tstride=16)
    groups = task.configure_optimizers().param_groups
    assert [g["name"] for g in groups] == ["encoder", "head"]
    assert groups[0]["lr"] == pytest.approx(1e-3) and groups[1]["lr"] == pytest.approx(3e-3)
    assert sum(len(g["params"]) for g in groups) == len(list(task.parameters()))


@pytest.mark.parametrize("multilabel,loss,expected", [(False, "auto", "ce"), (True, "auto", "bce"), (False, "bce", "bce")])
def test_finetune_loss_follows_the_data(multilabel, loss, expected):
    task = Finetuning(ADAMW, encoder=tiny_encoder(), loss=loss, data={**DATA, "multilabel": multilabel})
    assert task.loss_name == expected
    logits, target = torch.randn(4, 3), torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0.3, 0.7, 0]])
    reference = (F.binary_cross_entropy_with_logits(logits, target) if expected == "bce"
                 else -(target * logits.log_softmax(-1)).sum(-1).mean())
    assert torch.allclose(task.loss(logits, target), reference)


def test_finetune_class_count_errors():
    with pytest.raises(ConfigError, match="task.num_classes=5: the data has 3 classes"):
        Finetuning(ADAMW, encoder=tiny_encoder(), num_classes=5, data=DATA)
    with pytest.raises(ConfigError, match="needs labeled data"):
        Finetuning(ADAMW, encoder=tiny_encoder(), data={**DATA, "label_names": ["unlabeled"]})
    with pytest.raises(ConfigError, match="task.pooling='max'"):
        Finetuning(ADAMW, encoder=tiny_encoder(), pooling="max", data=DATA)


def test_extra_metrics_get_the_batch_fields_they_ask_for():
    from torchmetrics import Metric

    class PatientsSeen(Metric):
        def __init__(self):
            super().__init__()
            self.add_state("patients", default=[], dist_reduce_fx="cat")

        def update(self, preds, target, patient):
            self.patients.append(torch.tensor([int(p) for p in patient]))

        def compute(self):
            return torch.cat(self.patients).unique().numel()

    task = Finetuning(ADAMW, encoder=tiny_encoder(), metrics={"patients": PatientsSeen()}, data=DATA,
                      fstride=16, tstride=16)
    logged = {}
    task.log_dict = lambda values, **kwargs: logged.update(values)
    task.log = lambda *args, **kwargs: None
    batch = {"fbank": torch.randn(3, 64, 128), "target": torch.eye(3), "id": ["x", "y", "z"], "patient": ["1", "2", "2"]}
    task.validation_step(batch, 0)
    task.on_validation_epoch_end()
    assert logged["val/patients"] == 2
    assert set(logged) == {"val/acc", "val/mAP", "val/patients"}


def test_classification_head_pools_patch_tokens_or_cls():
    tokens = torch.randn(2, 5, 8)
    mean_head, cls_head = ClassificationHead(8, 3, "mean"), ClassificationHead(8, 3, "cls")
    assert torch.allclose(mean_head.pool(tokens), tokens[:, 1:].mean(1))
    assert torch.equal(cls_head.pool(tokens), tokens[:, 0])


def test_epoch_range_averaging_averages_the_chosen_epochs(tmp_path):
    import lightning as L

    snapshots = []

    class Snapshot(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            snapshots.append(module.layer.weight.detach().clone())

    torch.manual_seed(0)
    model = BoringModel()
    averaging = EpochRangeAveraging(start_epoch=1, end_epoch=2)
    trainer = L.Trainer(accelerator="cpu", max_epochs=4, limit_train_batches=2, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Snapshot(), averaging], default_root_dir=tmp_path)
    trainer.fit(model)
    # Snapshot runs before the averaging callback at each epoch end: epochs 1 and 2 are averaged.
    assert torch.allclose(model.layer.weight, (snapshots[1] + snapshots[2]) / 2, atol=1e-6)
    assert averaging.should_update(epoch_idx=2) and not averaging.should_update(epoch_idx=3)
    assert not averaging.should_update(step_idx=5)


def test_ddp_ranks_draw_different_masks_from_one_seed():
    from types import SimpleNamespace

    def first_mask(rank, world_size):
        torch.manual_seed(7)
        task = pretraining()
        task._trainer = SimpleNamespace(world_size=world_size, global_rank=rank)
        task.on_fit_start()
        return task.sample_mask(4, 8)

    assert not torch.equal(first_mask(0, 2), first_mask(1, 2))
    assert torch.equal(first_mask(0, 1), first_mask(0, 1))  # one process: the seeded stream is untouched
