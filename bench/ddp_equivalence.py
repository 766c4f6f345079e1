"""DDP equivalence: 2 devices x batch B against 1 device x batch 2B, the same optimizer steps.

    python bench/ddp_equivalence.py --out /tmp/ddp            # 2 GPUs (trainer=ddp) vs 1 GPU (trainer=gpu)
    python bench/ddp_equivalence.py --out /tmp/ddp --cpu      # the same on CPU (trainer=ddp_sim vs cpu)

Runs train.py (pretraining on synthetic data) three times -- 2 x B, 1 x 2B, and 1 x 2B with another seed to
measure seed noise -- and checks:
1. the final validation metrics of 2 x B and 1 x 2B differ by no more than the seed noise (x ``--noise-factor``,
   at least ``--tolerance``);
2. no training item is seen twice within an epoch across the two ranks, and every rank sees the same count;
3. a ``-m`` sweep of two jobs under DDP makes one folder per job, each with its own metrics and checkpoint.
Also prints samples/s of each run, over the whole run and in steady state (median step time after the
first 10 steps); with ``--scaling`` a 1 x B run gives the scaling efficiency
``throughput(2 x B) / (2 x throughput(1 x B))`` both ways. Writes ``summary.json`` in ``--out``; exits 1 on a failed check.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]


class RecordSampleIds(Callback):
    """Writes the item ids each rank trained on, per epoch, to ``<out>/ids-rank<r>.json``."""

    def __init__(self, out: str):
        self.out = out
        self.ids: dict[int, list[str]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.ids.setdefault(trainer.current_epoch, []).extend(batch["id"])

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.out).mkdir(parents=True, exist_ok=True)
        Path(self.out, f"ids-rank{trainer.global_rank}.json").write_text(json.dumps(self.ids))


class RecordStepTimes(Callback):
    """Rank 0 writes the wall time at the end of every optimizer step (device synchronised) to
    ``<out>/step_times.json``; the median step time gives a steady-state throughput that leaves out
    start-up, compilation and validation."""

    def __init__(self, out: str):
        self.out = out
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.times.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            Path(self.out).mkdir(parents=True, exist_ok=True)
            Path(self.out, "step_times.json").write_text(json.dumps(self.times))


def median_step_seconds(run_dir: Path, skip: int = 10) -> float:
    """Median of the step-to-step intervals after the first ``skip`` steps (half the steps in short runs)."""
    times = json.loads((run_dir / "step_times.json").read_text())
    times = times[min(skip, len(times) // 2):]
    return statistics.median(b - a for a, b in zip(times, times[1:]))


def train(run_dir: Path, overrides: list[str], timeout: float, multirun: bool = False) -> float | None:
    """Seconds the run took; None when it hung past ``timeout`` (the run is killed)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "WANDB_MODE": "disabled"}
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    command = [sys.executable, "train.py", *(["-m"] if multirun else []), *overrides, f"{key}={run_dir}"]
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"timed out after {timeout:.0f} s: {' '.join(command)}", file=sys.stderr)
        return None
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-4000:]}")
    return time.perf_counter() - start


