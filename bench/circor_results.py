"""CirCor heart-murmur results: patient-wise stratified k-fold cross-validation of SSAMBA-tiny, from
scratch vs pretrained on each fold's training patients, several seeds, either or both label schemes.

A cell is (label scheme, fold, seed, arm). For seed ``s`` the patients are dealt into ``--folds``
folds stratified on murmur and outcome (``data.split=kfold data.split_seed=s``: a fresh partition per
seed, i.e. repeated k-fold). In cell (fold ``f``, seed ``s``) fold ``f``'s patients are the test
patients; ``data.val_fraction`` of the other folds' patients are val and the rest train. Arm
``scratch`` finetunes (``experiment=circor_murmur``, or ``circor_timing`` for ``murmur_timing``) from
random weights; arm ``pretrained`` first runs ``experiment=circor_pretrain`` on the same fold and seed
(the train patients' audio, the val patients' for its monitor; one pretraining serves both label
schemes), then finetunes from its last checkpoint, at once, on the same machine. Each finetuned model's last
checkpoint (or, with ``--checkpoint best``, the one best on val) is scored per patient on the fold's test
patients, which choose nothing, in the finetuning's own process (``train.py score_checkpoint=...``, the
evaluate.py code path). The report: per scheme and arm the mean over cells with a 95% interval, the paired
difference pretrained - scratch with its interval, the pooled out-of-fold scores of every seed, and
each cell with its card and wall time (docs/heart-murmurs.md says what the intervals mean).

    # optional, where the data lives: split a CirCor folder into parts of at most 40 MiB (each patient in
    # one part, without the unread .hea/.tsv files), to copy it to a GPU machine in pieces
    python bench/circor_results.py stage --src <circor-dev folder> --dst .gpudata/circor --max-mib 40
    # on the GPU machine, with a CirCor folder or the parts; the same command resumes the grid:
    python bench/circor_results.py run --data .gpudata/circor/part* --results .gpudata/circor-cv \\
        --tasks murmur murmur_timing --folds 5 --seeds 0 1 2 --stop-after-minutes 8 --out circor-cv.md
    # a grid over several machines: the cells (small JSON files) accumulate in the repository, the run
    # folders (checkpoints) stay on each machine; commit docs/results/circor-cv/ after each call
    python bench/circor_results.py run --data .gpudata/circor/part* --results docs/results/circor-cv \\
        --work .gpudata/circor-cv-work --tasks murmur murmur_timing --stop-after-minutes 8 \\
        --out docs/results/circor-cv.md
    # anywhere, from the per-cell JSON files:
    python bench/circor_results.py report --results .gpudata/circor-cv --out docs/results/circor-cv.md
    # each cell an ensemble of 3 finetunings (seeds s, s + 1000, s + 2000 on the same patients), own --results:
    python bench/circor_results.py run --data .gpudata/circor/part* --results .gpudata/cv-members3 --members 3
    # another recipe's grid (its own --results) against this one, pair by pair (scheme, fold, seed):
    python bench/circor_results.py compare --base docs/results/circor-cv --other .gpudata/cv-other --out cmp.md
    # patient decision rules scored on the cells' stored predictions (no training; --data adds the quality gate):
    python bench/circor_results.py rules --results docs/results/circor-cv --data <circor-dev folder> \\
        --out docs/results/circor-cv-rules.md
    # the quality gate fitted on all of an arm's out-of-fold predictions, for evaluate.py quality_gate=gate.json:
    python bench/circor_results.py gate --results docs/results/circor-cv --data <circor-dev folder> --arm scratch \\
        --out gate.json

A call skips every cell whose ``cells/*.json`` is in ``--results``; cells of several folders merge by copying
them into one (same ``grid.json``). A pretraining whose checkpoint is not on this machine is done again (the log
says so) before the finetunings that start from it.

Extra Hydra overrides go to every training (``--override``) or to one kind (``--pretrain-override``,
``--finetune-override``), e.g. ``--override +model.depth=2`` for a quick check.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import math
import shutil
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import device_name  # noqa: E402  (bench/ is the script's directory)

ARMS = ("scratch", "pretrained")
ARM_TITLES = {"scratch": "from scratch", "pretrained": "circor_pretrain, then finetuned"}
RECIPES = {"murmur": "circor_murmur", "murmur_timing": "circor_timing"}  # label scheme -> finetuning recipe
SCHEME_TITLES = {"murmur": "the Challenge's Present / Unknown / Absent",
                 "murmur_timing": "the fork's murmur-timing classes, and the Challenge's scores of them collapsed"}
REPORTED = {  # label scheme -> (score key, column title, digits)
    "murmur": (("weighted_accuracy", "weighted accuracy", 3), ("uar", "UAR", 3), ("auroc", "macro AUROC", 3),
               ("recall_Unknown", "Unknown recall", 3), ("cost", "Challenge cost", 0)),
    "murmur_timing": (("uar", "timing UAR", 3), ("auroc", "timing macro AUROC", 3),
                      ("murmur_weighted_accuracy", "murmur weighted accuracy", 3), ("murmur_uar", "murmur UAR", 3),
                      ("murmur_auroc", "murmur macro AUROC", 3), ("murmur_recall_Unknown", "Unknown recall", 3),
                      ("murmur_cost", "Challenge cost", 0)),
}  # fmt: skip
# the README's summary: per label scheme, the keys of murmur weighted accuracy, murmur UAR, Unknown recall and
# timing UAR (None: the scheme has no timing classes); it replaces the text between the two markers
README_KEYS = {"murmur": ("weighted_accuracy", "uar", "recall_Unknown", None),
               "murmur_timing": ("murmur_weighted_accuracy", "murmur_uar", "murmur_recall_Unknown", "uar")}
README_MARKERS = ("<!-- circor-cv summary: written by bench/circor_results.py report --readme -->",
                  "<!-- end of circor-cv summary -->")
TABLES = ("training_data.csv", "split.csv", "LICENSE.txt")
AUDIO_SUFFIXES = (".wav", ".flac")
CONFIDENCE = 0.95
GRACE_SECONDS = 120  # after SIGTERM: the batch in flight, a validation due, writing last.ckpt
MIN_START_SECONDS = 60  # no training starts with less time left before --stop-after-minutes
LAST_CHECKPOINT = "checkpoints/last.ckpt"  # what a finished pretraining leaves for its finetunings
TEST_SCORES = "test_scores.json"  # what a finished finetuning leaves for its cell (train.py score_checkpoint=...)
CIRCOR_CONFIG = ROOT / "conf" / "data" / "circor.yaml"  # its val and label fractions, for the intervals
MEMBER_SEED_STEP = 1000  # --members K: member j of the cell of seed s trains with seed s + j * MEMBER_SEED_STEP


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


def write_json(path: Path, value, indent: int = 2) -> None:
    """Whole or not at all: a runner killed mid-write, or another reading the shared --results (--run-folds array
    jobs), never sees a part of a cell, runner.json or grid.json."""
    from ssamba.utils.atomic_checkpoint import atomic_write_bytes

    atomic_write_bytes((json.dumps(value, indent=indent) + "\n").encode(), path)


# --- one training run, resumable -----------------------------------------------------------------
class Deadline:
    """``--stop-after-minutes`` as a point in time (none when 0); ``stop()`` (on SIGTERM or SIGINT to the
    runner) brings it forward to now."""

    def __init__(self, minutes: float):
        self.end = time.monotonic() + minutes * 60 if minutes > 0 else math.inf

    def left(self) -> float:
        return self.end - time.monotonic()

    def stop(self, *_) -> None:
        self.end = -math.inf


def _run_until(command: list[str], log_path: Path, deadline: Deadline) -> tuple[int | None, float]:
    """Run ``command`` (output appended to ``log_path``) until it exits or the deadline passes; then
    SIGTERM (train.py writes last.ckpt at the next batch and exits), SIGKILL after ``GRACE_SECONDS``.
    Returns (exit status, or None when stopped by the deadline or ``Deadline.stop``; wall seconds)."""
    print("+", " ".join(command), flush=True)
    start = time.perf_counter()
    with open(log_path, "a") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        code = process.poll()
        while code is None and deadline.left() > 0:
            try:
                code = process.wait(timeout=min(deadline.left(), 1.0))
            except subprocess.TimeoutExpired:
                pass
        if code is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    return code, time.perf_counter() - start


def train(overrides: list[str], run_dir: Path, deadline: Deadline, output: str) -> dict | None:
    """``python train.py <overrides>`` into ``run_dir``, resumed from its ``last.ckpt`` when an earlier call
    was stopped. Its state (``runner.json``: finished, wall seconds of all attempts, cards) is returned once
    finished; None when the deadline (or a stop signal to the runner) stopped it first.

    ``output`` is the file (relative to ``run_dir``) that the cells read from the finished run. A run marked
    finished without it (its folder came from another machine, where checkpoints stay) is trained again."""
    state_path = run_dir / "runner.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"finished": False, "seconds": 0.0,
                                                                              "devices": []}  # fmt: skip
    settings = [o for o in overrides if not o.startswith("data.num_workers=")]  # the workers may change on resume
    if state.setdefault("overrides", settings) != settings:
        changed = sorted(set(state["overrides"]) ^ set(settings))
        raise ValueError(f"{run_dir} holds a training of other settings ({', '.join(changed)}): a --work folder "
                         "serves one grid; use another --work")
    if state["finished"] and (run_dir / output).is_file():
        return state
    if state["finished"]:
        print(f"{run_dir.name}: finished earlier, but its {output} is not here (trained on another machine?); "
              "training it again", flush=True)
        state["finished"] = False
    if deadline.left() < MIN_START_SECONDS:
        print(f"{run_dir.name}: not started (--stop-after-minutes or a stop signal); the next call runs it", flush=True)
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    last = run_dir / LAST_CHECKPOINT
    resuming = last.is_file()
    command = [sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}", *([f"ckpt_path={last}"] * resuming)]
    code, seconds = _run_until(command, run_dir / "stdout.log", deadline)
    state["seconds"] += seconds
    state["devices"] = sorted({*state["devices"], device_name()})
    state["finished"] = code == 0
    if code == 0:
        state["wall_times"] = wall_times(run_dir, seconds)
    write_json(state_path, state)
    if code == 0:
        return state
    if code is None or deadline.left() <= 0:  # a Ctrl-C reaches the training too, which then exits non-zero
        print(f"{run_dir.name}: stopped (--stop-after-minutes or a stop signal); the next call resumes it", flush=True)
        return None
    if resuming:  # e.g. a checkpoint cut short by a killed job: start this training over
        print(f"{run_dir.name}: resuming from {last} failed (exit {code}); starting it over", flush=True)
        shutil.rmtree(run_dir / "checkpoints")
        return train(overrides, run_dir, deadline, output)
    tail = (run_dir / "stdout.log").read_text()[-4000:]
    raise RuntimeError(f"train.py failed (exit {code}) in {run_dir}:\n{tail}")


def wall_times(run_dir: Path, seconds: float) -> dict[str, float]:
    """Where the last attempt's ``seconds`` went (``ssamba.callbacks.WallTimes``' sums), with its process start-up
    (to the start of fitting) and what followed fitting (the test patients' scoring, the exit)."""
    path = run_dir / "wall_times.json"
    if not path.is_file():
        return {}
    phases = json.loads(path.read_text())
    ended = time.time()
    start, fit_start, fit_end = ended - seconds, phases.pop("fit_start"), phases.pop("fit_end")
    return {"seconds": round(seconds, 3), "start_seconds": round(fit_start - start, 3), **phases,
            "after_fit_seconds": round(ended - fit_end, 3)}


# --- the grid -------------------------------------------------------------------------------------
PARTITION_KEY = "data.group_linked_patients"


def grid_partition(results: Path, overrides: list[str]) -> list[str]:
    """The partition override a grid runs with, unless ``--override`` names one: a new grid records
    ``data.group_linked_patients=true``; a grid begun before that option (its ``grid.json`` names none) dealt
    each patient id alone and goes on doing so, so that its new cells pair with its old ones."""
    if any(o.lstrip("+").startswith(PARTITION_KEY + "=") for o in overrides):
        return []
    path = results / "grid.json"
    older = path.is_file() and not any(PARTITION_KEY in o for o in json.loads(path.read_text()).get("common", []))
    return [f"{PARTITION_KEY}={'false' if older else 'true'}"]


def check_grid(results: Path, settings: dict) -> None:
    """A results folder holds one grid: its settings (``grid.json``) must match the new call's."""
    path = results / "grid.json"
    if path.is_file():
        earlier = json.loads(path.read_text())
        if earlier != settings:
            changed = sorted(k for k in {*earlier, *settings} if earlier.get(k) != settings.get(k))
            raise ValueError(f"--results {results} holds a grid with other settings ({', '.join(changed)}): "
                             "use another --results folder")
    else:
        results.mkdir(parents=True, exist_ok=True)
        write_json(path, settings)


class Durations:
    """How long a training of each kind (pretraining, finetuning) takes, so that no training starts that the
    deadline would stop: stopped on a machine that is then given back, its checkpoint is lost with it. The
    estimate is the longest of its kind recorded in ``--results``' cells with this call's ``--parallel`` (with
    any, if none), raised by those finished in this call; a resumed training needs that less what it ran.
    ``--machine-stays`` sets the rule aside: a pretraining longer than one call then spans several."""

    def __init__(self, results: Path, parallel: int):
        records = [json.loads(path.read_text()) for path in sorted((results / "cells").glob("*.json"))]
        same = [r for r in records if r.get("parallel") == parallel] or records
        per_training = {"pretrain": lambda r: r["pretrain_seconds"],  # a cell's finetunings: its --members
                        "finetune": lambda r: r["finetune_seconds"] / r.get("members", 1)}
        self.longest = {kind: max((seconds(r) for r in same), default=0.0) for kind, seconds in per_training.items()}

    @staticmethod
    def kind(job: Job) -> str:
        return "pretrain" if job.task is None else "finetune"

    def finished(self, job: Job, seconds: float) -> None:
        self.longest[self.kind(job)] = max(self.longest[self.kind(job)], seconds)

    def needed(self, job: Job, run_dir: Path) -> float:
        """Seconds ``job`` is expected to need (0 when nothing of its kind is known). A pretraining needs room for
        one finetuning after it as well: its checkpoint stays in ``--work``, so if the machine is given back
        before a finetuning has used it, it is lost like a stopped training."""
        state = run_dir / "runner.json"
        resuming = state.is_file() and (run_dir / LAST_CHECKPOINT).is_file()
        spent = json.loads(state.read_text())["seconds"] if resuming else 0.0
        follows = self.longest["finetune"] if self.kind(job) == "pretrain" else 0.0
        return max(self.longest[self.kind(job)] - spent, 0.0) + follows


@dataclass
class Grid:
    """What every cell of one ``run`` call shares."""

    args: argparse.Namespace
    deadline: Deadline
    results: Path
    work: Path
    common: list[str]
    pretrain: list[str]
    finetune: list[str]
    settings: dict


def run_grid(args: argparse.Namespace) -> bool:
    """Train and score every missing cell until done or ``--stop-after-minutes``; True when the grid is complete."""
    results = Path(args.results)
    work = Path(args.work) if args.work else results
    data_root = merge([Path(p) for p in args.data], work / "data")
    partition = grid_partition(results, args.override)
    common = [
        f"data.root={data_root}", f"data.num_workers={args.num_workers}", f"trainer={args.trainer}",
        "logger=csv", "test=false", "trainer.enable_progress_bar=false", "++callbacks.progress_bar=null",
        "data.split_file=null", "data.split=kfold", f"data.folds={args.folds}",
        "+callbacks.wall_times._target_=ssamba.callbacks.WallTimes",
        "+callbacks.wall_times.dirpath=${paths.output_dir}",
        *partition, *args.override,
    ]  # fmt: skip
    # No checkpoint or validation pass that the cell does not read: the pretraining keeps only last.ckpt (its val
    # drives the plateau schedule); the finetuning validates only after its last epoch unless --checkpoint best
    # picks an epoch, and scores the test patients in its own process (score_checkpoint, as evaluate.py). The
    # numbers stay the same: the epoch-stepped finetuning schedule needs no val, and the val loader draws its
    # one seed from the global RNG in the sanity check either way (with loader workers, which persist, and the
    # sanity check on: the runner's defaults; without them every val pass draws one, and fewer change the draws).
    pretrain = ["experiment=circor_pretrain", f"trainer.max_epochs={args.pretrain_epochs}",
                "callbacks.model_checkpoint.save_top_k=0", *args.pretrain_override]
    lean = [f"trainer.check_val_every_n_epoch={args.finetune_epochs}", "callbacks.model_checkpoint.save_top_k=0"]
    finetune = [f"trainer.max_epochs={args.finetune_epochs}", f"score_checkpoint={args.checkpoint}",
                *(lean if args.checkpoint == "last" else []), *args.finetune_override]
    settings = {
        "folds": args.folds, "checkpoint": args.checkpoint, "pretrain": pretrain, "finetune": finetune,
        "common": [o for o in common if not o.startswith(("data.root=", "data.num_workers="))  # no machine paths
                   and not (o in partition and o.endswith("=false"))],  # an older grid's, which it did not record
        **({"members": args.members} if args.members > 1 else {}),  # absent for one: older grids stay the same
    }  # fmt: skip
    check_grid(results, settings)
    settings |= {"recipes": {task: f"experiment={RECIPES[task]}" for task in args.tasks}, "data": args.data_description}
    grid = Grid(args, Deadline(args.stop_after_minutes), results, work, common, pretrain, finetune, settings)
    (results / "cells").mkdir(parents=True, exist_ok=True)
    folds = args.run_folds or range(args.folds)
    jobs = [job for seed, fold, arm in itertools.product(args.seeds, folds, args.arms)
            for job in cell_jobs(grid, args.tasks, fold, seed, arm)]  # fmt: skip
    stops = (signal.SIGTERM, signal.SIGINT)  # a job's end or Ctrl-C: checkpoint the trainings, then stop
    before = [signal.signal(signum, grid.deadline.stop) for signum in stops]
    try:
        complete = run_jobs(grid, jobs)
    finally:
        for signum, handler in zip(stops, before):
            signal.signal(signum, handler)
    write_report(results, Path(args.out), grid_plan(args))
    return complete


def cell_path(results: Path, task: str, fold: int, seed: int, arm: str) -> Path:
    return results / "cells" / f"{task}_fold{fold}_seed{seed}_{arm}.json"


@dataclass(eq=False)
class Job:
    """One training of the grid: a fold and seed's pretraining (``task`` None), or a finetuning whose cell
    (``task``, ``fold``, ``seed``, ``arm``) it scores, after the pretraining it ``needs`` for arm pretrained."""

    fold: int
    seed: int
    arm: str
    task: str | None = None
    needs: Job | None = None
    member: int = 0  # --members K: 1 .. K-1 are a cell's further finetunings, trained with their own seeds
    members: tuple[Job, ...] = ()  # of the cell's own finetuning (member 0): the members it is scored with

    @property
    def run_dir_name(self) -> str:
        if self.task is None:
            return f"pretrain_fold{self.fold}_seed{self.seed}"
        cell = f"{self.task}_fold{self.fold}_seed{self.seed}_{self.arm}"
        return f"{cell}_member{self.member}" if self.member else cell

    @property
    def prerequisites(self) -> list[Job]:
        return [*([self.needs] if self.needs else []), *self.members]


def job_folder(grid: Grid, job: Job) -> Path:
    """Where a job's training runs (checkpoints, logs, runner.json): in --work, never in --results."""
    return grid.work / "runs" / job.run_dir_name


def cell_jobs(grid: Grid, tasks: list[str], fold: int, seed: int, arm: str) -> list[Job]:
    """The trainings of one (fold, seed, arm)'s missing cells, one per label scheme: for arm pretrained its
    pretraining first (shared by the schemes), then the finetunings that start from it (with ``--members K``,
    K per cell, the cell's own last). A pretraining's checkpoint stays on the machine that made it: one finished
    on another machine is done again here."""
    todo = [t for t in tasks if not cell_path(grid.results, t, fold, seed, arm).is_file()]
    if not todo:
        return []
    pretraining = None
    if arm == "pretrained":
        pretraining = Job(fold, seed, arm)
        served = [t for t in RECIPES if t not in todo and cell_path(grid.results, t, fold, seed, arm).is_file()]
        if served and not (job_folder(grid, pretraining) / LAST_CHECKPOINT).is_file():
            print(f"{pretraining.run_dir_name}: finished elsewhere (the {', '.join(served)} cells started from it), "
                  "but its checkpoint is not on this machine; pretraining again", flush=True)
    jobs = [pretraining] if pretraining else []
    for task in todo:
        members = tuple(Job(fold, seed, arm, task, pretraining, member) for member in range(1, grid.args.members))
        jobs += [*members, Job(fold, seed, arm, task, pretraining, members=members)]
    return jobs


def train_job(grid: Grid, job: Job) -> dict | None:
    """Train one job (``train``'s result: its state, or None when stopped by the deadline). A further member of a
    cell trains on the same patients with its own seed and is kept, unscored, for the cell's own finetuning to
    score with it as one ensemble (``train.py score_ensemble=...``)."""
    seed = job.seed + MEMBER_SEED_STEP * job.member
    each = [f"data.fold={job.fold}", f"data.split_seed={job.seed}", f"seed={seed}"]
    if job.task is None:
        return train([*grid.pretrain, *grid.common, *each], job_folder(grid, job), grid.deadline, LAST_CHECKPOINT)
    init = [f"task.pretrained={job_folder(grid, job.needs) / LAST_CHECKPOINT}"] if job.needs else []
    recipe = f"experiment={RECIPES[job.task]}"
    if job.member:
        unscored = [o for o in grid.finetune if not o.startswith("score_checkpoint=")]
        return train([recipe, *unscored, *grid.common, *each, *init], job_folder(grid, job), grid.deadline,
                     LAST_CHECKPOINT)
    paths = ",".join(f"'{job_folder(grid, member) / LAST_CHECKPOINT}'" for member in job.members)
    ensemble = [f"score_ensemble=[{paths}]"] if job.members else []
    lengths = grid.args.score_max_seconds
    shortened = [f"score_max_seconds=[{','.join(f'{n:g}' for n in lengths)}]"] if lengths else []
    return train([recipe, *grid.finetune, *grid.common, *each, *init, *ensemble, *shortened], job_folder(grid, job),
                 grid.deadline, TEST_SCORES)


def run_jobs(grid: Grid, jobs: list[Job]) -> bool:
    """Train ``jobs`` up to ``--parallel`` at once, each as soon as the pretraining it needs has finished, in the
    order given (the grid's: seeds, then folds, then arms) wherever an earlier one must wait; write each finished
    finetuning's cell. True when every job finished. A failed training stops the others (they checkpoint and
    resume on the next call) and is raised once they have stopped."""
    finished: dict[Job, dict] = {}
    pending, running, complete, failure = list(jobs), {}, True, None
    durations, deferred = Durations(grid.results, grid.args.parallel), set()
    with ThreadPoolExecutor(max_workers=grid.args.parallel) as pool:
        while pending or running:
            for job in list(pending):
                if len(running) >= grid.args.parallel or failure or grid.deadline.left() < MIN_START_SECONDS:
                    break
                waiting = [other for other in job.prerequisites if other not in finished]
                if not waiting:
                    needed = 0.0 if grid.args.machine_stays else durations.needed(job, job_folder(grid, job))
                    if grid.deadline.left() < needed:
                        if job not in deferred:
                            deferred.add(job)
                            basis = ("the longest pretraining and finetuning recorded, one after the other"
                                     if durations.kind(job) == "pretrain" else "the longest such training recorded")
                            print(f"{job.run_dir_name}: not started: about {needed:.0f} s needed ({basis}), "
                                  f"{grid.deadline.left():.0f} s left", flush=True)
                        continue
                    pending.remove(job)
                    running[pool.submit(train_job, grid, job)] = job
                elif any(other not in running.values() and other not in pending for other in waiting):
                    # one it waits for was stopped: its turn is the next call
                    pending.remove(job)
                    complete = False
            if not running:
                break
            done, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)  # a timeout lets signals reach us
            for future in done:
                job = running.pop(future)
                try:
                    state = future.result()
                except Exception as error:  # noqa: BLE001 (raised below, once the other trainings have stopped)
                    failure = failure or error
                    grid.deadline.stop()
                    continue
                if state is None:
                    complete = False
                    continue
                finished[job] = state
                durations.finished(job, state["seconds"])
                if job.task is not None and not job.member:
                    pretrained = finished[job.needs] if job.needs else {"seconds": 0.0, "devices": []}
                    record_cell(grid, job, pretrained, [state, *(finished[member] for member in job.members)])
    if failure:
        raise failure
    if pending:
        print(f"{len(pending)} training(s) not started (--stop-after-minutes or a stop signal); the next call runs "
              "them", flush=True)
    return complete and not pending


