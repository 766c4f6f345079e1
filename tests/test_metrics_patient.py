"""Patient-level aggregation: hand-worked CirCor-like cases, edge cases and a real 2-process DDP run."""

import math
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssamba.metrics import MacroAUROC, MurmurWeightedAccuracy, PatientChallengeMetrics, challenge_cost
from ssamba.metrics.patient import id_code

P, U, A = 0, 1, 2
ABN, NOR = 0, 1

# (item id, patient, recording, segment logits, target, outcome)
ROWS = [
    # patient 100, Present, Abnormal: AV averages to [2, 1, 0] -> Present; MV -> Absent
    ("100_AV#0", "100", "100_AV", [4.0, 0.0, 0.0], P, ABN),
    ("100_AV#1", "100", "100_AV", [0.0, 2.0, 0.0], P, ABN),
    ("100_MV#0", "100", "100_MV", [0.0, 0.0, 3.0], P, ABN),
    # patient 200, Absent, Normal: AV -> Absent, PV -> Unknown
    ("200_AV#0", "200", "200_AV", [0.0, 0.0, 1.0], A, NOR),
    ("200_PV#0", "200", "200_PV", [0.0, 0.5, 0.0], A, NOR),
    # patient 300, Unknown, Abnormal
    ("300_TV#0", "300", "300_TV", [0.0, 1.0, 0.0], U, ABN),
]
# hierarchical: 100 -> P (any Present), 200 -> U, 300 -> U
# mean of recording logits: 100 -> [1, .5, 1.5] Absent, 200 -> [0, .25, .5] Absent, 300 -> Unknown


def columns(rows):
    items, patients, recordings, logits, target, outcome = zip(*rows)
    return {
        "logits": torch.tensor(logits),
        "target": torch.tensor(target),
        "patient": list(patients),
        "recording": list(recordings),
        "id": list(items),
        "outcome": torch.tensor(outcome),
    }


def as_floats(result):
    """A metrics dict as plain floats: pytest.approx compares those in every pytest version (not tensors)."""
    return {key: float(value) for key, value in result.items()}


def scores(rows, rule="hierarchical", **drop):
    metric = PatientChallengeMetrics(rule=rule)
    batch = columns(rows)
    for key in drop:
        batch.pop(key)
    metric.update(**batch)
    return metric.compute()


def test_hierarchical_rule_hand_worked():
    result = scores(ROWS)
    # confusion [true, pred]: Present -> P, Unknown -> U, Absent -> U
    assert result["weighted_accuracy"].item() == pytest.approx((5 + 3) / (5 + 3 + 1))
    assert result["uar"].item() == pytest.approx((1 + 1 + 0) / 3)
    # all three referred: Abnormal 100, 300 (TP), Normal 200 (FP)
    assert result["cost"].item() == pytest.approx(challenge_cost(2, 1, 0, 0).item())
    assert result["patients"].item() == 3


def test_mean_logit_rule_hand_worked():
    result = scores(ROWS, rule="mean")
    # Present -> A, Unknown -> U, Absent -> A
    assert result["weighted_accuracy"].item() == pytest.approx((0 + 3 + 1) / 9)
    assert result["recall_Present"].item() == 0.0
    # 300 referred (TP), 100 missed (FN), 200 not referred (TN)
    assert result["cost"].item() == pytest.approx(challenge_cost(1, 0, 1, 1).item())


def test_segments_are_averaged_per_recording_before_the_patient_rule():
    metric = PatientChallengeMetrics()
    metric.update(**columns(ROWS))
    predictions = metric.predictions()
    first = predictions.patient.tolist().index(id_code("100"))
    # patient logits are the mean of the recordings' means [2, 1, 0] and [0, 0, 3]
    assert predictions.logits[first].tolist() == pytest.approx([1.0, 0.5, 1.5])
    assert predictions.num_recordings[first].item() == 2
    assert metric.patient_id(predictions.patient[first]) == "100"


def test_the_recordings_behind_the_patients_are_kept_with_their_ids_means_and_classes():
    metric = PatientChallengeMetrics()
    metric.update(**columns(ROWS))
    recordings = metric.predictions().recordings
    rows = {metric.recording_id(code): (metric.patient_id(patient), logits, target) for code, patient, logits, target
            in zip(recordings.recording, recordings.patient, recordings.logits.tolist(), recordings.target.tolist())}
    assert rows == {"100_AV": ("100", [2.0, 1.0, 0.0], P), "100_MV": ("100", [0.0, 0.0, 3.0], P),
                    "200_AV": ("200", [0.0, 0.0, 1.0], A), "200_PV": ("200", [0.0, 0.5, 0.0], A),
                    "300_TV": ("300", [0.0, 1.0, 0.0], U)}  # fmt: skip
    without = PatientChallengeMetrics()
    without.update(**{k: v for k, v in columns(ROWS).items() if k != "recording"})
    alone = without.predictions().recordings  # a patient's rows are its one recording, named as the patient
    assert sorted(without.recording_id(code) for code in alone.recording) == ["100", "200", "300"]


def test_recording_level_targets_give_the_patient_label():
    # murmur audible on AV only: MV carries Absent, the patient stays Present
    rows = [r if r[2] != "100_MV" else (*r[:4], A, r[5]) for r in ROWS]
    assert scores(rows)["weighted_accuracy"].item() == pytest.approx(scores(ROWS)["weighted_accuracy"].item())


def test_ids_are_codes_of_their_exact_text():
    assert id_code("100") == 100 and id_code(100) == 100 and id_code("-5") == -5
    assert len({id_code(x) for x in ("7", "07", "+7", "-0", "0", "7.0")}) == 6  # six different ids


