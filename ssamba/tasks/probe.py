"""SUPERB-style probing (``task=probe``): a frozen encoder, a learnable mix of its layers, a light head.

The encoder comes from ``pretrained`` (any checkpoint :func:`load_pretrained_encoder` reads) or,
without one, from the model config (a random-features baseline). It never trains: its parameters
are frozen, it stays in eval mode (no drop path) and runs without autograd. Only the
:class:`LayerProbeHead` trains: the softmax weights over every layer's output, the projector and
the classifier.

Checkpoints hold what trains and a pointer to the encoder, not a copy: ``checkpoint["ssamba"]``
names the ``pretrained`` file and a fingerprint (sha256) of the encoder's weights after the grid
was laid out. Loading one (testing the best checkpoint, resuming) puts the encoder of this task
back in and refuses, in one line, an encoder whose fingerprint differs.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from ssamba.errors import ConfigError
from ssamba.models.heads import LayerProbeHead
from ssamba.tasks.base import EncoderTask
from ssamba.tasks.finetune import LOSSES, ClassifierTraining, Finetuning, check_strides, load_pretrained_encoder

log = logging.getLogger(__name__)

ENCODER_PREFIX = "encoder."


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over the names, shapes and bytes of ``module``'s state, in order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Probing(ClassifierTraining, EncoderTask):
    """Frozen encoder + :class:`LayerProbeHead`; CE (or BCE for multi-label data); accuracy."""

    task_name = "probe"
    class_weights = None  # the probe trains unweighted (ClassifierTraining's loss)

    def __init__(self, optimizer, encoder: nn.Module | Any = None, pretrained: str | None = None,
                 backend: str | None = None, fstride: int | None = None, tstride: int | None = None,
                 projector_dim: int | None = 256, loss: str = "auto", num_classes: int | None = None,
                 scheduler=None, scheduler_config: dict | None = None, warmup_steps: int = 0,
                 data: dict | None = None):
        data = dict(data or {})
        if pretrained:
            encoder, _ = load_pretrained_encoder(pretrained, backend, data)
            log.info("probing the frozen encoder of %s", pretrained)
        elif encoder is None:
            raise ConfigError("task.pretrained: no checkpoint and no model config; give task.pretrained=PATH "
                              "(or a model=... to probe a randomly initialised encoder)")
        elif not isinstance(encoder, nn.Module):
            encoder = encoder()
            log.warning("task.pretrained=null: probing a randomly initialised encoder (a baseline)")
        super().__init__(encoder, optimizer, scheduler, scheduler_config, warmup_steps, data)
        self.save_hyperparameters(ignore=["encoder", "optimizer", "scheduler"])
        if loss not in LOSSES:
            raise ConfigError(f"task.loss={loss!r}: allowed values are {', '.join(LOSSES)}")
        if projector_dim is not None and projector_dim < 1:
            raise ConfigError(f"task.projector_dim={projector_dim}: must be >= 1 (or null: one linear layer)")
        self.pretrained = pretrained
        self.num_classes = Finetuning._resolve_num_classes(num_classes, data.get("label_names"))
        self.multilabel = bool(data.get("multilabel", False))
        self.loss_name = ("bce" if self.multilabel else "ce") if loss == "auto" else loss
        check_strides(self.encoder.patch_shape, fstride, tstride)
        # null strides keep the pretraining grid: the frozen encoder sees the layout it learned
        self.encoder.set_grid(input_tdim=data.get("target_length") or None, fstride=fstride, tstride=tstride)
        self.encoder.requires_grad_(False)  # after set_grid, which makes a new position embedding
        self.encoder.eval()
        self.head = LayerProbeHead(self.encoder.num_hidden_states, self.encoder.embed_dim, self.num_classes,
                                   self.encoder.num_prefix_tokens, projector_dim)
        self.val_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self._fingerprint: str | None = None

    def train(self, mode: bool = True) -> Probing:
        super().train(mode)
        self.encoder.eval()  # frozen: no drop path, whatever Lightning switches
        return self

    # --- model ------------------------------------------------------------------------------------
    def layer_outputs(self, fbank: Tensor) -> Tensor:
        """Every layer's output of the frozen encoder, ``[L, B, P + N, D]``."""
        with torch.no_grad():
            _, states = self.encoder.forward_features(fbank, return_hidden_states=True)
        return torch.stack(states)

    def forward(self, fbank: Tensor) -> Tensor:
        return self.head(self.layer_outputs(fbank))

    # --- steps ------------------------------------------------------------------------------------
    def evaluation_step(self, batch: dict, stage: str) -> Tensor | None:
        """Logs the loss and accuracy; returns the logits (the W&B prediction tables read them)."""
        if batch["fbank"].shape[0] == 0:  # every item of the batch was unusable (counted by the data)
            return None
        logits = self(batch["fbank"])
        self.log(f"{stage}/loss", self.loss(logits, batch["target"]), on_epoch=True, sync_dist=True,
                 batch_size=logits.shape[0])
        metric = self.val_acc if stage == "val" else self.test_acc
        metric.update(logits, batch["target"].argmax(-1))
        self.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=stage == "val")
        return logits

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        return self.evaluation_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        return self.evaluation_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        weights = self.head.layer_weights.detach().softmax(0)
        self.log_dict({f"probe/layer_weight_{i:02d}": w for i, w in enumerate(weights)})

    # --- checkpoints: what trains, and a pointer to the encoder -----------------------------------
    def encoder_fingerprint(self) -> str:
        if self._fingerprint is None:  # the encoder is frozen: computed once
            self._fingerprint = weights_fingerprint(self.encoder)
        return self._fingerprint

    def checkpoint_record(self) -> dict[str, Any]:
        record = super().checkpoint_record()
        record["probe"] = {"pretrained": self.pretrained, "encoder_sha256": self.encoder_fingerprint(),
                           "num_classes": self.num_classes, "num_layers": self.head.layer_weights.numel()}
        return record

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(ENCODER_PREFIX)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        probe = checkpoint.get("ssamba", {}).get("probe")
        if probe is None:
            raise ConfigError("not a probe checkpoint (no ssamba.probe record); task=probe resumes and tests only "
                              "its own checkpoints")
        if probe["encoder_sha256"] != self.encoder_fingerprint():
            raise ConfigError(f"this probe checkpoint was trained on the encoder of task.pretrained="
                              f"{probe['pretrained']}, whose weights differ from this run's task.pretrained="
                              f"{self.pretrained}")
        checkpoint["state_dict"].update({ENCODER_PREFIX + k: v for k, v in self.encoder.state_dict().items()})
