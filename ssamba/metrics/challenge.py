"""George B. Moody PhysioNet Challenge 2022 scoring (heart murmurs and clinical outcome).

Definitions follow the Challenge's published scoring (Reyna et al., "Heart murmur detection from
phonocardiogram recordings: the George B. Moody PhysioNet Challenge 2022", PLOS Digital Health
2023, and the Challenge's `evaluate_model` scoring program):

* The Challenge's confusion matrix ``A`` has rows = predicted class, columns = true class. Here we
  keep torchmetrics' layout (rows = true, columns = predicted), i.e. ``confmat = A.T``.
* Weighted accuracy multiplies every column (true class) of ``A`` by that class's weight and takes
  trace / sum. Murmur weights Present 5, Unknown 3, Absent 1; outcome weights Abnormal 5, Normal 1::

      murmur WA = (5 PP + 3 UU + AA) / (5 #Present + 3 #Unknown + #Absent)

  where ``PP`` counts Present patients predicted Present and ``#Present`` counts Present patients.
* The cost scores a referral decision against the clinical outcome: a patient is *referred* when the
  prediction is Present, Unknown or Abnormal (not when Absent or Normal) and is a true positive when
  the outcome is Abnormal. With ``n`` patients, ``TP`` referred Abnormal, ``FP`` referred Normal,
  ``FN`` not-referred Abnormal and ``q = (TP + FP) / n``, the mean cost per patient is::

      [10 n + (25 + 397 q - 1718 q^2 + 11296 q^4) n + 10000 TP + 50000 FN] / n

  (algorithmic pre-screening 10 per patient, expert screening of the referred, treatment 10000 per
  treated patient, 50000 per missed/late treatment). The Challenge reports this cost both for the
  outcome predictions and for the murmur predictions (scored against the outcome labels).

Class indices follow the Challenge's order: Present=0, Unknown=1, Absent=2; Abnormal=0, Normal=1.
Undefined scores (no patients, a class with no true cases) are NaN, as in the Challenge, and class
averages skip them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import multiclass_auroc, multiclass_confusion_matrix

from ssamba.constants import MURMUR_CLASSES, OUTCOME_CLASSES

CLASS_WEIGHTS = {"Present": 5.0, "Unknown": 3.0, "Absent": 1.0, "Abnormal": 5.0, "Normal": 1.0}
REFERRAL_CLASSES = frozenset({"Present", "Unknown", "Abnormal"})


def check_challenge_classes(class_names: Sequence[str]) -> tuple[str, ...]:
    """Return ``class_names`` as a tuple if it is one of the Challenge's label sets, else raise."""
    names = tuple(class_names)
    if names not in (MURMUR_CLASSES, OUTCOME_CLASSES):
        raise ValueError(
            f"class_names={list(names)} is not a Challenge label set: expected "
            f"{list(MURMUR_CLASSES)} (murmur) or {list(OUTCOME_CLASSES)} (outcome), in that order"
        )
    return names


def class_indices(values: Tensor, num_classes: int, name: str) -> Tensor:
    """Class indices ``[N]`` from indices ``[N]`` or scores/one-hot rows ``[N, C]`` (argmax; ties -> lower index)."""
    if values.ndim == 2:
        if values.shape[1] != num_classes:
            raise ValueError(f"{name} has {values.shape[1]} columns, expected num_classes={num_classes}")
        return values.argmax(dim=1)
    if values.ndim != 1:
        raise ValueError(
            f"{name} must be class indices [N] or scores [N, {num_classes}], got shape {tuple(values.shape)}"
        )
    if values.is_floating_point():
        if not torch.equal(values, values.round()):
            raise ValueError(f"{name} is a float vector that is not integral; pass scores as [N, {num_classes}]")
        values = values.long()
    if values.numel() and (values.min() < 0 or values.max() >= num_classes):
        raise ValueError(f"{name} holds class indices outside [0, {num_classes - 1}]")
    return values.long()