def final_metrics(run_dir: Path) -> dict[str, float]:
    rows = [row for row in csv.DictReader(open(run_dir / "metrics.csv")) if row.get("val/loss")]
    return {key: float(rows[-1][key]) for key in ("val/loss", "val/acc")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--cpu", action="store_true", help="trainer=ddp_sim vs trainer=cpu (2 processes, gloo)")
    parser.add_argument("--batch", type=int, default=16, help="B, the per-device batch of the 2-device run")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num-train", type=int, default=2048, help="a multiple of 2B")
    parser.add_argument("--num-val", type=int, default=256, help="a multiple of 2 x eval batch")
    parser.add_argument("--noise-factor", type=float, default=2.0)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--scaling", action="store_true", help="also run 1 x B for the scaling efficiency")
    parser.add_argument("--no-sweep", action="store_true", help="skip the -m sweep check")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a run counts as hung")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides, e.g. model=small")
    args = parser.parse_args()
    if args.num_train % (2 * args.batch):
        parser.error("--num-train must be a multiple of 2 x --batch (equal optimizer steps)")
    two, one = ("ddp_sim", "cpu") if args.cpu else ("ddp", "gpu")
    common = ["logger=csv", "++callbacks.progress_bar=null", "trainer.enable_progress_bar=false",
              f"trainer.max_epochs={args.epochs}", f"data.num_train={args.num_train}", f"data.num_val={args.num_val}",
              "data.num_test=0", "trainer.num_sanity_val_steps=0", "task.figure_every_n_steps=0", *args.overrides]
    record = f"+callbacks.sample_ids={{_target_: ddp_equivalence.RecordSampleIds, out: {args.out / 'ids'}}}"
    runs = {
        "2xB": [f"trainer={two}", "trainer.devices=2", f"data.batch_size={args.batch}", record],
        "1x2B": [f"trainer={one}", "trainer.devices=1", f"data.batch_size={2 * args.batch}"],
        "1x2B_other_seed": [f"trainer={one}", "trainer.devices=1", f"data.batch_size={2 * args.batch}", "seed=43"],
    }
    if args.scaling:
        runs["1xB"] = [f"trainer={one}", "trainer.devices=1", f"data.batch_size={args.batch}",
                       f"trainer.max_steps={args.epochs * args.num_train // (2 * args.batch)}"]
    summary: dict = {"device": "cpu (ddp_sim)" if args.cpu else "gpu", "runs": {}}
    for name, overrides in runs.items():
        timer = f"+callbacks.step_times={{_target_: ddp_equivalence.RecordStepTimes, out: {args.out / name}}}"
        seconds = train(args.out / name, common + overrides + [timer], args.timeout)
        if seconds is None:
            sys.exit(f"{name} hung")
        samples = args.epochs * args.num_train if name != "1xB" else args.epochs * args.num_train // 2
        global_batch = args.batch if name == "1xB" else 2 * args.batch
        summary["runs"][name] = {"metrics": final_metrics(args.out / name), "seconds": seconds,
                                 "samples_per_s": samples / seconds,
                                 "steady_samples_per_s": global_batch / median_step_seconds(args.out / name)}
        print(name, summary["runs"][name], flush=True)

    checks = {}
    metrics = {name: run["metrics"] for name, run in summary["runs"].items()}
    for key in ("val/loss", "val/acc"):
        noise = abs(metrics["1x2B"][key] - metrics["1x2B_other_seed"][key])
        gap = abs(metrics["2xB"][key] - metrics["1x2B"][key])
        checks[f"{key} within noise"] = gap <= max(args.noise_factor * noise, args.tolerance)
        summary[f"{key} gap / seed noise"] = [gap, noise]

    ids = [json.loads((args.out / "ids" / f"ids-rank{r}.json").read_text()) for r in range(2)]
    per_epoch = [(ids[0][e], ids[1][e]) for e in ids[0]]
    checks["no item twice per epoch"] = all(len(set(a) | set(b)) == len(a) + len(b) for a, b in per_epoch)
    checks["equal share per rank"] = all(len(a) == len(b) == args.num_train // 2 for a, b in per_epoch)

    if not args.no_sweep:
        sweep = args.out / "sweep"
        finished = train(sweep, common + [f"trainer={two}", "trainer.devices=2", f"data.batch_size={args.batch}",
                                          "trainer.max_epochs=1", "seed=1,2"], args.timeout, multirun=True)
        jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
        checks["one folder per sweep job"] = finished is not None and [p.name for p in jobs] == ["0", "1"] and all(
            (p / "metrics.csv").is_file() and (p / "checkpoints" / "last.ckpt").is_file() for p in jobs)

    if args.scaling:
        for key, label in (("samples_per_s", "scaling_efficiency_whole_run"),
                           ("steady_samples_per_s", "scaling_efficiency_steady")):
            summary[label] = summary["runs"]["2xB"][key] / (2 * summary["runs"]["1xB"][key])
    summary["checks"] = checks
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
