"""Challenge output files, the scores table and the confusion figure."""

import torch

from ssamba.metrics import PatientChallengeMetrics
from ssamba.metrics.report import confusion_figure, scores_table, write_challenge_outputs


def patient_predictions():
    metric = PatientChallengeMetrics()
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    metric.update(logits, torch.tensor([0, 2, 1]), ["9979", "2530", "9983"])
    return metric


def test_challenge_output_file_format(tmp_path):
    metric = patient_predictions()
    predictions = metric.predictions()
    ids = [metric.patient_id(code) for code in predictions.patient]
    assert ids == ["2530", "9979", "9983"]  # sorted by code
    paths = write_challenge_outputs(predictions, ids, ["Present", "Unknown", "Absent"], tmp_path)
    lines = (tmp_path / "9979.csv").read_text().splitlines()
    assert [p.name for p in paths] == ["2530.csv", "9979.csv", "9983.csv"]
    assert lines[0] == "#9979"
    assert lines[1] == "Present,Unknown,Absent,Abnormal,Normal"
    assert lines[2] == "1,0,0,1,0"
    probs = [float(v) for v in lines[3].split(",")]
    e = torch.e**2
    assert probs[0] == round(e / (e + 2), 6)
    assert abs(probs[3] - (probs[0] + probs[1])) < 2e-6 and abs(probs[3] + probs[4] - 1) < 2e-6
    # Absent: not referred, so the implied outcome is Normal
    assert (tmp_path / "2530.csv").read_text().splitlines()[2] == "0,0,1,0,1"


def test_outcome_model_files_hold_outcome_classes_only(tmp_path):
    metric = PatientChallengeMetrics(class_names=["Abnormal", "Normal"])
    metric.update(torch.tensor([[0.0, 1.0]]), torch.tensor([1]), ["7"])
    write_challenge_outputs(metric.predictions(), ["7"], ["Abnormal", "Normal"], tmp_path)
    assert (tmp_path / "7.csv").read_text().splitlines()[1:3] == ["Abnormal,Normal", "0,1"]


def test_table_and_figure():
    metric = patient_predictions()
    scores = metric.compute()
    table = scores_table(scores, "val")
    assert table.row_count == len(scores)
    predictions = metric.predictions()
    fig = confusion_figure(predictions.preds, predictions.target, ["Present", "Unknown", "Absent"])
    texts = sorted(t.get_text() for t in fig.axes[0].texts)
    assert texts == sorted(["1", "0", "0", "0", "1", "0", "0", "0", "1"])
