"""Streaming at AudioSet scale: open a 2-million-item litdata index and start an epoch on 8 ranks x 8 workers.

    python bench/streaming_index.py --work /scratch/streaming --out docs/performance

The index is synthetic but real to litdata: one chunk of ``--chunk-items`` generated 10 s clips (FLAC, about
the size of AudioSet's clips, so a chunk is close to the default 64 MB) written by ``ssamba.data.streaming``,
then listed ``items / chunk-items`` times in ``index.json`` under hard links (no extra disk). Every item can be
read; reads come from one file, so from the page cache (a remote store would add download time).

For index sizes ``items / 100``, ``items / 10`` and ``items``, a fresh process measures (``data=shards`` as
``train.py`` builds it):

* open: time and resident memory to build ``ShardDataModule`` and its train dataset and ask its length (litdata
  reads the index);
* the dataset each DataLoader worker receives (pickled size) and what one worker holds after starting an epoch
  (Python and NumPy allocations, tracemalloc);
* epoch start on ``--ranks`` x ``--workers``: each (rank, worker) view is what litdata builds inside that
  worker (its rank and worker number set as a launcher and DataLoader would); the views are started one after
  another in one process, not in 64 processes: time to read the index and assign its chunks (``iter``) and to
  return its first item;
* items/s per worker: raw litdata reads (file bytes) and full items (decode + 1024-frame fbank), one worker.

Writes ``streaming_index.json`` and ``streaming_index.md`` in ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGET_LENGTH = 1024  # 10 s clips, AudioSet's length


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def build_base(work: Path, chunk_items: int) -> Path:
    """One chunk of generated 10 s clips (written once, reused)."""
    base = work / "base"
    if (base / "index.json").is_file():
        return base
    from ssamba.data import SyntheticDataModule
    from ssamba.data.streaming import write_shards

    source = SyntheticDataModule(num_train=chunk_items, num_val=0, num_test=0, target_length=TARGET_LENGTH)
    write_shards(source, "train", str(base), chunk_bytes="1GB", workers=1)
    return base


def build_index(base: Path, folder: Path, items: int) -> int:
    """An index of ``items`` (rounded up to whole chunks) whose chunks are hard links to the base chunk."""
    index = json.loads((base / "index.json").read_text())
    (chunk,) = index["chunks"]
    count = -(-items // chunk["chunk_size"])
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    entries = []
    for i in range(count):
        name = f"chunk-0-{i}.bin"
        os.link(base / chunk["filename"], folder / name)
        entries.append({**chunk, "filename": name})
    (folder / "index.json").write_text(json.dumps({**index, "chunks": entries}))
    sidecar = json.loads((base / "ssamba.json").read_text())
    (folder / "ssamba.json").write_text(json.dumps({**sidecar, "items": count * chunk["chunk_size"]}))
    return count * chunk["chunk_size"]


def view(opened, ranks: int, rank: int, workers: int, worker: int):
    """The dataset as litdata sees it inside DataLoader worker ``worker`` of rank ``rank``: a copy of the opened
    one (a worker receives it pickled) with that worker's rank and number."""
    from litdata.utilities.env import _DistributedEnv, _WorkerEnv

    dataset = copy.deepcopy(opened)
    dataset.distributed_env = _DistributedEnv(ranks, rank, ranks)  # one rank per node, as on 8 nodes x 1 GPU
    dataset._forced_worker_env = _WorkerEnv(workers, worker)
    return dataset


def measure(folder: str, ranks: int, workers: int, batch_size: int, rate_items: int, raw_items: int) -> dict:
    """In this (fresh) process: open, per-worker memory, epoch start on every (rank, worker), items/s."""
    import litdata
    import torch

    from ssamba.data.streaming import ShardDataModule

    torch.set_num_threads(1)  # as in a DataLoader worker
    result: dict = {"rss_before_open_mb": rss_mb()}
    start = time.perf_counter()
    module = ShardDataModule(train_dir=folder, batch_size=batch_size, num_workers=workers, target_length=TARGET_LENGTH)
    dataset = module.make_dataset("train")
    dataset.set_batch_size(batch_size)
    dataset.set_num_workers(workers)
    result["items"] = len(dataset)  # litdata reads the index here (Lightning asks to count the batches)
    result["open_s"] = time.perf_counter() - start
    result["rss_after_open_mb"] = rss_mb()
    result["worker_dataset_pickle_kb"] = len(pickle.dumps(dataset)) / 1024

    tracemalloc.start()
    first = view(dataset, ranks, 0, workers, 0)
    iter(first)
    next(first)
    result["worker_epoch_start_traced_mb"] = tracemalloc.get_traced_memory()[1] / 2**20  # peak
    tracemalloc.stop()
    del first

    assign, first_item = [], []
    for rank in range(ranks):
        for worker in range(workers):
            current = view(dataset, ranks, rank, workers, worker)
            t0 = time.perf_counter()
            iter(current)
            t1 = time.perf_counter()
            next(current)
            assign.append(t1 - t0)
            first_item.append(time.perf_counter() - t1)
    result["epoch_start"] = {"views": len(assign), "assign_s_median": statistics.median(assign),
                             "assign_s_max": max(assign), "first_item_s_median": statistics.median(first_item),
                             "all_views_s": sum(assign) + sum(first_item),
                             "items_per_worker": current.stop_length}
    result["rss_after_all_views_in_one_process_mb"] = rss_mb()

    worker = view(dataset, ranks, 0, workers, 0)
    iter(worker)
    next(worker)
    result["items_per_s_full"] = items_per_s(worker, rate_items)

    raw = litdata.StreamingDataset(folder, shuffle=True, seed=42)
    raw.set_batch_size(batch_size)
    raw.set_num_workers(workers)
    raw = view(raw, ranks, 0, workers, 0)
    iter(raw)
    next(raw)
    result["items_per_s_raw"] = items_per_s(raw, raw_items)
    result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def items_per_s(worker, count: int) -> float:
    """Items/s of a started worker view over its next ``count`` items (fewer if its share ends first)."""
    count = min(count, worker.stop_length - 1)
    start = time.perf_counter()
    for _ in range(count):
        next(worker)
    return count / (time.perf_counter() - start)