def record_cell(grid: Grid, job: Job, pretrained: dict, finetunings: list[dict]) -> None:
    """Write a finished cell's JSON (scores, the patients' predictions, cards, wall times) and the report.
    ``finetunings``: the states of the cell's own finetuning, then of its further members (``--members``), whose
    seconds its finetune_seconds sums."""
    scored = json.loads((job_folder(grid, job) / TEST_SCORES).read_text())
    scores, finetuned = scored["scores"], finetunings[0]
    record = {
        "task": job.task, "fold": job.fold, "seed": job.seed, "arm": job.arm,
        "cards": sorted({*pretrained["devices"], *(card for state in finetunings for card in state["devices"])}),
        "pretrain_seconds": pretrained["seconds"], "finetune_seconds": sum(state["seconds"] for state in finetunings),
        **({"members": len(finetunings)} if len(finetunings) > 1 else {}),
        "score_seconds": scored["seconds"], "parallel": grid.args.parallel, "num_workers": grid.args.num_workers,
        "settings": grid.settings,
        "scores": scores,
        **({"by_max_seconds": scored["by_max_seconds"]} if "by_max_seconds" in scored else {}),
        "patients": scored["patients"],
        "wall_times": {"pretrain": pretrained.get("wall_times", {}), "finetune": finetuned.get("wall_times", {})},
    }  # fmt: skip
    write_json(cell_path(grid.results, job.task, job.fold, job.seed, job.arm), record, indent=1)
    print(f"{job.run_dir_name}: " + ", ".join(f"{k}={scores.get(k, math.nan):.4f}" for k, *_ in REPORTED[job.task]),
          flush=True)  # fmt: skip
    write_report(grid.results, Path(grid.args.out), grid_plan(grid.args))


