"""The Gluon scan kernels of two checkouts, on the same inputs: are their outputs the same, and which is faster (GPU).

A kernel edit is weighed here before it reaches a training step (``bench/train_throughput.py --baseline``
weighs the step). Both trees' ``scan_fwd`` and ``scan_bwd`` run on the same bf16 inputs, at the widths the
models' layers give them (``--dims``: model widths, so E = 2 x d channels per direction), each tree in a fresh
process that imports that tree's package, the trees alternating for ``--runs`` rounds (baseline first).

Reported per width: each output bitwise equal to the baseline's or not, with the largest difference; with two
or more runs, also the baseline against its own second run, since the atomically summed gradients (dB/dC and
the parameters') change with the order of their additions between two runs of one kernel. Then each kernel's
time per call (CUDA events over ``--iters`` calls after ``--warmup``) in every run, and the ratio of the medians.

    python bench/scan_ab.py --baseline ../old                 # d = 192 and 768 (tiny and base), batch 64
    python bench/scan_ab.py --baseline ../old --dims 192 --batch 256 --runs 3
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("y", "ckpt", "du", "ddt", "dBC", "dA_log", "dD", "dbias")


def scan_inputs(batch: int, tokens: int, dim: int, d_state: int, device):
    """Seeded bf16 activations and fp32 parameters for one width, as the mixer hands them to the scan."""
    import torch

    E = 2 * dim
    gen = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, device=device, generator=gen)  # noqa: E731
    u = rnd(batch, tokens, 2 * E).bfloat16()
    dt = (rnd(batch, tokens, 2 * E) * 0.5 - 2).bfloat16()
    bc = rnd(batch, tokens, 2, 2 * d_state).bfloat16()
    A_log = torch.log(torch.rand(2, E, d_state, device=device, generator=gen) * 15 + 1)
    params = (A_log[0], A_log[1], rnd(E), rnd(E), rnd(E) * 0.1 - 3, rnd(E) * 0.1 - 3)
    return u, dt, bc, params, rnd(batch, tokens, E).bfloat16()


def child(tree: Path, out: Path, args) -> None:
    """One tree's kernel times and (unless ``--no-outputs``) outputs, saved to ``out``; imports that tree's
    package."""
    sys.path.insert(0, str(tree))
    import torch

    from ssamba.models.ssamba import SSAMBAConfig
    from ssamba.ops import gluon_scan
    from ssamba.ops.gluon_scan import scan_bwd, scan_fwd

    if not Path(gluon_scan.__file__).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"imported {gluon_scan.__file__}, not the package of {tree}")

    def per_call_ms(fn) -> float:
        for _ in range(args.warmup):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(args.iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / args.iters

    result = {}
    for dim in args.dims:
        u, dt, bc, params, g = scan_inputs(args.batch, args.tokens, dim, SSAMBAConfig().d_state, "cuda")
        y, ckpt = scan_fwd(u, dt, bc, params)
        grads = scan_bwd(u, dt, bc, params, ckpt, g)
        result[dim] = {"outputs": {} if args.no_outputs else dict(zip(OUTPUTS, (y, ckpt, *grads))),
                       "ms": {"scan_fwd": per_call_ms(lambda: scan_fwd(u, dt, bc, params)),
                              "scan_bwd": per_call_ms(lambda: scan_bwd(u, dt, bc, params, ckpt, g))}}
    torch.save(result, out)


def run_tree(tree: Path, args, outputs: bool) -> dict:
    """``child`` of ``tree`` in a fresh process; its saved results (the outputs only where compared: at base
    width they are about a GiB)."""
    import torch

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.pt"
        command = [sys.executable, str(Path(__file__).resolve()), "--child", str(tree), "--out", str(out),
                   "--dims", *map(str, args.dims), "--batch", str(args.batch), "--tokens", str(args.tokens),
                   "--warmup", str(args.warmup), "--iters", str(args.iters),
                   *([] if outputs else ["--no-outputs"])]  # fmt: skip
        if subprocess.run(command, cwd=tree).returncode or not out.exists():
            raise SystemExit(f"the run of {tree} failed (its output is above)")
        return torch.load(out, map_location="cpu", weights_only=True)


def bitwise_equal(a, b) -> bool:
    """Same dtype, shape and bits (``==`` would call -0.0 and 0.0 equal, and a NaN unequal to itself)."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def compare_outputs(base: dict, other: dict) -> dict[str, str]:
    """Per output: "bitwise equal", or its largest absolute difference."""
    verdicts = {}
    for name, tensor in base.items():
        theirs = other[name]
        if tensor.shape != theirs.shape:
            verdicts[name] = f"shapes differ: {tuple(tensor.shape)} / {tuple(theirs.shape)}"
        elif bitwise_equal(tensor, theirs):
            verdicts[name] = "bitwise equal"
        else:
            verdicts[name] = f"max abs diff {(tensor.double() - theirs.double()).abs().max().item():.3g}"
    return verdicts


