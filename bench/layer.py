"""One layer, forward + backward, at the pretraining length: stock bidirectional Mamba vs ours vs a ViT block.

Per width (d=192 tiny, d=768 base), batch 64, 513 tokens, bf16 autocast, median of CUDA-event timings
after warm-up:
- ``stock``: LayerNorm + two stock ``mamba_ssm.Mamba`` modules, one on ``h`` and one on ``flip(h)``,
  averaged (what the released Vim/SSAMBA code computes with its patched fork), plus the residual add;
- ``ours-<backend>``: our ``MambaBlock`` (add -> norm -> bidirectional mixer) per available backend;
  ``ours`` in the JSON is ``backend=auto``;
- ``ours-pair``: a pair of layers as the encoder runs it with the published pairing (``backend=auto``;
  on the Gluon path one Function for both, ``ops.pair``), its time halved: per layer, comparable with
  the rows above;
- ``ssast``: the SSAST/ViT pre-norm block (``scaled_dot_product_attention``) of ``ssamba.models.ssast``.

    python bench/layer.py --write           # GPU -> docs/performance/layer.json + table in docs/performance.md
    python bench/layer.py --sweep           # GPU: Gluon scan configurations, both kernels timed alone
    python bench/layer.py --overhead        # GPU: host vs device time of one layer step (CUDA graph)
    python bench/layer.py --profile         # GPU: per-kernel CUDA time of ``ours-auto`` (torch.profiler)
    python bench/layer.py --smoke           # CPU: tiny sizes, to check the script runs
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from ssamba.models.ssamba import MambaBlock, SSAMBAConfig, SSAMBAEncoder
from ssamba.models.ssast import Block as SSASTBlock
from ssamba.models.ssast import SSASTConfig
from ssamba.ops.backend import cuda_kernels, resolve_backend, triton_available

from machine import device_name  # bench/ is the script's directory

ROOT = Path(__file__).resolve().parents[1]


class StockMixer(nn.Module):
    """``(Mamba_f(h) + flip(Mamba_b(flip(h)))) / 2`` with two stock ``mamba_ssm.Mamba`` modules."""

    def __init__(self, dim: int):
        super().__init__()
        from mamba_ssm import Mamba

        self.forward_mamba = Mamba(dim, d_state=16, d_conv=4, expand=2)
        self.backward_mamba = Mamba(dim, d_state=16, d_conv=4, expand=2)

    def forward(self, h, reverse: bool = False):
        if reverse:  # the published pairing's second layer, on the time-reversed stream as released
            return self.forward(h.flip(1)).flip(1)
        return (self.forward_mamba(h) + self.backward_mamba(h.flip(1)).flip(1)) / 2


def use_stock_mixers(encoder):
    """Every layer's mixer of an SSAMBA encoder replaced by :class:`StockMixer` (new weights): the
    composition the released code runs, with our add + norm around it. Returns the encoder."""
    for layer in encoder.layers:
        layer.mixer = StockMixer(encoder.config.embed_dim).to(next(encoder.parameters()).device)
    return encoder


class StockBidirectional(nn.Module):
    """Residual add + LayerNorm + :class:`StockMixer`."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mixer = StockMixer(dim)

    def forward(self, hidden, residual):
        residual = residual + hidden
        return self.mixer(self.norm(residual)), residual


class OursBlock(nn.Module):
    def __init__(self, dim: int, backend: str):
        super().__init__()
        self.block = MambaBlock(SSAMBAConfig(embed_dim=dim, backend=backend), layer_idx=1, drop_path=0.0)

    def forward(self, hidden, residual):
        return self.block(hidden, residual)


class OursPair(nn.Module):
    """Two layers of the published pairing on one stream, run as the encoder runs them."""

    def __init__(self, dim: int):
        super().__init__()
        self.encoder = SSAMBAEncoder(SSAMBAConfig(embed_dim=dim, depth=2, drop_path_rate=0.0))

    def forward(self, hidden, residual):
        return self.encoder._pair(*self.encoder.layers, hidden, residual)