def grid_plan(args: argparse.Namespace) -> dict:
    """The cells a run or report was asked for, for the report's count of those still to come."""
    return {key: getattr(args, key) for key in ("tasks", "seeds", "arms") if getattr(args, key, None)}


# --- statistics -------------------------------------------------------------------------------------
def t_cdf(x: float, df: int, steps: int = 20000) -> float:
    """Student's t distribution function, by Simpson's rule on its density (enough for a report's digits)."""
    if x < 0:
        return 1.0 - t_cdf(-x, df, steps)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(t: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))

    h = x / steps
    total = density(0.0) + density(x)
    total += sum((4 if k % 2 else 2) * density(k * h) for k in range(1, steps))
    return 0.5 + total * h / 3


@functools.lru_cache
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t with ``df`` degrees of freedom, by bisection."""
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2 * high
    while high - low > 1e-7:
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


def test_to_train(records: list[dict]) -> float:
    """A test fold's size over the patients a cell's finetuning trained on (:func:`interval`): the other k - 1
    folds less the val patients carved from them (``data.val_fraction``) and, with ``data.label_fraction``, less
    the train patients whose labels were left out. Where two grids are paired, the larger of theirs."""
    return max(_test_to_train(r["settings"]) for r in records)


def _test_to_train(settings: dict) -> float:
    val, labels = data_setting(settings, "val_fraction"), data_setting(settings, "label_fraction")
    return 1 / ((settings["folds"] - 1) * (1 - val) * labels)


def data_setting(settings: dict, key: str) -> float:
    """``data.<key>`` as a cell's finetuning ran it: its overrides, else the ``data=circor`` default."""
    given = dict(o.lstrip("+").split("=", 1) for o in [*settings["common"], *settings["finetune"]] if "=" in o)
    return float(given.get(f"data.{key}", circor_default(key)))


