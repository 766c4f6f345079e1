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
from ssamba.tasks.masking import fit_count_to_grid
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
    """The released per-clip loop: scores = targets @ preds.T; its softmax and log-softmax are both over dim -1
    (``nn.Softmax(dim=-1)``), the accuracy's argmax over dim 0 of the softmax."""
    correct, total = 0, 0.0
    for p, t in zip(preds, targets):
        scores = t @ p.T
        correct += (torch.argmax(torch.softmax(scores, dim=-1), dim=0) == torch.arange(len(p))).sum()
        total += torch.diag(torch.log_softmax(scores, dim=-1)).sum()
    count = preds.shape[0] * preds.shape[1]
    return -total / count, correct / count


def test_batched_nce_matches_the_per_clip_loop():
    torch.manual_seed(0)
    preds, targets = torch.randn(5, 17, 256), torch.randn(5, 17, 256)
    nce, acc = masked_patch_nce(preds, targets)
    ref_nce, ref_acc = reference_nce(preds, targets)
    assert torch.allclose(nce, ref_nce, atol=1e-5) and torch.allclose(acc, ref_acc.float())
    raw = (torch.bmm(targets, preds.transpose(1, 2)).argmax(dim=1) == torch.arange(17)).float().mean()
    assert raw != acc  # the argmax of the raw scores is another count: the test tells the two apart
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


def test_mask_counts_stated_for_another_grid_scale_only_when_asked():
    # 250 and 400 of 512 patches on this 32-patch grid: 15.6 -> 16 and 25
    task = pretraining(mask={"count": 250, "val_count": 400, "grid_patches": 512, "fit_to_grid": True})
    assert (task.mask_cfg["count"], task.mask_cfg["val_count"]) == (16, 25)
    assert pretraining(mask={"count": 20, "grid_patches": 32, "fit_to_grid": True}).mask_cfg["count"] == 20
    with pytest.raises(ConfigError, match=r"mask.count=250 must be in 1..31.*mask.fit_to_grid=true.*grid_patches=512"):
        pretraining(mask={"count": 250, "val_count": 12, "grid_patches": 512})


@pytest.mark.parametrize("count,stated,patches,expected", [(250, 512, 64, 31), (300, 512, 64, 38), (400, 512, 64, 50),
                                                             (1, 512, 64, 1), (511, 512, 64, 63), (128, 256, 256, 128)])
def test_fit_count_to_grid_keeps_the_ratio_inside_the_grid(count, stated, patches, expected):
    assert fit_count_to_grid(count, stated, patches) == expected


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


def test_finetuning_on_another_mel_scale_than_the_pretraining_warns(tmp_path, caplog):
    narrow = {"mel_low_hz": 20.0, "mel_high_hz": 2000.0, "fft_size": 2048}
    task = pretraining(data={**DATA, **narrow})
    checkpoint = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(checkpoint)
    assert {key: checkpoint["ssamba"][key] for key in narrow} == narrow
    path = tmp_path / "pretrain.ckpt"
    torch.save(checkpoint, path)
    with caplog.at_level("WARNING", logger="ssamba.tasks.finetune"):
        Finetuning(ADAMW, pretrained=str(path), data={**DATA, **narrow})
        assert not caplog.records
        Finetuning(ADAMW, pretrained=str(path), data={**DATA, **narrow, "mel_high_hz": 8000.0, "fft_size": 512})
    assert [r.getMessage().split(" was pretrained with ")[1] for r in caplog.records] == [
        "data.mel_high_hz=2000 data.fft_size=2048; the data gives data.mel_high_hz=8000 data.fft_size=512"]


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


@pytest.mark.parametrize("family", ["tiny", "ssast_tiny"])
def test_layer_lr_decay_gives_each_depth_its_rate(family):
    encoder = ssamba.build_encoder(family, depth=4, embed_dim=16, **({"d_state": 4} if family == "tiny" else
                                                                      {"num_heads": 2}))
    task = Finetuning(ADAMW, encoder=encoder, head_lr_multiplier=3.0, layer_lr_decay=0.5, data=DATA,
                      fstride=16, tstride=16)
    groups = task.configure_optimizers().param_groups
    assert [g["name"] for g in groups] == [f"encoder_depth{d}" for d in range(6)] + ["head"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3 * 0.5 ** (5 - d) for d in range(6)] + [3e-3])
    by_id = {id(p): g["name"] for g in groups for p in g["params"]}
    named = dict(task.encoder.named_parameters())
    stack = task.encoder.layer_stack
    assert by_id[id(named["patch_embed.proj.weight"])] == by_id[id(named["pos_embed"])] == "encoder_depth0"
    assert by_id[id(named[next(n for n in named if n.startswith(f"{stack}.2."))])] == "encoder_depth3"
    assert by_id[id(named[next(n for n in named if n.startswith(task.encoder.top_modules[0]))])] == "encoder_depth5"
    assert len(by_id) == sum(len(g["params"]) for g in groups) == len(list(task.parameters()))


