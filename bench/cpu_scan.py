"""The PyTorch selective scan on CPU: the stepped solver against the log-depth one.

``selective_scan_torch`` steps through time on CPU once the state is big enough
(``STEPPED_MIN_STATE``) and runs the log-depth scan otherwise; this times both on the same inputs
(fp32, forward + backward of the mean-square loss, and forward alone without autograd), with the
bytes each keeps for the backward, then whole SSAMBA-tiny encoders with each solver.

    python bench/cpu_scan.py --write     # -> docs/performance/cpu_scan.json, section "CPU scan" of docs/performance.md
    python bench/cpu_scan.py --smoke     # small shapes, to check the script runs
"""
from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager

import torch

from layer import ROOT, replace_section
from machine import device_name
import ssamba.ops.selective_scan as scan
from ssamba.models import build_encoder
from ssamba.utils.memory import saved_bytes

SOLVERS = {"stepped": 0, "log-depth": 2 ** 62}  # STEPPED_MIN_STATE that forces each solver
# (batch, channels of both directions, N, L): a test-sized scan, then an SSAMBA-tiny layer's (2E = 768)
SCANS = [(2, 128, 16, 100), (2, 256, 16, 1024), (4, 768, 16, 601)]
SMOKE_SCANS = [(2, 64, 4, 50), (2, 128, 16, 64)]
# name: (batch, frames, stride, with backward); the CirCor finetuning clip is 5 s (512 frames) at stride 10
ENCODERS = {"ssamba_tiny, CirCor finetuning clips (batch 4, 601 tokens), forward + backward": (4, 512, 10, True),
            "ssamba_tiny, one 10 s clip (513 tokens), inference": (1, 1024, 16, False)}
SMOKE_ENCODERS = {"2-layer width-32 encoder, forward + backward": (2, 64, 16, True)}


@contextmanager
def solver(name: str):
    kept = scan.STEPPED_MIN_STATE
    scan.STEPPED_MIN_STATE = SOLVERS[name]
    try:
        yield
    finally:
        scan.STEPPED_MIN_STATE = kept


def best_seconds(fn, iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def scan_inputs(batch: int, channels: int, d_state: int, length: int) -> dict:
    g = torch.Generator().manual_seed(0)
    leaf = lambda *shape: torch.randn(*shape, generator=g).requires_grad_()  # noqa: E731
    return dict(u=leaf(batch, channels, length), delta=leaf(batch, channels, length),
                A=(-torch.rand(channels, d_state, generator=g) * 4 - 0.1).requires_grad_(),
                B=leaf(batch, 2, d_state, length), C=leaf(batch, 2, d_state, length), D=leaf(channels),
                z=leaf(batch, channels, length), delta_bias=leaf(channels), delta_softplus=True)


def time_scans(shapes, iters: int) -> list[dict]:
    rows = []
    for batch, channels, d_state, length in shapes:
        args = scan_inputs(batch, channels, d_state, length)
        row = {"batch": batch, "channels": channels, "d_state": d_state, "length": length}
        for name in SOLVERS:
            with solver(name):
                def train_step():
                    scan.selective_scan_torch(**args).pow(2).mean().backward()

                def forward():
                    with torch.no_grad():
                        scan.selective_scan_torch(**args)

                row[name] = {"train_s": best_seconds(train_step, iters), "forward_s": best_seconds(forward, iters),
                             "saved_mib": saved_bytes(lambda: scan.selective_scan_torch(**args)) / 2 ** 20}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def time_encoders(cases: dict, smoke: bool, iters: int) -> list[dict]:
    rows = []
    for label, (batch, frames, stride, backward) in cases.items():
        small = dict(depth=2, embed_dim=32) if smoke else {}
        torch.manual_seed(0)
        encoder = build_encoder("ssamba_tiny", backend="torch", input_tdim=frames, fstride=stride, tstride=stride,
                                **small).train(backward)
        fbank = torch.randn(batch, frames, 128)
        row = {"case": label, "tokens": encoder.num_patches + encoder.num_prefix_tokens}
        for name in SOLVERS:
            with solver(name):
                def step():
                    with torch.set_grad_enabled(backward):
                        out = encoder.forward_features(fbank)
                    if backward:
                        out.pow(2).mean().backward()

                row[name] = {"seconds": best_seconds(step, iters)}
                if backward:
                    row[name]["saved_gib"] = saved_bytes(lambda: encoder.forward_features(fbank)) / 2 ** 30
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    lines = [f"`python bench/cpu_scan.py --write` on {result['device']} ({result['threads']} torch threads), torch "
             f"{result['torch']}, fp32, after one warm-up step the best of {result['iters']} timings per scan and "
             f"{result['encoder_iters']} per encoder. `selective_scan_torch` steps "
             f"through time on CPU from {scan.STEPPED_MIN_STATE} state elements (batch x channels x N) and runs the "
             "log-depth scan below that; each row forces one solver or the other.", "",
             "| scan: batch x channels x N x L | solver | forward + backward (s) | forward, no autograd (s) | "
             "kept for the backward (MiB) |", "|---|---|---|---|---|"]
    for row in result["scans"]:
        shape = f"{row['batch']} x {row['channels']} x {row['d_state']} x {row['length']}"
        for name in SOLVERS:
            r = row[name]
            lines.append(f"| {shape} | {name} | {r['train_s']:.4f} | {r['forward_s']:.4f} | {r['saved_mib']:.1f} |")
    lines += ["", "| encoder | tokens | solver | seconds per step | kept for the backward (GiB) |",
              "|---|---|---|---|---|"]
    for row in result["encoders"]:
        for name in SOLVERS:
            r = row[name]
            saved = f"{r['saved_gib']:.2f}" if "saved_gib" in r else "-"
            lines.append(f"| {row['case']} | {row['tokens']} | {name} | {r['seconds']:.2f} | {saved} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=3, help="timed repeats per scan (the best is kept)")
    parser.add_argument("--encoder-iters", type=int, default=1, help="timed repeats per encoder")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke and args.write:  # smoke rows are not measurements: they must not replace the recorded ones
        parser.error("--smoke checks that the script runs; it does not --write")
    result = {"device": device_name(torch.device("cpu")), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "iters": args.iters, "encoder_iters": args.encoder_iters,
              "scans": time_scans(SMOKE_SCANS if args.smoke else SCANS, args.iters),
              "encoders": time_encoders(SMOKE_ENCODERS if args.smoke else ENCODERS, args.smoke, args.encoder_iters)}
    table = markdown(result)
    print(table)
    if args.write:
        (ROOT / "docs" / "performance" / "cpu_scan.json").write_text(json.dumps(result, indent=2) + "\n")
        replace_section(ROOT / "docs" / "performance.md", "CPU scan", table)


if __name__ == "__main__":
    main()
