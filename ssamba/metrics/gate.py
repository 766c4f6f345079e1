"""A signal-quality gate for the Challenge's murmur classes: a patient the model does not call Present
becomes Unknown when its recordings look ungradable.

CirCor's Unknown class marks patients whose recordings the annotators could not grade, and murmur
models rarely predict it (docs/heart-murmurs.md). A class-balanced ridge logistic regression on
per-patient signal-quality statistics (``ssamba.data.quality``) scores how ungradable a patient's
recordings look; a threshold on that score, chosen for the best weighted accuracy of the gated
predictions, decides. Both are fitted on patients with labels and with predictions from models that
never trained on them (cross-validation's out-of-fold predictions), so the gate is scored fairly only
on other patients. Present predictions are never overridden: a Present patient called Unknown costs
weight 5 for a gain of at most 3.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from ssamba.metrics.challenge import CLASS_WEIGHTS, MURMUR_CLASSES, weighted_accuracy_of

GATE_FORMAT = 1  # the saved file's layout; a file of another gives a clear error
L2_PENALTY = 1e-2  # ridge penalty of the regression, on standardised features
PRESENT, UNKNOWN = MURMUR_CLASSES.index("Present"), MURMUR_CLASSES.index("Unknown")
MURMUR_WEIGHTS = [CLASS_WEIGHTS[name] for name in MURMUR_CLASSES]


@dataclass(frozen=True)
class QualityGate:
    """A fitted gate: feature standardisation, regression weights and the threshold on its score."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weight: tuple[float, ...]
    bias: float
    threshold: float  # inf: the fit found no threshold that helped, so the gate changes nothing
    fitted_on: str = ""  # what the gate was fitted on, in words (predictions of which models, which patients)

    def score(self, rows: Tensor) -> Tensor:
        """The regression's logit of Unknown for feature rows ``[patients, features]``."""
        rows = torch.as_tensor(rows, dtype=torch.float64)
        if rows.ndim != 2 or rows.shape[1] != len(self.features):
            raise ValueError(f"the gate takes rows of {len(self.features)} features, got shape {tuple(rows.shape)}")
        mean, scale, weight = (torch.tensor(v, dtype=torch.float64) for v in (self.mean, self.scale, self.weight))
        return (rows - mean) / scale @ weight + self.bias

    def apply(self, preds: Tensor, rows: Tensor) -> Tensor:
        """``preds`` (murmur class indices) with every patient not predicted Present made Unknown where
        its score exceeds the threshold."""
        preds = torch.as_tensor(preds)
        return _gated(preds, self.score(rows).to(preds.device), self.threshold)

    def save(self, path: str | Path) -> None:
        """Strict JSON: a gate without a threshold (inf) is saved with ``threshold`` null."""
        record = {"format": GATE_FORMAT, **asdict(self)}
        record["threshold"] = None if math.isinf(self.threshold) else self.threshold
        Path(path).write_text(json.dumps(record, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path, features: Sequence[str] | None = None) -> QualityGate:
        """The gate saved at ``path``; with ``features``, refuses a gate fitted on other statistics."""
        record = json.loads(Path(path).read_text())
        if record.pop("format", None) != GATE_FORMAT:
            raise ValueError(f"{path}: not a quality gate of format {GATE_FORMAT} (fit one with "
                             "bench/circor_results.py gate)")
        expected = {field.name for field in fields(cls)}
        if not expected - {"fitted_on"} <= set(record) <= expected:
            raise ValueError(f"{path}: a quality gate needs the keys {sorted(expected)}, got {sorted(record)}")
        if record["threshold"] is None:
            record["threshold"] = math.inf
        gate = cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in record.items()})
        if features is not None and tuple(features) != gate.features:
            raise ValueError(f"{path}: fitted on other signal-quality statistics than this version computes "
                             f"({len(gate.features)} vs {len(features)}); fit it again")
        return gate


def _gated(preds: Tensor, scores: Tensor, threshold: float) -> Tensor:
    return torch.where((preds != PRESENT) & (scores > threshold), torch.full_like(preds, UNKNOWN), preds)


def fit_gate(rows: Tensor, target: Tensor, preds: Tensor, features: Sequence[str],
             fitted_on: str = "") -> QualityGate:
    """Fit a gate on patients' feature rows ``[P, F]``, their murmur classes ``target`` and a model's
    predictions ``preds`` of them (from models that did not train on them). The threshold is the
    regression score with the best weighted accuracy of the gated predictions; no threshold (inf)
    where none beats the predictions as they are, and ties keep the fewer overrides."""
    rows = torch.as_tensor(rows, dtype=torch.float64)
    target, preds = torch.as_tensor(target, dtype=torch.long), torch.as_tensor(preds, dtype=torch.long)
    if not rows.shape[0] == target.numel() == preds.numel():
        raise ValueError(f"fit_gate: {rows.shape[0]} feature rows, {target.numel()} targets, "
                         f"{preds.numel()} predictions")
    unknown = (target == UNKNOWN).to(torch.float64)
    if not 0 < unknown.sum() < unknown.numel():
        raise ValueError("fit_gate needs patients of the Unknown class and of the others")
    mean, scale = rows.mean(dim=0), rows.std(dim=0).clamp(min=1e-9)
    z = (rows - mean) / scale
    weight = torch.zeros(rows.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200)
    balance = (unknown.numel() - unknown.sum()) / unknown.sum()

    def loss():
        optimizer.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(z @ weight + bias, unknown, pos_weight=balance)
        value = value + L2_PENALTY * weight.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    gate = QualityGate(tuple(features), tuple(mean.tolist()), tuple(scale.tolist()), tuple(weight.detach().tolist()),
                       float(bias.detach()), math.inf, fitted_on)
    scores = gate.score(rows)
    best = (weighted_accuracy_of(target, preds, MURMUR_WEIGHTS), math.inf)
    for threshold in sorted(set(scores.tolist()), reverse=True):  # from the fewest overrides
        value = weighted_accuracy_of(target, _gated(preds, scores, threshold), MURMUR_WEIGHTS)
        if value > best[0]:
            best = (value, threshold)
    return QualityGate(**{**asdict(gate), "threshold": best[1]})
