"""Patient-level Challenge scores from segment or recording logits.

CirCor is scored per patient, but models see 5 s segments of single recordings. Aggregation:
segment logits are averaged per recording; recordings are combined per patient either by the
``hierarchical`` rule (Present if any recording is predicted Present, else Unknown if any is
Unknown, else Absent: the lowest class index in the Challenge's order) or by ``mean`` (argmax of the
recordings' mean logits). Patient probabilities (for AUROC and output files) are the softmax of the
recordings' mean logits under both rules. The patient's true class is the same hierarchical
aggregate of the items' targets, which is the patient label whether items carry patient labels or
recording labels (a murmur-audible recording Present, the others Absent).

Under DDP every process keeps its items' logits with integer codes of their patient, recording and
item ids; torchmetrics gathers them (``cat``) before ``compute``, and items seen twice (the padding
of a distributed sampler) are counted once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_confusion_matrix

from ssamba.constants import NO_OUTCOME
from ssamba.metrics.challenge import (
    CLASS_WEIGHTS,
    MURMUR_CLASSES,
    OUTCOME_CLASSES,
    RowMetric,
    accuracy,
    check_challenge_classes,
    class_indices,
    cost_from_predictions,
    macro_auroc,
    per_class_recall,
    weighted_accuracy,
)

AGGREGATION_RULES = ("hierarchical", "mean")


def id_code(item_id: str | int) -> int:
    """A process-independent int64 code for an id: the integer itself for an integer written in its one decimal
    form (so ``"07"`` and ``"7"`` stay two ids), else a hash."""
    text = str(item_id)
    if text.lstrip("-").isdigit() and text == str(int(text)) and -(2**63) <= int(text) < 2**63:
        return int(text)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def _codes(ids: Sequence[str | int] | Tensor, name: str, n: int, device: torch.device) -> Tensor:
    codes = ids.to(torch.long) if isinstance(ids, Tensor) else torch.tensor([id_code(i) for i in ids], dtype=torch.long)
    if codes.shape != (n,):
        raise ValueError(f"{name} has {codes.numel()} ids, expected one per item ({n})")
    return codes.to(device)


def _group(codes: Tensor) -> tuple[Tensor, Tensor]:
    """Unique codes (sorted) and, for every row, the index of its group."""
    return torch.unique(codes, sorted=True, return_inverse=True)


def _group_mean(values: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    sums = torch.zeros(num_groups, values.shape[1], dtype=values.dtype, device=values.device).index_add_(
        0, groups, values
    )
    counts = torch.bincount(groups, minlength=num_groups).clamp(min=1).unsqueeze(1)
    return sums / counts


def _group_min(values: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    start = torch.full((num_groups,), torch.iinfo(values.dtype).max, dtype=values.dtype, device=values.device)
    return start.scatter_reduce_(0, groups, values, reduce="amin")


def _group_max(values: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    start = torch.full((num_groups,), torch.iinfo(values.dtype).min, dtype=values.dtype, device=values.device)
    return start.scatter_reduce_(0, groups, values, reduce="amax")


@dataclass
class RecordingPredictions:
    """One row per recording, sorted by recording code: what the patient rules start from, kept so that
    a recording's own prediction can be read (which auscultation location sounded like a murmur) and other
    rules tried on it later."""

    recording: Tensor  # int64 codes
    patient: Tensor  # [R] int64 code of the recording's patient
    logits: Tensor  # [R, C] mean of the recording's item logits
    target: Tensor  # [R] its items' class (the lowest index: a recording label, or its patient's)


@dataclass
class PatientPredictions:
    """One row per patient, sorted by patient code."""

    patient: Tensor  # int64 codes
    logits: Tensor  # [P, C] mean of recording logits
    probs: Tensor  # [P, C] softmax of ``logits``
    preds: Tensor  # [P] class index from the aggregation rule
    target: Tensor  # [P] true class index
    outcome: Tensor | None  # [P] outcome index (Abnormal=0, Normal=1), if known
    num_recordings: Tensor  # [P]
    recordings: RecordingPredictions | None = None  # the recordings behind the rows, where they were aggregated here


def aggregate_patients(
    logits: Tensor,
    target: Tensor,
    patient: Tensor,
    recording: Tensor,
    rule: str = "hierarchical",
    outcome: Tensor | None = None,
) -> PatientPredictions:
    """Segment logits -> recording mean -> patient prediction by ``rule`` (codes as int64 tensors)."""
    if rule not in AGGREGATION_RULES:
        raise ValueError(f"aggregation rule={rule!r} is not one of {AGGREGATION_RULES}")
    logits = logits.to(torch.float64)
    rec_codes, rec_of_row = _group(recording)
    num_rec = rec_codes.numel()
    rec_logits = _group_mean(logits, rec_of_row, num_rec)
    rec_patient = _group_min(patient, rec_of_row, num_rec)
    if not torch.equal(rec_patient, _group_max(patient, rec_of_row, num_rec)):
        raise ValueError("a recording id occurs under more than one patient id")

    pat_codes, pat_of_rec = _group(rec_patient)
    num_pat = pat_codes.numel()
    pat_logits = _group_mean(rec_logits, pat_of_rec, num_pat)
    if rule == "hierarchical":
        preds = _group_min(rec_logits.argmax(dim=1), pat_of_rec, num_pat)
    else:
        preds = pat_logits.argmax(dim=1)
    pat_of_row = pat_of_rec[rec_of_row]
    pat_outcome = None
    if outcome is not None:
        pat_outcome = _group_min(outcome, pat_of_row, num_pat)
        if not torch.equal(pat_outcome, _group_max(outcome, pat_of_row, num_pat)):
            raise ValueError("a patient has items with different outcome labels")
    return PatientPredictions(
        patient=pat_codes,
        logits=pat_logits,
        probs=pat_logits.softmax(dim=1),
        preds=preds,
        target=_group_min(target, pat_of_row, num_pat),
        outcome=pat_outcome,
        num_recordings=torch.bincount(pat_of_rec, minlength=num_pat),
        recordings=RecordingPredictions(rec_codes, rec_patient, rec_logits, _group_min(target, rec_of_row, num_rec)),
    )


def patient_scores(predictions: PatientPredictions, class_names: Sequence[str]) -> dict[str, Tensor]:
    """Challenge scores of patient predictions; ``cost`` only where outcome labels are known."""
    class_names = check_challenge_classes(class_names)
    num_classes = len(class_names)
    confmat = multiclass_confusion_matrix(predictions.preds, predictions.target, num_classes, validate_args=False)
    recall = per_class_recall(confmat)
    auroc_per_class, auroc = macro_auroc(predictions.probs, predictions.target)
    scores = {
        "weighted_accuracy": weighted_accuracy(confmat, [CLASS_WEIGHTS[c] for c in class_names]),
        "uar": recall.nanmean(),
        "accuracy": accuracy(confmat),
        "auroc": auroc,
        "patients": torch.tensor(float(predictions.target.numel()), dtype=torch.float64),
    }
    for name, value in zip(class_names, recall):
        scores[f"recall_{name}"] = value
    for name, value in zip(class_names, auroc_per_class):
        scores[f"auroc_{name}"] = value
    outcome = predictions.target if class_names == OUTCOME_CLASSES else predictions.outcome
    if outcome is not None:
        scores["cost"] = cost_from_predictions(predictions.preds, outcome, class_names)
    return scores


class PatientChallengeMetrics(RowMetric):
    """Challenge scores at patient level from segment/recording logits, exact under DDP.

    ``update(logits, target, patient, recording=None, id=None, outcome=None)`` takes the keys of a
    CirCor batch: ``logits`` ``[N, C]``; ``target`` class indices ``[N]`` or one-hot ``[N, C]``;
    ``patient``, ``recording`` and item ``id`` (lists of str/int or int64 code tensors). Without
    ``recording`` all rows of a patient form one recording; item ids let duplicates be dropped.
    ``outcome`` (Abnormal=0, Normal=1, -1 unknown) enables the Challenge cost for murmur models
    (outcome models use their own target). ``compute()`` returns a dict of scalar tensors (see ``patient_scores``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, class_names: Sequence[str] = MURMUR_CLASSES, rule: str = "hierarchical", **kwargs) -> None:
        super().__init__(**kwargs)
        if rule not in AGGREGATION_RULES:
            raise ValueError(f"aggregation rule={rule!r} is not one of {AGGREGATION_RULES}")
        self.class_names = self.check_classes(class_names)
        self.rule = rule
        self.patient_names: dict[int, str] = {}
        self.recording_names: dict[int, str] = {}
        self.add_row_state("logits", len(self.class_names), torch.float32)
        for name in ("target", "outcome", "patient", "recording", "item"):
            self.add_row_state(name, None, torch.long)
        self.add_row_state("has_item", None, torch.bool)

    @staticmethod
    def check_classes(class_names: Sequence[str]) -> tuple[str, ...]:
        """The label sets this metric scores (subclasses widen it)."""
        return check_challenge_classes(class_names)

    def aggregate(
        self, logits: Tensor, target: Tensor, patient: Tensor, recording: Tensor, outcome: Tensor | None
    ) -> PatientPredictions:
        """Item rows -> patient predictions by ``self.rule`` (subclasses change the class order it uses)."""
        return aggregate_patients(logits, target, patient, recording, self.rule, outcome)

    def update(
        self,
        logits: Tensor,
        target: Tensor,
        patient: Sequence[str | int] | Tensor,
        recording: Sequence[str | int] | Tensor | None = None,
        id: Sequence[str | int] | Tensor | None = None,
        outcome: Tensor | None = None,
    ) -> None:
        num_classes = len(self.class_names)
        if logits.ndim != 2 or logits.shape[1] != num_classes:
            raise ValueError(f"logits must be [N, {num_classes}], got shape {tuple(logits.shape)}")
        n, device = logits.shape[0], logits.device
        target = class_indices(target, num_classes, "target")
        if target.shape != (n,):
            raise ValueError(f"target has {target.numel()} items, logits {n}")
        patient_codes = _codes(patient, "patient", n, device)
        if not isinstance(patient, Tensor):
            self.patient_names.update(zip(patient_codes.tolist(), map(str, patient)))
        recording_codes = patient_codes if recording is None else _codes(recording, "recording", n, device)
        recording_ids = patient if recording is None else recording
        if not isinstance(recording_ids, Tensor):
            self.recording_names.update(zip(recording_codes.tolist(), map(str, recording_ids)))
        if outcome is None:
            outcome_codes = torch.full((n,), NO_OUTCOME, dtype=torch.long, device=device)
        else:
            outcome_codes = _outcome_codes(outcome, n).to(device)
        self.append_rows("logits", logits.detach())
        self.append_rows("target", target)
        self.append_rows("outcome", outcome_codes)
        self.append_rows("patient", patient_codes)
        self.append_rows("recording", recording_codes)
        items = torch.zeros(n, dtype=torch.long, device=device) if id is None else _codes(id, "id", n, device)
        self.append_rows("item", items)
        self.append_rows("has_item", torch.full((n,), id is not None, dtype=torch.bool, device=device))

    def predictions(self) -> PatientPredictions:
        """Patient-level predictions from everything seen so far (call after a DDP sync or in one process)."""
        columns = {name: self.rows(name) for name in ("target", "outcome", "patient", "recording", "item")}
        keep = _first_occurrences(columns["item"], self.rows("has_item"))
        logits = self.rows("logits")[keep]
        columns = {name: value[keep] for name, value in columns.items()}
        outcome = columns["outcome"]
        known = outcome != NO_OUTCOME
        if known.any() and not known.all():
            raise ValueError("outcome was given for some items but not for others")
        return self.aggregate(
            logits,
            columns["target"],
            columns["patient"],
            columns["recording"],
            outcome if known.any() else None,
        )

    def compute(self) -> dict[str, Tensor]:
        return self.scores(self.predictions())

    def scores(self, predictions: PatientPredictions) -> dict[str, Tensor]:
        """The scores of patient predictions, also of ones gathered elsewhere (e.g. pooled over folds)."""
        return patient_scores(predictions, self.class_names)

    def patient_id(self, code: int) -> str:
        """The original id of a patient code seen by this process (the code itself otherwise)."""
        return self.patient_names.get(int(code), str(int(code)))

    def recording_id(self, code: int) -> str:
        """The original id of a recording code seen by this process (the code itself otherwise); without
        recording ids a patient's rows are its one recording, named as the patient."""
        return self.recording_names.get(int(code), str(int(code)))


def _outcome_codes(outcome: Tensor, n: int) -> Tensor:
    """Outcome indices [N] (one-hot rows allowed); -1 marks an unknown outcome, as CirCor batches do."""
    if outcome.ndim == 2:
        return class_indices(outcome, len(OUTCOME_CLASSES), "outcome")
    if outcome.shape != (n,):
        raise ValueError(f"outcome has {outcome.numel()} items, logits {n}")
    if outcome.numel() and (outcome.min() < NO_OUTCOME or outcome.max() >= len(OUTCOME_CLASSES)):
        raise ValueError("outcome holds values outside -1 (unknown), 0 (Abnormal), 1 (Normal)")
    return outcome.long()


def _first_occurrences(item: Tensor, has_item: Tensor) -> Tensor:
    """Mask keeping rows without an item id and the first row of every item id."""
    keep = ~has_item
    if has_item.any():
        rows = has_item.nonzero().squeeze(1)
        _, inverse = torch.unique(item[rows], return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), rows.numel(), dtype=torch.long, device=item.device)
        first.scatter_reduce_(0, inverse, torch.arange(rows.numel(), device=item.device), reduce="amin")
        keep[rows[first]] = True
    return keep
