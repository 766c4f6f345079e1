"""Training throughput (samples/s) and peak GPU memory of the real training stack, several models in one run.

Composes ``conf/train.yaml`` with the given overrides (synthetic data; the pretraining task, or
finetuning at its default patch stride), runs ``trainer.fit`` for a fixed number of optimizer steps
and times the last ones, the device synchronised before the first and after the last only (rows
of docs/performance/train.json without ``synchronised`` were timed with a wait after every step,
which kept the host from running ahead), so data loading, the encoder passes, the heads, the
optimizer and Lightning's own overhead are all inside the figure. Without ``--callbacks`` no
callback runs; with it, those of a user's run that act every step (non-finite guard, progress bar).
On a GPU each case runs in a process of its own, so its peak memory owes nothing to the cases before
it. Two peaks over the whole fit: ``torch.cuda.max_memory_allocated`` (every live tensor:
activations, gradients, optimizer state) and ``max_memory_reserved`` (what the caching allocator
held from the driver, CUDA-graph pools included: closer to what the card must have free). A graph
pool keeps the memory of its capture's temporaries after they are freed, so with graphs the reserved
peak says more than the allocated one.

    python bench/train_throughput.py                       # GPU: every case (stock ones need mamba-ssm)
    python bench/train_throughput.py --only finetune base  # GPU: the cases whose label contains either text
    python bench/train_throughput.py --only finetune --extra task.fstride=16 task.tstride=16  # other shapes
    python bench/train_throughput.py --only "tiny, finetune" --callbacks  # with the callbacks a user's run has
    python bench/train_throughput.py --only "tiny, 2 passes, CUDA" --profile  # GPU: where each step's device time goes
    python bench/train_throughput.py --smoke               # CPU: a tiny check that the script works
    python bench/train_throughput.py --write               # also docs/performance/train.json (rows merged
                                                           # by label, each with its card, torch and date)
    python bench/train_throughput.py --only "tiny, 2 passes, CUDA" --baseline ../old --reps 2
        # A/B: each case alternately from another checkout (its own bench script and package) and from this one,
        # each run in a fresh process, --reps times; the rows and whether every one of one tree's is faster.
        # To time an old package with this script's timing, give a folder with the old ssamba/, conf/ and
        # train.py beside this tree's bench/

Timings of one tree drift over minutes on one machine and differ between machines of the same kind, so a
change is only measured against a baseline timed in the same call, interleaved with it (``--baseline``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssamba.tasks import build_task  # noqa: E402
from ssamba.utils.instantiate import build_callbacks  # noqa: E402
from layer import stock_available, use_stock_mixers  # noqa: E402  (bench/ is the script's directory)
from machine import device_name  # noqa: E402
import hydra  # noqa: E402

STOCK = "stock composition"  # marks a case whose mixers are swapped for bench/layer.py's StockMixer
CASES = {  # label -> overrides
    "ssamba_tiny, 2 passes (released objective)": ["model=tiny", "task.joint_passes=2", "task.cuda_graphs=false"],
    "stock composition (two mamba_ssm.Mamba per layer), 2 passes": ["model=tiny", "task.joint_passes=2",
                                                                      "task.cuda_graphs=false", STOCK],
    "ssamba_tiny, 1 pass (joint_passes=1)": ["model=tiny", "task.joint_passes=1", "task.cuda_graphs=false"],
    "ssast_tiny, 2 passes": ["model=ssast_tiny", "task.joint_passes=2", "task.cuda_graphs=false"],
    "ssamba_tiny, 2 passes, CUDA graphs": ["model=tiny", "task.joint_passes=2", "task.cuda_graphs=true"],
    "ssast_tiny, 2 passes, CUDA graphs": ["model=ssast_tiny", "task.joint_passes=2", "task.cuda_graphs=true"],
    "stock composition, 2 passes, CUDA graphs": ["model=tiny", "task.joint_passes=2", "task.cuda_graphs=true",
                                                 STOCK],
    "ssamba_base, 2 passes": ["model=base", "task.joint_passes=2", "task.cuda_graphs=false"],
    "ssamba_base, 2 passes, CUDA graphs": ["model=base", "task.joint_passes=2", "task.cuda_graphs=true"],
    "ssast_base, 2 passes": ["model=ssast_base", "task.joint_passes=2", "task.cuda_graphs=false"],
    "ssast_base, 2 passes, CUDA graphs": ["model=ssast_base", "task.joint_passes=2", "task.cuda_graphs=true"],
    # finetuning at its default patch stride 10 (overlapping patches: 1212 tokens for 1024 frames)
    "ssamba_tiny, finetune, eager": ["task=finetune", "model=tiny", "data.num_classes=527", "task.cuda_graphs=false"],
    "ssamba_tiny, finetune, CUDA graphs": ["task=finetune", "model=tiny", "data.num_classes=527",
                                           "task.cuda_graphs=true"],
    "ssast_tiny, finetune, eager": ["task=finetune", "model=ssast_tiny", "data.num_classes=527",
                                    "task.cuda_graphs=false"],
}

SMOKE_OVERRIDES = ["data.target_length=128", "mask='40'", "+model.depth=2"]  # --smoke: a model small enough for CPU

# kernel name fragments -> the part of a training step a kernel belongs to; the first part that matches wins
STEP_PARTS = (("scan", ("scan",)), ("conv", ("conv",)), ("add + norm", ("norm",)), ("gate", ("gate",)),
              ("attention", ("flash", "fmha", "attention")), ("matmul", ("gemm", "cutlass", "xmma", "nvjet")),
              ("optimizer", ("adam", "multi_tensor")), ("copies and fills", ("memcpy", "memset", "copy", "fill")))
OTHER_PART = "other (elementwise, reductions)"


def step_part(kernel: str) -> str:
    name = kernel.lower()
    return next((part for part, fragments in STEP_PARTS if any(f in name for f in fragments)), OTHER_PART)


def device_time(kernels: list[tuple[str, float, float]], wall_us: float, steps: int, top: int = 12) -> dict:
    """Per step of a profiled window: device-busy time (the union of the kernels' ``(name, start, end)``
    intervals, in us, so kernels overlapping on other streams count once) against the window's wall time,
    and the kernels' summed time by part of the step and by kernel."""
    busy, reach = 0.0, float("-inf")
    for _, start, end in sorted(kernels, key=lambda k: k[1]):
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    parts, by_name = {}, {}
    for name, start, end in kernels:
        part = step_part(name)
        parts[part] = parts.get(part, 0.0) + end - start
        total, launches = by_name.get(name, (0.0, 0))
        by_name[name] = (total + end - start, launches + 1)
    heaviest = sorted(by_name.items(), key=lambda item: -item[1][0])[:top]
    return {"wall_ms_per_step": wall_us / steps / 1e3, "busy_ms_per_step": busy / steps / 1e3,
            "busy_fraction": busy / wall_us if wall_us else 0.0,
            "parts_ms_per_step": {part: us / steps / 1e3 for part, us in sorted(parts.items(), key=lambda p: -p[1])},
            "kernels": [[name, us / steps / 1e3, launches / steps] for name, (us, launches) in heaviest]}


