"""Where a CirCor grid's murmur errors are: recall by the patients' own annotations.

A grid's cells (``bench/circor_results.py``) store each test patient's prediction; ``training_data.csv``
describes each patient: the systolic murmur's grade, the locations where the murmur is audible, age
group, campaign. This scores, per arm, each class's recall within every value of those columns, so that
a ceiling shows where it comes from (e.g. faint murmurs heard at one location only). Each patient counts
once: its hit rate over the seeds that scored it (every prediction out-of-fold), and a group's recall is
the mean over its patients, with a 95% Student's t interval over them (the patients are independent; the
models that scored them share training patients, so the interval is a guide).

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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from circor_results import ARM_TITLES, ARMS, interval, load_results  # noqa: E402

CLASSES = ("Present", "Unknown", "Absent")  # the Challenge's murmur classes, in the cells' index order
TABLE = "training_data.csv"
# (column of training_data.csv, the classes broken down by it): grade and locations describe Present only
BREAKDOWNS = (("Systolic murmur grading", ("Present",)), ("Murmur locations", ("Present",)),
              ("Age", CLASSES), ("Campaign", CLASSES))  # fmt: skip
NO_SYSTOLIC = "none (diastolic only)"


def read_table(data: list[Path]) -> dict[str, dict[str, str]]:
    """Patient id -> its row of ``training_data.csv``, from the CirCor folder or the staged part that holds it."""
    paths = [folder / TABLE for folder in data if (folder / TABLE).is_file()]
    if not paths:
        raise FileNotFoundError(f"none of --data {[str(p) for p in data]} holds {TABLE}")
    with open(paths[0], newline="") as f:
        reader = csv.DictReader(f)
        missing = sorted({"Patient ID", *(column for column, _ in BREAKDOWNS)} - set(reader.fieldnames or []))
        if missing:
            raise ValueError(f"{paths[0]}: no column {', '.join(map(repr, missing))} (CirCor's training_data.csv "
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
