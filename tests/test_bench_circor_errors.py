"""bench/circor_errors.py on hand-made cells: each patient counted once over its seeds, groups by the
annotation columns, and one-line refusals."""
import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from circor_errors import render  # noqa: E402

COLUMNS = ["Patient ID", "Murmur", "Murmur locations", "Systolic murmur grading", "Age", "Campaign"]
PATIENTS = [  # id, murmur, locations, grading, age, campaign
    ("1", "Present", "AV", "I/VI", "Child", "CC2015"),
    ("2", "Present", "AV+PV+TV+MV", "I/VI", "Child", "CC2015"),
    ("3", "Present", "AV", "nan", "Child", "CC2014"),  # a diastolic murmur only
    ("4", "Unknown", "nan", "nan", "Infant", "CC2015"),
    ("5", "Absent", "nan", "nan", "nan", "CC2014"),
]
TARGETS = [0, 0, 0, 1, 2]
PREDICTIONS = {0: [0, 0, 2, 1, 2], 1: [2, 0, 2, 2, 0]}  # seed -> each patient's predicted class


def grid(tmp_path: Path, class_names=("Present", "Unknown", "Absent")) -> tuple[Path, Path]:
    data, results = tmp_path / "circor", tmp_path / "results"
    data.mkdir(parents=True)
    (results / "cells").mkdir(parents=True)
    with open(data / "training_data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(PATIENTS)
    for seed, preds in PREDICTIONS.items():
        patients = {"id": [p[0] for p in PATIENTS], "target": TARGETS, "pred": preds, "class_names": list(class_names)}
        record = {"task": "murmur", "fold": 0, "seed": seed, "arm": "scratch", "patients": patients}
        (results / "cells" / f"murmur_fold0_seed{seed}_scratch.json").write_text(json.dumps(record))
    return results, data


def test_recall_by_annotation_counts_each_patient_once_over_its_seeds(tmp_path):
    results, data = grid(tmp_path)
    text = render(results, [tmp_path / "elsewhere", data])  # the folder that holds the table is found
    # patients 1 and 2 (grade I/VI): hit rates 0.5 and 1.0; two values: t(0.975, 1) x 0.25 spans [0, 1]
    assert "| Present | Systolic murmur grading | I/VI | 2 | 0.75 [0.00, 1.00] | 0.75 | 0.00 | 0.25 |" in text
    assert "| Present | Systolic murmur grading | none (diastolic only) | 1 | 0.00 | 0.00 | 0.00 | 1.00 |" in text
    assert "| Present | Murmur locations | 1 | 2 | 0.25 [0.00, 1.00] | 0.25 | 0.00 | 0.75 |" in text  # 1 and 3
    assert "| Present | Murmur locations | 4 or more | 1 | 1.00 | 1.00 | 0.00 | 0.00 |" in text
    assert "| Unknown | Age | Infant | 1 | 0.50 | 0.00 | 0.50 | 0.50 |" in text
    assert "| Absent | Age | not given | 1 | 0.50 | 0.50 | 0.00 | 0.50 |" in text
    assert "| Absent | Systolic murmur grading" not in text  # grading describes Present patients only
    assert "### from scratch (2 cells)" in text and "circor_pretrain" not in text


def test_refusals_are_one_line(tmp_path):
    results, data = grid(tmp_path)
    rows = (data / "training_data.csv").read_text().splitlines()
    (data / "training_data.csv").write_text("\n".join(rows[:-1]) + "\n")  # patient 5 missing
    command = [sys.executable, "bench/circor_errors.py", "--results", str(results), "--data", str(data), "--out",
               str(tmp_path / "errors.md")]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "patient 5 of the cells is not in training_data.csv" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    other, data = grid(tmp_path / "timing", class_names=("absent", "unknown", "present"))
    run = subprocess.run([*command[:3], str(other), "--data", str(data), "--out", str(tmp_path / "e.md")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "reads the Challenge's murmur classes" in run.stderr
    rows[0] = rows[0].replace("Campaign", "Site")  # a table without a column the breakdowns read
    (tmp_path / "circor" / "training_data.csv").write_text("\n".join(rows) + "\n")
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "no column 'Campaign'" in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_children_screened_twice_by_whether_their_other_id_trained_the_model(tmp_path):
    from ssamba.data.circor import Patient, kfold_split

    # 8 patients in two strata; 1 and 5 are one child (linked both ways), 2's other id is not in the data
    rows = [(str(k), "Present" if k <= 4 else "Absent", "Abnormal" if k <= 4 else "Normal",
             {1: "5", 5: "1", 2: "99"}.get(k, "nan")) for k in range(1, 9)]
    data, results = tmp_path / "circor", tmp_path / "results"
    (data / "training_data").mkdir(parents=True)  # a CirCor folder the data reads (the table's rows suffice)
    (results / "cells").mkdir(parents=True)
    with open(data / "training_data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*COLUMNS, "Outcome", "Additional ID"])
        writer.writerows([(pid, murmur, "nan", "nan", "Child", "CC2015", outcome, other)
                          for pid, murmur, outcome, other in rows])
    alone = [Patient(pid, murmur, outcome, set()) for pid, murmur, outcome, _ in rows]  # as the old grids dealt
    settings = {"folds": 2, "common": ["data.val_fraction=0"], "finetune": []}
    for fold in range(2):
        split = kfold_split(alone, 2, fold, 0.0, 1)  # seed 1 deals 1 and 5 to different folds
        tested = [pid for pid, part in split.items() if part == "test"]
        targets = [0 if int(pid) <= 4 else 2 for pid in tested]
        patients = {"id": tested, "target": targets, "pred": targets, "class_names": ["Present", "Unknown", "Absent"]}
        record = {"task": "murmur", "fold": fold, "seed": 1, "arm": "scratch", "settings": settings,
                  "patients": patients}
        (results / "cells" / f"murmur_fold{fold}_seed1_scratch.json").write_text(json.dumps(record))
    text = render(results, [data])
    assert "### Children screened in both campaigns" in text
    # each of 1 and 5 was scored while the other trained the fold's model
    assert "| Present | other id trained on | 1 | 1.00 |" in text and "| Absent | other id trained on | 1 | 1.00 |" in text
    assert "other id not trained on" not in text
    assert "| Present | no other id in the data | 3 | 1.00 [1.00, 1.00] |" in text  # 2 (linked outside), 3, 4
