"""ssamba.metrics.gate: the signal-quality gate's fit, its one override, and its saved form."""

import math

import pytest
import torch

from ssamba.metrics.gate import PRESENT, UNKNOWN, QualityGate, fit_gate

ABSENT = 2
FEATURES = ("noise", "level")


def patients(generator):
    """40 patients: 8 Unknown ones with noisy recordings (high first feature), 12 Present, 20 Absent; the
    model predicts every Unknown patient Absent except one it calls Present."""
    target = torch.tensor([UNKNOWN] * 8 + [PRESENT] * 12 + [ABSENT] * 20)
    rows = torch.randn(40, 2, generator=generator, dtype=torch.float64)
    rows[:8, 0] += 4.0
    preds = target.clone()
    preds[:8] = ABSENT
    preds[0] = PRESENT
    return rows, target, preds


def test_the_fitted_gate_recovers_unknown_patients_and_never_overrides_present():
    rows, target, preds = patients(torch.Generator().manual_seed(0))
    gate = fit_gate(rows, target, preds, FEATURES)
    assert math.isfinite(gate.threshold)
    gated = gate.apply(preds, rows)
    assert gated[1:8].eq(UNKNOWN).all()  # the noisy patients predicted Absent
    assert gated[0] == PRESENT and torch.equal(gated[8:20], preds[8:20])  # Present predictions stay
    assert gated[20:].eq(ABSENT).all()  # quiet Absent patients stay Absent
    noisy_present = rows.clone()
    noisy_present[8:20, 0] += 10.0  # whatever the score, a Present prediction is kept
    assert torch.equal(gate.apply(preds, noisy_present)[8:20], preds[8:20])


def test_a_gate_that_cannot_help_changes_nothing_and_unfittable_data_is_refused(tmp_path):
    rows, target, _ = patients(torch.Generator().manual_seed(1))
    perfect = fit_gate(rows, target, target, FEATURES)  # predictions already right: no override helps
    assert perfect.threshold == math.inf and torch.equal(perfect.apply(target, rows), target)
    perfect.save(tmp_path / "gate.json")  # strict JSON: no threshold is null, and loads as inf again
    assert "Infinity" not in (tmp_path / "gate.json").read_text()
    assert QualityGate.load(tmp_path / "gate.json") == perfect
    with pytest.raises(ValueError, match="needs patients of the Unknown class"):
        fit_gate(rows[8:], target[8:], target[8:], FEATURES)
    with pytest.raises(ValueError, match="40 feature rows, 39 targets"):
        fit_gate(rows, target[1:], target, FEATURES)


def test_a_saved_gate_loads_to_the_same_decisions_and_a_foreign_file_is_refused(tmp_path):
    rows, target, preds = patients(torch.Generator().manual_seed(2))
    gate = fit_gate(rows, target, preds, FEATURES)
    gate.save(tmp_path / "gate.json")
    again = QualityGate.load(tmp_path / "gate.json", FEATURES)
    assert again == gate and torch.equal(again.apply(preds, rows), gate.apply(preds, rows))
    with pytest.raises(ValueError, match="fitted on other signal-quality statistics"):
        QualityGate.load(tmp_path / "gate.json", ("noise",))
    with pytest.raises(ValueError, match="takes rows of 2 features"):
        gate.apply(preds, rows[:, :1])
    (tmp_path / "other.json").write_text('{"threshold": 1.0}')
    with pytest.raises(ValueError, match="not a quality gate"):
        QualityGate.load(tmp_path / "other.json")
    (tmp_path / "partial.json").write_text('{"format": 1, "threshold": 1.0}')
    with pytest.raises(ValueError, match="needs the keys"):
        QualityGate.load(tmp_path / "partial.json")