@functools.cache
def circor_default(key: str):
    """A setting of ``data=circor`` as its config file gives it."""
    from omegaconf import OmegaConf

    return OmegaConf.load(CIRCOR_CONFIG)[key]


def ratio_text(ratio: float) -> str:
    return f"s² (1/n + {ratio:.3f}), {ratio:.3f} a test fold's size over the patients its models trained on"


def minutes_per_cell(cells: list[dict]) -> float:
    """Mean wall minutes of the cells' trainings, a pretrained cell's pretraining included."""
    return statistics.fmean((r["pretrain_seconds"] + r["finetune_seconds"]) / 60 for r in cells)


def interval(values: list[float], test_to_train: float) -> tuple[float, float, int]:
    """(mean, half-width of its ``CONFIDENCE`` interval, n) over the finite ``values`` of fold x seed cells.

    Student's t with n - 1 degrees of freedom on the variance corrected for cells that share patients
    (Nadeau and Bengio's corrected resampled t): ``s^2 * (1/n + test_to_train)``, where ``test_to_train``
    is a test fold's size over its training patients' (:func:`test_to_train`). NaN half-width below 2 values.
    """
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan, 0
    n, mean = len(values), statistics.fmean(values)
    if n < 2:
        return mean, math.nan, n
    spread = math.sqrt((1 / n + test_to_train) * statistics.variance(values))
    return mean, t_quantile(0.5 + CONFIDENCE / 2, n - 1) * spread, n


def paired_differences(records: list[dict], key: str) -> list[float]:
    """pretrained - scratch of ``key`` for every (fold, seed) that both arms scored. The two cells of a pair must
    have scored the same patients (a cell run after a change of partition, e.g. data.group_linked_patients, has
    not), else the pair means nothing and is refused."""
    cells = {(r["fold"], r["seed"], r["arm"]): r for r in records}
    differences = []
    for (fold, seed, arm), cell in sorted(cells.items()):
        other = cells.get((fold, seed, "pretrained"))
        if arm != "scratch" or other is None:
            continue
        if other.get("patients", {}).get("id") != cell.get("patients", {}).get("id"):
            raise ValueError(f"{cell['task']} fold {fold} seed {seed}: the pretrained and scratch cells scored "
                             "different patients (another partition), so they cannot be paired")
        differences.append(other["scores"].get(key, math.nan) - cell["scores"].get(key, math.nan))
    return differences


def patient_scores_of(records: list[dict], preds: list[int] | None = None) -> dict[str, float]:
    """Scores of the cells' stored patient predictions, taken together (``records`` of one scheme and arm), with
    each patient's predicted class from ``preds`` (in the cells' order) instead of the stored one if given."""
    import torch

    from ssamba.metrics import patient_metrics
    from ssamba.metrics.patient import PatientPredictions, id_code

    first = records[0]["patients"]
    rows = {name: [v for r in records for v in r["patients"][name]] for name in ("id", "target", "pred", "probs",
                                                                                   "outcome", "recordings")}
    if len(set(rows["id"])) != len(rows["id"]):
        raise ValueError("a patient is in the test patients of two folds")
    probs = torch.tensor(rows["probs"], dtype=torch.float64)
    outcome = torch.tensor(rows["outcome"])
    predictions = PatientPredictions(
        patient=torch.tensor([id_code(i) for i in rows["id"]]), logits=probs.clamp(min=1e-12).log(), probs=probs,
        preds=torch.tensor(rows["pred"] if preds is None else preds), target=torch.tensor(rows["target"]),
        outcome=None if bool((outcome < 0).all()) else outcome, num_recordings=torch.tensor(rows["recordings"]),
    )  # fmt: skip
    metric = patient_metrics(first["class_names"], first["rule"])
    return {name: float(value) for name, value in metric.scores(predictions).items()}


def pooled_scores(records: list[dict]) -> dict[str, float]:
    """Scores of the out-of-fold patient predictions of one (scheme, seed, arm), every fold's together."""
    return patient_scores_of(records)


# --- the report ------------------------------------------------------------------------------------
def number(value: float, digits: int, signed: bool = False) -> str:
    return "n/a" if math.isnan(value) else f"{value:{'+' if signed else ''}.{digits}f}"


def with_interval(values: list[float], test_to_train: float, digits: int, signed: bool = False) -> str:
    mean, half, _ = interval(values, test_to_train)
    if math.isnan(half):
        return number(mean, digits, signed)
    low, high = number(mean - half, digits, signed), number(mean + half, digits, signed)
    return f"{number(mean, digits, signed)} [{low}, {high}]"


def load_results(results: Path) -> list[dict]:
    records = [json.loads(p.read_text()) for p in sorted((results / "cells").glob("*.json"))]
    return sorted(records, key=lambda r: (list(REPORTED).index(r["task"]), ARMS.index(r["arm"]), r["seed"], r["fold"]))


def render_scheme(task: str, records: list[dict]) -> list[str]:
    reported, ratio, folds = REPORTED[task], test_to_train(records), records[0]["settings"]["folds"]
    titles = " | ".join(title for _, title, _ in reported)
    rule = "|---" * len(reported) + "|"
    lines = [f"### `{task}`: {SCHEME_TITLES[task]}", "", f"| arm | cells | {titles} | minutes per cell | cards |",
             f"|---|---{rule}---|---|"]  # fmt: skip
    for arm in ARMS:
        rows = [r for r in records if r["arm"] == arm]
        if rows:
            cells = [with_interval([r["scores"].get(k, math.nan) for r in rows], ratio, d) for k, _, d in reported]
            minutes = minutes_per_cell(rows)
            cards = ", ".join(sorted({c for r in rows for c in r["cards"]}))
            lines.append(f"| {ARM_TITLES[arm]} | {len(rows)} | " + " | ".join(cells) + f" | {minutes:.1f} | {cards} |")
    pairs = paired_differences(records, reported[0][0])
    if pairs:
        diffs = [with_interval(paired_differences(records, k), ratio, d, signed=True) for k, _, d in reported]
        lines += ["", "Paired difference, pretrained minus scratch, over the (fold, seed) cells both arms scored:", "",
                  f"| pairs | {titles} |", f"|---{rule}", f"| {len(pairs)} | " + " | ".join(diffs) + " |"]  # fmt: skip
    lines += shortened_lines(records, reported, ratio)
    pooled = []
    for arm in ARMS:
        for seed in sorted({r["seed"] for r in records}):
            group = [r for r in records if r["arm"] == arm and r["seed"] == seed]
            if len({r["fold"] for r in group}) == folds:
                scores = pooled_scores(group)
                cells = [number(scores.get(k, math.nan), d) for k, _, d in reported]
                pooled.append(f"| {arm} | {seed} | " + " | ".join(cells) + f" | {int(scores['patients'])} |")
    if pooled:
        lines += ["", "Pooled out-of-fold: each seed's folds scored together, every patient once:", "",
                  f"| arm | seed | {titles} | patients |", f"|---|---{rule}---|", *pooled]  # fmt: skip
    lines += ["", "Per cell (test patients of the fold):", "",
              f"| fold | seed | arm | {titles} | patients | card | minutes (pretrain + finetune) |",
              f"|---|---|---{rule}---|---|---|"]  # fmt: skip
    for r in sorted(records, key=lambda r: (r["seed"], r["fold"], ARMS.index(r["arm"]))):
        cells = [number(r["scores"].get(k, math.nan), d) for k, _, d in reported]
        minutes = f"{r['pretrain_seconds'] / 60:.1f} + {r['finetune_seconds'] / 60:.1f}"
        if r.get("parallel", 1) > 1:  # wall minutes that may overlap other trainings on the machine
            minutes += f" (--parallel {r['parallel']})"
        lines.append(f"| {r['fold']} | {r['seed']} | {r['arm']} | " + " | ".join(cells)
                     + f" | {int(r['scores']['patients'])} | {', '.join(r['cards'])} | {minutes} |")
    return lines + [""]


