"""Where a CirCor grid's murmur errors are: recall by the patients' own annotations.

A grid's cells (``bench/circor_results.py``) store each test patient's prediction; ``training_data.csv``
describes each patient: the systolic murmur's grade, the locations where the murmur is audible, age
group, campaign. This scores, per arm, each class's recall within every value of those columns, so that
a ceiling shows where it comes from (e.g. faint murmurs heard at one location only). Each patient counts
once: its hit rate over the seeds that scored it (every prediction out-of-fold), and a group's recall is
the mean over its patients, with a 95% Student's t interval over them (the patients are independent; the
models that scored them share training patients, so the interval is a guide).

A last table takes the children screened in both campaigns (two ids linked by ``Additional ID``): recall
where the child's other id was a training patient of the model that scored it (a partition that dealt
each id alone, as grids before ``data.group_linked_patients`` did), against where it was not.

    python bench/circor_errors.py --results docs/results/screens/ep20 --data <circor-dev folder> \\
        --out docs/results/screens/ep20/errors.md
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from circor_results import ARM_TITLES, ARMS, data_setting, interval, load_results  # noqa: E402

from ssamba.data.circor import Patient, kfold_split, read_patients  # noqa: E402

CLASSES = ("Present", "Unknown", "Absent")  # the Challenge's murmur classes, in the cells' index order
TABLE = "training_data.csv"
# (column of training_data.csv, the classes broken down by it): grade and locations describe Present only
BREAKDOWNS = (("Systolic murmur grading", ("Present",)), ("Murmur locations", ("Present",)),
              ("Age", CLASSES), ("Campaign", CLASSES))  # fmt: skip
NO_SYSTOLIC = "none (diastolic only)"


def table_folder(data: list[Path]) -> Path:
    """The CirCor folder, or the staged part, that holds ``training_data.csv``."""
    folders = [folder for folder in data if (folder / TABLE).is_file()]
    if not folders:
        raise FileNotFoundError(f"none of --data {[str(p) for p in data]} holds {TABLE}")
    return folders[0]


def read_table(data: list[Path]) -> dict[str, dict[str, str]]:
    """Patient id -> its row of ``training_data.csv``, from the CirCor folder or the staged part that holds it."""
    path = table_folder(data) / TABLE
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = sorted({"Patient ID", *(column for column, _ in BREAKDOWNS)} - set(reader.fieldnames or []))
        if missing:
            raise ValueError(f"{path}: no column {', '.join(map(repr, missing))} (CirCor's training_data.csv "
                             "has them)")
        return {row["Patient ID"]: row for row in reader}


def group_value(row: dict[str, str], column: str) -> str:
    """The value a patient is grouped under: the count of murmur locations, a blank shown as such."""
    if column == "Murmur locations":
        count = len([loc for loc in row[column].split("+") if loc and loc != "nan"])
        return "4 or more" if count >= 4 else str(count)
    value = row.get(column, "").strip()
    if column == "Systolic murmur grading" and value in ("", "nan"):
        return NO_SYSTOLIC
    return value if value not in ("", "nan") else "not given"


def patient_outcomes(records: list[dict]) -> dict[str, tuple[int, list[int]]]:
    """Patient id -> (true class, its predicted class from every cell that scored it)."""
    out: dict[str, tuple[int, list[int]]] = {}
    for r in records:
        for pid, target, pred in zip(r["patients"]["id"], r["patients"]["target"], r["patients"]["pred"]):
            out.setdefault(pid, (target, []))[1].append(pred)
    return out


def breakdown_rows(outcomes: dict[str, tuple[int, list[int]]], table: dict[str, dict[str, str]]) -> list[str]:
    """Markdown rows: class, column, value, patients, recall with interval, and where its patients went."""
    missing = sorted(pid for pid in outcomes if pid not in table)
    if missing:
        raise ValueError(f"patient {missing[0]} of the cells is not in {TABLE} ({len(missing)} missing)")
    lines = []
    for column, classes in BREAKDOWNS:
        for name in classes:
            index = CLASSES.index(name)
            groups: dict[str, list[list[int]]] = {}
            for pid, (target, preds) in outcomes.items():
                if target == index:
                    groups.setdefault(group_value(table[pid], column), []).append(preds)
            for value in sorted(groups):
                shares = [[sum(p == k for p in preds) / len(preds) for preds in groups[value]] for k in range(3)]
                mean, half, _ = interval(shares[index], 0.0)  # independent patients: no correction
                recall = f"{mean:.2f}" if math.isnan(half) else f"{mean:.2f} [{max(0.0, mean - half):.2f}, " \
                                                               f"{min(1.0, mean + half):.2f}]"
                went = " | ".join(f"{statistics.fmean(shares[k]):.2f}" for k in range(3))
                lines.append(f"| {name} | {column} | {value} | {len(groups[value])} | {recall} | {went} |")
    return lines


TWIN_STATES = ("other id trained on", "other id not trained on", "no other id in the data")


def twin_states(records: list[dict], patients: list[Patient]) -> dict[tuple[str, str], list[int]]:
    """(patient id, TWIN_STATES entry) -> the patient's predictions in that state, over the cells. A cell's
    partition is rebuilt from the patients as the data reads them (each id alone, else linked ids together:
    whichever gives the cell's test patients), to tell whether the other id trained the cell's models."""
    ids = {p.id for p in patients}
    linked_ids = {p.id: p.additional_id for p in patients if p.additional_id in ids}
    alone = [replace(p, additional_id=None) for p in patients]
    out: dict[tuple[str, str], list[int]] = {}
    for r in records:
        val = data_setting(r["settings"], "val_fraction")
        tested = set(r["patients"]["id"])
        for partition in (alone, patients):
            split = kfold_split(partition, r["settings"]["folds"], r["fold"], val, r["seed"])
            if {pid for pid, s in split.items() if s == "test"} == tested:
                break
        else:
            raise ValueError(f"fold {r['fold']} seed {r['seed']}: no partition of the data gives the cell's test "
                             "patients (another data folder?)")
        for pid, target, pred in zip(r["patients"]["id"], r["patients"]["target"], r["patients"]["pred"]):
            other = linked_ids.get(pid)
            state = TWIN_STATES[2] if other is None else TWIN_STATES[0 if split[other] == "train" else 1]
            out.setdefault((pid, state), [target]).append(pred)
    return out


def twin_rows(states: dict[tuple[str, str], list[int]]) -> list[str]:
    """Markdown rows: class, state, patients, recall with interval (each patient once per state)."""
    lines = []
    for index, name in enumerate(CLASSES):
        for state in TWIN_STATES:
            hits = [sum(p == index for p in preds) / len(preds)
                    for (_, s), (target, *preds) in states.items() if s == state and target == index]
            if not hits:
                continue
            mean, half, _ = interval(hits, 0.0)
            recall = f"{mean:.2f}" if math.isnan(half) else f"{mean:.2f} [{max(0.0, mean - half):.2f}, " \
                                                           f"{min(1.0, mean + half):.2f}]"
            lines.append(f"| {name} | {state} | {len(hits)} | {recall} |")
    return lines


def render(results: Path, data: list[Path], task: str = "murmur") -> str:
    records = [r for r in load_results(results) if r["task"] == task]
    if not records:
        raise ValueError(f"no `{task}` cells in {results}/cells")
    if tuple(records[0]["patients"]["class_names"]) != CLASSES:
        raise ValueError(f"the breakdown reads the Challenge's murmur classes {list(CLASSES)}, these cells have "
                         f"{records[0]['patients']['class_names']}")
    table = read_table(data)
    seeds = sorted({r["seed"] for r in records})
    lines = [f"## CirCor `{task}`: recall by the patients' annotations, `{results.name}`", "",
             f"Written {datetime.date.today().isoformat()} by `bench/circor_errors.py` from {len(records)} cells "
             f"(seeds {', '.join(map(str, seeds))}). Each patient is one row: its hit rate over the seeds that "
             "scored it; a group's recall is the mean over its patients with a 95% Student's t interval over them "
             "(a guide: the models share training patients). The last three columns: where the group's patients "
             "went, as mean shares predicted Present, Unknown and Absent. Grading and murmur locations are "
             "annotated for Present patients only.", ""]  # fmt: skip
    for arm in ARMS:
        arm_records = [r for r in records if r["arm"] == arm]
        if not arm_records:
            continue
        lines += [f"### {ARM_TITLES[arm]} ({len(arm_records)} cells)", "",
                  "| class | by | value | patients | recall | Present | Unknown | Absent |",
                  "|---|---|---|---|---|---|---|---|", *breakdown_rows(patient_outcomes(arm_records), table), ""]
    if not any("Additional ID" in row for row in table.values()):
        return "\n".join(lines)
    patients = read_patients(str(table_folder(data)))
    lines += ["### Children screened in both campaigns", "",
              "Recall of the patients whose other-campaign id (`Additional ID`) trained the model that scored them, "
              "of those whose other id was val, test or absent, and of the rest; each patient once per state, "
              "its hit rate over the cells that scored it in that state.", ""]
    for arm in ARMS:
        arm_records = [r for r in records if r["arm"] == arm]
        if arm_records:
            lines += [f"{ARM_TITLES[arm]}:", "", "| class | other id | patients | recall |", "|---|---|---|---|",
                      *twin_rows(twin_states(arm_records, patients)), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, required=True, help="a grid's results folder (its cells/)")
    parser.add_argument("--data", type=Path, nargs="+", required=True,
                        help="the CirCor folder (or staged parts) the cells scored, for its training_data.csv")
    parser.add_argument("--out", type=Path, required=True, help="markdown report")
    args = parser.parse_args(argv)
    try:
        text = render(args.results, args.data)
    except (ValueError, FileNotFoundError) as error:  # bad input: one line, not a traceback
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"errors by annotation: {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
