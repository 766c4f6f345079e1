"""The paper's downstream rows, one command each: train every fold (and seed), report mean and spread.

A row is a recipe of conf/experiment on the folder ``python -m ssamba.prepare`` wrote. Rows with
folds (ESC-50: fold1..5, IEMOCAP: session1..5 held out) train once per fold; the others once per
``--seeds`` entry. Each run is ``python train.py experiment=<recipe> ...`` in its own folder under
``--results``; its score is read from the run's metrics.csv, the metric the paper reports:

- ``test/...``: the test split, scored by the checkpoint that validation picked (train.py's test);
- ``val/...``: the evaluation split of a row without a separate test split (AudioSet's eval set,
  the held-out ESC-50 fold or IEMOCAP session), at the end of training: nothing is selected on it.

Finished runs are kept (a JSON per run), so running the command again continues where it stopped.
``--report FILE`` appends one line per row to FILE (docs/results/downstream.md): task, model,
checkpoint, metric mean ± std over folds or seeds, each run's value, card and wall time.

    python bench/downstream.py run esc50 --data /data/prepared/esc50 --pretrained ssamba_tiny.pth \\
        --report docs/results/downstream.md

Extra Hydra overrides go to every run: ``--override trainer.max_epochs=1 ...``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import device_name  # noqa: E402  (bench/ is the script's directory)


@dataclass(frozen=True)
class Row:
    """One paper row: its recipe, the metric it reports and, for cross-validation, the fold folders."""

    task: str
    recipe: str
    metric: str
    folds: tuple[str, ...] = ()


ROWS = {
    "as20k": Row("AudioSet-20K", "finetune_as20k", "val/mAP"),
    "as2m": Row("AudioSet-2M", "finetune_as2m", "val/mAP"),
    "esc50": Row("ESC-50", "finetune_esc50", "val/acc", tuple(f"fold{k}" for k in range(1, 6))),
    "sc_v2": Row("Speech Commands V2 (35)", "finetune_speechcommands_v2", "test/acc"),
    "sc_v1": Row("Speech Commands V1 (30)", "finetune_speechcommands_v1", "test/acc"),
    "ks12": Row("SUPERB KS (12)", "probe_ks12", "test/acc"),
    "voxceleb1": Row("SUPERB SID (VoxCeleb1)", "probe_voxceleb1", "test/acc"),
    "iemocap": Row("SUPERB ER (IEMOCAP)", "probe_iemocap", "val/acc", tuple(f"session{k}" for k in range(1, 6))),
}
# what each recipe reads from its data.root (relative to the fold folder where there are folds)
NEEDED = {
    "finetune_as20k": ("balanced_train.json", "eval.json"),
    "finetune_as2m": ("full_train.json", "eval.json"),
    "finetune_esc50": ("train.json", "eval.json"),
    "finetune_speechcommands_v2": ("train.json", "valid.json", "test.json"),
    "finetune_speechcommands_v1": ("train.json", "valid.json", "test.json", "stats.json"),
    "probe_ks12": ("train.json", "valid.json", "test.json", "stats.json"),
    "probe_voxceleb1": ("train.json", "valid.json", "test.json", "stats.json"),
    "probe_iemocap": ("train.json", "eval.json", "stats.json"),
}
REPORT_HEADER = ("| task | model | checkpoint | metric | mean ± std | runs | card | wall time (min) | date |\n"
                 "|---|---|---|---|---|---|---|---|---|\n")


class RowError(Exception):
    """Bad input to the runner; the message is one line."""


def units(row: Row, folds: list[str] | None, seeds: list[int]) -> list[tuple[str, int]]:
    """(fold folder or "", seed) of every run of ``row``; ``folds`` as numbers (``1 2``) or names."""
    if not folds:
        return [(fold, seed) for fold in row.folds or ("",) for seed in seeds]
    if not row.folds:
        raise RowError(f"--folds: {row.task} has no folds (it trains once per --seeds entry)")
    prefix = row.folds[0].rstrip("0123456789")
    chosen = [f if f.startswith(prefix) else prefix + f for f in folds]
    wrong = [f for f in chosen if f not in row.folds]
    if wrong:
        raise RowError(f"--folds: {wrong[0]} is not one of {row.task}'s folds {', '.join(row.folds)}")
    return [(fold, seed) for fold in chosen for seed in seeds]


def check_prepared(row: Row, data: Path, fold: str) -> None:
    """The files the recipe reads must be there before any training starts."""
    for rel in NEEDED[row.recipe]:
        path = (data / fold / rel).resolve()
        if not path.is_file():
            raise RowError(f"{path} not found: --data must be the --dst of python -m ssamba.prepare for {row.task}")


def read_metric(run_dir: Path, metric: str) -> float:
    """The last value of ``metric`` in the run's metrics.csv (train.py's CSV logger)."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        raise RowError(f"{path} not found: the run logged no metrics (runs need logger=csv, not fast_dev_run)")
    with open(path, newline="") as f:
        values = [row[metric] for row in csv.DictReader(f) if row.get(metric)]
    if not values:
        raise RowError(f"{path} has no {metric} values")
    return float(values[-1])


