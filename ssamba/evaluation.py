"""Scoring a finetuned checkpoint on a CirCor-style split: ``evaluate.py``, and ``train.py score_checkpoint=...``
right after training (one code path, so both give the same numbers).

The classifier is rebuilt from the checkpoint's own record (``checkpoint["ssamba"]``: encoder
config after the finetuning grid, head settings, input normalisation), so scoring needs neither
the training config nor the pretraining checkpoint it started from. This sits above the metrics
(which know nothing of models) and beside the tasks: it is inference plus scoring.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ssamba.checkpoints import INPUT_KEYS, Checkpoint, load_checkpoint
from ssamba.data.quality import PATIENT_FEATURES, patients_quality
from ssamba.errors import ConfigError, MissingFileError
from ssamba.metrics.challenge import MURMUR_CLASSES
from ssamba.metrics.gate import QualityGate
from ssamba.metrics.labelset import patient_metrics
from ssamba.metrics.patient import PatientChallengeMetrics, PatientPredictions
from ssamba.models import ClassifierEnsemble

BATCH_METRIC_KEYS = ("patient", "recording", "id", "outcome")
LOGIT_DECIMALS = 4  # a recording's logits as stored with a cell's patients: ample for any rule, and compact
SCORED_CHECKPOINTS = ("last", "best")  # train.py score_checkpoint=...: the run's last.ckpt, or its best on val


def load_finetuned(path: str) -> Checkpoint:
    """A finetuning checkpoint (read once), with a clear error naming ``ckpt_path`` for anything else."""
    try:
        checkpoint = load_checkpoint(path)
    except FileNotFoundError:
        raise MissingFileError(f"ckpt_path={path}: no such file") from None
    except ValueError as error:
        raise ConfigError(f"ckpt_path={path}: {error}") from error
    if checkpoint.head is None:
        raise ConfigError(
            f"ckpt_path={path}: a {checkpoint.task or 'non-finetuning'} checkpoint has no classification "
            "head; evaluate a finetuning checkpoint"
        )
    return checkpoint


def load_members(paths: Sequence[str]) -> list[Checkpoint]:
    """The finetuning checkpoints of an ensemble (or of one model), which must agree on what the data gives
    them: classes, input length, normalisation and mel scale, and single- or multi-label head."""
    members = [load_finetuned(str(path)) for path in paths]
    first = members[0]
    for path, member in zip(paths[1:], members[1:]):
        for key in ("label_names", *INPUT_KEYS):
            if getattr(member, key) != getattr(first, key):
                raise ConfigError(f"ckpt_path: {path} has {key}={getattr(member, key)!r} but {paths[0]} has "
                                  f"{getattr(first, key)!r}; an ensemble's models must share it")
        if bool(member.head.get("multilabel")) != bool(first.head.get("multilabel")):
            raise ConfigError(f"ckpt_path: {path} and {paths[0]} differ in multilabel; an ensemble's models must "
                              "share it")
    return members


def build_model(members: Sequence[Checkpoint], backend: str | None = None) -> nn.Module:
    """The classifier of one checkpoint, or the ensemble of several (mean class probabilities)."""
    classifiers = [member.build_classifier(backend=backend) for member in members]
    if len(classifiers) == 1:
        return classifiers[0]
    return ClassifierEnsemble(classifiers, multilabel=bool(members[0].head.get("multilabel"))).eval()


def check_compatible(checkpoint: Checkpoint, label_names: Sequence[str], target_length: int) -> None:
    """The data must give the classes and input length the head and encoder were trained on."""
    trained = list(checkpoint.label_names)
    if trained and trained != list(label_names):
        raise ConfigError(f"data.label_names={list(label_names)} but the checkpoint was trained on {trained}")
    if checkpoint.target_length and int(checkpoint.target_length) != int(target_length):
        raise ConfigError(
            f"data.target_length={target_length} but the checkpoint was trained on {checkpoint.target_length} frames"
        )


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA when asked; full precision otherwise."""
    if precision not in ("32", "bf16"):
        raise ValueError(f"precision={precision!r}: allowed values are 32, bf16")
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_scorable(datamodule: Any) -> None:
    """Patient-level scores need single-label items that name their patient (or subject): refused otherwise,
    before any inference."""
    name = type(datamodule).__name__
    if "patient" not in getattr(datamodule, "meta_keys", ()):
        raise ConfigError(f"{name} gives no patient of its items: patient-level scoring needs data=circor, "
                          "data=earbud, or shards packed from them")
    if datamodule.multilabel:
        raise ConfigError(f"data.multilabel=true: patient-level scoring takes one class per item, and {name}'s "
                          "items may have several (score single-label data, data.multilabel=false)")


@torch.no_grad()
def score_split(
    model: nn.Module,
    datamodule: Any,
    split: str,
    rule: str,
    device: torch.device,
    precision: str = "32",
) -> PatientChallengeMetrics:
    """Run ``model`` over every item of ``split`` and return the filled patient-level metric
    (:func:`ssamba.metrics.patient_metrics` of the data's label set)."""
    check_scorable(datamodule)
    model = model.to(device).eval()
    metric = patient_metrics(datamodule.label_names, rule).to(device)
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