def machine() -> dict:
    import litdata
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    memory = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(memory / 2**20, 1),
            "python": platform.python_version(), "torch": torch.__version__, "litdata": litdata.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="folder for the chunk and the indexes (about 70 MB)")
    parser.add_argument("--out", type=Path, help="where streaming_index.json and .md go")
    parser.add_argument("--items", type=int, default=2_000_000)
    parser.add_argument("--chunk-items", type=int, default=250, help="clips per chunk (250 x 10 s: about 62 MB)")
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers per rank")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rate-items", type=int, default=100, help="full items timed for items/s")
    parser.add_argument("--raw-items", type=int, default=2000, help="raw reads timed for items/s")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one index, in a fresh process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.ranks, args.workers, args.batch_size, args.rate_items,
                                 args.raw_items)))
        return
    if args.work is None or args.out is None:
        parser.error("--work and --out are required")
    base = build_base(args.work, args.chunk_items)
    sizes = []
    for items in (args.items // 100, args.items // 10, args.items):
        folder = args.work / f"index-{items}"
        built = build_index(base, folder, items)
        command = [sys.executable, __file__, "--measure", str(folder), "--ranks", str(args.ranks), "--workers",
                   str(args.workers), "--batch-size", str(args.batch_size), "--rate-items", str(args.rate_items),
                   "--raw-items", str(args.raw_items)]
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"measuring {folder} failed:\n{run.stderr[-3000:]}")
        result = {"index_items": built, "chunks": built // args.chunk_items, **json.loads(run.stdout.splitlines()[-1])}
        print(json.dumps(result), flush=True)
        sizes.append(result)
        shutil.rmtree(folder)
    arguments = ["<work>" if arg == str(args.work) else arg for arg in sys.argv[1:]]  # no local paths in the record
    report = {"command": "python bench/streaming_index.py " + " ".join(arguments), "machine": machine(),
              "setup": {"chunk_items": args.chunk_items, "chunk_mb": (base / "chunk-0-0.bin").stat().st_size / 2**20,
                        "clip_seconds": 10, "ranks": args.ranks, "workers_per_rank": args.workers,
                        "batch_size": args.batch_size},
              "sizes": sizes}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "streaming_index.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "streaming_index.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    m, s = report["machine"], report["setup"]
    lines = [
        "# Streaming a 2-million-item index (litdata)", "",
        f"`{report['command']}` on {m['cpu']} ({m['cores']} cores, {m['memory_gb']} GB), Python {m['python']}, "
        f"torch {m['torch']}, litdata {m['litdata']}. Chunks of {s['chunk_items']} generated 10 s clips "
        f"({s['chunk_mb']:.0f} MB, hard links of one file, read from the page cache); {s['ranks']} ranks x "
        f"{s['workers_per_rank']} workers emulated in one process; batch {s['batch_size']}.", "",
        "| index items | chunks | open (s) | RSS added by open (MB) | dataset per worker (KB pickled) "
        "| worker memory at epoch start (MB, traced peak) | assign chunks per worker (ms, median / max) "
        "| first item (ms, median) | items/s per worker, raw | items/s per worker, decode + fbank |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["sizes"]:
        e = r["epoch_start"]
        lines.append(f"| {r['index_items']:,} | {r['chunks']:,} | {r['open_s']:.2f} "
                     f"| {r['rss_after_open_mb'] - r['rss_before_open_mb']:.1f} "
                     f"| {r['worker_dataset_pickle_kb']:.0f} | {r['worker_epoch_start_traced_mb']:.1f} "
                     f"| {1e3 * e['assign_s_median']:.0f} / {1e3 * e['assign_s_max']:.0f} "
                     f"| {1e3 * e['first_item_s_median']:.1f} | {r['items_per_s_raw']:.0f} "
                     f"| {r['items_per_s_full']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