def report(runs: dict[str, list[dict]], dims: list[int], verdict) -> str:
    """Markdown: the outputs compared per width, then the kernels' times per run (``verdict``: an ordering
    from the two trees' times, only where they do not overlap)."""
    base, this = runs["baseline"], runs["this tree"]
    lines = []
    for dim in dims:
        this_vs_base = compare_outputs(base[0][dim]["outputs"], this[0][dim]["outputs"])
        again = compare_outputs(base[0][dim]["outputs"], base[1][dim]["outputs"]) if len(base) > 1 else None
        lines += ["", f"d = {dim} (E = {2 * dim}): outputs against the baseline's", "",
                  "| output | this tree | baseline, its second run |" if again else "| output | this tree |",
                  "|---|---|---|" if again else "|---|---|"]
        lines += [f"| {name} | {verdict_} |" + (f" {again[name]} |" if again else "")
                  for name, verdict_ in this_vs_base.items()]
    lines += ["", "| kernel | d | baseline ms / call | this tree ms / call | this / baseline (medians) | verdict |",
              "|---|---|---|---|---|---|"]
    for dim in dims:
        for kernel in base[0][dim]["ms"]:
            old = [run[dim]["ms"][kernel] for run in base]
            new = [run[dim]["ms"][kernel] for run in this]
            lines.append(f"| {kernel} | {dim} | {' / '.join(f'{v:.3f}' for v in old)} | "
                         f"{' / '.join(f'{v:.3f}' for v in new)} | "
                         f"{statistics.median(new) / statistics.median(old):.3f} | {verdict(old, new)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="another checkout of this project (its ssamba/ is timed)")
    parser.add_argument("--dims", type=int, nargs="+", default=[192, 768], help="model widths (E = 2 x d)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=513)
    parser.add_argument("--runs", type=int, default=2, help="rounds, each tree once per round")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--no-outputs", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return child(args.child, args.out, args)
    if args.baseline is None:
        parser.error("--baseline is required: the checkout whose kernels this tree's are compared with")
    if not (args.baseline / "ssamba" / "ops" / "gluon_scan.py").exists():
        parser.error(f"--baseline {args.baseline}: no ssamba/ops/gluon_scan.py there (give a checkout of this project)")
    import torch

    if not torch.cuda.is_available():
        parser.error("the Gluon scan kernels need a CUDA GPU; none is visible here")
    sys.path.insert(0, str(ROOT / "bench"))
    from machine import device_name
    from train_throughput import ab_verdict

    runs = {"baseline": [], "this tree": []}
    for round_ in range(args.runs):
        for name, tree in (("baseline", args.baseline.resolve()), ("this tree", ROOT)):
            # compared: both trees' first round, and the baseline's second against its first
            runs[name].append(run_tree(tree, args, outputs=round_ == 0 or (round_ == 1 and name == "baseline")))
            print(f"round {round_ + 1}: {name} done", flush=True)
    print(f"\n{device_name()}, torch {torch.__version__}, batch {args.batch}, {args.tokens} tokens, bf16 inputs; "
          f"A/B against {args.baseline} (trees alternating, baseline first)")
    print(report(runs, args.dims, ab_verdict))


if __name__ == "__main__":
    main()