def test_duplicated_items_are_counted_once():
    # a sampler that pads by repeating 100_AV#1 would otherwise tip recording 100_AV to Unknown
    rows = ROWS + [ROWS[1], ROWS[1], ROWS[1]]
    assert as_floats(scores(rows)) == pytest.approx(as_floats(scores(ROWS)), nan_ok=True)
    assert scores(rows, id=None)["recall_Present"].item() == 0.0


def test_single_patient_and_single_class():
    result = scores([r for r in ROWS if r[1] == "100"])
    assert result["weighted_accuracy"].item() == 1.0
    assert result["patients"].item() == 1
    assert math.isnan(result["recall_Absent"].item())
    assert math.isnan(result["auroc"].item())  # one class only: no ROC curve


def test_without_recording_ids_a_patient_is_one_recording():
    result = scores(ROWS, rule="hierarchical", recording=None)
    # 100 -> mean of its three segments [4/3, 2/3, 1] -> Present; 200 -> [0, .25, .5] -> Absent
    assert result["weighted_accuracy"].item() == pytest.approx((5 + 3 + 1) / 9)


def test_without_outcome_there_is_no_cost():
    assert "cost" not in scores(ROWS, outcome=None)


def test_unknown_outcome_marked_minus_one_gives_no_cost():
    batch = columns(ROWS)
    batch["outcome"] = torch.full((len(ROWS),), -1)
    metric = PatientChallengeMetrics()
    metric.update(**batch)
    assert "cost" not in metric.compute()
    with pytest.raises(ValueError, match="outcome holds"):
        metric.update(**{**batch, "outcome": torch.full((len(ROWS),), 2)})


def test_outcome_model_scores_its_own_target():
    metric = PatientChallengeMetrics(class_names=["Abnormal", "Normal"])
    metric.update(torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]]), torch.tensor([ABN, NOR, ABN]), ["1", "2", "3"])
    result = metric.compute()
    assert result["weighted_accuracy"].item() == pytest.approx((5 * 1 + 1 * 1) / (5 * 2 + 1))
    assert result["cost"].item() == pytest.approx(challenge_cost(1, 0, 1, 1).item())


def test_several_batches_with_a_patient_split_across_them():
    metric = PatientChallengeMetrics()
    metric.update(**columns(ROWS[:2]))
    metric.update(**columns(ROWS[2:]))
    assert as_floats(metric.compute()) == pytest.approx(as_floats(scores(ROWS)), nan_ok=True)


@pytest.mark.parametrize(
    ("rows", "kwargs", "match"),
    [
        (
            [("x", "1", "r", [0.0, 0.0, 1.0], A, NOR), ("y", "2", "r", [0.0, 0.0, 1.0], A, NOR)],
            {},
            "more than one patient",
        ),
        ([("x", "1", "r", [0.0, 0.0, 1.0], A, NOR), ("y", "1", "r", [0.0, 0.0, 1.0], A, ABN)], {}, "different outcome"),
    ],
)
def test_inconsistent_ids_are_reported(rows, kwargs, match):
    metric = PatientChallengeMetrics(**kwargs)
    metric.update(**columns(rows))
    with pytest.raises(ValueError, match=match):
        metric.compute()


def test_bad_arguments_name_the_key():
    with pytest.raises(ValueError, match="rule"):
        PatientChallengeMetrics(rule="vote")
    metric = PatientChallengeMetrics()
    with pytest.raises(ValueError, match="patient"):
        metric.update(torch.zeros(2, 3), torch.tensor([0, 1]), ["1"])
    with pytest.raises(ValueError, match="logits"):
        metric.update(torch.zeros(2, 2), torch.tensor([0, 1]), ["1", "2"])
    metric.update(torch.zeros(1, 3), torch.tensor([0]), ["1"], outcome=torch.tensor([0]))
    metric.update(torch.zeros(1, 3), torch.tensor([0]), ["2"])
    with pytest.raises(ValueError, match="outcome was given for some"):
        metric.compute()


def _ddp_worker(rank, world_size, init_file, out_dir, idle_rank):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        # rank 0: part of patient 100; rank 1: the rest plus a padded duplicate of a rank-0 item.
        # With an idle rank, rank 0 holds every row and rank 1 never updates.
        if idle_rank is None:
            shard = ROWS[:2] if rank == 0 else ROWS[2:] + [ROWS[0]]
        else:
            shard = [] if rank == idle_rank else ROWS + [ROWS[0]]
        patient_metric, item_metric, auroc = PatientChallengeMetrics(), MurmurWeightedAccuracy(), MacroAUROC()
        if shard:
            batch = columns(shard)
            patient_metric.update(**batch)
            item_metric.update(batch["logits"], batch["target"])
            auroc.update(batch["logits"], batch["target"])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The ``compute`` method of metric")
            result = {"patient": patient_metric.compute(), "item": item_metric.compute(), "auroc": auroc.compute()}
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("idle_rank", [None, 1], ids=["both-ranks-score", "one-rank-never-updates"])
def test_ddp_gathers_items_across_processes(tmp_path, idle_rank):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), idle_rank), nprocs=2, join=True)
    every_row = columns(ROWS + [ROWS[0]])
    expected_items = MurmurWeightedAccuracy()(every_row["logits"], every_row["target"])
    expected_auroc = MacroAUROC()(every_row["logits"], every_row["target"])
    for rank in range(2):
        result = torch.load(tmp_path / f"{rank}.pt")
        assert as_floats(result["patient"]) == pytest.approx(as_floats(scores(ROWS)), nan_ok=True)
        assert result["item"].item() == pytest.approx(expected_items.item())
        assert result["auroc"].item() == pytest.approx(expected_auroc.item())
