"""CirCor cross-validation splits (data.split=kfold): stratified folds that partition the patients, a
val part carved from each fold's training patients, clear errors, and pretraining that reads only the
training patients' audio."""

import logging
from collections import Counter
from pathlib import Path

import pytest
from circor_fixtures import cloned_circor
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ssamba.data import CirCorDataModule
from ssamba.data.circor import (
    Patient,
    kfold_split,
    read_patients,
    stratified_folds,
    stratified_split,
    stratified_subset,
)

ROOT = Path(__file__).resolve().parents[1]
CIRCOR_MINI = ROOT / "tests" / "data" / "circor-mini"
STRATA = {("Absent", "Normal"): 23, ("Absent", "Abnormal"): 11, ("Present", "Abnormal"): 9,
          ("Unknown", "Normal"): 5, ("Present", None): 6}  # fmt: skip


def cohort() -> list[Patient]:
    """54 patients in five murmur/outcome strata (one without outcomes), ids in no particular order."""
    patients, number = [], 0
    for (murmur, outcome), count in STRATA.items():
        for _ in range(count):
            number += 1
            patients.append(Patient(str(1000 + (number * 37) % 541), murmur, outcome, set()))
    assert len({p.id for p in patients}) == len(patients)
    return patients


@pytest.mark.parametrize("seed", [0, 1, 5])
@pytest.mark.parametrize("folds", [2, 3, 5])
def test_folds_partition_the_patients_and_are_stratified(folds, seed):
    patients = cohort()
    fold_of = stratified_folds(patients, folds, seed)
    assert sorted(fold_of) == sorted(p.id for p in patients)  # every patient in exactly one fold
    sizes = Counter(fold_of.values())
    assert set(sizes) == set(range(folds)) and max(sizes.values()) - min(sizes.values()) <= 1
    for (murmur, outcome), count in STRATA.items():
        per_fold = Counter(fold_of[p.id] for p in patients if (p.murmur, p.outcome) == (murmur, outcome))
        assert sorted(per_fold) == list(range(folds))
        assert {per_fold[k] for k in range(folds)} <= {count // folds, -(-count // folds)}


def test_folds_are_reproducible_by_seed_and_differ_between_seeds():
    patients = cohort()
    assert stratified_folds(patients, 5, 3) == stratified_folds(list(patients), 5, 3)
    assert stratified_folds(patients, 5, 3) != stratified_folds(patients, 5, 4)


def test_kfold_split_tests_each_patient_once_and_carves_val_from_the_training_patients():
    patients, folds = cohort(), 3
    fold_of = stratified_folds(patients, folds, 2)
    tested = Counter()
    for fold in range(folds):
        assignment = kfold_split(patients, folds, fold, 0.2, 2)
        assert sorted(assignment) == sorted(p.id for p in patients)
        test = {pid for pid, split in assignment.items() if split == "test"}
        assert test == {pid for pid, k in fold_of.items() if k == fold}
        val = [pid for pid, split in assignment.items() if split == "val"]
        assert len(val) == round(0.2 * (len(patients) - len(test)))
        tested.update(test)
    assert set(tested.values()) == {1} and len(tested) == len(patients)


def linked_cohort() -> list[Patient]:
    """cohort() with eight children screened twice: each second id links to the first (and back for half of
    them, as CirCor's csv links both ways), in the first id's stratum or another."""
    patients = cohort()
    for k in range(8):
        first = patients[k * 6]
        murmur, outcome = (first.murmur, first.outcome) if k % 3 else ("Absent", "Normal")
        patients.append(Patient(f"7{k:03d}", murmur, outcome, set(), additional_id=first.id))
        if k % 2:
            patients[k * 6] = Patient(first.id, first.murmur, first.outcome, set(), additional_id=f"7{k:03d}")
    return patients


@pytest.mark.parametrize("seed", [0, 1, 5])
def test_a_child_screened_twice_stays_in_one_fold_and_one_split(seed):
    patients = linked_cohort()
    pairs = [(p.additional_id, p.id) for p in patients if p.id.startswith("7")]
    fold_of = stratified_folds(patients, 5, seed)
    assert sorted(fold_of) == sorted(p.id for p in patients)
    assert all(fold_of[a] == fold_of[b] for a, b in pairs)
    second_ids = {b for _, b in pairs}
    groups_per_fold = Counter(k for pid, k in fold_of.items() if pid not in second_ids)  # one count per group
    assert max(groups_per_fold.values()) - min(groups_per_fold.values()) <= 1
    for fold in range(5):
        assignment = kfold_split(patients, 5, fold, 0.2, seed)
        assert all(assignment[a] == assignment[b] for a, b in pairs)
    holdout = stratified_split(patients, {"val": 0.2, "test": 0.3}, seed)
    assert all(holdout[a] == holdout[b] for a, b in pairs)
    # without the links, the same cohort's partition is the one each id alone gets (the earlier behaviour)
    unlinked = [Patient(p.id, p.murmur, p.outcome, set()) for p in patients]
    assert stratified_folds(unlinked, 5, seed) != fold_of


def test_linked_ids_apart_are_reported_and_grouping_can_be_turned_off(tmp_path, caplog):
    import csv

    root = cloned_circor(tmp_path / "circor", 4)  # 24 patients; link two clones of one patient
    with open(root / "training_data.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    rows[0]["Additional ID"], rows[6]["Additional ID"] = rows[6]["Patient ID"], rows[0]["Patient ID"]
    with open(root / "training_data.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    a, b = rows[0]["Patient ID"], rows[6]["Patient ID"]
    for pid in (a, b):  # their .txt files say nan: the csv gives the link
        assert "#Additional ID: nan" in (root / "training_data" / f"{pid}.txt").read_text()
    for seed in range(3):
        dm = CirCorDataModule(root=str(root), split="kfold", folds=2, split_seed=seed, num_workers=0)
        assert dm.assignment[a] == dm.assignment[b]
    assert "linked by Additional ID" not in caplog.text
    dm = CirCorDataModule(root=str(root), split="kfold", folds=2, split_seed=1, num_workers=0,
                          group_linked_patients=False)  # each id alone: with this seed they land apart
    assert dm.assignment[a] != dm.assignment[b]
    assert f"1 child(ren) screened in both campaigns (linked by Additional ID) have ids in different splits, " \
           f"e.g. {a} / {b}" in caplog.text


def test_the_holdout_split_is_unchanged():
    """Pinned from the implementation before k-fold existed: the same options give the same patients."""
    patients = read_patients(str(CIRCOR_MINI))
    assert stratified_split(patients, {"val": 0.2, "test": 0.35}, 7) == {
        "50743": "test", "9983": "test", "49748": "val", "50216": "train", "2530": "train", "9979": "train"}  # fmt: skip


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"split": "folds"}, r"data.split must be one of \['holdout', 'kfold'\], got 'folds'"),
        ({"split": "kfold", "folds": 1}, r"data.folds must be an integer >= 2, got 1"),
        ({"split": "kfold", "folds": 2, "fold": 2}, r"data.fold must be an integer in 0..1 \(data.folds=2\), got 2"),
        ({"split": "kfold", "fold": -1}, r"data.fold must be an integer in 0..4"),
        ({"split": "kfold", "folds": 3}, r"data.folds=3: stratum Absent/Normal \(murmur/outcome\) has only 2 "
                                         r"patient\(s\), fewer than the folds; use data.folds<=2"),
        ({"split": "kfold", "split_file": str(CIRCOR_MINI / "training_data.csv")},
         "data.split_file and data.split=kfold exclude each other"),
    ],
)  # fmt: skip
def test_bad_fold_options_fail_with_one_line_naming_the_key(tmp_path, options, message):
    root = cloned_circor(tmp_path / "circor", copies=2)
    with pytest.raises(ValueError, match=message) as error:
        CirCorDataModule(root=str(root), **options)
    assert "\n" not in str(error.value)


