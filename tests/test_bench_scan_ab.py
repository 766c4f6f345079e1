"""bench/scan_ab.py on CPU: its refusals, and the comparison and table it prints (the GPU runs are benchmarks)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from scan_ab import OUTPUTS, bitwise_equal, compare_outputs, report  # noqa: E402
from train_throughput import ab_verdict  # noqa: E402


def run_script(*args):
    return subprocess.run([sys.executable, "bench/scan_ab.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_it_refuses_a_missing_baseline_and_a_folder_that_is_not_a_checkout(tmp_path):
    result = run_script()
    assert result.returncode == 2 and "--baseline is required" in result.stderr
    result = run_script("--baseline", str(tmp_path))
    assert result.returncode == 2 and "no ssamba/ops/gluon_scan.py there" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal without a GPU")
def test_without_a_gpu_it_says_so_in_one_line():
    result = run_script("--baseline", str(ROOT))
    assert result.returncode == 2 and "need a CUDA GPU" in result.stderr.splitlines()[-1]


def test_bitwise_means_the_bits():
    zero = torch.zeros(3)
    assert bitwise_equal(zero, zero.clone())
    assert not bitwise_equal(zero, -zero)  # == calls them equal
    nan = torch.full((2,), float("nan"), dtype=torch.bfloat16)
    assert bitwise_equal(nan, nan.clone())  # == calls them unequal
    assert not bitwise_equal(zero, zero.double())


def fake_run(ms: float, shift: float = 0.0) -> dict:
    outputs = {name: torch.arange(4, dtype=torch.float32) for name in OUTPUTS}
    outputs["dBC"] = outputs["dBC"] + shift
    return {192: {"outputs": outputs, "ms": {"scan_fwd": ms, "scan_bwd": 4 * ms}}}


def test_the_report_compares_each_output_and_orders_only_non_overlapping_times():
    runs = {"baseline": [fake_run(1.0), fake_run(1.1, shift=1e-3)],
            "this tree": [fake_run(0.8, shift=2e-3), fake_run(0.9)]}
    verdicts = compare_outputs(runs["baseline"][0][192]["outputs"], runs["this tree"][0][192]["outputs"])
    assert verdicts["y"] == "bitwise equal" and verdicts["dBC"] == "max abs diff 0.002"
    table = report(runs, [192], ab_verdict)
    assert "| dBC | max abs diff 0.002 | max abs diff 0.001 |" in table  # against this tree, and baseline vs itself
    assert "| scan_fwd | 192 | 1.000 / 1.100 | 0.800 / 0.900 | 0.810 | this tree faster in every row |" in table
    assert "| scan_bwd | 192 | 4.000 / 4.400 | 3.200 / 3.600 |" in table


def test_one_run_reports_no_self_comparison():
    table = report({"baseline": [fake_run(1.0)], "this tree": [fake_run(1.0)]}, [192], ab_verdict)
    assert "| output | this tree |" in table and "second run" not in table
    assert "| scan_fwd | 192 | 1.000 | 1.000 | 1.000 | no ordering (the rows overlap) |" in table
