"""Challenge 2022 scores against hand-worked confusion matrices and an independent re-derivation."""

import math

import pytest
import torch

from ssamba.metrics import (
    MacroAUROC,
    MurmurWeightedAccuracy,
    OutcomeCost,
    OutcomeWeightedAccuracy,
    PerClassRecall,
    UnweightedAverageRecall,
    challenge_cost,
)

P, U, A = 0, 1, 2
ABN, NOR = 0, 1


def pairs_from_confusion(rows_true):
    """(preds, target) index tensors realising a [true, pred] count matrix."""
    preds, target = [], []
    for true_class, row in enumerate(rows_true):
        for pred_class, count in enumerate(row):
            preds += [pred_class] * count
            target += [true_class] * count
    return torch.tensor(preds), torch.tensor(target)


def challenge_layout_weighted_accuracy(preds, target, weights):
    """Re-derivation in the Challenge's layout: A[pred, true], B = A * weight of the true class."""
    n = len(weights)
    a = [[0.0] * n for _ in range(n)]
    for p, t in zip(preds.tolist(), target.tolist()):
        a[p][t] += 1
    b = [[a[i][j] * weights[j] for j in range(n)] for i in range(n)]
    return sum(b[i][i] for i in range(n)) / sum(map(sum, b))


# true Present: 3 -> P, 1 -> U, 1 -> A; true Unknown: 1 -> U, 1 -> A; true Absent: 1 -> P, 4 -> A
MURMUR_CONFUSION = [[3, 1, 1], [0, 1, 1], [1, 0, 4]]


def test_murmur_weighted_accuracy_hand_worked():
    preds, target = pairs_from_confusion(MURMUR_CONFUSION)
    # (5*3 + 3*1 + 1*4) / (5*5 + 3*2 + 1*5)
    expected = 22 / 36
    assert MurmurWeightedAccuracy()(preds, target).item() == pytest.approx(expected)
    assert challenge_layout_weighted_accuracy(preds, target, [5, 3, 1]) == pytest.approx(expected)


def test_weighted_accuracy_matches_challenge_layout_on_random_data():
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (200,), generator=gen)
    preds = torch.where(torch.rand(200, generator=gen) < 0.6, target, torch.randint(0, 3, (200,), generator=gen))
    expected = challenge_layout_weighted_accuracy(preds, target, [5, 3, 1])
    assert MurmurWeightedAccuracy()(preds, target).item() == pytest.approx(expected)


def test_logits_probabilities_and_one_hot_targets_give_the_same_score():
    preds, target = pairs_from_confusion(MURMUR_CONFUSION)
    logits = torch.nn.functional.one_hot(preds, 3).float() * 4.0 - 1.0
    one_hot_target = torch.nn.functional.one_hot(target, 3).float()
    by_index = MurmurWeightedAccuracy()(preds, target)
    assert MurmurWeightedAccuracy()(logits, one_hot_target) == by_index
    assert MurmurWeightedAccuracy()(logits.softmax(1), target) == by_index


def test_batches_accumulate_including_a_batch_without_some_classes():
    preds, target = pairs_from_confusion(MURMUR_CONFUSION)
    metric = MurmurWeightedAccuracy()
    only_absent = target == A
    metric.update(preds[only_absent], target[only_absent])
    metric.update(preds[~only_absent], target[~only_absent])
    assert metric.compute().item() == pytest.approx(22 / 36)


def test_outcome_weighted_accuracy_hand_worked():
    # true Abnormal: 2 -> Abnormal, 2 -> Normal; true Normal: 1 -> Abnormal, 5 -> Normal
    preds, target = pairs_from_confusion([[2, 2], [1, 5]])
    expected = (5 * 2 + 1 * 5) / (5 * 4 + 1 * 6)
    assert OutcomeWeightedAccuracy()(preds, target).item() == pytest.approx(expected)


@pytest.mark.parametrize(
    ("tp", "fp", "fn", "tn", "expected"),
    [
        # everyone Abnormal and referred: q = 1, expert cost 25 + 397 - 1718 + 11296 = 10000 per patient
        (3, 0, 0, 0, 10 + 10000 + 10000),
        # everyone Abnormal, nobody referred: q = 0
        (0, 0, 2, 0, 10 + 25 + 50000),
        # everyone Normal, nobody referred
        (0, 0, 0, 5, 10 + 25),
        # one of each: q = 1/2, expert 25 + 198.5 - 429.5 + 706 = 500 per patient
        (1, 1, 1, 1, (4 * 10 + 4 * 500 + 10000 + 50000) / 4),
    ],
)
def test_challenge_cost_hand_worked(tp, fp, fn, tn, expected):
    assert challenge_cost(tp, fp, fn, tn).item() == pytest.approx(expected)