def test_circor_mini_has_strata_too_small_for_two_folds():
    with pytest.raises(ValueError, match=r"data.folds=2: stratum .* has only 1 patient"):
        CirCorDataModule(root=str(CIRCOR_MINI), split="kfold", folds=2)


def test_datamodule_folds_cover_every_patient_once_as_test(tmp_path):
    root = cloned_circor(tmp_path / "circor", copies=3)
    seen = Counter()
    for fold in range(3):
        dm = CirCorDataModule(root=str(root), split="kfold", folds=3, fold=fold, split_seed=4, num_workers=0)
        assert dm.splits == ("train", "val", "test")
        parts = {split: {p.id for p in dm.split_patients(split)} for split in dm.splits}
        assert not (parts["train"] & parts["val"] or parts["train"] & parts["test"] or parts["val"] & parts["test"])
        assert sum(map(len, parts.values())) == 18
        seen.update(parts["test"])
        assert "3-fold cross-validation, fold" in dm.split_description
    assert len(seen) == 18 and set(seen.values()) == {1}


def test_pretraining_on_a_fold_reads_only_its_training_patients_audio(tmp_path):
    """experiment=circor_pretrain with the fold options: the fit stage builds train and val from the other
    folds' patients; no item of the test fold is read."""
    root = cloned_circor(tmp_path / "circor", copies=2)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=circor_pretrain", f"data.root={root}", "data.split=kfold",
                                          "data.folds=2", "data.fold=1", "data.split_seed=3", "data.num_workers=0"])
    dm = instantiate(cfg.data)
    test = {p.id for p in dm.split_patients("test")}
    assert len(test) == 6
    dm.setup("fit")
    assert set(dm.datasets) == {"train", "val"}
    read = {Path(item.path).name.split("_")[0] for split in ("train", "val") for item in dm.datasets[split].items}
    assert read and not read & test
    assert read == {p.id for p in dm.split_patients("train")} | {p.id for p in dm.split_patients("val")}


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_a_label_fraction_trains_on_a_stratified_share_of_the_train_patients_only(fraction):
    patients = cohort()
    kept = stratified_subset(patients, fraction, 3)
    assert len(kept) == round(fraction * len(patients)) and kept == stratified_subset(list(patients), fraction, 3)
    for stratum, count in STRATA.items():  # every stratum in proportion, to within one patient
        share = sum(p.id in kept for p in patients if (p.murmur, p.outcome) == stratum)
        assert abs(share - fraction * count) <= 1
    assert stratified_subset(patients[:3], 0.01, 0) and len(stratified_subset(patients[:3], 0.01, 0)) == 1