def shortened_lines(records: list[dict], reported: tuple, ratio: float) -> list[str]:
    """The cells' scores on each recording's first N s (``--score-max-seconds``), and those minus the cell's own
    scores on the whole recordings: how much the models depend on the length they are scored on."""
    lengths = sorted({key for r in records for key in r.get("by_max_seconds", {})}, key=float)  # as written: "5"
    if not lengths:
        return []
    titles = " | ".join(title for _, title, _ in reported)
    lines = ["", "Scored again on each recording's first N s only (`--score-max-seconds`), and that minus the "
             "whole recordings' score, cell by cell:", "", f"| arm | scored on | cells | {titles} |",
             "|---|---|---" + "|---" * len(reported) + "|"]  # fmt: skip
    for arm in ARMS:
        for key in lengths:
            rows = [r for r in records if r["arm"] == arm and key in r.get("by_max_seconds", {})]
            if not rows:
                continue
            short = [[r["by_max_seconds"][key].get(k, math.nan) for r in rows] for k, _, _ in reported]
            whole = [[r["scores"].get(k, math.nan) for r in rows] for k, _, _ in reported]
            at = [with_interval(v, ratio, d) for v, (_, _, d) in zip(short, reported)]
            moved = [with_interval([a - b for a, b in zip(v, w)], ratio, d, signed=True)
                     for v, w, (_, _, d) in zip(short, whole, reported)]
            lines += [f"| {arm} | first {key} s | {len(rows)} | " + " | ".join(at) + " |",
                      f"| {arm} | first {key} s minus whole | {len(rows)} | " + " | ".join(moved) + " |"]
    return lines


def planned_cells(records: list[dict], plan: dict | None) -> tuple[list[str], list[int], list[str], int]:
    """Label schemes, seeds and arms of the grid (the cells' own and ``plan``'s; both arms where ``plan`` names
    none), and its number of cells."""
    plan = plan or {}
    tasks = sorted({r["task"] for r in records} | set(plan.get("tasks", ())))
    seeds = sorted({r["seed"] for r in records} | set(plan.get("seeds", ())))
    arms = sorted(set(plan.get("arms") or ARMS) | {r["arm"] for r in records})
    return tasks, seeds, arms, len(tasks) * records[0]["settings"]["folds"] * len(seeds) * len(arms)


def readme_summary(records: list[dict], plan: dict | None = None) -> str:
    """The README's table: per label scheme and arm the cells, the headline scores with their intervals and
    the minutes per cell; then pretrained minus scratch, and whether any interval orders the arms."""
    ratio = test_to_train(records)
    _, _, _, expected = planned_cells(records, plan)
    lines = [f"{len(records)} of the grid's {expected} cells:", "",
             "| label scheme | arm | cells | murmur weighted accuracy | murmur UAR | Unknown recall | "
             "timing UAR (7 classes) | minutes per cell |", "|---|---|---|---|---|---|---|---|"]
    differences, ordered = [], []
    for task, keys in README_KEYS.items():
        rows = [r for r in records if r["task"] == task]
        for arm in ARMS:
            cells = [r for r in rows if r["arm"] == arm]
            if cells:
                scores = [with_interval([r["scores"].get(k, math.nan) for r in cells], ratio, 3) if k else "-"
                          for k in keys]
                minutes = minutes_per_cell(cells)
                lines.append(f"| `{task}` | {ARM_TITLES[arm]} | {len(cells)} | " + " | ".join(scores)
                             + f" | {minutes:.1f} |")
        for key, title in ((keys[0], "murmur weighted accuracy"), (keys[3], "timing UAR")):
            pairs = paired_differences(rows, key) if key else []
            if len(pairs) > 1:
                mean, half, _ = interval(pairs, ratio)
                differences.append(f"{with_interval(pairs, ratio, 3, signed=True)} in {title} (`{task}`, "
                                   f"{len(pairs)} pairs)")
                if abs(mean) > half:
                    ordered.append(f"{title} (`{task}`)")
    if differences:
        verdict = (f"the interval of {', '.join(ordered)} excludes 0" if ordered else
                   "every interval spans 0, so no ordering of the arms is claimed")
        lines += ["", f"Pretrained minus scratch, pair by pair: {'; '.join(differences)}: {verdict}."]
    return "\n".join(lines)


def write_readme_summary(readme: Path, records: list[dict], plan: dict | None) -> None:
    """Replace the text between :data:`README_MARKERS` in ``readme`` with :func:`readme_summary`."""
    text = readme.read_text()
    start, end = (text.find(marker) for marker in README_MARKERS)
    if start < 0 or end < start:
        raise ValueError(f"{readme} has no block between the lines {README_MARKERS[0]} and {README_MARKERS[1]}")
    head = text[:start + len(README_MARKERS[0])]
    readme.write_text(f"{head}\n{readme_summary(records, plan)}\n{text[end:]}")
    print(f"summary: {readme}", flush=True)


def render(records: list[dict], plan: dict | None = None) -> str:
    """Markdown: per label scheme the arms' means with intervals, the paired difference, pooled scores, cells.
    ``plan`` (``tasks``, ``seeds``, ``arms``: what a run was asked for) counts the cells still to come; the
    cells' own schemes, seeds and arms are counted either way, and both arms where ``plan`` names none."""
    if not records:
        raise ValueError("no results to report")
    settings = records[0]["settings"]
    folds = settings["folds"]
    seeds = sorted({r["seed"] for r in records})
    lines = [
        f"## CirCor heart murmurs: patient-wise stratified {folds}-fold cross-validation, SSAMBA-tiny from scratch "
        "vs CirCor pretraining",
        "",
        f"Written {datetime.date.today().isoformat()} by `bench/circor_results.py`. "
        f"Data: {settings.get('data') or 'CirCor'}. Seeds {', '.join(map(str, seeds))}; each seed deals the "
        f"patients into {folds} folds stratified on murmur and outcome (its own partition). A cell trains on the "
        "other folds' patients (val carved from them) and is scored per patient on its fold with the "
        f"{settings['checkpoint']} checkpoint; the test fold chooses nothing.",
        f"Intervals: {CONFIDENCE:.0%}, Student's t over the fold x seed cells with the variance corrected for "
        f"their shared patients (Nadeau-Bengio: {ratio_text(test_to_train(records))}); see docs/heart-murmurs.md.",
        "",
    ]
    tasks, planned_seeds, arms, expected = planned_cells(records, plan)
    if len(records) < expected:
        lines += [f"**Incomplete grid: {len(records)} of the {expected} cells** (label schemes {', '.join(tasks)}; "
                  f"seeds {', '.join(map(str, planned_seeds))}; {folds} folds; arms {', '.join(arms)}). The cells "
                  "so far cover only some folds and seeds; read no ordering of the arms into them.", ""]
    for task in REPORTED:
        rows = [r for r in records if r["task"] == task]
        if rows:
            lines += render_scheme(task, rows)
    lines += [
        "Settings (Hydra overrides):",
        "",
        f"- pretraining (one per fold and seed, shared by the label schemes): `{' '.join(settings['pretrain'])}`",
        "- finetuning: " + ", ".join(sorted({f"`{r['settings']['recipes'][r['task']]}`" for r in records}))
        + f" with `{' '.join(settings['finetune'])}`",
        f"- every training: `{' '.join(settings['common'])}`, and per cell `data.fold=<fold> "
        "data.split_seed=<seed> seed=<seed>`",
    ]
    members = records[0].get("members", 1)  # a grid's folder holds one count (run refuses another)
    if members > 1:
        lines.append(f"- each cell: {members} finetunings on its patients (seeds <seed> + j x {MEMBER_SEED_STEP}, "
                     f"j < {members}), scored per patient as one ensemble (mean class probabilities; `--members`)")
    return "\n".join([*lines, ""])


def write_report(results: Path, out: Path, plan: dict | None = None, readme: Path | None = None) -> None:
    records = load_results(results)
    if records:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render(records, plan))
        print(f"report: {out} ({len(records)} cells)", flush=True)
        if readme is not None:
            write_readme_summary(readme, records, plan)


# --- two recipes, pair by pair -------------------------------------------------------------------
def setting_changes(base: dict, other: dict) -> list[str]:
    """What the other grid's Hydra overrides add or drop, per kind, against the base grid's."""
    lines = []
    for kind in ("common", "pretrain", "finetune"):
        before, after = base.get(kind, []), other.get(kind, [])
        added, dropped = [o for o in after if o not in before], [o for o in before if o not in after]
        if added or dropped:
            change = "; ".join(part for part in (f"adds `{' '.join(added)}`" if added else "",
                                                 f"drops `{' '.join(dropped)}`" if dropped else "") if part)
            lines.append(f"- {kind}: {change}")
    members = base.get("members", 1), other.get("members", 1)
    if members[0] != members[1]:
        lines.append(f"- finetunings per cell, scored as one ensemble (`--members`): {members[0]} -> {members[1]}")
    return lines or ["- none: the same overrides (another seed set or arm only)"]


def compare_pairs(base: list[dict], other: list[dict], base_arm: str, other_arm: str) -> dict[str, list[tuple]]:
    """Per label scheme, the (base cell, other cell) pairs of the same fold and seed. Paired cells must have
    scored the same patients (same data, same partition), else the pairing means nothing and is refused."""
    index = {(r["task"], r["fold"], r["seed"]): r for r in base if r["arm"] == base_arm}
    pairs: dict[str, list[tuple]] = {}
    for r in other:
        key = (r["task"], r["fold"], r["seed"])
        if r["arm"] != other_arm or key not in index:
            continue
        if index[key]["patients"]["id"] != r["patients"]["id"]:
            raise ValueError(f"{r['task']} fold {r['fold']} seed {r['seed']}: the two grids scored different "
                             "patients (other data or another partition), so their cells cannot be paired")
        pairs.setdefault(r["task"], []).append((index[key], r))
    return pairs