def weighted_accuracy(confmat: Tensor, class_weights: Sequence[float]) -> Tensor:
    """Challenge weighted accuracy from a ``[true, pred]`` confusion matrix (NaN without patients)."""
    weights = torch.as_tensor(class_weights, dtype=torch.float64, device=confmat.device)
    confmat = confmat.to(torch.float64)
    denominator = (weights * confmat.sum(dim=1)).sum()
    if denominator == 0:
        return torch.tensor(math.nan, dtype=torch.float64, device=confmat.device)
    return (weights * confmat.diagonal()).sum() / denominator


def weighted_accuracy_of(target: Sequence[int] | Tensor, preds: Sequence[int] | Tensor,
                         class_weights: Sequence[float]) -> float:
    """:func:`weighted_accuracy` of class indices (true and predicted, one per patient)."""
    classes = len(class_weights)
    pairs = torch.as_tensor(target, dtype=torch.long) * classes + torch.as_tensor(preds, dtype=torch.long)
    return float(weighted_accuracy(torch.bincount(pairs, minlength=classes * classes).view(classes, classes),
                                   class_weights))


def per_class_recall(confmat: Tensor) -> Tensor:
    """Recall of every class from a ``[true, pred]`` confusion matrix; NaN for a class with no true cases."""
    confmat = confmat.to(torch.float64)
    support = confmat.sum(dim=1)
    recall = confmat.diagonal() / support.clamp(min=1)
    return torch.where(support > 0, recall, torch.full_like(recall, math.nan))


def unweighted_average_recall(confmat: Tensor) -> Tensor:
    """Mean recall over the classes that occur in the targets (balanced accuracy)."""
    return per_class_recall(confmat).nanmean()


def accuracy(confmat: Tensor) -> Tensor:
    """Fraction of items on the diagonal of a confusion matrix (NaN without items)."""
    confmat = confmat.to(torch.float64)
    total = confmat.sum()
    return confmat.trace() / total if total > 0 else torch.tensor(math.nan, dtype=torch.float64, device=confmat.device)


def challenge_cost(
    true_pos: Tensor | float, false_pos: Tensor | float, false_neg: Tensor | float, true_neg: Tensor | float
) -> Tensor:
    """Mean cost per patient of the Challenge's referral model (see the module docstring)."""
    tp, fp, fn, tn = (torch.as_tensor(v, dtype=torch.float64) for v in (true_pos, false_pos, false_neg, true_neg))
    n = tp + fp + fn + tn
    if n == 0:
        return torch.tensor(math.nan, dtype=torch.float64)
    q = (tp + fp) / n
    algorithm = 10.0 * n
    expert = (25.0 + 397.0 * q - 1718.0 * q**2 + 11296.0 * q**4) * n
    treatment = 10000.0 * tp
    error = 50000.0 * fn
    return (algorithm + expert + treatment + error) / n


def referral_mask(class_names: Sequence[str]) -> Tensor:
    """Bool ``[C]``: which predicted classes refer the patient (Present, Unknown, Abnormal)."""
    return torch.tensor([name in REFERRAL_CLASSES for name in check_challenge_classes(class_names)])


def cost_from_predictions(preds: Tensor, outcome: Tensor, class_names: Sequence[str]) -> Tensor:
    """Challenge cost of predicted class indices ``preds`` against outcome indices (Abnormal=0, Normal=1)."""
    referred = referral_mask(class_names).to(preds.device)[preds]
    abnormal = outcome == OUTCOME_CLASSES.index("Abnormal")
    return challenge_cost(
        (referred & abnormal).sum(),
        (referred & ~abnormal).sum(),
        (~referred & abnormal).sum(),
        (~referred & ~abnormal).sum(),
    )