def test_layer_lr_decay_must_be_a_fraction():
    for value in (0.0, 1.5, -0.2):
        with pytest.raises(ConfigError, match=r"task.layer_lr_decay=.*allowed values are in \(0, 1\]"):
            Finetuning(ADAMW, encoder=tiny_encoder(), layer_lr_decay=value, data=DATA)


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
    with pytest.raises(ConfigError, match="task.class_weights has 2 entries; the data has 3 classes"):
        Finetuning(ADAMW, encoder=tiny_encoder(), class_weights=[1.0, 2.0], data=DATA)
    for weights in ([1.0, -1.0, 1.0], [1.0, float("nan"), 1.0], [0.0, 0.0, 0.0]):
        with pytest.raises(ConfigError, match=r"task.class_weights=.*must be finite and >= 0"):
            Finetuning(ADAMW, encoder=tiny_encoder(), class_weights=weights, data=DATA)
    task = Finetuning(ADAMW, encoder=tiny_encoder(), class_weights=[5.0, 0.0, 1.0], data=DATA)  # 0 ignores a class
    assert task.class_weights.tolist() == [5.0, 0.0, 1.0]


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


def head_by_hand(head, pooled):
    """LayerNorm -> Linear written out, with the head's own parameters."""
    centred = pooled - pooled.mean(-1, keepdim=True)
    normed = centred / torch.sqrt(centred.square().mean(-1, keepdim=True) + head.norm.eps)
    return (normed * head.norm.weight + head.norm.bias) @ head.fc.weight.T + head.fc.bias


def randomised_head(*args):
    head = ClassificationHead(*args)
    with torch.no_grad():  # LayerNorm starts as the identity affine map; make it count
        head.norm.weight.normal_()
        head.norm.bias.normal_()
    return head


@pytest.mark.parametrize("prefix", [1, 2], ids=["ssamba-cls", "ssast-cls-dist"])
def test_classification_head_pools_as_the_released_code(prefix):
    """cls: token 0 with one prefix token, (cls + dist) / 2 with two (released ``finetuningcls``);
    mean: the patch tokens only, every prefix token excluded (released ``finetuningavgtok``)."""
    torch.manual_seed(0)
    tokens = torch.randn(2, prefix + 5, 8)
    cls_pooled = tokens[:, 0] if prefix == 1 else (tokens[:, 0] + tokens[:, 1]) / 2
    mean_pooled = sum(tokens[:, prefix + i] for i in range(5)) / 5
    for pooling, pooled in (("cls", cls_pooled), ("mean", mean_pooled)):
        head = randomised_head(8, 3, pooling, prefix)
        assert torch.allclose(head.pool(tokens), pooled, atol=1e-6)
        assert torch.allclose(head(tokens), head_by_hand(head, pooled), atol=1e-5)


def test_ssast_cls_pooling_averages_cls_and_dist_tokens():
    torch.manual_seed(0)
    encoder = ssamba.build_encoder("ssast_tiny", embed_dim=32, depth=2, num_heads=4, input_tdim=64)
    task = Finetuning(ADAMW, encoder=encoder, pooling="cls", data=DATA, fstride=16, tstride=16).eval()
    with torch.no_grad():
        task.head.norm.weight.normal_()
        task.head.norm.bias.normal_()
        x = torch.randn(2, 64, 128)
        tokens = task.encoder.forward_features(x)
        logits = task(x)
    assert tokens.shape[1] == 2 + 32
    assert torch.allclose(logits, head_by_hand(task.head, (tokens[:, 0] + tokens[:, 1]) / 2), atol=1e-5)
    assert not torch.allclose(logits, head_by_hand(task.head, tokens[:, 0]), atol=1e-3)  # token 0 alone differs


def frame_encoder():
    """128 x 2 frame patches on 64 frames: a 1 x 32 grid."""
    return tiny_encoder(fshape=128, tshape=2, fstride=128, tstride=2)


@pytest.mark.parametrize("encoder,strides,key", [
    (frame_encoder, {}, "task.tstride=10"),  # the default stride 10 on 2-frame patches
    (frame_encoder, {"fstride": 128, "tstride": 3}, "task.tstride=3"),
    (tiny_encoder, {"fstride": 20, "tstride": 10}, "task.fstride=20"),
])
def test_finetune_refuses_a_stride_larger_than_the_patch(encoder, strides, key):
    with pytest.raises(ConfigError) as error:
        Finetuning(ADAMW, encoder=encoder(), data=DATA, **strides)
    message = str(error.value)
    assert message.startswith(f"{key}: larger than the patch") and "\n" not in message


def test_frame_patches_finetune_at_their_own_stride():
    task = Finetuning(ADAMW, encoder=frame_encoder(), data=DATA, fstride=128, tstride=2)
    assert task.encoder.grid == (1, 32)
    assert task(torch.randn(2, 64, 128)).shape == (2, 3)
    assert Finetuning(ADAMW, encoder=tiny_encoder(), data=DATA).encoder.grid == (12, 5)  # stride 10 < 16: allowed


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


@pytest.mark.parametrize("setting", ["auto", True])
def test_cuda_graphs_give_way_to_gradient_accumulation(setting):
    """A replayed backward leaves a parameter's gradient in the graph's own buffer, which the next micro-batch
    overwrites: with trainer.accumulate_grad_batches > 1, ``auto`` runs eager and ``true`` is refused."""
    from types import SimpleNamespace

    task = pretraining()
    task.graphed_passes, task.cuda_graphs = object(), setting  # as use_cuda_graphs leaves them on a GPU
    task._trainer = SimpleNamespace(world_size=1, accumulate_grad_batches=2)
    task._device = torch.device("cuda", 0)
    if setting == "auto":
        task.on_fit_start()
        assert task.graphed_passes is None
    else:
        with pytest.raises(ConfigError, match="cannot accumulate gradients .*accumulate_grad_batches=2"):
            task.on_fit_start()
    task.graphed_passes, task._trainer.accumulate_grad_batches = "kept", 1
    task.on_fit_start()
    assert task.graphed_passes == "kept"