LAYERS_PER_STEP = {"ours-pair": 2}  # a candidate whose step runs several layers reports per layer


class SSASTLayer(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.block = SSASTBlock(SSASTConfig(embed_dim=dim, num_heads=max(1, dim // 64)), drop_path=0.0)

    def forward(self, hidden, residual):
        return (self.block(hidden),)


def time_steps(step, device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of ``step()`` after ``warmup`` calls: CUDA events on GPU, a host clock on CPU."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_fwd_bwd(layer: nn.Module, batch: int, tokens: int, dim: int, device: torch.device, warmup: int,
                 iters: int) -> float:
    """Median milliseconds of one forward + backward (bf16 autocast on CUDA, fp32 on CPU).

    Gradients are reset to None before each step, as ``optimizer.zero_grad()`` leaves them in training,
    so no step pays for accumulating into the previous step's gradients."""
    return time_steps(layer_step(layer, batch, tokens, dim, device), device, warmup, iters)


def layer_step(layer: nn.Module, batch: int, tokens: int, dim: int, device: torch.device):
    """A closure running one training-like forward + backward of ``layer`` on fixed random inputs."""
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(batch, tokens, dim, device=device, generator=gen, requires_grad=True)
    residual = torch.randn(batch, tokens, dim, device=device, generator=gen, requires_grad=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        grad_outputs = [torch.ones_like(o) for o in layer(hidden, residual)]
    leaves = [hidden, residual, *layer.parameters()]

    def step():
        for leaf in leaves:
            leaf.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            outs = layer(hidden, residual)
        torch.autograd.backward(outs, grad_outputs)

    return step


def graph_replay_ms(step, device: torch.device, iters: int) -> float:
    """Median milliseconds of ``step`` captured once as a CUDA graph and replayed: its device time alone,
    without the host's cost of issuing kernels and autograd nodes (what training's graph replays run)."""
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return time_steps(graph.replay, device, 3, iters)


def stock_available() -> bool:
    """The stock composition runs ``mamba_ssm.Mamba``'s fused path, which needs causal-conv1d too."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("mamba_ssm", "causal_conv1d"))


def our_backends(device: torch.device) -> list[str]:
    """``auto`` plus every other backend that can run here (``torch`` only on CPU: it is far too slow on GPU)."""
    cuda = device.type == "cuda"
    available = ["triton"] if cuda and triton_available() else []
    available += ["cuda"] if cuda and cuda_kernels() else []
    available += [] if cuda else ["torch"]
    return ["auto"] + [b for b in available if b != resolve_backend("auto", cuda)]


def replace_section(path: Path, title: str, body: str) -> None:
    """Replace (or append) the ``## title`` section of a markdown file, keeping every other section."""
    text = path.read_text() if path.exists() else "# Performance\n"
    lines = text.splitlines()
    heading = f"## {title}"
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = [heading, "", *body.strip().splitlines(), ""]
    else:
        lines += ["", heading, "", *body.strip().splitlines()]
    path.write_text("\n".join(lines).rstrip() + "\n")


def run_layers(args, device: torch.device) -> dict:
    results = {}
    for dim in args.dims:
        row = {}
        candidates = {f"ours-{b}": (lambda b=b: OursBlock(dim, b)) for b in our_backends(device)}
        candidates["ours-pair"] = lambda: OursPair(dim)
        if device.type == "cuda" and not args.no_stock and stock_available():
            candidates["stock"] = lambda: StockBidirectional(dim)
        candidates["ssast"] = lambda: SSASTLayer(dim)
        for name, make in candidates.items():
            layer = make().to(device)
            step = layer_step(layer, args.batch, args.tokens, dim, device)
            per_layer = LAYERS_PER_STEP.get(name, 1)
            row[name] = time_steps(step, device, args.warmup, args.iters) / per_layer
            if device.type == "cuda":
                try:
                    row[f"{name} graph"] = graph_replay_ms(step, device, args.iters) / per_layer
                except RuntimeError as error:  # a layer whose kernels cannot be captured keeps its eager time only
                    print(f"d={dim} {name}: CUDA-graph capture failed: {error}", flush=True)
            print(f"d={dim} {name}: {row[name]:.3f} ms" + (f", graph replay {row[f'{name} graph']:.3f} ms"
                                                           if f"{name} graph" in row else ""), flush=True)
            del layer, step
        results[dim] = row
    return results


def write_outputs(results: dict, args, device: torch.device) -> None:
    name = device_name(device)
    resolved = resolve_backend("auto", device.type == "cuda")
    layer_json = {"device": name}
    for dim, row in results.items():
        layer_json[f"d{dim}"] = {"stock_ms": row.get("stock"), "ours_ms": row.get("ours-auto"),
                                 "ssast_ms": row.get("ssast"), "stock_graph_ms": row.get("stock graph"),
                                 "ours_graph_ms": row.get("ours-auto graph"), "ssast_graph_ms": row.get("ssast graph"),
                                 "ours_pair_per_layer_ms": row.get("ours-pair"),
                                 "ours_pair_per_layer_graph_ms": row.get("ours-pair graph")}
    out_dir = ROOT / "docs" / "performance"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "layer.json").write_text(json.dumps(layer_json, indent=2) + "\n")
    names = sorted({k for row in results.values() for k in row if not k.endswith(" graph")},
                   key=lambda k: (k != "stock", k != "ssast", k))
    graphs = any(k.endswith(" graph") for row in results.values() for k in row)
    columns = [(d, suffix) for d in results for suffix in (("", " graph") if graphs else ("",))]
    table = [f"`python bench/layer.py --write` on {name}, torch {torch.__version__}: one layer forward + backward, "
             f"batch {args.batch}, {args.tokens} tokens, bf16 autocast, median of {args.iters} CUDA-event timings "
             f"after {args.warmup} warm-up steps. `ours-auto` resolved to `{resolved}`. `stock` = LayerNorm + two "
             "stock `mamba_ssm.Mamba` modules (h and flip(h)) averaged; `ssast` = pre-norm ViT block with "
             "`scaled_dot_product_attention`; `ours-pair` = a pair of layers as the encoder runs them (the published "
             "pairing), per layer. \"graph\": the same step captured once as a CUDA graph and "
             "replayed (device time only, as training runs it). Raw numbers: docs/performance/layer.json.", "",
             "| layer | " + " | ".join(f"d={d}{' graph' if suffix else ''} (ms)" for d, suffix in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for key in names:
        cells = [f"{results[d][key + suffix]:.2f}" if key + suffix in results[d] else "-" for d, suffix in columns]
        table.append(f"| {key} | " + " | ".join(cells) + " |")
    replace_section(ROOT / "docs" / "performance.md", "Layer", "\n".join(table))
    print("\n".join(table))


SWEEP_CONFIGS = [dict(T=16, TS=2, SPLIT=2, WARPS=1), dict(T=16, TS=2, SPLIT=1, WARPS=1),
                 dict(T=16, TS=2, SPLIT=2, WARPS=1, maxnreg=128), dict(T=16, TS=2, SPLIT=2, WARPS=1, maxnreg=112),
                 dict(T=16, TS=2, SPLIT=2, WARPS=1, maxnreg=96), dict(T=16, TS=2, SPLIT=1, WARPS=1, maxnreg=128),
                 dict(T=16, TS=2, SPLIT=1, WARPS=1, maxnreg=96), dict(T=8, TS=2, SPLIT=2, WARPS=1, maxnreg=128),
                 dict(T=16, TS=2, SPLIT=4, WARPS=1), dict(T=16, TS=2, SPLIT=1, WARPS=2)]


def sweep(args, device: torch.device) -> None:
    """Time the Gluon scan kernels alone for several configurations (bf16 inputs, fp32 inside). A config
    without ``maxnreg`` keeps each kernel's default (the forward's 128-register cap); ``maxnreg=None``
    lifts it."""
    from triton.testing import do_bench

    from ssamba.ops.gluon_scan import scan_bwd, scan_fwd

    for dim in args.dims:
        E, N, B, L = 2 * dim, 16, args.batch, args.tokens
        gen = torch.Generator(device=device).manual_seed(0)
        rnd = lambda *s: torch.randn(*s, device=device, generator=gen)  # noqa: E731
        u, dt = rnd(B, L, 2 * E).bfloat16(), rnd(B, L, 2 * E).bfloat16()
        bc = rnd(B, L, 2, 2 * N).bfloat16()
        A_log = torch.log(torch.rand(2, E, N, device=device, generator=gen) * 15 + 1)
        params = (A_log[0], A_log[1], torch.ones(E, device=device), torch.ones(E, device=device),
                  torch.full((E,), -3.0, device=device), torch.full((E,), -3.0, device=device))
        g = rnd(B, L, E)
        for cfg in SWEEP_CONFIGS:
            fwd = lambda: scan_fwd(u, dt, bc, params, cfg)  # noqa: E731
            _, ckpt = fwd()
            bwd = lambda: scan_bwd(u, dt, bc, params, ckpt, g, cfg)  # noqa: E731
            t_f = do_bench(fwd, warmup=50, rep=200, return_mode="median")
            t_b = do_bench(bwd, warmup=50, rep=200, return_mode="median")
            print(f"sweep d={dim} {cfg}: scan fwd {t_f:.3f} ms  bwd {t_b:.3f} ms", flush=True)


def overhead(args, device: torch.device) -> None:
    """Split one layer step into host and device time: CUDA events around an eager step, the host's
    time to issue a step (no synchronisation), and a CUDA-graph replay of the step (device only)."""
    for dim in args.dims:
        for name, layer in (("ours-auto", OursBlock(dim, "auto")), ("ssast", SSASTLayer(dim))):
            layer = layer.to(device)
            step = layer_step(layer, args.batch, args.tokens, dim, device)
            eager = time_steps(step, device, args.warmup, args.iters)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.iters):
                step()
            host = (time.perf_counter() - start) / args.iters * 1e3
            replay = graph_replay_ms(step, device, args.iters)
            print(f"d={dim} {name}: eager {eager:.3f} ms | host issue {host:.3f} ms | graph replay {replay:.3f} ms",
                  flush=True)


def profile(args, device: torch.device) -> None:
    """Per-kernel device time of one ``ours-auto`` layer step, to see where the milliseconds go."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for dim in args.dims:
        layer = OursBlock(dim, "auto").to(device)
        time_fwd_bwd(layer, args.batch, args.tokens, dim, device, args.warmup, 1)
        with torch_profile(activities=activities) as prof:
            time_fwd_bwd(layer, args.batch, args.tokens, dim, device, 0, 5)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"d={dim}, 5 steps:")
        print(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[192, 768])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=513)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-stock", action="store_true", help="skip the stock mamba-ssm composition")
    parser.add_argument("--sweep", action="store_true", help="time scan-kernel configurations instead")
    parser.add_argument("--profile", action="store_true", help="per-kernel device time of ours-auto instead")
    parser.add_argument("--overhead", action="store_true", help="host vs device time of one layer step instead")
    parser.add_argument("--write", action="store_true", help="write docs/performance/layer.json and the table")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, 2 iterations")
    args = parser.parse_args()
    if args.smoke and args.write:  # smoke rows are not measurements: they must not replace the recorded ones
        parser.error("--smoke checks that the script runs; it does not --write")
    if args.smoke:
        args.device, args.dims, args.batch, args.tokens, args.warmup, args.iters = "cpu", [32], 2, 33, 1, 2
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.sweep:
        sweep(args, device)
        return
    if args.profile:
        profile(args, device)
        return
    if args.overhead:
        overhead(args, device)
        return
    results = run_layers(args, device)
    if args.write:
        write_outputs(results, args, device)


if __name__ == "__main__":
    main()
