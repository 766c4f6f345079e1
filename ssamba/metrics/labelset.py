"""Scores for any single-label class set, per patient, and the Challenge's murmur view of it.

The Challenge's scores (:mod:`ssamba.metrics.challenge`) know two label sets only. Label sets such
as the seven murmur-timing classes of CirCor or the six earbud classes are scored here with what
holds for any set: the confusion matrix, per-class recall, the unweighted average recall (UAR) and
the macro one-vs-rest AUROC. A class with no true case has no recall and no ROC curve: it is NaN,
never a division by zero, and the averages run over the classes that do occur.

Class names carry their murmur group when they follow the heart-murmur naming (case-insensitive):
``absent`` -> Absent, ``unknown`` -> Unknown, any name starting with ``present`` -> Present (e.g.
``present-holosystolic``). Such a label set can be collapsed to the Challenge's three murmur classes
(probabilities summed per group, predictions and targets mapped to their group) and then gets the
Challenge's murmur scores as well, weighted accuracy and cost included.

Patients: recordings are combined by ``mean`` (arg-max of the recordings' mean logits) or, for
murmur-named classes, by ``hierarchical``: the patient's murmur group is the most severe group
predicted for any recording (Present, then Unknown, then Absent), and within it the class with the
largest mean logit. A patient's true class is its most severe item label (ties: the lower index);
for label sets without murmur names, the lowest index among its items' labels.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_confusion_matrix

from ssamba.metrics.challenge import MURMUR_CLASSES, OUTCOME_CLASSES, accuracy, macro_auroc, per_class_recall
from ssamba.metrics.patient import (
    AGGREGATION_RULES,
    PatientChallengeMetrics,
    PatientPredictions,
    aggregate_patients,
    patient_scores,
)

COLLAPSED_PREFIX = "murmur_"  # the Challenge's scores of a collapsed label set are logged under this prefix


def murmur_groups(class_names: Sequence[str]) -> tuple[str, ...] | None:
    """The Challenge murmur class of every class name, or None when a name is not murmur-like."""
    groups = []
    for name in class_names:
        key = str(name).strip().lower()
        if key == "absent":
            groups.append("Absent")
        elif key == "unknown":
            groups.append("Unknown")
        elif key.startswith("present"):
            groups.append("Present")
        else:
            return None
    return tuple(groups)


def label_set_scores(preds: Tensor, probs: Tensor, target: Tensor, class_names: Sequence[str]) -> dict[str, Tensor]:
    """Scores of class predictions ``[N]``, probabilities ``[N, C]`` and targets ``[N]`` over any label set.

    ``uar``, ``accuracy``, ``auroc`` (macro over the classes with a defined curve) and per class
    ``recall_<name>``, ``auroc_<name>``, ``support_<name>`` (true cases); NaN where undefined.
    """
    num_classes = len(class_names)
    if probs.ndim != 2 or probs.shape[1] != num_classes:
        raise ValueError(f"probs must be [N, {num_classes}], got shape {tuple(probs.shape)}")
    confmat = confusion_matrix(preds, target, num_classes)
    recall = per_class_recall(confmat)
    auroc_per_class, auroc = macro_auroc(probs, target)
    support = confmat.sum(dim=1).to(torch.float64)
    scores = {
        "uar": recall.nanmean(),
        "accuracy": accuracy(confmat),
        "auroc": auroc,
    }
    for name, r, a, s in zip(class_names, recall, auroc_per_class, support):
        scores[f"recall_{name}"] = r
        scores[f"auroc_{name}"] = a
        scores[f"support_{name}"] = s
    return scores


def confusion_matrix(preds: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """``[true, pred]`` counts (int64), as torchmetrics lays them out."""
    return multiclass_confusion_matrix(preds.long(), target.long(), num_classes, validate_args=False)


def collapse_to_murmur(predictions: PatientPredictions, class_names: Sequence[str]) -> PatientPredictions:
    """Patient predictions over murmur-named classes -> the same over the Challenge's Present/Unknown/Absent.

    A patient's prediction is the group of its own class prediction (the model's call, made by the rule
    over all classes); probabilities, and a recording's logits, are summed per group. The argmax of summed
    probabilities can name another group than that call (two Present classes at 0.3 each outweigh Absent
    at 0.4), so a recording's collapsed argmax is the group with the most probability, not its call's."""
    groups = murmur_groups(class_names)
    if groups is None:
        raise ValueError(f"class_names={list(class_names)} cannot be collapsed to the Challenge's murmur classes: "
                         "every name must be 'absent', 'unknown' or start with 'present'")
    device = predictions.probs.device
    group_of = torch.tensor([MURMUR_CLASSES.index(g) for g in groups], device=device)
    onto = torch.zeros(len(groups), len(MURMUR_CLASSES), dtype=predictions.probs.dtype, device=device)
    onto[torch.arange(len(groups), device=device), group_of] = 1.0

    def log_of(probs: Tensor) -> Tensor:
        return probs.clamp(min=torch.finfo(probs.dtype).tiny).log()

    probs = predictions.probs @ onto
    recordings = predictions.recordings
    if recordings is not None:  # a recording's logits become the log of its collapsed probabilities
        recordings = dataclasses.replace(recordings, logits=log_of(recordings.logits.softmax(dim=1) @ onto),
                                         target=group_of[recordings.target])
    return PatientPredictions(
        patient=predictions.patient,
        logits=log_of(probs),
        probs=probs,
        preds=group_of[predictions.preds],
        target=group_of[predictions.target],
        outcome=predictions.outcome,
        num_recordings=predictions.num_recordings,
        recordings=recordings,
    )


def collapsed_challenge_scores(predictions: PatientPredictions, class_names: Sequence[str]) -> dict[str, Tensor]:
    """The Challenge's murmur scores (weighted accuracy, UAR, AUROC, cost where outcomes are known, ...)
    of murmur-named patient predictions collapsed to Present/Unknown/Absent."""
    return patient_scores(collapse_to_murmur(predictions, class_names), MURMUR_CLASSES)


def check_rule(rule: str, class_names: Sequence[str]) -> None:
    """``rule`` is an aggregation rule that applies to ``class_names``, else one ValueError saying what does."""
    if rule not in AGGREGATION_RULES:
        raise ValueError(f"aggregation rule={rule!r} is not one of {AGGREGATION_RULES}")
    if rule == "hierarchical" and murmur_groups(class_names) is None:
        raise ValueError(f"aggregation rule='hierarchical' needs murmur class names (absent, unknown, present...), "
                         f"got {list(class_names)}; use rule='mean'")


def _severity_order(class_names: Sequence[str]) -> list[int]:
    """Class indices from most to least severe murmur group (index order within a group and without names)."""
    groups = murmur_groups(class_names)
    if groups is None:
        return list(range(len(class_names)))
    return sorted(range(len(class_names)), key=lambda k: (MURMUR_CLASSES.index(groups[k]), k))


def aggregate_label_set(
    logits: Tensor,
    target: Tensor,
    patient: Tensor,
    recording: Tensor,
    class_names: Sequence[str],
    rule: str = "mean",
    outcome: Tensor | None = None,
) -> PatientPredictions:
    """Item logits -> recording mean -> patient prediction by ``rule`` for any label set (see the module doc).

    The Challenge's own aggregation runs on the classes reordered by severity, so that its "lowest
    index wins" rules pick the most severe group; the hierarchical prediction is then refined to the
    group's class with the largest mean logit, and everything is mapped back to the caller's order.
    """
    check_rule(rule, class_names)
    groups = murmur_groups(class_names)
    device = logits.device
    order = torch.tensor(_severity_order(class_names), device=device)
    position = torch.argsort(order)  # class index -> its position in the severity order
    result = aggregate_patients(logits[:, order], position[target], patient, recording, rule, outcome)
    preds = result.preds
    if rule == "hierarchical":
        rank = torch.tensor([MURMUR_CLASSES.index(groups[k]) for k in order.tolist()], device=device)
        other_group = rank.unsqueeze(0) != rank[preds].unsqueeze(1)
        preds = result.logits.masked_fill(other_group, -math.inf).argmax(dim=1)
    recordings = dataclasses.replace(result.recordings, logits=result.recordings.logits[:, position],
                                     target=order[result.recordings.target])
    return PatientPredictions(
        patient=result.patient,
        logits=result.logits[:, position],
        probs=result.probs[:, position],
        preds=order[preds],
        target=order[result.target],
        outcome=result.outcome,
        num_recordings=result.num_recordings,
        recordings=recordings,
    )


class PatientLabelSetMetrics(PatientChallengeMetrics):
    """Patient-level scores for any single-label class set (same ``update`` as :class:`PatientChallengeMetrics`).

    ``compute()`` (and :meth:`scores` of given predictions) gives :func:`label_set_scores` over patients,
    ``patients`` (their number) and, for murmur-named sets other than the Challenge's own, the collapsed
    Challenge scores under ``murmur_<score>``. :meth:`confusion_matrix` gives the patients' ``[true, pred]`` counts.
    """

    def __init__(self, class_names: Sequence[str], rule: str = "mean", **kwargs) -> None:
        super().__init__(class_names=class_names, rule=rule, **kwargs)
        check_rule(rule, self.class_names)

    @staticmethod
    def check_classes(class_names: Sequence[str]) -> tuple[str, ...]:
        names = tuple(str(n) for n in class_names)
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"class_names={list(names)}: need at least two distinct class names")
        return names

    def aggregate(
        self, logits: Tensor, target: Tensor, patient: Tensor, recording: Tensor, outcome: Tensor | None
    ) -> PatientPredictions:
        return aggregate_label_set(logits, target, patient, recording, self.class_names, self.rule, outcome)

    def scores(self, predictions: PatientPredictions) -> dict[str, Tensor]:
        scores = label_set_scores(predictions.preds, predictions.probs, predictions.target, self.class_names)
        scores["patients"] = torch.tensor(float(predictions.target.numel()), dtype=torch.float64)
        if murmur_groups(self.class_names) is not None and self.class_names != MURMUR_CLASSES:
            collapsed = collapsed_challenge_scores(predictions, self.class_names)
            scores.update({COLLAPSED_PREFIX + k: v for k, v in collapsed.items() if k != "patients"})
        return scores

    def confusion_matrix(self) -> Tensor:
        predictions = self.predictions()
        return confusion_matrix(predictions.preds, predictions.target, len(self.class_names))


def is_challenge_label_set(class_names: Sequence[str]) -> bool:
    """The Challenge's murmur or outcome classes, whose patients get Challenge output files."""
    return tuple(class_names) in (MURMUR_CLASSES, OUTCOME_CLASSES)


def patient_metrics(class_names: Sequence[str], rule: str) -> PatientChallengeMetrics:
    """The patient-level metric of a label set, chosen here only: the Challenge's scores for its label
    sets; per-class recall, UAR, AUROC (and the collapsed Challenge murmur scores of timing classes) for
    any other, e.g. CirCor's murmur timing or the earbud classes."""
    if is_challenge_label_set(class_names):
        return PatientChallengeMetrics(class_names=tuple(class_names), rule=rule)
    return PatientLabelSetMetrics(class_names=tuple(class_names), rule=rule)