def render_comparison(base_dir: Path, other_dir: Path, base_arm: str, other_arm: str) -> str:
    """Markdown: the other grid's recipe minus the base grid's, over the (scheme, fold, seed) cells both
    scored, with the same corrected intervals as the report's paired differences."""
    base, other = load_results(base_dir), load_results(other_dir)
    if not base or not other:
        raise ValueError(f"no cells in {base_dir if not base else other_dir}/cells")
    folds = base[0]["settings"]["folds"]
    if other[0]["settings"]["folds"] != folds:
        raise ValueError(f"the grids have {folds} and {other[0]['settings']['folds']} folds: cells of different "
                         "partitions cannot be paired")
    pairs = compare_pairs(base, other, base_arm, other_arm)
    if not pairs:
        raise ValueError(f"no (label scheme, fold, seed) cell of arm {other_arm} in {other_dir} has a {base_arm} "
                         f"cell in {base_dir} to pair with")
    ratio = test_to_train(base + other)
    lines = [f"## CirCor: `{other_dir.name}` ({other_arm}) minus `{base_dir.name}` ({base_arm}), pair by pair", "",
             f"Written {datetime.date.today().isoformat()} by `bench/circor_results.py compare`. A pair is one label "
             f"scheme, fold and seed scored by both grids: the same {folds}-fold partition, the same test patients. "
             f"Intervals: {CONFIDENCE:.0%}, Student's t with the Nadeau-Bengio correction ({ratio_text(ratio)}), "
             "as in the cross-validation report; an interval that spans 0 orders neither recipe.", "",
             f"What `{other_dir.name}` changes (Hydra overrides against `{base_dir.name}`):", "",
             *setting_changes(base[0]["settings"], other[0]["settings"]), ""]  # fmt: skip
    for task in REPORTED:
        if task not in pairs:
            continue
        reported, matched = REPORTED[task], pairs[task]
        titles = " | ".join(title for _, title, _ in reported)
        rule = "|---" * len(reported) + "|"
        seeds = ", ".join(map(str, sorted({b["seed"] for b, _ in matched})))
        lines += [f"### `{task}`: {SCHEME_TITLES[task]}", "", f"{len(matched)} pairs (seeds {seeds}).", "",
                  f"| | {titles} |", f"|---{rule}"]  # fmt: skip
        for name, side in ((f"`{base_dir.name}` ({base_arm})", 0), (f"`{other_dir.name}` ({other_arm})", 1)):
            cells = [with_interval([p[side]["scores"].get(k, math.nan) for p in matched], ratio, d)
                     for k, _, d in reported]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        diffs = [with_interval([o["scores"].get(k, math.nan) - b["scores"].get(k, math.nan) for b, o in matched],
                               ratio, d, signed=True) for k, _, d in reported]
        lines += ["| difference | " + " | ".join(diffs) + " |", "",
                  "The cells' own spread (sample standard deviation over these cells) and how the two grids' "
                  "cells move together, cell by cell (Pearson correlation): a recipe meant to lower training "
                  "noise shows it here before its means can.", "", f"| | {titles} |", f"|---{rule}"]
        for name, side in ((f"sd, `{base_dir.name}`", 0), (f"sd, `{other_dir.name}`", 1)):
            sds = [number(spread([p[side]["scores"].get(k, math.nan) for p in matched]), d) for k, _, d in reported]
            lines.append(f"| {name} | " + " | ".join(sds) + " |")
        correlations = [number(correlation([(b["scores"].get(k, math.nan), o["scores"].get(k, math.nan))
                                            for b, o in matched]), 2) for k, _, _ in reported]
        lines += ["| correlation | " + " | ".join(correlations) + " |", ""]
    return "\n".join(lines)


def spread(values: list[float]) -> float:
    """Sample standard deviation of the finite ``values``; NaN below two."""
    values = [v for v in values if not math.isnan(v)]
    return statistics.stdev(values) if len(values) > 1 else math.nan


def correlation(pairs: list[tuple[float, float]]) -> float:
    """Pearson correlation over the pairs with both values finite; NaN below three or where either side is
    constant (no correlation to speak of)."""
    pairs = [(a, b) for a, b in pairs if not (math.isnan(a) or math.isnan(b))]
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return math.nan
    return statistics.correlation(*zip(*pairs))


# --- patient decision rules on the cells' stored predictions ------------------------------------------
# log-probability offsets searched for Present and Unknown by the rules fitted on the other folds: a patient's
# (which the mean rule under-calls Present) and each recording's (where the hierarchical rule may over-call it)
BIAS_GRID = tuple(step / 4 for step in range(11))
RECORDING_BIAS_GRID = tuple(step / 4 for step in range(-10, 11))
RULES = {  # name -> what it does, for the report
    "recorded": "the cell's own predictions: the hierarchical rule over its recordings (the grid's scores)",
    "mean": "argmax of the patient's probabilities (the softmax of its recordings' mean logits)",
    "challenge weights": "argmax of the probabilities times the Challenge's class weights (5, 3, 1)",
    "fitted offsets": f"argmax of the log-probabilities plus offsets for Present and Unknown (each {BIAS_GRID[0]} "
                      f"to {BIAS_GRID[-1]} by {BIAS_GRID[1]}) chosen for the best weighted accuracy on the same "
                      "seed's other folds, scored by their own models: the fold's patients choose nothing",
    "seed ensemble": "argmax of the mean of the patient's probabilities over the arm's seeds (each from the "
                     "fold model that did not train on the patient)",
    "recording offsets": f"the hierarchical rule on each recording's log-probabilities plus offsets for Present and "
                         f"Unknown (each {RECORDING_BIAS_GRID[0]} to {RECORDING_BIAS_GRID[-1]} by 0.25) chosen for "
                         "the best weighted accuracy on the same seed's other folds: the fold's patients choose "
                         "nothing (cells that kept their recordings' logits)",
    "seed ensemble, recordings": "the hierarchical rule on each recording's probabilities averaged over the arm's "
                                 "seeds (cells that kept their recordings' logits)",
    "quality gate": "the recorded predictions, except that a patient not predicted Present becomes Unknown when a "
                    "logistic regression on its recordings' signal-quality statistics (ssamba.data.quality; "
                    "needs --data) scores it above a threshold; regression and threshold (the best weighted "
                    "accuracy) fitted on the same seed's other folds: the fold's patients choose nothing",
}  # fmt: skip


def _argmax(rows: list[list[float]]) -> list[int]:
    return [max(range(len(row)), key=row.__getitem__) for row in rows]


def _log_probs(rows: list[list[float]]) -> list[list[float]]:
    return [[math.log(max(p, 1e-12)) for p in row] for row in rows]


def cell_key(record: dict) -> tuple[int, int, str]:
    """(fold, seed, arm): a cell of one label scheme."""
    return record["fold"], record["seed"], record["arm"]


def fitted_offsets(records: list[dict], weights: list[float]) -> tuple[float, float]:
    """The (Present, Unknown) log-probability offsets from :data:`BIAS_GRID` with the best weighted accuracy
    over ``records``' patients; ties go to the smaller offsets."""
    from ssamba.metrics.challenge import weighted_accuracy_of

    target = [t for r in records for t in r["patients"]["target"]]
    logs = _log_probs([row for r in records for row in r["patients"]["probs"]])
    best = None
    for present, unknown in itertools.product(BIAS_GRID, BIAS_GRID):
        preds = _argmax([[row[0] + present, row[1] + unknown, *row[2:]] for row in logs])
        score = weighted_accuracy_of(target, preds, weights)
        if best is None or score > best[0]:
            best = (score, present, unknown)
    return best[1], best[2]


def recording_log_probs(record: dict) -> list[list[list[float]]] | None:
    """For each patient of the cell, in its order, its recordings' log-probabilities (the log-softmax of their
    mean logits); None for a cell scored before cells kept their recordings (``recording_rows``)."""
    rows = record["patients"].get("recording_rows")
    if rows is None:
        return None
    by_patient: dict[str, list[list[float]]] = {}
    for patient, logits in zip(rows["patient"], rows["logits"]):
        by_patient.setdefault(patient, []).append(_log_softmax(logits))
    return [by_patient[patient] for patient in record["patients"]["id"]]


def _log_softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    norm = top + math.log(sum(math.exp(value - top) for value in logits))
    return [value - norm for value in logits]


def hierarchical(patients: list[list[list[float]]], present: float = 0.0, unknown: float = 0.0) -> list[int]:
    """The hierarchical rule over each patient's recordings (rows of Present, Unknown, Absent scores): the
    lowest class index a recording's argmax takes, after adding the offsets to its Present and Unknown scores."""
    return [min(_argmax([[row[0] + present, row[1] + unknown, *row[2:]] for row in recordings]))
            for recordings in patients]


def fitted_recording_offsets(patients: list[list[list[float]]], target: list[int],
                             weights: list[float]) -> tuple[float, float]:
    """The (Present, Unknown) offsets from :data:`RECORDING_BIAS_GRID` for :func:`hierarchical` with the best
    weighted accuracy over ``patients`` (each its recordings' log-probabilities, :func:`recording_log_probs`)
    and their ``target`` classes; ties go to the smallest shift."""
    from ssamba.metrics.challenge import weighted_accuracy_of

    best = None
    for present, unknown in sorted(itertools.product(RECORDING_BIAS_GRID, RECORDING_BIAS_GRID),
                                   key=lambda pair: (abs(pair[0]) + abs(pair[1]), pair)):
        score = weighted_accuracy_of(target, hierarchical(patients, present, unknown), weights)
        if best is None or score > best[0]:
            best = (score, present, unknown)
    return best[1], best[2]


