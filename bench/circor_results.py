"""CirCor heart-murmur results: SSAMBA-tiny from scratch vs pretrained on CirCor audio, several seeds.

For each seed, arm ``scratch`` finetunes ``experiment=circor_murmur`` from random weights; arm
``pretrained`` first runs ``experiment=circor_pretrain`` on the train patients' audio (no labels),
then finetunes from its last checkpoint. Every finetuned model's *last* checkpoint is scored on the
val patients at patient level (evaluate.py's code path): val is the evaluation split, so it is not
used to pick checkpoints. The report gives mean +- std over seeds of the murmur weighted accuracy,
UAR, the Challenge cost (murmur predictions against outcomes) and macro AUROC, with the card and
the wall time of each training.

    # optional, where the data lives: split a CirCor folder into parts of at most 40 MiB (each patient in
    # one part, without the unread .hea/.tsv files), to copy it to a GPU machine in pieces
    python bench/circor_results.py stage --src <circor-dev folder> --dst .gpudata/circor --max-mib 40
    # on the GPU machine, with a CirCor folder or the parts; runs resume, so a grid can span several jobs:
    python bench/circor_results.py run --data .gpudata/circor/part* --results .gpudata/circor-runs \\
        --seeds 0 1 2 --pretrain-epochs 8 --finetune-epochs 8 --stop-after-minutes 9 --out circor-results.md
    # anywhere, from the per-run JSON files:
    python bench/circor_results.py report --results .gpudata/circor-runs --out docs/results/circor-results.md

Extra Hydra overrides go to every training (``--override``) or to one kind (``--pretrain-override``,
``--finetune-override``), e.g. ``--override +model.depth=2`` for a quick check.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = ("scratch", "pretrained")
ARM_TITLES = {"scratch": "from scratch", "pretrained": "circor_pretrain, then finetuned"}
TABLES = ("training_data.csv", "split.csv", "LICENSE.txt")
AUDIO_SUFFIXES = (".wav", ".flac")
REPORTED = (("weighted_accuracy", "murmur weighted accuracy", 3), ("uar", "UAR", 3), ("cost", "outcome cost", 0),
            ("auroc", "macro AUROC", 3))  # fmt: skip


# --- staging ----------------------------------------------------------------------------------
def patient_of(name: str) -> str:
    return name.split("_")[0].split(".")[0]


def stage(src: Path, dst: Path, max_bytes: int, keep_annotations: bool = False) -> list[Path]:
    """Copy ``src`` (CirCor layout) into ``dst/part<k>`` folders of at most ``max_bytes`` each.

    A patient's files stay in one part; the tables go into part 0. ``.hea``/``.tsv`` files are left
    out unless ``keep_annotations`` (the datamodule reads only ``<PID>.txt`` and the audio).
    """
    folder = src / "training_data"
    if not (src / "training_data.csv").is_file() or not folder.is_dir():
        raise FileNotFoundError(f"--src {src}: expected training_data.csv and training_data/")
    wanted = {".txt", *AUDIO_SUFFIXES} | ({".hea", ".tsv"} if keep_annotations else set())
    groups: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix in wanted:
            groups.setdefault(patient_of(path.name), []).append(path)
    tables = [src / name for name in TABLES if (src / name).is_file()]
    parts: list[list[Path]] = [list(tables)]
    sizes = [sum(p.stat().st_size for p in tables)]
    for pid, files in groups.items():
        size = sum(p.stat().st_size for p in files)
        if size > max_bytes:
            raise ValueError(f"patient {pid} alone has {size / 2**20:.1f} MiB, over --max-mib")
        if sizes[-1] + size > max_bytes:
            parts.append([])
            sizes.append(0)
        parts[-1] += files
        sizes[-1] += size
    if dst.exists():
        shutil.rmtree(dst)
    folders = []
    for index, files in enumerate(parts):
        part = dst / f"part{index}"
        (part / "training_data").mkdir(parents=True)
        for path in files:
            target = part / (path.name if path.parent == src else f"training_data/{path.name}")
            shutil.copy2(path, target)
        folders.append(part)
        print(f"{part}: {len(files)} files, {sizes[index] / 2**20:.1f} MiB")
    return folders


def merge(parts: list[Path], dst: Path) -> Path:
    """One CirCor folder of symbolic links over the staged parts (or the single folder itself)."""
    if len(parts) == 1:
        return parts[0]
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "training_data").mkdir(parents=True)
    for part in parts:
        for path in sorted(part.iterdir()):
            if path.is_file():
                link = dst / path.name
                if link.exists():
                    raise ValueError(f"{path.name} is in more than one of --data")
                link.symlink_to(path.resolve())
        for path in sorted((part / "training_data").iterdir()):
            link = dst / "training_data" / path.name
            if link.exists():
                raise ValueError(f"training_data/{path.name} is in more than one of --data")
            link.symlink_to(path.resolve())
    if not (dst / "training_data.csv").exists():
        raise FileNotFoundError(f"none of --data {[str(p) for p in parts]} holds training_data.csv")
    return dst


# --- one training run ---------------------------------------------------------------------------
def train(overrides: list[str], run_dir: Path) -> float:
    """``python train.py <overrides>`` into ``run_dir``; returns its wall time in seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"]
    print("+", " ".join(command), flush=True)
    start = time.perf_counter()
    with open(run_dir / "stdout.log", "w") as log:
        code = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        tail = (run_dir / "stdout.log").read_text()[-4000:]
        raise RuntimeError(f"train.py failed (exit {code}) in {run_dir}:\n{tail}")
    return seconds


