"""Whole encoders, forward + backward, at the pretraining input (1024 frames -> 512 patches + prefix tokens).

SSAMBA tiny/base per selective-scan backend, and with every mixer swapped for two stock
``mamba_ssm.Mamba`` modules (where mamba-ssm is installed), next to SSAST tiny/base, batch 64, bf16
autocast, median of CUDA-event timings after warm-up; reports ms per step and samples/s.

    python bench/encoder.py --write          # GPU -> table in docs/performance.md (section "Encoder")
    python bench/encoder.py --smoke          # CPU: 2-layer width-32 models, to check the script runs
"""
from __future__ import annotations

import argparse
import json

import torch

from layer import ROOT, replace_section, stock_available, time_steps, use_stock_mixers
from machine import device_name
from ssamba.models import build_encoder
from ssamba.ops.backend import cuda_kernels, resolve_backend, triton_available


def candidates(sizes, frames: int, device: torch.device, smoke: bool) -> dict:
    small = dict(depth=2, embed_dim=32, input_tdim=frames) if smoke else dict(input_tdim=frames)
    backends = ["triton", "cuda"] if device.type == "cuda" else ["torch"]
    backends = [b for b in backends if b != "triton" or triton_available()]
    backends = [b for b in backends if b != "cuda" or cuda_kernels() is not None]
    models = {}
    for size in sizes:
        if device.type == "cuda" and stock_available():
            models[f"ssamba_{size}, stock mixers (mamba_ssm.Mamba)"] = lambda s=size: use_stock_mixers(build_encoder(
                f"ssamba_{s}", **small).to(device))
        for backend in backends:
            models[f"ssamba_{size} ({backend})"] = lambda s=size, b=backend: build_encoder(f"ssamba_{s}", backend=b,
                                                                                            **small)
        models[f"ssast_{size}"] = lambda s=size: build_encoder(
            f"ssast_{s}", **(dict(small, num_heads=2) if smoke else {}))
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--frames", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models, 2 iterations")
    args = parser.parse_args()
    if args.smoke and args.write:  # smoke rows are not measurements: they must not replace the recorded ones
        parser.error("--smoke checks that the script runs; it does not --write")
    if args.smoke:
        args.device, args.sizes, args.batch, args.frames, args.warmup, args.iters = "cpu", ["tiny"], 2, 64, 1, 2
    device = torch.device(args.device)
    rows = {}
    for name, make in candidates(args.sizes, args.frames, device, args.smoke).items():
        encoder = make().to(device).train()
        fbank = torch.randn(args.batch, args.frames, 128, device=device)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = encoder(fbank)
            out.float().pow(2).mean().backward()

        ms = time_steps(step, device, args.warmup, args.iters)
        rows[name] = {"ms": ms, "samples_per_s": args.batch / ms * 1e3, "tokens": encoder.num_patches
                      + encoder.num_prefix_tokens, "layers": len(getattr(encoder, encoder.layer_stack))}
        print(f"{name}: {ms:.2f} ms/step, {rows[name]['samples_per_s']:.1f} samples/s", flush=True)
        del encoder
    if not args.write:
        return
    resolved = resolve_backend("auto", device.type == "cuda")
    table = [f"`python bench/encoder.py --write` on {device_name(device)}, torch {torch.__version__}: whole encoder "
             f"forward + backward (loss = mean square of the output), batch {args.batch}, {args.frames} frames, bf16 "
             f"autocast, median of {args.iters} CUDA-event timings after {args.warmup} warm-up steps. "
             f"`backend=auto` resolves to `{resolved}` here.", "",
             "| encoder | tokens | ms / step | samples / s |", "|---|---|---|---|"]
    table += [f"| {name} | {row['tokens']} | {row['ms']:.1f} | {row['samples_per_s']:.1f} |" for name, row in rows.items()]
    replace_section(ROOT / "docs" / "performance.md", "Encoder", "\n".join(table))
    out_dir = ROOT / "docs" / "performance"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "encoder.json").write_text(json.dumps({"device": device_name(device), "batch": args.batch,
                                                      "encoders": rows}, indent=2) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