def quality_table(data: list[Path]) -> dict[str, list[float]]:
    """Each patient's :data:`ssamba.data.quality.PATIENT_FEATURES` from a CirCor folder (or its staged parts).
    A recording that cannot be read is skipped and counted; a patient without one is left out."""
    import tempfile

    from ssamba.data.circor import read_patients
    from ssamba.data.quality import patients_quality

    with tempfile.TemporaryDirectory() as joined:
        table, skipped = patients_quality(read_patients(str(merge(data, Path(joined) / "circor"))))
    note = f", {len(skipped)} recordings skipped (first: {skipped[0]})" if skipped else ""
    print(f"signal quality: {len(table)} patients{note}", flush=True)
    return {pid: row.tolist() for pid, row in table.items()}


def quality_rows(records: list[dict], quality: dict[str, list[float]]) -> list[list[float]]:
    """The quality features of every patient the cells scored, in the cells' order; a one-line error for a
    patient without any in ``quality``."""
    ids = [i for r in records for i in r["patients"]["id"]]
    missing = [i for i in ids if i not in quality]
    if missing:
        raise ValueError(f"patient {missing[0]} of the cells has no recording in --data ({len(missing)} missing)")
    return [quality[i] for i in ids]


def quality_gate(cell: dict, others: list[dict], quality: dict[str, list[float]]) -> list[int] | None:
    """The quality-gate rule's predictions of ``cell``, a gate (``ssamba.metrics.gate``) fitted on ``others``
    (:data:`RULES`); None where the other folds hold no Unknown patient (or only Unknown ones) to fit it on."""
    from ssamba.data.quality import PATIENT_FEATURES
    from ssamba.metrics.gate import UNKNOWN, fit_gate

    target = [t for r in others for t in r["patients"]["target"]]
    if len({t == UNKNOWN for t in target}) < 2:
        return None
    preds = [p for r in others for p in r["patients"]["pred"]]
    gate = fit_gate(quality_rows(others, quality), target, preds, PATIENT_FEATURES)
    return gate.apply(cell["patients"]["pred"], quality_rows([cell], quality)).tolist()


def rule_predictions(records: list[dict], quality: dict[str, list[float]] | None = None
                     ) -> dict[str, dict[tuple, list[int]]]:
    """Per rule of :data:`RULES`, each cell's patient predictions, by (fold, seed, arm). ``records``: one label
    scheme whose classes are the Challenge's Present, Unknown, Absent; ``quality``: patient -> quality features
    (:func:`quality_table`), for the quality gate. A rule with no prediction for a cell (no other fold of its
    seed, a patient that only one seed scored, no ``quality``, no kept recordings) leaves that cell out."""
    from ssamba.metrics.challenge import CLASS_WEIGHTS, MURMUR_CLASSES

    names = records[0]["patients"]["class_names"]
    if tuple(names) != tuple(MURMUR_CLASSES):
        raise ValueError(f"decision rules need the Challenge's murmur classes {list(MURMUR_CLASSES)}, "
                         f"these cells have {names}")
    weights = [CLASS_WEIGHTS[name] for name in names]
    rules: dict[str, dict[tuple, list[int]]] = {name: {} for name in RULES}
    by_patient: dict[tuple[str, str], list[list[float]]] = {}  # (arm, patient) -> each seed's probabilities
    by_recording: dict[tuple[str, str], list[list[float]]] = {}  # (arm, recording) -> each seed's probabilities
    for r in records:
        for patient, row in zip(r["patients"]["id"], r["patients"]["probs"]):
            by_patient.setdefault((r["arm"], patient), []).append(row)
        rows = r["patients"].get("recording_rows", {"id": [], "logits": []})
        for recording, logits in zip(rows["id"], rows["logits"]):
            by_recording.setdefault((r["arm"], recording), []).append([math.exp(v) for v in _log_softmax(logits)])
    kept = {cell_key(r): recording_log_probs(r) for r in records}
    for r in records:
        patients = r["patients"]
        rules["recorded"][cell_key(r)] = list(patients["pred"])
        rules["mean"][cell_key(r)] = _argmax(patients["probs"])
        rules["challenge weights"][cell_key(r)] = _argmax([[w * p for w, p in zip(weights, row)]
                                                      for row in patients["probs"]])
        others = [o for o in records if o["seed"] == r["seed"] and o["arm"] == r["arm"] and o["fold"] != r["fold"]]
        if others and quality is not None:
            gate = quality_gate(r, others, quality)
            if gate is not None:
                rules["quality gate"][cell_key(r)] = gate
        if others:
            present, unknown = fitted_offsets(others, weights)
            rules["fitted offsets"][cell_key(r)] = _argmax([[row[0] + present, row[1] + unknown, *row[2:]]
                                                            for row in _log_probs(patients["probs"])])
        seeds = [by_patient[(r["arm"], patient)] for patient in patients["id"]]
        if all(len(rows) > 1 for rows in seeds):
            rules["seed ensemble"][cell_key(r)] = _argmax([[statistics.fmean(column) for column in zip(*rows)]
                                                      for rows in seeds])
        if kept[cell_key(r)] is None:
            continue
        if others and all(kept[cell_key(o)] is not None for o in others):
            present, unknown = fitted_recording_offsets([rows for o in others for rows in kept[cell_key(o)]],
                                                        [t for o in others for t in o["patients"]["target"]], weights)
            rules["recording offsets"][cell_key(r)] = hierarchical(kept[cell_key(r)], present, unknown)
        recordings: dict[str, list[list[list[float]]]] = {}  # patient -> each recording's probabilities per seed
        for patient, recording in zip(patients["recording_rows"]["patient"], patients["recording_rows"]["id"]):
            recordings.setdefault(patient, []).append(by_recording[(r["arm"], recording)])
        if all(len(per_seed) > 1 for rows in recordings.values() for per_seed in rows):
            rules["seed ensemble, recordings"][cell_key(r)] = hierarchical(
                [[[statistics.fmean(column) for column in zip(*per_seed)] for per_seed in recordings[patient]]
                 for patient in patients["id"]])
    return rules


RULE_KEYS = (("weighted_accuracy", "weighted accuracy", 3), ("uar", "UAR", 3), ("recall_Unknown", "Unknown recall", 3),
             ("recall_Present", "Present recall", 3), ("cost", "Challenge cost", 0))  # fmt: skip


def render_rules(results: Path, task: str, data: list[Path] | None = None) -> str:
    """Markdown: per arm and rule of :data:`RULES`, the mean scores over the cells it predicted, and its
    difference from the recorded predictions cell by cell, with the report's corrected intervals. ``data``:
    the CirCor folder (or parts) the cells scored, for the quality gate."""
    records = [r for r in load_results(results) if r["task"] == task]
    if not records:
        raise ValueError(f"no `{task}` cells in {results}/cells")
    ratio = test_to_train(records)
    quality = quality_table(data) if data else None
    predictions = rule_predictions(records, quality)
    by_key = {cell_key(r): r for r in records}
    scores = {(rule, k): patient_scores_of([by_key[k]], preds) for rule, cells in predictions.items()
              for k, preds in cells.items()}
    titles = " | ".join(title for _, title, _ in RULE_KEYS)
    rule_line = "|---" * len(RULE_KEYS) + "|"
    lines = [f"## CirCor `{task}`: patient decision rules on the grid's stored predictions", "",
             f"Written {datetime.date.today().isoformat()} by `bench/circor_results.py rules` from the cells in "
             f"`{results.name}` ({len(records)} cells). No model is trained or run: each rule turns the patient "
             "probabilities the cells stored (and their recordings', where kept) into predictions, which are scored "
             "as the grid scores them. Intervals: "
             f"{CONFIDENCE:.0%}, Student's t with the Nadeau-Bengio correction ({ratio_text(ratio)}) over the "
             "cells, as in the cross-validation report; a difference is the rule's score minus the recorded "
             "predictions' in the same cell.", ""]  # fmt: skip
    if quality is not None:
        lines += [f"The quality gate read the recordings of {len(quality)} patients in --data (the cells' data: "
                  f"{records[0]['settings'].get('data') or 'CirCor'}).", ""]
    lines += ["Rules:", "", *(f"- **{name}**: {text}" for name, text in RULES.items() if predictions[name]), ""]
    for arm in ARMS:
        keys = sorted(k for k in predictions["recorded"] if k[2] == arm)
        if not keys:
            continue
        lines += [f"### {ARM_TITLES[arm]}", "", f"| rule | cells | {titles} | weighted accuracy minus recorded |",
                  f"|---|---{rule_line}---|"]  # fmt: skip
        for rule in RULES:
            cells = [k for k in keys if k in predictions[rule]]
            if not cells:
                continue
            values = [with_interval([scores[(rule, k)].get(name, math.nan) for k in cells], ratio, digits)
                      for name, _, digits in RULE_KEYS]
            difference = "-" if rule == "recorded" else with_interval(
                [scores[(rule, k)]["weighted_accuracy"] - scores[("recorded", k)]["weighted_accuracy"] for k in cells],
                ratio, 3, signed=True)
            lines.append(f"| {rule} | {len(cells)} | " + " | ".join(values) + f" | {difference} |")
        lines.append("")
    return "\n".join(lines)