def last_checkpoint(run_dir: Path) -> Path:
    path = run_dir / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the run wrote no last checkpoint")
    return path


def score(ckpt: Path, data_root: Path, split_file: Path | None, num_workers: int) -> dict[str, float]:
    """Patient-level Challenge scores of ``ckpt`` on the val patients."""
    import torch

    from ssamba.data import CirCorDataModule
    from ssamba.evaluation import check_compatible, load_finetuned, score_split

    checkpoint = load_finetuned(str(ckpt))
    datamodule = CirCorDataModule(
        root=str(data_root), split_file=None if split_file is None else str(split_file), num_workers=num_workers,
        target_length=checkpoint.target_length, norm_mean=checkpoint.norm_mean, norm_std=checkpoint.norm_std,
        batch_size=64,
    )  # fmt: skip
    check_compatible(checkpoint, datamodule.label_names, datamodule.target_length)
    model = checkpoint.build_classifier()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    metric = score_split(
        model, datamodule, "val", datamodule.aggregation, device, "bf16" if device.type == "cuda" else "32"
    )
    return {name: float(value) for name, value in metric.compute().items()}


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


# --- the grid -------------------------------------------------------------------------------------
def run_grid(args: argparse.Namespace) -> None:
    data_root = merge([Path(p) for p in args.data], Path(args.results) / "data")
    split_file = data_root / "split.csv" if (data_root / "split.csv").exists() else None
    results = Path(args.results)
    runs = results / "runs"
    common = [
        f"data.root={data_root}", f"data.num_workers={args.num_workers}", f"trainer={args.trainer}",
        "logger=csv", "test=false", "trainer.enable_progress_bar=false", "++callbacks.progress_bar=null",
        *([f"data.split_file={split_file}"] if split_file else []), *args.override,
    ]  # fmt: skip
    pretrain = ["experiment=circor_pretrain", f"trainer.max_epochs={args.pretrain_epochs}", *args.pretrain_override]
    finetune = ["experiment=circor_murmur", f"trainer.max_epochs={args.finetune_epochs}", *args.finetune_override]
    shown = [o for o in common if not o.startswith(("data.root=", "data.split_file="))]  # no machine paths
    settings = {
        "pretrain": pretrain, "finetune": finetune, "common": shown, "split_file": split_file is not None,
        "shared_pretraining": args.shared_pretraining, "data": args.data_description,
    }  # fmt: skip
    started, durations = time.perf_counter(), {}
    for seed in args.seeds:
        for arm in args.arms:
            out = results / f"{arm}_seed{seed}.json"
            if out.exists():
                print(f"{out.name}: done earlier, kept")
                continue
            expected = durations.get(arm, max(durations.values(), default=0.0))
            elapsed = (time.perf_counter() - started) / 60
            if args.stop_after_minutes and elapsed + expected / 60 > args.stop_after_minutes:
                print(f"stopping before {arm} seed {seed}: {elapsed:.1f} min used, the next run would pass "
                      f"--stop-after-minutes={args.stop_after_minutes}; run again to continue")  # fmt: skip
                write_report(results, Path(args.out))
                return
            record = {"arm": arm, "seed": seed, "device": device_name(), "settings": settings, "pretrain_seconds": 0.0}
            init: list[str] = []
            if arm == "pretrained":
                pretrain_seed = args.pretrain_seed if args.pretrain_seed is not None else (
                    args.seeds[0] if args.shared_pretraining else seed)
                pretrain_dir = runs / f"pretrain_seed{pretrain_seed}"
                if not (pretrain_dir / "checkpoints" / "last.ckpt").is_file():
                    record["pretrain_seconds"] = train([*pretrain, *common, f"seed={pretrain_seed}"], pretrain_dir)
                record["pretrain_seed"] = pretrain_seed
                init = [f"task.pretrained={last_checkpoint(pretrain_dir)}"]
            finetune_dir = runs / f"{arm}_seed{seed}"
            record["finetune_seconds"] = train([*finetune, *common, *init, f"seed={seed}"], finetune_dir)
            record["scores"] = score(last_checkpoint(finetune_dir), data_root, split_file, args.num_workers)
            durations[arm] = record["pretrain_seconds"] + record["finetune_seconds"]
            out.write_text(json.dumps(record, indent=2) + "\n")
            print(f"{arm} seed {seed}: " + ", ".join(f"{k}={record['scores'][k]:.4f}" for k, *_ in REPORTED))
            write_report(results, Path(args.out))


# --- the report ------------------------------------------------------------------------------------
def mean_std(values: list[float], digits: int) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def load_results(results: Path) -> list[dict]:
    records = [json.loads(p.read_text()) for p in sorted(results.glob("*_seed*.json"))]
    return sorted(records, key=lambda r: (ARMS.index(r["arm"]), r["seed"]))


