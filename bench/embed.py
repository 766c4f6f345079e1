"""Inference time and peak memory of SSAMBA vs SSAST on long inputs (the paper's efficiency claim).

The paper reports SSAMBA-tiny 92.7% faster with 95.4% less memory than SSAST-tiny at ~22k tokens
(16x16 patches, stride 16, batch 2, no grad). This measures, per token count:
- ``ssamba``: one pass over the whole input (selective-scan backend: auto, i.e. mamba-ssm if installed);
- ``ssast``: one pass with today's ``scaled_dot_product_attention`` kernels;
- ``ssast-math``: one pass with the materialised attention matrix (the attention of the paper's time);
- ``ssast-windowed``: windows of 1024 frames (512 tokens), as ``ssamba.embed`` runs SSAST.

    python bench/embed.py                      # GPU: 4k, 22k, 100k tokens -> docs/performance/embed.{md,json}
    python bench/embed.py --smoke              # CPU: a few small sizes, to check the script runs (writes nothing)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from machine import device_name
from ssamba.models import build_encoder
from ssamba.ops.backend import resolve_backend

MODES = ("ssamba", "ssast", "ssast-math", "ssast-windowed")
WINDOW_FRAMES = 1024
OUT = "docs/performance/embed"  # the measured figures, without .md / .json


def frames_for_tokens(tokens: int, mel_patches: int = 8, patch: int = 16) -> int:
    """Frames whose 16x16 stride-16 grid holds at least ``tokens`` patches."""
    return math.ceil(tokens / mel_patches) * patch


def build(mode: str, size: str, frames: int, smoke: bool):
    family = "ssamba" if mode == "ssamba" else "ssast"
    small = {"depth": 2, "embed_dim": 32} | ({"num_heads": 2} if family == "ssast" else {}) if smoke else {}
    tdim = min(frames, WINDOW_FRAMES) if mode == "ssast-windowed" else frames
    return build_encoder(f"{family}_{size}", input_tdim=tdim, **small)


def forward(encoder, x: torch.Tensor, mode: str, window_batch: int) -> None:
    if mode == "ssast-windowed":
        window = encoder.config.input_tdim
        frames = math.ceil(x.shape[1] / window) * window
        windows = torch.nn.functional.pad(x, (0, 0, 0, frames - x.shape[1])).reshape(-1, window, x.shape[2])
        for chunk in windows.split(window_batch):
            encoder(chunk)
        return
    attention = sdpa_kernel(SDPBackend.MATH) if mode == "ssast-math" else contextlib.nullcontext()
    with attention:
        encoder(x)


def measure(mode: str, size: str, tokens: int, args) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    frames = frames_for_tokens(tokens)
    row = {"mode": mode, "model": f"{'ssamba' if mode == 'ssamba' else 'ssast'}_{size}",
           "tokens": frames // 16 * 8, "frames": frames, "batch": args.batch}
    encoder = x = None
    try:
        encoder = build(mode, size, frames, args.smoke).to(device).eval()
        if mode == "ssamba":
            row["backend"] = resolve_backend(encoder.config.backend, cuda)
        x = torch.randn(args.batch, frames, 128, device=device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
        times = []
        with torch.no_grad(), autocast:
            for step in range(args.warmup + args.repeats):
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    baseline = torch.cuda.memory_allocated()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    forward(encoder, x, mode, args.window_batch)
                    end.record()
                    torch.cuda.synchronize()
                    elapsed = start.elapsed_time(end) / 1000
                else:
                    began = time.perf_counter()
                    forward(encoder, x, mode, args.window_batch)
                    elapsed = time.perf_counter() - began
                if step >= args.warmup:
                    times.append(elapsed)
        row["seconds"] = statistics.median(times)
        if cuda:
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            row["activation_gib"] = (torch.cuda.max_memory_allocated() - baseline) / 2**30
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    finally:
        del encoder, x
        if cuda:
            torch.cuda.empty_cache()
    return row


def header(device: str, torch_version: str, bf16: bool, smoke: bool) -> str:
    return (f"## Inference at long inputs ({device}, torch {torch_version}, "
            f"{'bf16 autocast' if bf16 else 'float32'}{', smoke sizes' if smoke else ''})")


def markdown(rows: list[dict], title: str) -> str:
    lines = [title, "", "| model | mode | tokens | batch | time (s) | peak memory (GiB) | activations (GiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        mode = r["mode"] + (f" ({r['backend']} scan)" if "backend" in r else "")
        if "error" in r:
            cells = [r["error"], "-", "-"]
        else:
            cells = [f"{r['seconds']:.3f}", f"{r['peak_gib']:.2f}" if "peak_gib" in r else "n/a",
                     f"{r['activation_gib']:.2f}" if "activation_gib" in r else "n/a"]
        lines.append(f"| {r['model']} | {mode} | {r['tokens']} | {r['batch']} | " + " | ".join(cells) + " |")
    by_key = {(r["mode"], r["tokens"]): r for r in rows if "error" not in r}
    lines.append("")
    for tokens in sorted({r["tokens"] for r in rows}):
        ssamba, ssast = by_key.get(("ssamba", tokens)), by_key.get(("ssast", tokens))
        if ssamba and ssast and "peak_gib" in ssamba:
            lines.append(f"- {tokens} tokens: SSAMBA takes {ssamba['seconds'] / ssast['seconds']:.2f}x SSAST's time "
                         f"and {ssamba['peak_gib'] / ssast['peak_gib']:.2f}x its peak memory (SDPA kernels)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4_000, 22_000, 100_000])
    parser.add_argument("--size", default="tiny", choices=("tiny", "small", "base"))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--window-batch", type=int, default=16, help="windows per forward in ssast-windowed")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (default: float32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny widths, few tokens, one repeat (checks the script)")
    parser.add_argument("--out", help=f"writes OUT.md and OUT.json (default {OUT}; '' to skip, as --smoke does "
                        "unless --out is given)")
    parser.add_argument("--render", metavar="JSON",
                        help="rewrite OUT.md from a JSON file of this script, measuring nothing")
    args = parser.parse_args(argv)
    if args.out is None:  # a smoke run must not overwrite the measured figures
        args.out = "" if args.smoke else OUT
    if args.render:
        with open(args.render) as f:
            measured = json.load(f)
        with open(args.out + ".md", "w") as f:
            f.write(markdown(measured["rows"], header(measured["device"], measured["torch"], measured["bf16"],
                                                      measured.get("smoke", False))))
        return
    if args.smoke:
        args.tokens, args.warmup, args.repeats = [64, 256], 0, 1
    torch.manual_seed(0)
    rows = []
    for tokens in args.tokens:
        for mode in args.modes:
            rows.append(measure(mode, args.size, tokens, args))
            print(json.dumps(rows[-1]), flush=True)
    device = device_name(torch.device(args.device))
    text = markdown(rows, header(device, torch.__version__, args.bf16, args.smoke))
    print(text)
    if args.out:
        with open(args.out + ".md", "w") as f:
            f.write(text)
        with open(args.out + ".json", "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "bf16": args.bf16, "smoke": args.smoke,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