def kernel_intervals(prof, device_type=torch.autograd.DeviceType.CUDA) -> list[tuple[str, float, float]]:
    """``(name, start, end)`` in us of a finished ``torch.profiler.profile``'s events on ``device_type``."""
    return [(e.name, e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == device_type]


class StepTimer(L.Callback):
    """Wall time of optimizer steps ``warmup .. warmup + steps``, the device synchronised at both ends only:
    a wait at every step would keep the host from preparing a step while the device runs the one before.
    With a ``profiler`` (``torch.profiler.profile``), it records exactly those steps."""

    def __init__(self, warmup: int, steps: int, profiler=None):
        self.warmup, self.steps, self.start, self.end, self.timed = warmup, steps, None, None, 0
        self.profiler = profiler

    def _sync(self, module):
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.start is None:
            if self.profiler is not None:
                self.profiler.start()
            self._sync(module)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.start is not None and trainer.global_step == self.warmup + self.steps:
            self._sync(module)
            self.end = time.perf_counter()
            self.timed = trainer.global_step - self.warmup
            if self.profiler is not None:
                self.profiler.stop()


# --callbacks: train.py's default callbacks that act every step; not those that write files or only print once
QUIET_CALLBACKS = ["callbacks.model_checkpoint=null", "callbacks.periodic_checkpoint=null",
                   "callbacks.wandb_predictions=null", "callbacks.model_summary=null"]


def measure(overrides: list[str], steps: int, warmup: int, batch: int, gpu: bool, callbacks: bool = False,
            profile: bool = False) -> dict:
    stock = STOCK in overrides
    overrides = [o for o in overrides if o != STOCK]
    pretrain = not any(o.startswith("task=") for o in overrides)
    task_keys = ["task=pretrain", "task.figure_every_n_steps=0"] if pretrain else []
    common = [*(QUIET_CALLBACKS if callbacks else ["~callbacks"]), "data=synthetic", *task_keys,
              f"data.batch_size={batch}", "logger=none", "test=false",
              f"trainer.max_steps={warmup + steps}", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
              "+trainer.enable_checkpointing=false",
              f"data.num_train={batch * (warmup + steps + 1)}", f"paths.output_dir={tempfile.mkdtemp()}"]
    common += ["trainer=gpu", "data.num_workers=12"] if gpu else ["trainer=cpu", "data.num_workers=1"]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=common + overrides)
    L.seed_everything(0)
    datamodule = hydra.utils.instantiate(cfg.data)
    task = build_task(cfg, datamodule)
    if stock:
        use_stock_mixers(task.encoder)
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) if profile else None
    timer = StepTimer(warmup, steps, profiler)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[timer, *(build_callbacks(cfg) if callbacks else [])],
                                      logger=False, enable_progress_bar=callbacks, enable_model_summary=False)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(task, datamodule=datamodule)
    seconds = timer.end - timer.start
    profiled = {"profile": device_time(kernel_intervals(profiler), seconds * 1e6, timer.timed)} if profile else {}
    return {**profiled, "samples_per_s": timer.timed * batch / seconds, "ms_per_step": 1000 * seconds / timer.timed,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if gpu else None,
            "synchronised": "before the first and after the last timed step", "callbacks": callbacks,
            "steps_timed": timer.timed, "batch": batch, "tokens": task.encoder.num_patches + task.encoder.num_prefix_tokens,
            "backend": "mamba_ssm.Mamba" if stock else getattr(task.encoder.config, "backend", "-")}