def model_name(pretrained: str | None, overrides: list[str]) -> str:
    """The encoder that was evaluated: the checkpoint's record, else the model= choice."""
    if pretrained:
        from ssamba.checkpoints import load_checkpoint

        return str(load_checkpoint(pretrained).encoder_config["name"])
    chosen = [o.split("=", 1)[1] for o in overrides if o.startswith("model=")]
    return (chosen[-1] if chosen else "tiny") + " (random init)"


def train(overrides: list[str], run_dir: Path) -> float:
    """``python train.py <overrides>`` into ``run_dir``; returns its wall time in seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"]
    print("+", " ".join(command), flush=True)
    start = time.perf_counter()
    with open(run_dir / "stdout.log", "w") as log:
        code = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0:
        tail = (run_dir / "stdout.log").read_text()[-4000:]
        raise RuntimeError(f"train.py failed (exit {code}) in {run_dir}:\n{tail}")
    return time.perf_counter() - start


def run_row(name: str, data: Path, results: Path, pretrained: str | None, seeds: list[int],
            folds: list[str] | None, trainer: str, overrides: list[str]) -> dict:
    """Train every run of row ``name`` not finished earlier; returns the summary."""
    row = ROWS[name]
    plan = units(row, folds, seeds)
    for fold, _ in plan:
        check_prepared(row, data, fold)
    if pretrained and not Path(pretrained).exists():
        raise RowError(f"--pretrained {pretrained}: no such checkpoint file or model folder")
    records = []
    for fold, seed in plan:
        label = f"{fold or 'all'}_seed{seed}"
        out = results / name / f"{label}.json"
        if out.is_file():
            print(f"{name} {label}: done earlier, kept")
            records.append(json.loads(out.read_text()))
            continue
        run_dir = results / name / "runs" / label
        seconds = train([f"experiment={row.recipe}", f"data.root={(data / fold).resolve()}",
                         f"task.pretrained={Path(pretrained).resolve() if pretrained else 'null'}", f"seed={seed}",
                         f"trainer={trainer}", "logger=csv", "trainer.enable_progress_bar=false", *overrides],
                        run_dir)
        record = {"run": " ".join(filter(None, (fold, "" if fold and len(seeds) == 1 else f"seed{seed}"))),
                  "fold": fold, "seed": seed, "metric": row.metric, "value": read_metric(run_dir, row.metric),
                  "seconds": seconds, "device": device_name()}
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"{name} {label}: {row.metric} = {record['value']:.4f}", flush=True)
        records.append(record)
    values = [r["value"] for r in records]
    return {"row": name, "task": row.task, "metric": row.metric, "model": model_name(pretrained, overrides),
            "checkpoint": Path(pretrained).name if pretrained else "none",
            "mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": {r["run"]: r["value"] for r in records},
            "devices": sorted({r["device"] for r in records}), "minutes": sum(r["seconds"] for r in records) / 60}


def report_line(summary: dict) -> str:
    runs = ", ".join(f"{k} {v:.4f}" for k, v in summary["runs"].items())
    return (f"| {summary['task']} | {summary['model']} | {summary['checkpoint']} | {summary['metric']} | "
            f"{summary['mean']:.4f} ± {summary['std']:.4f} (n={len(summary['runs'])}) | {runs} | "
            f"{', '.join(summary['devices'])} | {summary['minutes']:.1f} | {datetime.date.today().isoformat()} |\n")


def append_report(path: Path, summary: dict) -> None:
    """One line for the row; the table header first where the file has none."""
    text = path.read_text() if path.is_file() else ""
    if REPORT_HEADER not in text:
        text += ("\n" if text and not text.endswith("\n") else "") + ("\n" if text else "") + REPORT_HEADER
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + report_line(summary))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train every fold / seed of a row (finished runs are kept)")
    run.add_argument("row", choices=tuple(ROWS))
    run.add_argument("--data", type=Path, required=True, help="the --dst of python -m ssamba.prepare")
    run.add_argument("--pretrained", help="checkpoint or model folder (none: a randomly initialised model=)")
    run.add_argument("--results", type=Path, default=Path("outputs/downstream"), help="run folders and JSON")
    run.add_argument("--seeds", type=int, nargs="+", default=[0])
    run.add_argument("--folds", nargs="+", help="a subset of the folds, e.g. 1 2 (default: all)")
    run.add_argument("--trainer", default="gpu", help="trainer config group choice (gpu, cpu, ddp, ...)")
    run.add_argument("--report", type=Path, help="append the row's line to this markdown file")
    run.add_argument("--override", nargs="*", default=[], help="Hydra overrides for every run")
    args = parser.parse_args(argv)
    try:
        summary = run_row(args.row, args.data, args.results, args.pretrained, args.seeds, args.folds,
                          args.trainer, args.override)
    except RowError as error:
        sys.exit(f"bench/downstream.py {args.row}: {error}")
    print(json.dumps(summary, indent=1))
    if args.report:
        append_report(args.report, summary)
        print(f"appended to {args.report}")


if __name__ == "__main__":
    main()
