"""Turning patient predictions into what people read: Challenge output files, a table, a figure."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ssamba.metrics.challenge import OUTCOME_CLASSES, check_challenge_classes, referral_mask
from ssamba.metrics.patient import PatientPredictions


def challenge_output_rows(probs: Tensor, preds: Tensor, class_names: Sequence[str]) -> tuple[list[str], Tensor, Tensor]:
    """Classes, one-hot labels and probabilities of the Challenge's output files.

    A murmur model's file also carries the outcome it implies under the Challenge's referral rule
    (Abnormal when Present or Unknown), with P(Abnormal) = P(Present) + P(Unknown), so the
    Challenge's own scoring program can read it.
    """
    class_names = check_challenge_classes(class_names)
    labels = torch.nn.functional.one_hot(preds, len(class_names))
    if class_names == OUTCOME_CLASSES:
        return list(class_names), labels, probs
    referred = referral_mask(class_names)
    p_abnormal = probs[:, referred].sum(dim=1, keepdim=True)
    outcome_probs = torch.cat([p_abnormal, 1 - p_abnormal], dim=1)
    outcome_labels = torch.stack([referred[preds], ~referred[preds]], dim=1).long()
    return (
        [*class_names, *OUTCOME_CLASSES],
        torch.cat([labels, outcome_labels], dim=1),
        torch.cat([probs, outcome_probs], dim=1),
    )


def write_challenge_outputs(
    predictions: PatientPredictions, patient_ids: Sequence[str], class_names: Sequence[str], out_dir: str | Path
) -> list[Path]:
    """One ``<PID>.csv`` per patient in the Challenge's format: ``#PID``, classes, 0/1 labels, probabilities."""
    if len(patient_ids) != predictions.preds.numel():
        raise ValueError(f"{len(patient_ids)} patient ids for {predictions.preds.numel()} patients")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classes, labels, probs = challenge_output_rows(predictions.probs.cpu(), predictions.preds.cpu(), class_names)
    paths = []
    for pid, label_row, prob_row in zip(patient_ids, labels.tolist(), probs.tolist()):
        path = out_dir / f"{pid}.csv"
        lines = [f"#{pid}", ",".join(classes), ",".join(map(str, label_row)), ",".join(f"{p:.6f}" for p in prob_row)]
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths


def write_predictions(
    predictions: PatientPredictions, patient_ids: Sequence[str], class_names: Sequence[str], path: str | Path
) -> Path:
    """``predictions.csv``: one row per patient with its true and predicted class and each class's probability."""
    if len(patient_ids) != predictions.preds.numel():
        raise ValueError(f"{len(patient_ids)} patient ids for {predictions.preds.numel()} patients")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(["patient", "target", "prediction", *(f"p_{name}" for name in class_names)])]
    rows = zip(patient_ids, predictions.target.tolist(), predictions.preds.tolist(), predictions.probs.tolist())
    for pid, target, pred, probs in rows:
        lines.append(",".join([pid, class_names[target], class_names[pred], *(f"{p:.6f}" for p in probs)]))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_recording_predictions(
    predictions: PatientPredictions, patient_ids: Sequence[str], recording_ids: Sequence[str],
    class_names: Sequence[str], path: str | Path
) -> Path:
    """``recordings.csv``: one row per recording with its patient, its class (its items' label), its own
    prediction (the argmax of its mean logits, before any patient rule) and each class's probability (their
    softmax): which recording, e.g. which auscultation location, a patient's prediction came from."""
    recordings = predictions.recordings
    if recordings is None:
        raise ValueError("these patient predictions keep no recordings")
    if len(patient_ids) != recordings.recording.numel() or len(recording_ids) != recordings.recording.numel():
        raise ValueError(f"{len(patient_ids)} patient and {len(recording_ids)} recording ids for "
                         f"{recordings.recording.numel()} recordings")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    probs = recordings.logits.softmax(dim=1)
    lines = [",".join(["patient", "recording", "target", "prediction", *(f"p_{name}" for name in class_names)])]
    rows = zip(patient_ids, recording_ids, recordings.target.tolist(), probs.argmax(dim=1).tolist(), probs.tolist())
    for pid, rid, target, pred, row in rows:
        lines.append(",".join([pid, rid, class_names[target], class_names[pred], *(f"{p:.6f}" for p in row)]))
    path.write_text("\n".join(lines) + "\n")
    return path


def scores_table(scores: Mapping[str, Tensor | float], title: str):
    """A rich table of scalar scores, in the order given."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in scores.items():
        value = float(value)
        table.add_row(name, "nan" if math.isnan(value) else f"{value:.4f}")
    return table


def confusion_figure(preds: Tensor, target: Tensor, class_names: Sequence[str], title: str = "patients"):
    """Matplotlib figure of the patient confusion matrix (rows true, columns predicted), with counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_classes = len(class_names)
    counts = torch.bincount(target.cpu() * num_classes + preds.cpu(), minlength=num_classes**2).view(
        num_classes, num_classes
    )
    fig, ax = plt.subplots(figsize=(1.2 * num_classes + 2, 1.2 * num_classes + 1.5))
    ax.imshow(counts.numpy(), cmap="Blues")
    ax.set_xticks(range(num_classes), labels=list(class_names))
    ax.set_yticks(range(num_classes), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    peak = max(int(counts.max()), 1)
    for i in range(num_classes):
        for j in range(num_classes):
            value = int(counts[i, j])
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    fig.tight_layout()
    return fig