def test_cost_of_murmur_predictions_refers_present_and_unknown():
    # murmur predictions P, U, A, A against outcomes Abnormal, Normal, Abnormal, Normal:
    # referred: P (TP), U (FP); not referred: A/Abnormal (FN), A/Normal (TN)
    cost = OutcomeCost(class_names=["Present", "Unknown", "Absent"])
    cost.update(torch.tensor([P, U]), torch.tensor([ABN, NOR]))
    cost.update(torch.tensor([A, A]), torch.tensor([ABN, NOR]))
    assert cost.compute().item() == pytest.approx(15510.0)


def test_cost_of_outcome_logits_with_one_hot_targets():
    logits = torch.tensor([[2.0, -1.0], [0.0, 3.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert OutcomeCost()(logits, target).item() == pytest.approx(challenge_cost(1, 0, 0, 1).item())


def test_recall_and_uar_skip_a_class_with_no_true_cases():
    # no true Unknown, but one Present patient is predicted Unknown
    preds = torch.tensor([P, U, A, A, P])
    target = torch.tensor([P, P, A, A, A])
    recall = PerClassRecall()(preds, target)
    assert recall[0].item() == pytest.approx(0.5)
    assert math.isnan(recall[1].item())
    assert recall[2].item() == pytest.approx(2 / 3)
    assert UnweightedAverageRecall()(preds, target).item() == pytest.approx((0.5 + 2 / 3) / 2)


def test_no_patients_gives_nan():
    for metric in (MurmurWeightedAccuracy(), OutcomeCost(), MacroAUROC()):
        with pytest.warns(UserWarning, match="before the ``update``"):
            value = metric.compute()
        assert math.isnan(value.item())


def test_macro_auroc_hand_worked_and_skips_undefined_classes():
    # Present vs rest perfectly separated (1.0); Absent vs rest: positives 0.6, 0.3 vs negatives 0.1, 0.1
    # -> 1.0 as well; Unknown never occurs and is left out of the mean.
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.2, 0.2, 0.6], [0.4, 0.3, 0.3]])
    target = torch.tensor([P, P, A, A])
    assert MacroAUROC()(probs, target).item() == pytest.approx(1.0)
    # second Present patient scored 0.3 < 0.4 of an Absent one: Present-vs-rest 3/4 pairs, Absent 1.0
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.2, 0.2, 0.6], [0.4, 0.3, 0.3]])
    assert MacroAUROC()(probs, target).item() == pytest.approx((0.75 + 1.0) / 2)
    assert MacroAUROC()(probs.log(), target).item() == pytest.approx((0.75 + 1.0) / 2)


def test_macro_auroc_ranks_a_confident_model_in_float64():
    """Absent leads the other classes by 18-23 logits; the true Absent patients lead most, so Absent-vs-rest
    ranks perfectly. In float32 their probabilities all round to 1.0 and tie, which gave 0.667."""
    from ssamba.metrics.challenge import macro_auroc

    lead = torch.tensor([23.0, 22.0, 21.0, 20.0, 19.0, 18.0], dtype=torch.float64)
    logits = torch.zeros(6, 3, dtype=torch.float64)
    logits[:, 2] = lead
    probs = logits.softmax(dim=1)
    assert probs[:, 2].float().unique().numel() < 6  # what float32 would have ranked
    per_class, _ = macro_auroc(probs, torch.tensor([A, A, A, P, P, U]))
    assert per_class[2].item() == 1.0


def test_macro_auroc_decides_probabilities_over_all_batches():
    # logits; the second batch's rows happen to lie in [0, 1] and sum to 1. Taken alone they would
    # pass raw, and its Absent patient's Present score 0.6 would outrank the softmaxed 0.51 of the
    # first batch's Present patient (AUROC 0.92 instead of 1.0).
    logits = torch.tensor([[0.5, 0.0, -0.5], [0.0, 1.0, -0.5], [-0.5, 0.0, 1.0]])
    look_like_probs = torch.tensor([[0.6, 0.2, 0.2], [0.2, 0.2, 0.6]])
    target = torch.tensor([P, U, A, A, A])
    metric = MacroAUROC()
    metric.update(logits, target[:3])
    metric.update(look_like_probs, target[3:])
    assert metric.compute().item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("preds", "target", "match"),
    [
        (torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), "columns"),
        (torch.tensor([0, 3]), torch.tensor([0, 1]), "outside"),
        (torch.tensor([0, 1]), torch.tensor([0, 1, 2]), "items"),
        (torch.tensor([0.5, 1.0]), torch.tensor([0, 1]), "not integral"),
    ],
)
def test_bad_input_names_the_argument(preds, target, match):
    with pytest.raises(ValueError, match=match):
        MurmurWeightedAccuracy()(preds, target)


def test_unknown_class_names_are_rejected():
    with pytest.raises(ValueError, match="class_names"):
        UnweightedAverageRecall(class_names=["Absent", "Present"])