def fit_quality_gate(results: Path, arm: str, data: list[Path], out: Path) -> str:
    """Fit a gate (``ssamba.metrics.gate``) on every `murmur` cell of ``arm`` pooled: the cells' test patients
    are out-of-fold, so each prediction comes from a model that did not train on its patient. Saves it to ``out``
    (``evaluate.py quality_gate=...``) and returns a one-line summary."""
    from ssamba.data.quality import PATIENT_FEATURES
    from ssamba.metrics.gate import UNKNOWN, fit_gate

    records = [r for r in load_results(results) if r["task"] == "murmur" and r["arm"] == arm]
    if not records:
        raise ValueError(f"no `murmur` cells of arm {arm} in {results}/cells")
    rows = quality_rows(records, quality_table(data))
    target = [t for r in records for t in r["patients"]["target"]]
    preds = [p for r in records for p in r["patients"]["pred"]]
    fitted_on = (f"out-of-fold predictions of the {arm} arm's {len(records)} murmur cells in {results.name} "
                 f"({len(rows)} patient predictions), {datetime.date.today().isoformat()}")
    gate = fit_gate(rows, target, preds, PATIENT_FEATURES, fitted_on)
    out.parent.mkdir(parents=True, exist_ok=True)
    gate.save(out)
    changed = sum(a != b for a, b in zip(gate.apply(preds, rows).tolist(), preds))
    return (f"quality gate: {out}, fitted on {len(records)} cells ({len(rows)} patient predictions, "
            f"{sum(t == UNKNOWN for t in target)} Unknown); threshold {gate.threshold:.3f} turns {changed} of them "
            "Unknown")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    staging = commands.add_parser("stage", help="split a CirCor folder into parts of at most --max-mib")
    staging.add_argument("--src", type=Path, required=True)
    staging.add_argument("--dst", type=Path, required=True)
    staging.add_argument("--max-mib", type=float, default=40.0)
    staging.add_argument("--keep-annotations", action="store_true", help="also copy .hea/.tsv files")
    grid = commands.add_parser("run", help="train and score the missing cells of the grid (resumes)")
    grid.add_argument("--data", nargs="+", required=True, help="a CirCor folder, or the staged parts")
    grid.add_argument("--data-description", default="", help="one line on the data, for the report")
    grid.add_argument("--results", default=".gpudata/circor-cv",
                      help="the grid's settings (grid.json) and per-cell JSON files (cells/)")
    grid.add_argument("--work", default="", help="run folders and the joined data (default: --results); "
                      "keep it out of a --results folder that is committed")
    grid.add_argument("--out", default="circor-cv.md", help="markdown report")
    grid.add_argument("--tasks", nargs="+", choices=list(RECIPES), default=["murmur"], help="label schemes")
    grid.add_argument("--folds", type=int, default=5)
    grid.add_argument("--run-folds", type=int, nargs="+",
                      help="train only these folds' cells in this call (default: every fold), so that several "
                           "machines share one grid, e.g. a cluster array task per fold, each with its own --work")
    grid.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    grid.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    grid.add_argument("--pretrain-epochs", type=int, default=8)
    grid.add_argument("--finetune-epochs", type=int, default=8)
    grid.add_argument("--checkpoint", choices=("last", "best"), default="last",
                      help="the finetuning checkpoint scored: last, or best on the val patients")
    grid.add_argument("--trainer", default="gpu", help="trainer config group choice (gpu, cpu, default)")
    grid.add_argument("--num-workers", type=int, default=8)
    grid.add_argument("--parallel", type=int, default=1,
                      help="trainings at once on the machine (a finetuning of this size leaves an H100 partly idle); "
                           "each gets --num-workers loader workers; cells record it: their wall times may overlap")
    grid.add_argument("--members", type=int, default=1,
                      help="finetunings per cell, the same patients with seeds s, s + 1000, ...: the cell scores them "
                           "as one ensemble (mean class probabilities)")
    grid.add_argument("--stop-after-minutes", type=float, default=0.0,
                      help="stop the training in progress then (it resumes on the next call); 0: no limit")
    grid.add_argument("--machine-stays", action="store_true",
                      help="the next call runs on this machine with this --work (calls chained while it is held): "
                           "trainings start even where they cannot finish before --stop-after-minutes, and the "
                           "next call resumes them. Without it a training starts only where the longest of its "
                           "kind recorded would finish (a pretraining: with one finetuning after it), since a "
                           "stopped training's checkpoint is lost with the machine")
    grid.add_argument("--score-max-seconds", type=float, nargs="+", default=[],
                      help="also score each cell's model on each recording's first N s, for each N (train.py "
                           "score_max_seconds): how its scores move with the length scored; no change to the "
                           "trainings, so a grid's folder takes cells with and without")
    grid.add_argument("--override", nargs="*", default=[], help="Hydra overrides for every training")
    grid.add_argument("--pretrain-override", nargs="*", default=[])
    grid.add_argument("--finetune-override", nargs="*", default=[])
    report = commands.add_parser("report", help="write the markdown report from --results")
    report.add_argument("--results", required=True)
    report.add_argument("--out", required=True)
    report.add_argument("--tasks", nargs="+", choices=list(RECIPES), help="label schemes planned (for the count "
                        "of cells to come; default: those with cells)")
    report.add_argument("--seeds", type=int, nargs="+", help="seeds planned (default: those with cells)")
    report.add_argument("--arms", nargs="+", choices=ARMS, help="arms planned (default: both)")
    report.add_argument("--readme", type=Path, help="also rewrite the summary between the circor-cv markers of "
                                                    "this file (README.md)")
    compare = commands.add_parser("compare", help="another grid's recipe minus a base grid's, pair by pair "
                                  "(same scheme, fold and seed)")
    compare.add_argument("--base", required=True, help="results folder of the base recipe")
    compare.add_argument("--other", required=True, help="results folder of the recipe compared with it")
    compare.add_argument("--base-arm", choices=ARMS, default="scratch")
    compare.add_argument("--other-arm", choices=ARMS, default="scratch")
    compare.add_argument("--out", required=True, help="markdown report")
    rules = commands.add_parser("rules", help="patient decision rules (mean logits, class weights, offsets fitted "
                                "on the other folds, seed ensemble, a signal-quality gate) scored on the cells' "
                                "stored predictions")
    rules.add_argument("--results", required=True)
    rules.add_argument("--task", choices=["murmur"], default="murmur", help="a label scheme of the Challenge's classes")
    rules.add_argument("--out", required=True, help="markdown report")
    rules.add_argument("--data", type=Path, nargs="+", help="the CirCor folder (or staged parts) the cells scored: "
                       "adds the quality gate, from the recordings' signal-quality statistics")
    fitting = commands.add_parser("gate", help="fit a signal-quality gate for evaluate.py on the cells' out-of-fold "
                                  "predictions of one arm")
    fitting.add_argument("--results", required=True)
    fitting.add_argument("--data", type=Path, nargs="+", required=True, help="the CirCor folder (or staged parts) "
                         "the cells scored")
    fitting.add_argument("--arm", choices=ARMS, default="scratch", help="the arm whose predictions the gate corrects")
    fitting.add_argument("--out", required=True, help="the gate's JSON file")
    args = parser.parse_args(argv)
    try:
        if args.command == "stage":
            stage(args.src, args.dst, int(args.max_mib * 2**20), args.keep_annotations)
        elif args.command == "run":
            if args.folds < 2:
                parser.error(f"--folds must be at least 2, got {args.folds}")
            if any(not 0 <= fold < args.folds for fold in args.run_folds or ()):
                parser.error(f"--run-folds must name folds in 0..{args.folds - 1} (--folds {args.folds}), "
                             f"got {args.run_folds}")
            if args.parallel < 1:
                parser.error(f"--parallel must be at least 1, got {args.parallel}")
            if args.members < 1 or (args.members > 1 and args.checkpoint != "last"):
                parser.error(f"--members must be at least 1, and above 1 only with --checkpoint last (the members "
                             f"keep their last checkpoints), got --members {args.members} --checkpoint {args.checkpoint}")
            complete = run_grid(args)
            done = f"folds {', '.join(map(str, args.run_folds))} complete" if args.run_folds else "grid complete"
            print(done if complete else "grid incomplete: run the same command again", flush=True)
        elif args.command == "rules":
            out = Path(args.out)
            text = render_rules(Path(args.results), args.task, args.data)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
            print(f"decision rules: {out}", flush=True)
        elif args.command == "gate":
            print(fit_quality_gate(Path(args.results), args.arm, args.data, Path(args.out)), flush=True)
        elif args.command == "compare":
            out = Path(args.out)
            text = render_comparison(Path(args.base), Path(args.other), args.base_arm, args.other_arm)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
            print(f"comparison: {out}", flush=True)
        else:
            write_report(Path(args.results), Path(args.out), grid_plan(args), args.readme)
    except (ValueError, FileNotFoundError) as error:  # bad input: one line, not a traceback
        parser.exit(2, f"{parser.prog} {args.command}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
