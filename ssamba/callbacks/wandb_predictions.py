"""Classification runs (finetuning, probing) to W&B each validation and test epoch: confusion matrices
and prediction tables.

Single-label data: the confusion matrix over clips (segments) and a table with one row per clip (id,
patient and recording where the data has them, true and predicted class, one score column per class).
Where the task scores patients (a patient metric of :mod:`ssamba.metrics`, as for CirCor and the
earbud subjects), also the patients' confusion matrix and a table with one row per patient, aggregated
by that metric's own rule, so that the rows are what the patient scores were computed from.

Multi-label data (AudioSet) gets no confusion matrix: a clip has several true classes, so there is no
single (true, predicted) pair to count (its score is the logged mAP). Its table lists each clip's true
labels and its ``top_k`` classes with their scores.

Scores are the model's: sigmoid of the logits for a BCE head, softmax for a CE head; patient scores
are the softmax of the patient's mean logits, as the patient metrics compute them.

Only with a W&B logger, outside the sanity check; otherwise every hook returns at once. Under DDP each
rank keeps its items, all ranks exchange them, items seen twice (the distributed sampler's padding)
are kept once, and rank 0 logs.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

from ssamba.errors import ConfigError
from ssamba.metrics.patient import PatientChallengeMetrics, id_code
from ssamba.tasks.finetune import Finetuning
from ssamba.tasks.probe import Probing

log = logging.getLogger(__name__)

ITEM_KEYS = ("id", "patient", "recording")  # per-item batch fields that name a table row


class WandbPredictions(Callback):
    """Logs ``<stage>/confusion_matrix`` and ``<stage>/predictions`` (plus ``<stage>/patient_*`` where
    patients are scored) for ``stage`` val and test."""

    def __init__(self, top_k: int = 5):
        if top_k < 1:
            raise ConfigError(f"callbacks.wandb_predictions.top_k={top_k}: must be >= 1")
        self.top_k = top_k
        self.active = False
        self._batches: list[dict[str, Any]] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Active for a classifier with a running W&B logger; rank 0 decides for all (it alone has the run)."""
        classifier = isinstance(pl_module, (Finetuning, Probing))
        wanted = classifier and any(isinstance(lg, WandbLogger) for lg in trainer.loggers)
        self.active = bool(trainer.strategy.broadcast(wanted, src=0))

    def _collecting(self, trainer) -> bool:
        return self.active and not trainer.sanity_checking

    # --- collect ----------------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._batches = []

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._batches = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._keep(trainer, outputs, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._keep(trainer, outputs, batch)

    def _keep(self, trainer, logits: Tensor | None, batch: dict) -> None:
        if not self._collecting(trainer) or logits is None:  # None: a batch of unusable items only
            return
        rows: dict[str, Any] = {"logits": logits.detach().float(), "target": batch["target"].detach().float()}
        rows.update({key: [str(v) for v in batch[key]] for key in ITEM_KEYS if key in batch})  # id: in every batch
        self._batches.append(rows)

    # --- log --------------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._log(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log(trainer, pl_module, "test")

    def _log(self, trainer, pl_module: Finetuning | Probing, stage: str) -> None:
        if not self._collecting(trainer):
            return
        sigmoid = pl_module.loss_name == "bce"
        local = self._local_rows(pl_module.multilabel, sigmoid)
        self._batches = []
        rows = first_occurrences(gather(trainer, local))
        if trainer.global_rank != 0 or not rows["id"]:
            return
        try:
            names = list(pl_module.data["label_names"])
            if pl_module.multilabel:
                logged = multilabel_tables(rows, names, stage)
            else:
                logged = single_label_tables(rows, names, sigmoid, stage, patient_metric(pl_module))
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_metrics(logged, step=trainer.global_step)
        except Exception as error:  # tables are diagnostics: never stop a run for them
            log.warning("W&B: could not log the %s predictions (%r)", stage, error)

    def _local_rows(self, multilabel: bool, sigmoid: bool) -> dict[str, Any]:
        """This rank's items. Multi-label rows keep only their true labels and top classes, so that
        the exchange between ranks stays small (AudioSet: 527 scores per clip)."""
        if not self._batches:
            return {"id": []}
        keys = [key for key in ITEM_KEYS if key in self._batches[0]]
        rows: dict[str, Any] = {key: [v for b in self._batches for v in b[key]] for key in keys}
        logits = torch.cat([b["logits"] for b in self._batches]).cpu()
        target = torch.cat([b["target"] for b in self._batches]).cpu()
        if multilabel:
            top = scores(logits, sigmoid).topk(min(self.top_k, logits.shape[1]), dim=1)
            rows.update(top=top.indices, top_score=top.values,
                        true=[(t > 0.5).nonzero().flatten().tolist() for t in target])
        else:
            rows.update(logits=logits, target=target.argmax(dim=1))
        return rows


def gather(trainer, rows: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's rows, in rank order (a single process: its own)."""
    if trainer.world_size == 1:
        return [rows]
    parts: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(parts, rows)
    return parts


def first_occurrences(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The ranks' rows joined, each item id once (the first occurrence)."""
    parts = [part for part in parts if part["id"]]
    if not parts:
        return {"id": []}
    seen: dict[str, int] = {}
    for index, item in enumerate(item for part in parts for item in part["id"]):
        seen.setdefault(item, index)
    keep = sorted(seen.values())
    joined: dict[str, Any] = {}
    for key, value in parts[0].items():
        if isinstance(value, Tensor):
            joined[key] = torch.cat([part[key] for part in parts])[keep]
        else:
            every = [v for part in parts for v in part[key]]
            joined[key] = [every[i] for i in keep]
    return joined


def patient_metric(pl_module) -> PatientChallengeMetrics | None:
    """The task's patient metric (the data's ``extra_metrics``), whose rule the patient table follows."""
    return next((m for m in pl_module.modules() if isinstance(m, PatientChallengeMetrics)), None)


def scores(logits: Tensor, sigmoid: bool) -> Tensor:
    return logits.sigmoid() if sigmoid else logits.softmax(dim=1)


def single_label_tables(rows: dict[str, Any], names: list[str], sigmoid: bool, stage: str,
                        metric: PatientChallengeMetrics | None) -> dict[str, Any]:
    import wandb

    probs = scores(rows["logits"], sigmoid)
    preds = probs.argmax(dim=1)
    keys = [key for key in ITEM_KEYS if key in rows]
    probability_columns = [f"p_{name}" for name in names]
    logged = {
        f"{stage}/confusion_matrix": wandb.plot.confusion_matrix(
            y_true=rows["target"].tolist(), preds=preds.tolist(), class_names=names, title=f"{stage}: clips"),
        f"{stage}/predictions": wandb.Table(
            columns=[*keys, "true", "predicted", *probability_columns],
            data=[[*(rows[key][i] for key in keys), names[t], names[p], *row]
                  for i, (t, p, row) in enumerate(zip(rows["target"].tolist(), preds.tolist(), probs.tolist()))]),
    }
    if metric is not None and "patient" in rows:
        patient = torch.tensor([id_code(p) for p in rows["patient"]], dtype=torch.long)
        recording = torch.tensor([id_code(r) for r in rows.get("recording", rows["patient"])], dtype=torch.long)
        result = metric.aggregate(rows["logits"], rows["target"], patient, recording, None)
        name_of = dict(zip(patient.tolist(), rows["patient"]))
        recording_name = dict(zip(recording.tolist(), rows.get("recording", rows["patient"])))
        classes = list(metric.class_names)
        logged[f"{stage}/patient_confusion_matrix"] = wandb.plot.confusion_matrix(
            y_true=result.target.tolist(), preds=result.preds.tolist(), class_names=classes,
            title=f"{stage}: patients ({metric.rule} rule)")
        logged[f"{stage}/patient_predictions"] = wandb.Table(
            columns=["patient", "recordings", "true", "predicted", *[f"p_{name}" for name in classes]],
            data=[[name_of[code], count, classes[t], classes[p], *row] for code, count, t, p, row in zip(
                result.patient.tolist(), result.num_recordings.tolist(), result.target.tolist(),
                result.preds.tolist(), result.probs.tolist())])
        recordings = result.recordings  # each recording's own call (argmax of its mean logits), before the rule
        recording_probs = recordings.logits.softmax(dim=1)
        logged[f"{stage}/recording_predictions"] = wandb.Table(
            columns=["patient", "recording", "true", "predicted", *[f"p_{name}" for name in classes]],
            data=[[name_of[p], recording_name[r], classes[t], classes[q], *row] for p, r, t, q, row in zip(
                recordings.patient.tolist(), recordings.recording.tolist(), recordings.target.tolist(),
                recording_probs.argmax(dim=1).tolist(), recording_probs.tolist())])
    return logged


def multilabel_tables(rows: dict[str, Any], names: list[str], stage: str) -> dict[str, Any]:
    import wandb

    keys = [key for key in ITEM_KEYS if key in rows]
    top_k = rows["top"].shape[1]
    columns = [*keys, "true", *[c for k in range(1, top_k + 1) for c in (f"top{k}", f"top{k}_score")]]
    data = [[*(rows[key][i] for key in keys), ", ".join(names[c] for c in true),
             *[v for c, score in zip(top, top_score) for v in (names[c], score)]]
            for i, (true, top, top_score) in enumerate(zip(rows["true"], rows["top"].tolist(),
                                                             rows["top_score"].tolist()))]
    return {f"{stage}/predictions": wandb.Table(columns=columns, data=data)}