def measure_in_child(label: str, steps: int, warmup: int, batch: int, extra: list[str], callbacks: bool,
                     profile: bool, tree: Path = ROOT, smoke: bool = False) -> dict:
    """``measure`` of one case in a fresh process (its CUDA memory, graph pools included, starts empty), by the
    benchmark script and package of the checkout ``tree`` (this one by default)."""
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        command = [sys.executable, str(tree / "bench" / "train_throughput.py"), "--case", label, "--result",
                   str(result), "--steps", str(steps), "--warmup", str(warmup), "--batch", str(batch),
                   *child_options(extra, callbacks, profile, smoke)]
        child = subprocess.run(command, cwd=tree)
        if child.returncode or not result.exists():
            raise RuntimeError(f"the child process exited with status {child.returncode}")
        return json.loads(result.read_text())


def child_options(extra: list[str], callbacks: bool, profile: bool, smoke: bool) -> list[str]:
    """The options a case's child process gets beyond its case and shape: only those in use, so that a baseline
    checkout whose script predates an option can time every case that does not need it."""
    return [*(["--callbacks"] if callbacks else []), *(["--profile"] if profile else []),
            *(["--smoke"] if smoke else []), *(["--extra", *extra] if extra else [])]


def baseline_lacks(script: Path, options: list[str]) -> list[str]:
    """The options among ``options`` that the baseline's benchmark script does not define."""
    text = script.read_text()
    return [option for option in options if option.startswith("--") and f'"{option}"' not in text]


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, few steps")
    parser.add_argument("--only", nargs="+", help="run the cases whose label contains any of these texts")
    parser.add_argument("--extra", nargs="*", default=[], help="Hydra overrides added to every case")
    parser.add_argument("--callbacks", action="store_true",
                        help="with train.py's default callbacks that act every step (non-finite guard, progress bar, "
                             "RNG state, pre-emption), as a user's run has them; rows are labelled so")
    parser.add_argument("--profile", action="store_true",
                        help="GPU: also where the timed steps' device time goes (torch.profiler: busy time against "
                             "wall time, by part of the step and by kernel); the profiler slows the host, so "
                             "such rows are printed, not written")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--baseline", type=Path, help="another checkout of this project: time each case alternately "
                        "with its code and with this tree's, in fresh processes (A/B rows are printed, not written)")
    parser.add_argument("--reps", type=int, default=2, help="with --baseline: rows per tree and case")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, in this process (what the parent starts)
    parser.add_argument("--result", help=argparse.SUPPRESS)  # where --case writes its figures
    args = parser.parse_args()
    if args.smoke and args.write:  # smoke rows are not measurements: they must not replace the recorded ones
        parser.error("--smoke checks that the script runs; it does not --write")
    gpu = torch.cuda.is_available() and not args.smoke
    if args.profile and (not gpu or args.write):
        parser.error("--profile reads kernel times, so it needs a CUDA device (not --smoke), and it slows the "
                     "host, so its rows are not written (no --write)")
    smoke = SMOKE_OVERRIDES if args.smoke else []
    if args.baseline is not None:
        if args.write or args.profile:
            parser.error("--baseline rows are printed, not written, and not profiled (no --write, no --profile)")
        script = args.baseline / "bench" / "train_throughput.py"
        if not script.is_file():
            parser.error(f"--baseline {args.baseline}: no bench/train_throughput.py there (give a checkout of this "
                         "project)")
        lacking = baseline_lacks(script, ["--case", "--result", *child_options(smoke + args.extra, args.callbacks,
                                                                               False, args.smoke)])
        if lacking:
            parser.error(f"--baseline {args.baseline}: its bench/train_throughput.py predates {', '.join(lacking)}; "
                         "time without those options or give a newer baseline")
        if args.reps < 1:
            parser.error(f"--reps must be at least 1, got {args.reps}")
    if args.case:
        figures = measure(CASES[args.case] + args.extra, args.steps, args.warmup, args.batch, gpu, args.callbacks,
                          args.profile)
        Path(args.result).write_text(json.dumps(figures))
        return
    device = device_name(torch.device("cuda" if gpu else "cpu"))
    results, pairs = {}, {}
    for label, overrides in CASES.items():
        if args.only and not any(text in label for text in args.only):
            continue
        if "task.cuda_graphs=true" in overrides and not gpu:
            continue  # CUDA graphs need a GPU
        if STOCK in overrides and not (gpu and stock_available()):
            print(f"{label}: skipped (needs a GPU and mamba-ssm)")
            continue
        overrides = overrides + smoke
        steps, warmup, batch = (3, 1, 2) if args.smoke else (args.steps, args.warmup, args.batch)
        if args.baseline is not None:
            pairs[label] = compare_trees(label, steps, warmup, batch, smoke + args.extra, args)
            continue
        try:  # a GPU case in a child process of its own, so that its peak memory is its own
            row_label = f"{label}, default callbacks" if args.callbacks else label
            results[row_label] = (measure_in_child(label, steps, warmup, batch, args.extra, args.callbacks,
                                                   args.profile) if gpu
                                  else measure(overrides + args.extra, steps, warmup, batch, gpu, args.callbacks))
        except RuntimeError as error:  # e.g. out of memory, or kernels a CUDA graph cannot capture
            print(f"{label}: failed: {error}", flush=True)
            continue
        row = results[row_label]
        print(f"{row_label}: {row['samples_per_s']:.1f} samples/s ({row['ms_per_step']:.1f} ms/step), peak "
              f"{_gib(row['peak_gib'])} GiB allocated, {_gib(row.get('peak_reserved_gib'))} GiB reserved", flush=True)
        if "profile" in row:
            print(describe_profile(row["profile"]), flush=True)
    if not results and not pairs:  # nothing matched --only, or every chosen case needs what is missing here
        raise SystemExit("no case ran: check --only against the case labels (and whether they need a GPU)")
    batch = 2 if args.smoke else args.batch
    if args.baseline is not None:
        print(f"\n{device}, torch {torch.__version__}, batch {batch}, {' '.join(args.extra)}\n"
              f"{ab_table(pairs, args.baseline)}")
        return
    lines = ["| run | backend | tokens | ms / step | samples / s | peak GiB allocated | peak GiB reserved |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {k} | {v['backend']} | {v['tokens']} | {v['ms_per_step']:.1f} | {v['samples_per_s']:.1f} | "
              f"{_gib(v['peak_gib'])} | {_gib(v.get('peak_reserved_gib'))} |" for k, v in results.items()]
    table = "\n".join(lines)
    print(f"\n{device}, torch {torch.__version__}, batch {batch}, {' '.join(args.extra)}\n{table}")
    if args.write:
        write_rows(ROOT / "docs" / "performance" / "train.json", results, device, " ".join(args.extra))