def patient_table(metric: PatientChallengeMetrics, predictions: PatientPredictions, class_names: Sequence[str],
                  rule: str) -> dict[str, list]:
    """The patients' predictions as plain JSON lists (ids, targets, predictions, probabilities, outcome or -1,
    recordings), enough to score any set of them again later (pooling folds), and the recordings' own
    (``recording_rows``: :func:`recording_table`), for rules that start from the recordings."""
    outcome = predictions.outcome.tolist() if predictions.outcome is not None else [-1] * len(predictions.preds)
    return {
        "class_names": list(class_names), "rule": rule,
        "id": [metric.patient_id(code) for code in predictions.patient.tolist()],
        "target": predictions.target.tolist(), "pred": predictions.preds.tolist(),
        "probs": predictions.probs.tolist(), "outcome": outcome, "recordings": predictions.num_recordings.tolist(),
        **({"recording_rows": recording_table(metric, predictions)} if predictions.recordings is not None else {}),
    }  # fmt: skip


def recording_ids(metric: PatientChallengeMetrics, predictions: PatientPredictions) -> tuple[list[str], list[str]]:
    """The patient and recording id of each row of ``predictions.recordings``."""
    recordings = predictions.recordings
    return ([metric.patient_id(code) for code in recordings.patient.tolist()],
            [metric.recording_id(code) for code in recordings.recording.tolist()])


def recording_table(metric: PatientChallengeMetrics, predictions: PatientPredictions) -> dict[str, list]:
    """Each recording's patient id, recording id, class and mean logits (to :data:`LOGIT_DECIMALS`) as plain
    JSON lists, in the order of ``predictions.recordings``."""
    recordings = predictions.recordings
    patients, ids = recording_ids(metric, predictions)
    return {
        "patient": patients,
        "id": ids,
        "target": recordings.target.tolist(),
        "logits": [[round(value, LOGIT_DECIMALS) for value in row] for row in recordings.logits.tolist()],
    }


def score_checkpoint(paths: Sequence[str], datamodule: Any, split: str, device: torch.device,
                     precision: str = "32", max_seconds: Sequence[float] = ()
                     ) -> tuple[dict[str, float], dict[str, list], dict[str, dict[str, float]]]:
    """Patient-level scores of finetuning checkpoints (one, or several as one ensemble: mean class
    probabilities, as ``evaluate.py ckpt_path=[...]``) on ``split`` of ``datamodule`` (its own aggregation
    rule), the patient predictions behind them (:func:`patient_table`), and, for each of ``max_seconds``, the
    same model's scores on each recording's first that many seconds (``datamodule.set_eval_max_seconds``),
    keyed by the length as written (``"5"``)."""
    members = load_members(paths)  # which agree on classes and input, so the first one speaks for all
    check_compatible(members[0], datamodule.label_names, datamodule.target_length)
    model, rule = build_model(members), datamodule.aggregation

    def scored() -> tuple[PatientChallengeMetrics, PatientPredictions, dict[str, float]]:
        metric = score_split(model, datamodule, split, rule, device, precision)
        predictions = metric.predictions()
        return metric, predictions, {name: float(value) for name, value in metric.scores(predictions).items()}

    metric, predictions, scores = scored()
    shortened = {}
    if max_seconds:
        whole = datamodule.eval_max_seconds
        try:
            for seconds in max_seconds:
                datamodule.set_eval_max_seconds(seconds)
                shortened[f"{seconds:g}"] = scored()[2]
        finally:  # the datamodule scores whole recordings again, also after an error
            datamodule.set_eval_max_seconds(whole)
    return scores, patient_table(metric, predictions, datamodule.label_names, rule), shortened


def check_gate_applies(datamodule: Any) -> None:
    """A quality gate corrects CirCor's three murmur classes, reading each patient's recordings: else one
    ConfigError, before any inference."""
    if tuple(datamodule.label_names) != MURMUR_CLASSES:
        raise ConfigError(f"quality_gate= corrects the Challenge's murmur classes {list(MURMUR_CLASSES)}; this "
                          f"data's classes are {list(datamodule.label_names)}")
    if not hasattr(datamodule, "split_patients"):
        raise ConfigError(f"quality_gate= reads each patient's recordings: {type(datamodule).__name__} does not "
                          "list patients (use data=circor)")


def gate_predictions(path: str | Path, datamodule: Any, split: str, metric: PatientChallengeMetrics,
                     predictions: PatientPredictions) -> tuple[PatientPredictions, dict]:
    """``predictions`` with the quality gate saved at ``path`` applied (``ssamba.metrics.gate``), from the
    signal quality of each patient's recordings in ``split``, and what it did. A recording that cannot be
    read is skipped and counted; a patient with none keeps the model's prediction, counted too."""
    check_gate_applies(datamodule)
    gate = QualityGate.load(path, PATIENT_FEATURES)
    quality, skipped = patients_quality(datamodule.split_patients(split))
    ids = [metric.patient_id(code) for code in predictions.patient.tolist()]
    rows = [i for i, pid in enumerate(ids) if pid in quality]
    preds = predictions.preds.clone()
    if rows:
        preds[rows] = gate.apply(preds[rows], torch.stack([quality[ids[i]] for i in rows]))
    threshold = None if math.isinf(gate.threshold) else gate.threshold  # None: the gate changes nothing
    summary = {"path": str(path), "fitted_on": gate.fitted_on, "threshold": threshold,
               "made_unknown": int((preds != predictions.preds).sum()),
               "patients_without_readable_recording": len(ids) - len(rows), "recordings_skipped": len(skipped)}
    return dataclasses.replace(predictions, preds=preds), summary
