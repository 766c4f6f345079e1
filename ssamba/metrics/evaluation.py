"""Scoring a finetuned checkpoint on a CirCor-style split, outside of training (``evaluate.py``).

The classifier is rebuilt from the checkpoint's own record (``checkpoint["ssamba"]``: encoder
config after the finetuning grid, head settings, input normalisation), so scoring needs neither
the training config nor the pretraining checkpoint it started from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ssamba.metrics.patient import PatientChallengeMetrics

BATCH_METRIC_KEYS = ("patient", "recording", "id", "outcome")


class Classifier(nn.Module):
    """Encoder + classification head of a finetuning checkpoint: ``fbank [B, T, 128] -> logits [B, C]``."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, fbank: Tensor) -> Tensor:
        return self.head(self.encoder.forward_features(fbank))


def read_record(path: str) -> dict[str, Any]:
    """``checkpoint["ssamba"]`` of a finetuning checkpoint, with a clear error for anything else."""
    checkpoint = _load(path)
    record = checkpoint.get("ssamba")
    if not record or "encoder" not in record:
        raise ValueError(f"ckpt_path={path}: not an ssamba checkpoint (no checkpoint['ssamba'] record)")
    if "head" not in record:
        raise ValueError(
            f"ckpt_path={path}: a {record.get('task', 'non-finetuning')} checkpoint has no classification "
            "head; evaluate a finetuning checkpoint"
        )
    return record


def load_classifier(path: str, backend: str | None = None) -> tuple[Classifier, dict[str, Any]]:
    """The finetuned model of ``path`` (eval mode, CPU) and its checkpoint record."""
    from ssamba.models import encoder_from_config
    from ssamba.tasks.heads import ClassificationHead

    checkpoint = _load(path)
    record = read_record(path)
    config = dict(record["encoder"])
    if backend is not None:
        config["backend"] = backend
    encoder = encoder_from_config(config)
    head_cfg = record["head"]
    head = ClassificationHead(
        encoder.embed_dim, head_cfg["num_classes"], head_cfg["pooling"], encoder.num_prefix_tokens
    )
    model = Classifier(encoder, head)
    state = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith(("encoder.", "head."))}
    model.load_state_dict(state, strict=True)
    return model.eval(), record


def _load(path: str) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"ckpt_path={path}: no such file") from None


def check_compatible(record: dict[str, Any], label_names: Sequence[str], target_length: int) -> None:
    """The data must give the classes and input length the head and encoder were trained on."""
    trained = list(record.get("label_names") or [])
    if trained and trained != list(label_names):
        raise ValueError(f"data.label_names={list(label_names)} but the checkpoint was trained on {trained}")
    if record.get("target_length") and int(record["target_length"]) != int(target_length):
        raise ValueError(
            f"data.target_length={target_length} but the checkpoint was trained on {record['target_length']} frames"
        )


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA when asked; full precision otherwise."""
    if precision not in ("32", "bf16"):
        raise ValueError(f"precision={precision!r}: allowed values are 32, bf16")
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def score_split(
    model: nn.Module,
    datamodule: Any,
    split: str,
    rule: str,
    device: torch.device,
    precision: str = "32",
) -> PatientChallengeMetrics:
    """Run ``model`` over every item of ``split`` and return the filled patient-level metric."""
    model = model.to(device).eval()
    metric = PatientChallengeMetrics(class_names=tuple(datamodule.label_names), rule=rule).to(device)
    for batch in datamodule.dataloader(split, shuffle=False):
        batch = datamodule.on_before_batch_transfer(batch, 0)
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
        batch = datamodule.on_after_batch_transfer(batch, 0)
        if batch["fbank"].shape[0] == 0:  # every item of the batch was unusable (counted by the data)
            continue
        with autocast(device, precision):
            logits = model(batch["fbank"])
        fields = {k: batch[k] for k in BATCH_METRIC_KEYS if k in batch}
        metric.update(logits.float(), batch["target"], **fields)
    return metric
