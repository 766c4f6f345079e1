"""Data pipeline throughput: clips/s of the CPU feature path (kaldi fbank in N DataLoader workers)
against the batched device path (workers only decode; fbank runs on the device per batch).

    python bench/data.py --workers 0 2 --device cpu            # what runs anywhere
    python bench/data.py --workers 0 4 8 --device cuda --write # GPU machine; updates docs/performance.md

Clips are generated 10 s 16 kHz 16-bit WAV files in a temporary folder, read through an AST
manifest exactly as a real dataset would be.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from ssamba.data import ManifestDataModule

from machine import cores, cpu_model, device_name  # bench/ is the script's directory

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Data pipeline"


def make_corpus(folder: Path, clips: int, seconds: float) -> Path:
    rng = np.random.default_rng(0)
    entries = []
    for i in range(clips):
        sf.write(folder / f"{i}.wav", rng.uniform(-0.3, 0.3, int(seconds * 16000)), 16000, subtype="PCM_16")
        entries.append({"wav": f"{i}.wav", "labels": ""})
    manifest = folder / "train.json"
    manifest.write_text(json.dumps({"data": entries}))
    return manifest


def clips_per_second(manifest: Path, workers: int, on_device: bool, device: torch.device, batch_size: int) -> float:
    dm = ManifestDataModule(train_manifest=str(manifest), root=str(manifest.parent), batch_size=batch_size,
                            num_workers=workers, features_on_device=on_device, pin_memory=device.type == "cuda")
    dm.setup("fit")
    loader = dm.dataloader("train", shuffle=False)
    for _ in zip(range(1), loader):  # start workers, warm caches
        pass
    count, start = 0, time.perf_counter()
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        batch = dm.on_after_batch_transfer(dm.on_before_batch_transfer(batch, 0), 0)
        count += batch["fbank"].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def machine(device: torch.device) -> str:
    text = f"{cpu_model()}, {cores()} cores available, torch {torch.__version__}"
    return text + (f", {device_name(device)}" if device.type == "cuda" else "")


def write_section(rows: list[tuple[str, int, float]], args, device: torch.device) -> None:
    path = ROOT / "docs" / "performance.md"
    table = "\n".join(f"| {path_name} | {workers} | {rate:.1f} |" for path_name, workers, rate in rows)
    section = (
        f"{SECTION}\n\n"
        f"`python bench/data.py --workers {' '.join(map(str, args.workers))} --device {args.device} "
        f"--clips {args.clips} --write` on {machine(device)}. {args.clips} clips of {args.seconds:g} s "
        f"(16 kHz WAV), batch {args.batch_size}, target_length 1024; clips/s including decoding.\n\n"
        "| features | DataLoader workers | clips/s |\n|---|---|---|\n"
        f"{table}\n"
    )
    if device.type == "cpu":
        section += (
            "\nOn a CPU the batched path is the slower one: one clip's frames stay in cache, a whole "
            "batch's (about 64 MB at 32 clips) do not. It exists to move the fbank off the CPU workers "
            "onto a GPU; more workers help only where there are spare cores.\n"
        )
    text = path.read_text() if path.exists() else "# Performance\n"
    if SECTION in text:  # replace only this section, keep everyone else's
        head, rest = text.split(SECTION, 1)
        tail = rest[rest.find("\n## "):] if "\n## " in rest else ""
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clips", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--write", action="store_true", help="update the Data pipeline section of docs/performance.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        manifest = make_corpus(Path(folder), args.clips, args.seconds)
        for workers in args.workers:
            for on_device, name in ((False, "CPU kaldi fbank per clip"), (True, f"batched on {device.type}")):
                rate = clips_per_second(manifest, workers, on_device, device, args.batch_size)
                rows.append((name, workers, rate))
                print(f"{name:28s} workers={workers:2d}  {rate:8.1f} clips/s", flush=True)
    if args.write:
        write_section(rows, args, device)


if __name__ == "__main__":
    main()
