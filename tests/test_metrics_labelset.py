"""Scores for any label set, their patient aggregation, and the Challenge's scores of a collapsed timing set."""

import math
import warnings

import pytest
import torch

from ssamba.metrics import (
    MURMUR_CLASSES,
    PatientChallengeMetrics,
    PatientLabelSetMetrics,
    aggregate_label_set,
    aggregate_patients,
    collapse_to_murmur,
    collapsed_challenge_scores,
    label_set_scores,
    murmur_groups,
)
from ssamba.metrics.patient import PatientPredictions

TIMING = ("absent", "unknown", "present-early-systolic", "present-mid-systolic", "present-late-systolic",
          "present-holosystolic", "present")


def one_hot_probs(preds, num_classes):
    return torch.nn.functional.one_hot(torch.as_tensor(preds), num_classes).double()


def test_label_set_scores_by_hand_with_classes_that_never_occur():
    # 7 classes; targets use absent (0), unknown (1) and holo (5) only
    target = torch.tensor([0, 0, 0, 1, 5, 5])
    preds = torch.tensor([0, 0, 2, 1, 5, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division-by-zero or undefined-metric warning
        scores = label_set_scores(preds, one_hot_probs(preds, 7), target, TIMING)
    assert scores["recall_absent"].item() == pytest.approx(2 / 3)
    assert scores["recall_unknown"].item() == 1.0 and scores["recall_present-holosystolic"].item() == 0.5
    for name in ("present-early-systolic", "present-mid-systolic", "present-late-systolic", "present"):
        assert math.isnan(scores[f"recall_{name}"]) and math.isnan(scores[f"auroc_{name}"])
        assert scores[f"support_{name}"] == 0
    assert scores["uar"].item() == pytest.approx((2 / 3 + 1 + 0.5) / 3)  # over the 3 classes that occur
    assert scores["accuracy"].item() == pytest.approx(4 / 6)
    # one-hot scores of absent: positives 1, 1, 0; negatives 0, 0, 1 -> (wins + ties / 2) over 3 x 3 pairs
    assert scores["auroc_absent"].item() == pytest.approx((2 * 2 + 0.5 * (2 * 1 + 1 * 2)) / 9)
    assert scores["auroc"].item() == pytest.approx(
        torch.tensor([scores[f"auroc_{n}"] for n in ("absent", "unknown", "present-holosystolic")]).mean().item())


def test_label_set_scores_without_any_target_are_nan():
    empty = torch.zeros(0, dtype=torch.long)
    scores = label_set_scores(empty, torch.zeros(0, 3), empty, ["a", "b", "c"])
    assert all(math.isnan(scores[k]) for k in ("uar", "accuracy", "auroc"))


def test_murmur_groups_follow_the_names():
    assert murmur_groups(TIMING) == ("Absent", "Unknown", *["Present"] * 5)
    assert murmur_groups(MURMUR_CLASSES) == MURMUR_CLASSES
    assert murmur_groups(["Normal", "Abnormal"]) is None


def test_timing_collapsed_to_the_challenge_murmur_scores():
    # patients: 2 absent, 1 unknown, 3 present with different timings
    target = torch.tensor([0, 0, 1, 2, 5, 6])
    preds = torch.tensor([0, 5, 1, 3, 5, 0])  # timing mistakes inside Present still count as Present
    probs = one_hot_probs(preds, 7) * 0.7 + 0.1 / 7 * 3
    predictions = PatientPredictions(torch.arange(6), probs.log(), probs, preds, target, None, torch.ones(6))
    scores = collapsed_challenge_scores(predictions, TIMING)
    # collapsed: truth P P P U A A, predicted P P A U A P -> PP 2 of 3, UU 1, AA 1 of 2
    assert scores["weighted_accuracy"].item() == pytest.approx((5 * 2 + 3 * 1 + 1) / (5 * 3 + 3 * 1 + 2))
    assert scores["recall_Present"].item() == pytest.approx(2 / 3)
    assert "cost" not in scores  # no outcomes
    outcome = torch.tensor([1, 1, 0, 0, 0, 0])
    with_outcome = PatientPredictions(torch.arange(6), probs.log(), probs, preds, target, outcome, torch.ones(6))
    assert "cost" in collapsed_challenge_scores(with_outcome, TIMING)
    with pytest.raises(ValueError, match="cannot be collapsed"):
        collapsed_challenge_scores(predictions, ["a", "b", "c", "d", "e", "f", "g"])


@pytest.mark.parametrize("rule", ["hierarchical", "mean"])
def test_aggregation_equals_the_challenge_one_on_the_challenge_classes(rule):
    torch.manual_seed(0)
    logits, target = torch.randn(300, 3), torch.randint(0, 3, (300,))
    patient = torch.randint(0, 30, (300,))
    recording = patient * 10 + torch.randint(0, 4, (300,))
    ours = aggregate_label_set(logits, target, patient, recording, MURMUR_CLASSES, rule)
    theirs = aggregate_patients(logits, target, patient, recording, rule)
    assert torch.equal(ours.preds, theirs.preds) and torch.equal(ours.target, theirs.target)
    assert torch.allclose(ours.probs, theirs.probs)


def test_hierarchical_timing_rule_most_severe_group_then_largest_mean_logit():
    big, medium, small = 4.0, 3.0, 1.0
    rows = [  # (patient, recording, logits over TIMING, target)
        (1, 10, [big, 0, 0, 0, 0, 0, 0], 0),  # absent recording
        (1, 11, [0, 0, small, 0, 0, 0, 0], 0),  # predicted early-systolic -> patient Present
        (1, 12, [0, 0, 0, 0, 0, medium, 0], 5),  # holo: the patient's largest present-* mean logit
        (2, 20, [big, 0, 0, 0, 0, 0, 0], 0),
        (2, 21, [0, medium, 0, 0, 0, 0, 0], 1),  # Unknown outranks Absent
        (3, 30, [big, 0, 0, 0, 0, 0, small], 0),
    ]
    patient = torch.tensor([r[0] for r in rows])
    recording = torch.tensor([r[1] for r in rows])
    logits = torch.tensor([r[2] for r in rows])
    target = torch.tensor([r[3] for r in rows])
    out = aggregate_label_set(logits, target, patient, recording, TIMING, "hierarchical")
    assert out.preds.tolist() == [5, 1, 0]
    assert out.target.tolist() == [5, 1, 0]  # most severe item label (recording-level labels)
    # the recordings in the caller's class order, with their own labels; collapsed, their murmur groups
    assert out.recordings.logits.tolist() == logits.tolist() and out.recordings.target.tolist() == target.tolist()
    collapsed = collapse_to_murmur(out, TIMING).recordings
    assert collapsed.target.tolist() == [2, 2, 0, 2, 1, 2]  # Present 0, Unknown 1, Absent 2
    assert collapsed.logits.exp().sum(dim=1).tolist() == pytest.approx([1.0] * 6)
    total = math.exp(medium) + 6  # recording 12: softmax over TIMING, then its five present-* classes summed
    assert collapsed.logits[2].exp().tolist() == pytest.approx([(math.exp(medium) + 4) / total, 1 / total, 1 / total])
    mean = aggregate_label_set(logits, target, patient, recording, TIMING, "mean")
    assert mean.preds.tolist() == [0, 0, 0]  # arg-max of the recordings' mean logits
    assert mean.probs[0].tolist() == pytest.approx(torch.tensor([4, 0, 1, 0, 0, 3, 0]).div(3).softmax(0).tolist())
    with pytest.raises(ValueError, match="hierarchical.*use rule='mean'"):
        aggregate_label_set(logits[:, :2], target.clamp(max=1), patient, recording, ["Normal", "Abnormal"],
                            "hierarchical")


def test_patient_metric_for_a_label_set_logs_scalars_and_the_collapsed_scores():
    metric = PatientLabelSetMetrics(TIMING, rule="hierarchical")
    target = torch.tensor([0, 0, 5, 5, 1, 2])
    logits = torch.nn.functional.one_hot(target, 7).float() * 3  # perfect
    metric.update(logits, torch.nn.functional.one_hot(target, 7).float(), patient=["a", "a", "b", "b", "c", "d"],
                  recording=["a1", "a2", "b1", "b2", "c1", "d1"], id=list("123456"),
                  outcome=torch.tensor([1, 1, 0, 0, 0, 0]))
    scores = metric.compute()
    assert all(v.numel() == 1 for v in scores.values())
    assert scores["uar"] == 1 and scores["patients"] == 4 and scores["murmur_weighted_accuracy"] == 1
    assert "murmur_cost" in scores and math.isnan(scores["recall_present-late-systolic"])
    assert metric.confusion_matrix().diagonal().tolist() == [1, 1, 1, 0, 0, 1, 0]
    with pytest.raises(ValueError, match="Challenge label set"):
        PatientChallengeMetrics(TIMING)  # the Challenge's metric keeps refusing other label sets
    with pytest.raises(ValueError, match="use rule='mean'"):
        PatientLabelSetMetrics(["Normal", "Abnormal"], rule="hierarchical")


def test_patient_metrics_is_chosen_by_the_label_set_alone():
    from ssamba.metrics import MURMUR_CLASSES, OUTCOME_CLASSES, PatientChallengeMetrics, patient_metrics

    for classes in (MURMUR_CLASSES, OUTCOME_CLASSES):
        metric = patient_metrics(classes, "mean")
        assert type(metric) is PatientChallengeMetrics and metric.class_names == tuple(classes)
    timing = patient_metrics(TIMING, "mean")
    assert isinstance(timing, PatientLabelSetMetrics) and timing.class_names == tuple(TIMING)
    reordered = patient_metrics(tuple(reversed(MURMUR_CLASSES)), "mean")  # not the Challenge's order
    assert isinstance(reordered, PatientLabelSetMetrics)