def compare_trees(label: str, steps: int, warmup: int, batch: int, extra: list[str], args) -> dict[str, list[dict]]:
    """``--reps`` rows of one case from each tree, alternating (baseline first), each in a fresh process."""
    rows = {"baseline": [], "this tree": []}
    for _ in range(args.reps):
        for name, tree in (("baseline", args.baseline.resolve()), ("this tree", ROOT)):
            row = measure_in_child(label, steps, warmup, batch, extra, args.callbacks, False, tree, args.smoke)
            rows[name].append(row)
            print(f"{label} ({name}): {row['ms_per_step']:.1f} ms/step", flush=True)
    return rows


def ab_verdict(baseline_ms: list[float], this_ms: list[float]) -> str:
    """An ordering only where the two trees' rows do not overlap."""
    if max(this_ms) < min(baseline_ms):
        return "this tree faster in every row"
    if min(this_ms) > max(baseline_ms):
        return "this tree slower in every row"
    return "no ordering (the rows overlap)"


def ab_table(pairs: dict[str, dict[str, list[dict]]], baseline: Path) -> str:
    """Markdown: per case, each tree's ms per step in run order, the medians' ratio, :func:`ab_verdict` and each
    tree's highest peak of allocated memory over its rows."""
    lines = [f"A/B against {baseline} (rows alternate, baseline first):", "",
             "| run | baseline ms / step | this tree ms / step | this / baseline (medians) | verdict | "
             "peak GiB allocated, baseline / this tree |",
             "|---|---|---|---|---|---|"]
    for label, rows in pairs.items():
        ms = {name: [row["ms_per_step"] for row in tree_rows] for name, tree_rows in rows.items()}
        peaks = [max((row["peak_gib"] for row in rows[name] if row.get("peak_gib") is not None), default=None)
                 for name in ("baseline", "this tree")]
        ratio = statistics.median(ms["this tree"]) / statistics.median(ms["baseline"])
        lines.append(f"| {label} | {' / '.join(f'{v:.1f}' for v in ms['baseline'])} | "
                     f"{' / '.join(f'{v:.1f}' for v in ms['this tree'])} | {ratio:.3f} | "
                     f"{ab_verdict(ms['baseline'], ms['this tree'])} | {' / '.join(map(_gib, peaks))} |")
    return "\n".join(lines)


def describe_profile(profile: dict) -> str:
    if not profile["kernels"]:
        return "  the profiler recorded no kernel in the timed steps"
    parts = ", ".join(f"{part} {ms:.1f}" for part, ms in profile["parts_ms_per_step"].items())
    kernels = "\n".join(f"    {ms:7.2f} ms  {launches:6.1f} x  {name[:100]}" for name, ms, launches in profile["kernels"])
    return (f"  device busy {profile['busy_ms_per_step']:.1f} of {profile['wall_ms_per_step']:.1f} ms per step "
            f"({100 * profile['busy_fraction']:.0f}%); ms per step by part: {parts}\n  heaviest kernels, ms and "
            f"launches per step:\n{kernels}")


def write_rows(path: Path, results: dict, device: str, extra: str) -> None:
    """Merge this run's rows into ``path`` by label, each row carrying its card, torch version, date and
    extra overrides (rows of other runs are kept: compare rows of one run only)."""
    rows = json.loads(path.read_text())["runs"] if path.exists() else {}
    stamp = {"device": device, "torch": torch.__version__, "date": datetime.date.today().isoformat(), "extra": extra}
    rows.update({label: {**row, **stamp} for label, row in results.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