def macro_auroc(probs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-class one-vs-rest AUROC (torchmetrics) and their mean over classes where it is defined.

    A class with no positive or no negative target has no ROC curve: it is NaN and left out of the
    mean, as in the Challenge (torchmetrics alone would count it as 0).
    """
    num_classes = probs.shape[1]
    if target.numel() == 0:
        nan = torch.full((num_classes,), math.nan, dtype=torch.float64)
        return nan, nan[0]
    with warnings.catch_warnings():  # undefined classes are masked below
        warnings.filterwarnings("ignore", message="No (positive|negative) samples in targets")
        # float64: near 1, float32 rounds distinct probabilities of a confident model to ties
        per_class = multiclass_auroc(probs.double(), target, num_classes, average=None, thresholds=None).to(
            torch.float64
        )
    counts = torch.bincount(target, minlength=num_classes)
    defined = (counts > 0) & (counts < target.numel())
    per_class = torch.where(defined.to(per_class.device), per_class, torch.full_like(per_class, math.nan))
    return per_class, per_class.nanmean()


class _ConfusionMetric(Metric):
    """Accumulates a ``[true, pred]`` confusion matrix; summed across processes under DDP."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, class_names: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.class_names = check_challenge_classes(class_names)
        self.num_classes = len(self.class_names)
        self.add_state(
            "confmat", torch.zeros(self.num_classes, self.num_classes, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, preds: Tensor, target: Tensor) -> None:
        """``preds``: class indices [N] or logits/probabilities [N, C]; ``target``: indices [N] or one-hot [N, C]."""
        preds = class_indices(preds, self.num_classes, "preds")
        target = class_indices(target, self.num_classes, "target")
        if preds.shape != target.shape:
            raise ValueError(f"preds has {preds.numel()} items but target has {target.numel()}")
        self.confmat += multiclass_confusion_matrix(preds, target, self.num_classes, validate_args=False)


class MurmurWeightedAccuracy(_ConfusionMetric):
    """Challenge murmur weighted accuracy, weights Present 5 / Unknown 3 / Absent 1."""

    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(MURMUR_CLASSES, **kwargs)

    def compute(self) -> Tensor:
        return weighted_accuracy(self.confmat, [CLASS_WEIGHTS[c] for c in self.class_names])


class OutcomeWeightedAccuracy(_ConfusionMetric):
    """Challenge outcome weighted accuracy, weights Abnormal 5 / Normal 1."""

    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(OUTCOME_CLASSES, **kwargs)

    def compute(self) -> Tensor:
        return weighted_accuracy(self.confmat, [CLASS_WEIGHTS[c] for c in self.class_names])


class UnweightedAverageRecall(_ConfusionMetric):
    """Mean recall over classes present in the targets (a class never seen as target is skipped)."""

    higher_is_better = True

    def __init__(self, class_names: Sequence[str] = MURMUR_CLASSES, **kwargs) -> None:
        super().__init__(class_names, **kwargs)

    def compute(self) -> Tensor:
        return unweighted_average_recall(self.confmat)


class PerClassRecall(_ConfusionMetric):
    """Recall of every class, ``[C]`` in class order; NaN where a class has no true cases."""

    higher_is_better = True

    def __init__(self, class_names: Sequence[str] = MURMUR_CLASSES, **kwargs) -> None:
        super().__init__(class_names, **kwargs)

    def compute(self) -> Tensor:
        return per_class_recall(self.confmat)


class OutcomeCost(Metric):
    """Challenge cost (lower is better) of referral decisions against the clinical outcome.

    ``preds`` are predictions over ``class_names`` (murmur or outcome classes): a patient is
    referred when the predicted class is Present, Unknown or Abnormal. ``target`` is the outcome
    (Abnormal=0, Normal=1), as indices or one-hot rows. See the module docstring for the formula.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, class_names: Sequence[str] = OUTCOME_CLASSES, **kwargs) -> None:
        super().__init__(**kwargs)
        self.class_names = check_challenge_classes(class_names)
        # counts indexed [outcome (Abnormal, Normal), referred (yes, no)]
        self.add_state("counts", torch.zeros(2, 2, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        preds = class_indices(preds, len(self.class_names), "preds")
        outcome = class_indices(target, len(OUTCOME_CLASSES), "target")
        if preds.shape != outcome.shape:
            raise ValueError(f"preds has {preds.numel()} items but target has {outcome.numel()}")
        referred = referral_mask(self.class_names).to(preds.device)[preds]
        not_referred = (~referred).long()
        self.counts += torch.bincount(outcome * 2 + not_referred, minlength=4).view(2, 2)

    def compute(self) -> Tensor:
        (tp, fn), (fp, tn) = self.counts.tolist()
        return challenge_cost(tp, fp, fn, tn)


class RowMetric(Metric):
    """A metric that keeps rows (scores, targets, ids) and concatenates them across processes.

    Each row state starts as a list holding one empty tensor of its row shape and dtype. torchmetrics
    would gather an empty list as a 1-D float tensor, so a process that saw no rows (a rank whose
    validation shard missed the metric's data) would send it against the others' 2-D or integer rows,
    and gloo or NCCL aborts on the mismatch.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._row_shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

    def add_row_state(self, name: str, width: int | None, dtype: torch.dtype) -> None:
        """A state of rows ``[N]`` (``width`` None) or ``[N, width]``."""
        self._row_shapes[name] = ((0,) if width is None else (0, width), dtype)
        self.add_state(name, [], dist_reduce_fx="cat")
        self._seed_rows(name)

    def _seed_rows(self, name: str) -> None:
        shape, dtype = self._row_shapes[name]
        getattr(self, name).append(torch.zeros(shape, dtype=dtype, device=self.device))

    def reset(self) -> None:
        super().reset()
        for name in self._row_shapes:
            self._seed_rows(name)

    def append_rows(self, name: str, rows: Tensor) -> None:
        getattr(self, name).append(rows.to(device=self.device, dtype=self._row_shapes[name][1]))

    def rows(self, name: str) -> Tensor:
        """Every row of a state (already one tensor after a DDP sync)."""
        state = getattr(self, name)
        return state if isinstance(state, Tensor) else torch.cat(state)


class MacroAUROC(RowMetric):
    """Macro one-vs-rest AUROC over classes with both positive and negative targets.

    Keeps every score (``cat`` across processes under DDP); ``preds`` are logits or probabilities
    ``[N, C]``. Whether they are probabilities is decided once over all of them at ``compute``, so a
    batch of logits that happens to look like probabilities is not ranked against softmaxed ones.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, class_names: Sequence[str] = MURMUR_CLASSES, **kwargs) -> None:
        super().__init__(**kwargs)
        self.class_names = check_challenge_classes(class_names)
        self.add_row_state("scores", len(self.class_names), torch.float32)
        self.add_row_state("target", None, torch.long)

    def update(self, preds: Tensor, target: Tensor) -> None:
        num_classes = len(self.class_names)
        if preds.ndim != 2 or preds.shape[1] != num_classes:
            raise ValueError(f"MacroAUROC needs scores [N, {num_classes}], got shape {tuple(preds.shape)}")
        self.append_rows("scores", preds.detach())
        self.append_rows("target", class_indices(target, num_classes, "target"))

    def compute(self) -> Tensor:
        return macro_auroc(as_probabilities(self.rows("scores")), self.rows("target"))[1]


def as_probabilities(scores: Tensor) -> Tensor:
    """Rows that already are probability vectors pass through; anything else gets a softmax."""
    scores = scores.detach().float()
    is_prob = bool(((scores >= 0) & (scores <= 1)).all()) and torch.allclose(
        scores.sum(dim=1), torch.ones(scores.shape[0], device=scores.device), atol=1e-4
    )
    return scores if is_prob else scores.softmax(dim=1)