def test_a_label_fraction_leaves_val_and_test_alone_and_says_so(tmp_path, caplog):
    root = cloned_circor(tmp_path / "circor", copies=4)  # 24 patients
    options = {"root": str(root), "split": "kfold", "folds": 2, "fold": 0, "split_seed": 1, "num_workers": 0}
    full, part = CirCorDataModule(**options), CirCorDataModule(**options, label_fraction=0.5)
    assert part.splits == ("train", "val", "test")
    for split in ("val", "test"):
        assert part.split_patients(split) == full.split_patients(split)
    train, kept = full.split_patients("train"), part.split_patients("train")
    assert set(p.id for p in kept) < set(p.id for p in train) and len(kept) == round(0.5 * len(train))
    assert f"training on 0.5 of the train patients ({len(train) - len(kept)} left out)" in part.split_description
    with caplog.at_level(logging.INFO, logger="ssamba.data.circor"):
        part.setup("fit")
    assert "training on 0.5 of the train patients" in caplog.text  # the run's log says what it trained on
    read = {Path(item.path).name.split("_")[0] for item in part.datasets["train"].items}
    assert read == {p.id for p in kept}
    for bad in (0, 1.5, True, "half"):
        with pytest.raises(ValueError, match=r"data.label_fraction must be in \(0, 1\]"):
            CirCorDataModule(**options, label_fraction=bad)
