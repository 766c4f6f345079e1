"""Supervised finetuning (or training from scratch) of an encoder with a classification head.

The encoder comes from one of our pretraining checkpoints (``pretrained``: rebuilt from its
``checkpoint["ssamba"]`` record, loaded with ``weights_only=True``) or, without one, from the
model config. Either way the patch grid is then re-laid for this task (``fstride``/``tstride``,
the data's ``target_length``), which cuts or interpolates the position embedding.

Metrics: ``acc`` (top-1 against the arg-max of the target) and ``mAP`` (macro average precision,
multi-label or multi-class by the data) on every evaluation split, plus any extra torchmetrics
given as ``metrics`` (from the config or the datamodule's ``extra_metrics()``). Extra metrics are
updated as ``metric.update(logits, target, **batch_fields)`` where ``batch_fields`` are the
batch's per-item keys (lists such as ``id``, ``patient``, ``recording`` and 1-D tensors such as
CirCor's ``outcome``) that the metric's ``update`` signature names; ``target`` is the batch's
``[B, C]`` target. The evaluation steps return the batch's logits, for callbacks that look at the
predictions (:class:`ssamba.callbacks.WandbPredictions`).
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassAveragePrecision, MultilabelAveragePrecision

from ssamba.checkpoints import Checkpoint, load_checkpoint
from ssamba.constants import MEL_KEYS, UNLABELED
from ssamba.errors import ConfigError
from ssamba.models.heads import POOLINGS, ClassificationHead
from ssamba.tasks.base import EncoderTask

log = logging.getLogger(__name__)

LOSSES = ("auto", "bce", "ce")


def load_pretrained_encoder(path: str, backend: str | None = None,
                            data: dict | None = None) -> tuple[nn.Module, Checkpoint]:
    """Encoder and record of one of our checkpoints, a released SSAMBA/SSAST ``.pth`` or a model folder
    (read by :func:`ssamba.checkpoints.load_checkpoint`; tensors only are unpickled). A warning when the
    data's mel scale (``data``: the task's data record) is not the one the encoder was pretrained on: its
    patches would then hold other frequencies than it learned, which is rarely meant."""
    try:
        checkpoint = load_checkpoint(path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"task.pretrained={path}: {error}") from error
    differ = [key for key in MEL_KEYS if key in (data or {}) and data[key] != getattr(checkpoint, key)]
    if differ:
        log.warning("task.pretrained=%s was pretrained with %s; the data gives %s", path,
                    " ".join(f"data.{key}={getattr(checkpoint, key):g}" for key in differ),
                    " ".join(f"data.{key}={data[key]:g}" for key in differ))
    return checkpoint.build_encoder(backend), checkpoint


def check_strides(patch_shape: tuple[int, int], fstride: int | None, tstride: int | None) -> None:
    """Refuse a finetuning stride larger than the patch (None keeps the encoder's stride): the grid would
    skip the bins or frames between patches, e.g. 128 x 2 frame patches at stride 10 see 2 frames in 10."""
    fshape, tshape = patch_shape
    for key, stride, size, unit in (("task.fstride", fstride, fshape, "mel bins"),
                                    ("task.tstride", tstride, tshape, "frames")):
        if stride is not None and stride > size:
            raise ConfigError(f"{key}={stride}: larger than the patch ({fshape} x {tshape}, mel bins x frames), "
                              f"so the grid would skip {stride - size} of every {stride} {unit}; allowed: 1..{size}, "
                              f"e.g. task.fstride={fshape} task.tstride={tshape} "
                              f"(experiment=finetune_frame for frame patches)")


class ClassifierTraining:
    """The loss and training step that finetuning and probing share: logits from ``self(fbank)``, BCE
    for multi-label data or cross entropy on (mixup-soft) targets, in fp32, weighted per class by
    ``class_weights`` (None: unweighted). The class sets ``loss_name`` and ``class_weights``."""

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.loss_name == "bce":
            return F.binary_cross_entropy_with_logits(logits.float(), target.float(), weight=self.class_weights)
        # soft targets: mixup-mixed labels
        return F.cross_entropy(logits.float(), target.float(), weight=self.class_weights)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        logits = self(batch["fbank"])
        loss = self.loss(logits, batch["target"])
        self.log_training({"train/loss": loss}, logits.shape[0])
        return loss


class Finetuning(ClassifierTraining, EncoderTask):
    """Encoder + :class:`ClassificationHead`; BCE or CE; head learning-rate multiplier and layer-wise decay."""

    task_name = "finetune"

    def __init__(self, optimizer, encoder: nn.Module | Any = None, pretrained: str | None = None,
                 backend: str | None = None, fstride: int = 10, tstride: int = 10, pooling: str = "mean",
                 loss: str = "auto", head_lr_multiplier: float = 1.0, layer_lr_decay: float = 1.0,
                 num_classes: int | None = None,
                 class_weights: list[float] | None = None, scheduler=None,
                 scheduler_config: dict | None = None, warmup_steps: int = 0,
                 metrics: dict[str, Metric] | None = None, cuda_graphs: bool | str = "auto",
                 data: dict | None = None):
        data = dict(data or {})
        if pretrained:
            encoder, checkpoint = load_pretrained_encoder(pretrained, backend, data)
            log.info("finetuning from %s (%s pretraining, grid %s)", pretrained, checkpoint.encoder_config["name"],
                     "x".join(map(str, encoder.grid)))
        elif encoder is None:
            raise ConfigError("task.pretrained: no checkpoint and no model config; give task.pretrained=PATH "
                              "or a model (model=tiny|small|base) to train from scratch")
        elif not isinstance(encoder, nn.Module):
            encoder = encoder()  # a factory from the config (model with _partial_)
        super().__init__(encoder, optimizer, scheduler, scheduler_config, warmup_steps, data)
        self.save_hyperparameters(ignore=["encoder", "optimizer", "scheduler", "metrics"])
        if pooling not in POOLINGS:
            raise ConfigError(f"task.pooling={pooling!r}: allowed values are {', '.join(POOLINGS)}")
        if loss not in LOSSES:
            raise ConfigError(f"task.loss={loss!r}: allowed values are {', '.join(LOSSES)}")
        self.num_classes = self._resolve_num_classes(num_classes, data.get("label_names"))
        self.multilabel = bool(data.get("multilabel", False))
        self.loss_name = ("bce" if self.multilabel else "ce") if loss == "auto" else loss
        self.head_lr_multiplier = head_lr_multiplier
        if not 0 < layer_lr_decay <= 1:
            raise ConfigError(f"task.layer_lr_decay={layer_lr_decay}: allowed values are in (0, 1] (1: one "
                              "learning rate for the whole encoder)")
        self.layer_lr_decay = layer_lr_decay
        if class_weights is not None and len(class_weights) != self.num_classes:
            raise ConfigError(f"task.class_weights has {len(class_weights)} entries; the data has "
                              f"{self.num_classes} classes (one weight per class, in label order)")
        if class_weights is not None and (not all(math.isfinite(w) and w >= 0 for w in class_weights)
                                          or not any(class_weights)):
            raise ConfigError(f"task.class_weights={list(class_weights)}: each weight must be finite and >= 0, "
                              "and one at least > 0 (a negative weight would push its class's loss up)")
        weights = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float)
        self.register_buffer("class_weights", weights, persistent=False)
        tdim = data.get("target_length") or self.encoder.config.input_tdim
        check_strides(self.encoder.patch_shape, fstride, tstride)
        self.encoder.set_grid(input_tdim=tdim, fstride=fstride, tstride=tstride)
        self.head = ClassificationHead(self.encoder.embed_dim, self.num_classes, pooling,
                                       self.encoder.num_prefix_tokens)
        self.use_cuda_graphs(cuda_graphs, passes=1)
        builtin = {"acc": MulticlassAccuracy(self.num_classes, average="micro"),
                   "mAP": (MultilabelAveragePrecision(self.num_classes, average="macro") if self.multilabel
                           else MulticlassAveragePrecision(self.num_classes, average="macro"))}
        self.val_metrics = nn.ModuleDict(builtin)
        self.test_metrics = nn.ModuleDict({k: m.clone() for k, m in builtin.items()})
        extra = MetricCollection(dict(metrics or {}), compute_groups=False)
        self.val_extra = extra.clone(prefix="val/")
        self.test_extra = extra.clone(prefix="test/")

    @staticmethod
    def _resolve_num_classes(num_classes: int | None, label_names: list[str] | None) -> int:
        if label_names is None or list(label_names) == UNLABELED:
            if label_names is not None:
                raise ConfigError("data: finetuning needs labeled data, but this datamodule gives none "
                                  "(label_names=['unlabeled']); choose a labeled data=... config")
            if num_classes is None:
                raise ConfigError("task.num_classes: not set and the data gives no label names; set "
                                  "task.num_classes=N (N >= 2)")
            resolved = num_classes
        else:
            resolved = len(label_names)
            if num_classes is not None and num_classes != resolved:
                raise ConfigError(f"task.num_classes={num_classes}: the data has {resolved} classes; "
                                  f"allowed: null or {resolved}")
        if resolved < 2:
            raise ConfigError(f"task.num_classes={resolved}: finetuning needs at least 2 classes")
        return resolved

    # --- model ------------------------------------------------------------------------------------
    def forward(self, fbank: Tensor) -> Tensor:
        return self.head(self.encode(fbank))

    def parameter_groups(self) -> list[dict]:
        """The encoder at the base learning rate and the head at ``head_lr_multiplier`` times it; with
        ``layer_lr_decay`` below 1, one encoder group per depth, each ``layer_lr_decay`` times the rate of
        the depth above it (the final norm at the base rate), so the layers nearest the input, whose
        pretrained features are the most general, move the least."""
        head = [p for p in self.head.parameters() if p.requires_grad]
        head_group = {"params": head, "name": "head", "lr": self.base_lr() * self.head_lr_multiplier}
        head_ids = {id(p) for p in head}
        body = [p for p in self.parameters() if p.requires_grad and id(p) not in head_ids]
        if self.layer_lr_decay == 1:
            return [{"params": body, "name": "encoder"}, head_group]
        depths = self.encoder.parameter_depths()
        top = max(depths.values())
        depth_of = {id(p): depths[name] for name, p in self.encoder.named_parameters()}
        groups: dict[int, list] = {}
        for p in body:  # anything outside the encoder and the head trains at the base rate, as the top
            groups.setdefault(depth_of.get(id(p), top), []).append(p)
        return [{"params": params, "name": f"encoder_depth{depth}",
                 "lr": self.base_lr() * self.layer_lr_decay ** (top - depth)}
                for depth, params in sorted(groups.items())] + [head_group]

    def checkpoint_record(self) -> dict[str, Any]:
        record = super().checkpoint_record()
        record["head"] = {"num_classes": self.num_classes, "pooling": self.head.pooling,
                          "multilabel": self.multilabel, "loss": self.loss_name}
        return record

    # --- steps ------------------------------------------------------------------------------------
    def evaluation_step(self, batch: dict, stage: str) -> Tensor | None:
        if batch["fbank"].shape[0] == 0:  # every item of the batch was unusable (counted by the data)
            return None
        logits = self(batch["fbank"])
        target = batch["target"]
        self.log(f"{stage}/loss", self.loss(logits, target), on_epoch=True, sync_dist=True,
                 batch_size=logits.shape[0])
        builtin = self.val_metrics if stage == "val" else self.test_metrics
        builtin["acc"].update(logits, target.argmax(-1))
        builtin["mAP"].update(logits, (target > 0.5).long() if self.multilabel else target.argmax(-1))
        fields = {k: v for k, v in batch.items()  # per-item fields: id lists and 1-D tensors (outcome)
                  if isinstance(v, (list, tuple)) or (isinstance(v, Tensor) and v.ndim == 1)}
        (self.val_extra if stage == "val" else self.test_extra).update(logits, target, **fields)
        return logits

    def log_evaluation(self, stage: str) -> None:
        builtin = self.val_metrics if stage == "val" else self.test_metrics
        extra = self.val_extra if stage == "val" else self.test_extra
        values = {f"{stage}/{name}": metric.compute() for name, metric in builtin.items()}
        if len(extra):
            values.update(_flatten(extra.compute()))
        self.log_dict({k: v.float() for k, v in values.items()}, prog_bar=stage == "val")
        for metric in builtin.values():
            metric.reset()
        extra.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        return self.evaluation_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self.log_evaluation("val")

    def test_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        return self.evaluation_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self.log_evaluation("test")


def _flatten(values: dict[str, Any]) -> dict[str, Tensor]:
    """Metric results to scalars: nested dicts become ``key/sub``, vectors ``key/0``, ``key/1``, ..."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten({f"{key}/{k}": v for k, v in value.items()}))
        elif isinstance(value, Tensor) and value.numel() > 1:
            flat.update({f"{key}/{i}": v for i, v in enumerate(value.flatten())})
        else:
            flat[key] = torch.as_tensor(value)
    return flat
