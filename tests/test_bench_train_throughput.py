"""bench/train_throughput.py on CPU: its smoke run, and the arithmetic of its ``--profile`` summary (the
GPU runs themselves are benchmarks, not tests)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from train_throughput import OTHER_PART, device_time, kernel_intervals, step_part  # noqa: E402


def run_script(*args):
    return subprocess.run([sys.executable, "bench/train_throughput.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_the_smoke_run_times_a_pretraining_and_a_finetuning_case():
    result = run_script("--smoke", "--only", "ssamba_tiny, 2 passes (released", "ssast_tiny, finetune")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ssa")]
    assert [row.split(" | ")[0] for row in rows] == ["| ssamba_tiny, 2 passes (released objective)",
                                                     "| ssast_tiny, finetune, eager"]
    assert all(float(row.split(" | ")[4]) > 0 for row in rows)  # samples/s


def test_profile_needs_a_gpu_and_is_never_written():
    result = run_script("--smoke", "--profile")
    assert result.returncode == 2 and "--profile reads kernel times" in result.stderr


def test_device_time_counts_overlapping_kernels_once_and_sums_parts_per_step():
    kernels = [("_scan_bwd_kernel", 0.0, 10.0), ("sm90_xmma_gemm_bf16bf16", 5.0, 15.0),
               ("multi_tensor_apply_kernel<FusedAdamMathFunctor>", 20.0, 30.0), ("_scan_bwd_kernel", 30.0, 34.0)]
    summary = device_time(kernels, wall_us=50.0, steps=2)
    assert summary["busy_ms_per_step"] == pytest.approx(29.0 / 2 / 1e3)  # 0-15, 20-30, 30-34
    assert summary["busy_fraction"] == pytest.approx(29.0 / 50.0)
    assert summary["wall_ms_per_step"] == pytest.approx(0.025)
    assert summary["parts_ms_per_step"] == pytest.approx({"scan": 0.007, "matmul": 0.005, "optimizer": 0.005})
    assert list(summary["parts_ms_per_step"]) == ["scan", "matmul", "optimizer"]  # heaviest first
    assert summary["kernels"][0] == ["_scan_bwd_kernel", pytest.approx(0.007), 1.0]  # 2 launches in 2 steps


@pytest.mark.parametrize("kernel, part", [
    ("_scan_fwd_kernel", "scan"), ("_bidir_conv_bwd_kernel", "conv"), ("_add_norm_fwd_kernel", "add + norm"),
    ("_gate_bwd_kernel", "gate"), ("flash_fwd_kernel", "attention"), ("nvjet_tst_128x64", "matmul"),
    ("Memcpy HtoD (Pinned -> Device)", "copies and fills"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::AddFunctor<float>>", OTHER_PART)])
def test_kernels_are_put_in_the_part_of_the_step_they_serve(kernel, part):
    assert step_part(kernel) == part


def test_kernel_intervals_reads_a_finished_profile():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ones(64, 64) @ torch.ones(64, 64)
    intervals = kernel_intervals(prof, torch.autograd.DeviceType.CPU)
    matmuls = [(start, end) for name, start, end in intervals if name == "aten::mm"]
    assert matmuls and all(end >= start for start, end in matmuls)


def test_a_baseline_checkout_is_timed_alternately_with_this_one_and_an_ordering_needs_disjoint_rows(tmp_path):
    import shutil

    from train_throughput import ab_table, ab_verdict

    baseline = tmp_path / "baseline"
    for part in ("ssamba", "bench", "conf"):
        shutil.copytree(ROOT / part, baseline / part, ignore=shutil.ignore_patterns("__pycache__"))
    script = baseline / "bench" / "train_throughput.py"  # records which package the baseline's child imported
    script.write_text(script.read_text().replace('if __name__ == "__main__":', 'if __name__ == "__main__":\n    '
                                                 'Path(__file__).with_name("ran").write_text(sys.modules["ssamba"].__file__)'))
    result = run_script("--smoke", "--only", "ssamba_tiny, 2 passes (released", "--baseline", str(baseline),
                        "--reps", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert out.index("(baseline):") < out.index("(this tree):")  # alternating, baseline first
    assert Path((baseline / "bench" / "ran").read_text()).is_relative_to(baseline)  # its own code, not this tree's
    assert "this / baseline (medians)" in out and "| ssamba_tiny, 2 passes (released objective) |" in out
    rows = {"baseline": [{"ms_per_step": 10.0, "peak_gib": 9.5}, {"ms_per_step": 11.0, "peak_gib": 9.6}],
            "this tree": [{"ms_per_step": 9.0, "peak_gib": 3.0}, {"ms_per_step": 9.5, "peak_gib": None}]}
    assert ab_table({"case": rows}, baseline).splitlines()[-1] == (
        "| case | 10.0 / 11.0 | 9.0 / 9.5 | 0.881 | this tree faster in every row | 9.60 / 3.00 |")
    assert ab_verdict([10.0, 11.0], [9.0, 9.5]) == "this tree faster in every row"
    assert ab_verdict([10.0, 11.0], [12.0, 11.5]) == "this tree slower in every row"
    assert ab_verdict([10.0, 11.0], [9.0, 10.5]) == "no ordering (the rows overlap)"
    missing = run_script("--smoke", "--baseline", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no bench/train_throughput.py there" in missing.stderr


def test_a_baseline_script_older_than_an_option_in_use_is_refused_before_any_run(tmp_path):
    from train_throughput import child_options

    assert child_options([], callbacks=False, profile=False, smoke=False) == []  # what an old script can take
    assert child_options(["task.fstride=16"], True, False, False) == ["--callbacks", "--extra", "task.fstride=16"]
    old = tmp_path / "old" / "bench" / "train_throughput.py"  # a script from before --extra and --callbacks
    old.parent.mkdir(parents=True)
    old.write_text('parser.add_argument("--case")\nparser.add_argument("--result")\nparser.add_argument("--smoke")\n')
    result = run_script("--smoke", "--callbacks", "--baseline", str(tmp_path / "old"))
    assert result.returncode == 2 and "predates --callbacks, --extra" in result.stderr