def render(records: list[dict]) -> str:
    """Markdown: the summary over seeds, then one row per run."""
    if not records:
        raise ValueError("no results to report")
    devices = sorted({r["device"] for r in records})
    settings = records[0]["settings"]
    lines = [
        "## CirCor murmur detection: SSAMBA-tiny, scratch vs CirCor pretraining",
        "",
        f"Card: {', '.join(devices)}. Written {datetime.date.today().isoformat()} by `bench/circor_results.py`.",
        f"Data: {settings.get('data') or 'CirCor'}; patients split by "
        + ("the data's split.csv" if settings.get("split_file") else "the datamodule's seeded stratified split")
        + "; scored per patient on the val patients with each run's last checkpoint.",
        "",
        "| arm | seeds | " + " | ".join(title for _, title, _ in REPORTED) + " | training time per seed (min) |",
        "|---|---|" + "---|" * len(REPORTED) + "---|",
    ]
    for arm in ARMS:
        rows = [r for r in records if r["arm"] == arm]
        if not rows:
            continue
        cells = [mean_std([r["scores"].get(key, math.nan) for r in rows], digits) for key, _, digits in REPORTED]
        finetune = statistics.mean(r["finetune_seconds"] for r in rows) / 60
        pretrain = [r["pretrain_seconds"] / 60 for r in rows if r["pretrain_seconds"]]
        time_cell = (
            f"{statistics.mean(pretrain):.1f} pretrain + {finetune:.1f} finetune" if pretrain else f"{finetune:.1f}"
        )
        lines.append(f"| {ARM_TITLES[arm]} | {len(rows)} | " + " | ".join(cells) + f" | {time_cell} |")
    lines += ["", "Per run:", "", "| arm | seed | " + " | ".join(t for _, t, _ in REPORTED) + " | patients |"]
    lines.append("|---|---|" + "---|" * len(REPORTED) + "---|")
    for r in records:
        values = [r["scores"].get(key, math.nan) for key, _, _ in REPORTED]
        cells = ["n/a" if math.isnan(v) else f"{v:.{d}f}" for v, (_, _, d) in zip(values, REPORTED)]
        lines.append(f"| {r['arm']} | {r['seed']} | " + " | ".join(cells) + f" | {int(r['scores']['patients'])} |")
    lines += [
        "",
        "Settings (Hydra overrides):",
        "",
        f"- pretraining: `{' '.join(settings['pretrain'])}`"
        + (" (one pretraining shared by all seeds)" if settings.get("shared_pretraining") else " (one per seed)"),
        f"- finetuning: `{' '.join(settings['finetune'])}`",
        f"- both: `{' '.join(settings['common'])}`",
        "",
    ]
    return "\n".join(lines)


def write_report(results: Path, out: Path) -> None:
    records = load_results(results)
    if records:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render(records))
        print(f"report: {out} ({len(records)} runs)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    staging = commands.add_parser("stage", help="split a CirCor folder into parts of at most --max-mib")
    staging.add_argument("--src", type=Path, required=True)
    staging.add_argument("--dst", type=Path, required=True)
    staging.add_argument("--max-mib", type=float, default=40.0)
    staging.add_argument("--keep-annotations", action="store_true", help="also copy .hea/.tsv files")
    grid = commands.add_parser("run", help="train and score the grid (skips runs already in --results)")
    grid.add_argument("--data", nargs="+", required=True, help="a CirCor folder, or the staged parts")
    grid.add_argument("--data-description", default="", help="one line on the data, for the report")
    grid.add_argument("--results", default=".gpudata/circor-runs", help="per-run JSON files and run folders")
    grid.add_argument("--out", default="circor-results.md", help="markdown report")
    grid.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    grid.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    grid.add_argument("--pretrain-epochs", type=int, default=8)
    grid.add_argument("--finetune-epochs", type=int, default=8)
    grid.add_argument("--shared-pretraining", action="store_true", help="one pretraining for all seeds")
    grid.add_argument("--pretrain-seed", type=int, default=None,
                      help="finetune from this seed's pretraining (lets several grid processes share one)")
    grid.add_argument("--trainer", default="gpu", help="trainer config group choice (gpu, cpu, default)")
    grid.add_argument("--num-workers", type=int, default=8)
    grid.add_argument("--stop-after-minutes", type=float, default=0.0, help="start no run that would end later")
    grid.add_argument("--override", nargs="*", default=[], help="Hydra overrides for every training")
    grid.add_argument("--pretrain-override", nargs="*", default=[])
    grid.add_argument("--finetune-override", nargs="*", default=[])
    report = commands.add_parser("report", help="write the markdown report from --results")
    report.add_argument("--results", required=True)
    report.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "stage":
        stage(args.src, args.dst, int(args.max_mib * 2**20), args.keep_annotations)
    elif args.command == "run":
        run_grid(args)
    else:
        write_report(Path(args.results), Path(args.out))


if __name__ == "__main__":
    main()
