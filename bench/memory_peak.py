"""What is alive at a training run's peak GPU memory, grouped by the code that allocated it.

Runs one case of ``bench/train_throughput.py`` (the real training stack, synthetic data) with the CUDA
caching allocator recording every allocation, replays the recorded allocations and frees to the moment
the allocated total peaked, and prints the live tensors there grouped by the innermost frame in this
project's code (or, with ``--depth``, by that many frames). Graph captures allocate through the same
allocator, so a CUDA-graph case shows its pools' tensors as they were at capture time.

    python bench/memory_peak.py --case "ssamba_tiny, 2 passes, CUDA graphs"
    python bench/memory_peak.py --case "ssast_tiny, 2 passes" --steps 3 --top 30 --depth 2
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from train_throughput import CASES, measure  # noqa: E402

OWN_CODE = (str(ROOT / "ssamba"), str(ROOT / "bench"))


def live_at_peak(trace: list[dict]) -> tuple[int, list[dict]]:
    """The peak allocated bytes over ``trace`` (the allocator's events) and the allocations live then."""
    total = peak = 0
    peak_index = -1
    live: dict[int, dict] = {}
    for index, event in enumerate(trace):
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
        elif event["action"] == "free_completed" and live.pop(event["addr"], None) is not None:
            total -= event["size"]
        if total > peak:
            peak, peak_index = total, index
    live.clear()
    for event in trace[:peak_index + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_completed":
            live.pop(event["addr"], None)
    return peak, list(live.values())


def site(event: dict, depth: int) -> str:
    """The innermost ``depth`` frames of this project's code that led to the allocation."""
    frames = [f for f in event.get("frames", []) if f["filename"].startswith(OWN_CODE)]
    if not frames:
        frames = event.get("frames", [])[:1]
    return " <- ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in frames[:depth]) or "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", required=True, choices=list(CASES), metavar="LABEL",
                        help="a case of bench/train_throughput.py")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps after --warmup")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--extra", nargs="*", default=[], help="Hydra overrides added to the case")
    parser.add_argument("--top", type=int, default=20, help="how many allocation sites to print")
    parser.add_argument("--depth", type=int, default=1, help="frames of this project's code per site")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("memory_peak.py needs a CUDA device")
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=2_000_000)
    measure(CASES[args.case] + args.extra, args.steps, args.warmup, args.batch, gpu=True)
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = [event for device_trace in snapshot["device_traces"] for event in device_trace]
    peak, live = live_at_peak(trace)
    sites: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for event in live:
        entry = sites[site(event, args.depth)]
        entry[0] += event["size"]
        entry[1] += 1
    print(f"{torch.cuda.get_device_name()}, {args.case}, batch {args.batch} {' '.join(args.extra)}: peak allocated "
          f"{peak / 2**30:.2f} GiB in {len(live)} tensors (recorded); max_memory_allocated "
          f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print("| GiB | tensors | allocated at |\n|---|---|---|")
    for name, (size, count) in sorted(sites.items(), key=lambda item: -item[1][0])[:args.top]:
        print(f"| {size / 2**30:.3f} | {count} | {name} |")


if __name__ == "__main__":
    main()
