"""What each GPU kernel of the training path costs the chip it is built for, without that chip.

Triton compiles for a named target on any machine (it ships ``ptxas``), so this script runs the training
path's kernel wrappers (``ssamba.ops``) on CPU tensors of the real shapes and dtypes, behind a stand-in
for Triton's GPU driver: every launch compiles the kernel with the arguments it would get on the GPU
(alignment and divisibility specialisations included) for ``--arch`` (90: H100 and H200; 80: A100; 86
and 89: consumer Ampere and Ada cards; 100: B200), and then does nothing. Reported per kernel and
configuration: registers per thread, bytes of local memory (register spills), the launch's shared memory,
SASS instructions, and the instructions per iteration of each innermost loop (by opcode in the JSON: where
an edit to a hot loop adds or saves work). Shared memory beyond the target's limit fails as it would at a
GPU launch. The values the wrappers compute are meaningless: only the compiles are.

    python bench/kernel_resources.py                 # the table
    python bench/kernel_resources.py --json out.json # the records, for tests and diffs
    python bench/kernel_resources.py --write         # docs/performance/kernels.{md,json}

Registers and spills decide how many warps a multiprocessor holds (docs/performance.md reads them from
``ncu`` on a GPU); here they come from the compiled binary, so a kernel edit can be checked for both
before any GPU time is spent. Timing still needs the GPU (bench/layer.py).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssamba.models.ssamba import SIZES, SSAMBAConfig  # noqa: E402

# shared memory a block may ask for, per compute capability (CUDA programming guide, compute capabilities table)
MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}
REGISTERS_PER_SM = 65536
MULTIPROCESSORS = 132  # an H100 SXM's; only the norm backward's program count depends on it
BATCH, LENGTH = 16, 513  # the pretraining grid's 513 tokens; a batch of 16 gives batch x L the divisibility of 64's


def _resource_usage(cubin: bytes, cuobjdump: Path) -> dict:
    """Registers, local (spill) bytes and SASS instruction count of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage, sass = (subprocess.run([str(cuobjdump), flag, file.name], capture_output=True, text=True,
                                      check=True).stdout for flag in ("--dump-resource-usage", "--dump-sass"))
    fields = dict(item.split(":") for line in usage.splitlines() if "REG:" in line for item in line.split())
    instructions = sum(1 for line in sass.splitlines() if line.strip().startswith("/*") and ";" in line)
    return {"registers": int(fields["REG"]), "local_bytes": int(fields["LOCAL"]), "sass_instructions": instructions,
            "loops": innermost_loops(sass)}


SASS_LINE = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def innermost_loops(sass: str) -> list[dict]:
    """The loops of a SASS listing that hold no other loop (a branch back to an earlier address closes one), in
    address order: instructions per iteration, and how many of each opcode (suffixes dropped: ``FMUL``,
    ``LDS``, ...). A kernel's time goes mostly there, so a kernel edit can be weighed by these counts."""
    code = [(int(m[1], 16), m[2].split(".")[0], m[3]) for m in map(SASS_LINE.match, sass.splitlines()) if m]
    index = {address: i for i, (address, _, _) in enumerate(code)}
    loops = []
    for end, (address, opcode, operands) in enumerate(code):
        target = re.search(r"0x([0-9a-f]+)", operands) if opcode == "BRA" else None
        if target and int(target[1], 16) < address and int(target[1], 16) in index:
            loops.append((index[int(target[1], 16)], end))
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    return [{"instructions": b - a + 1, "opcodes": dict(Counter(op for _, op, _ in code[a:b + 1]).most_common())}
            for a, b in sorted(set(inner))]


class OfflineDriver:
    """What Triton's JIT asks of its GPU driver, answered for a target that is not present: kernels compile
    for ``arch``, their binaries are read for their resources, and launches are recorded, not run."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)
        self.cuobjdump = Path(triton_root()) / "backends" / "nvidia" / "bin" / "cuobjdump"
        self.launches: list[dict] = []
        self.usage: dict[str, dict] = {}  # compiled kernel's hash -> resources
        self.loading: list[str] = []  # Triton asks for a kernel's launcher, then loads its binary
        self.utils = _OfflineUtils(self)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def launcher_cls(self, src, metadata):
        self.loading.append(metadata.hash)
        constants = {name: value for (index,), value in src.constants.items()
                     for name in [src.fn.arg_names[index]] if isinstance(value, (bool, int))}

        def launch(*_):
            self.launches.append({"kernel": src.name, "hash": metadata.hash, "num_warps": metadata.num_warps,
                                  "shared_bytes": metadata.shared, "constants": constants})
        return launch


class _OfflineUtils:
    """The driver's ``utils``: the target's limits, and a "load" that reads the binary's resources."""

    def __init__(self, driver: OfflineDriver):
        self.driver = driver

    def get_device_properties(self, device):
        return {"max_shared_mem": MAX_SHARED[self.driver.arch], "multiprocessor_count": MULTIPROCESSORS}

    def load_binary(self, name, cubin, shared, device):
        resources = _resource_usage(cubin, self.driver.cuobjdump)
        self.driver.usage[self.driver.loading.pop()] = resources
        threads = REGISTERS_PER_SM // max(resources["registers"], 1) // 32 * 32
        return None, None, resources["registers"], resources["local_bytes"], min(1024, threads)


def triton_root() -> str:
    import triton

    return str(Path(triton.__file__).parent)


@contextmanager
def offline(arch: int):
    """Triton's driver swapped for :class:`OfflineDriver`, and the kernels' caches emptied on the way out so
    that nothing compiled here is launched on a real GPU later in the same process."""
    from triton.runtime import driver as drivers
    from triton.runtime.jit import JITFunction

    stand_in = OfflineDriver(arch)
    drivers.set_active(stand_in)
    try:
        yield stand_in
    finally:
        drivers._active = None  # the real driver again, created when next asked for
        for module in [m for name, m in sys.modules.items() if name.startswith("ssamba.ops.")]:
            for value in vars(module).values():
                if isinstance(value, JITFunction):
                    value.device_caches.clear()


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def training_path(size: str) -> None:
    """One published pair's forward and backward as bf16 training runs it (the fused pair's add+norm, both
    mixers on the Gluon scan), the single add+norm, and the plain-Triton mixer (GPUs without the Gluon scan),
    at the widths of SSAMBA-``size``."""
    from ssamba.ops import gluon_bimamba, triton_bimamba, triton_norm

    config = SSAMBAConfig(embed_dim=SIZES[size]["embed_dim"])
    d, N, R, K = config.embed_dim, config.d_state, config.dt_rank, config.d_conv
    E = config.expand * d
    bf16 = torch.bfloat16
    hidden, residual = _randn(BATCH, LENGTH, d, dtype=bf16), _randn(BATCH, LENGTH, d)
    scales = (torch.ones(BATCH), torch.ones(BATCH))
    norm = (_randn(d), _randn(d))
    normed_f, _, _ = triton_norm.pair_add_norm_fwd(hidden, residual, scales, norm, norm, 1e-5, bf16, torch.float32)
    in_proj, out_proj = _randn(2 * E, d), _randn(d, E)
    branch = [_randn(E, 1, K), _randn(E), _randn(R + 2 * N, E), _randn(E, R), _randn(E), _randn(E, N), _randn(E)]
    weights = (*branch, *[t.clone() for t in branch])
    out, saved = gluon_bimamba.mixer_forward(normed_f, in_proj, out_proj, weights)
    grads = gluon_bimamba.mixer_backward(normed_f, saved, torch.randn_like(out), [t.dtype for t in weights],
                                         [in_proj.dtype, out_proj.dtype], R)
    triton_norm.pair_add_norm_bwd(hidden, residual, scales, (norm[0], norm[0]), False, 1e-5, grads[0], grads[0],
                                  torch.randn_like(residual))
    # the recompute in the pair's backward (no residual written) and the first pair (no residual, no drop path)
    triton_norm.pair_add_norm_fwd(hidden, residual, scales, norm, norm, 1e-5, bf16, None)
    triton_norm.pair_add_norm_fwd(hidden, None, None, norm, norm, 1e-5, bf16, torch.float32)

    single = [t.clone().requires_grad_() for t in (hidden, residual, *norm)]
    normed, new_residual = triton_norm.add_norm(*single, 1e-5, scales[0], torch.float32)
    torch.autograd.backward([normed, new_residual], [torch.randn_like(normed), torch.randn_like(new_residual)])

    xz = _randn(BATCH, LENGTH, 2 * E, dtype=bf16).requires_grad_()
    plain = [_randn(2 * E, K), _randn(2 * E), _randn(R + 2 * N, E), _randn(R + 2 * N, E), _randn(E, R), _randn(E, R),
             _randn(2 * E), _randn(2 * E, N), _randn(2 * E)]
    y = triton_bimamba.bimamba_inner_triton(xz, *[t.requires_grad_() for t in plain])
    y.backward(torch.randn_like(y))


def collect(arch: int, sizes: list[str]) -> list[dict]:
    """One record per model size and distinct compiled kernel: name, launch configuration and resources."""
    records, seen = [], set()
    with offline(arch) as driver:
        for size in sizes:
            start = len(driver.launches)
            training_path(size)
            for launch in driver.launches[start:]:
                if (launch["hash"], size) not in seen:
                    seen.add((launch["hash"], size))
                    records.append({"size": size, **{k: v for k, v in launch.items() if k != "hash"},
                                    **driver.usage[launch["hash"]]})
    return records


def render(records: list[dict], arch: int) -> str:
    import platform

    import triton

    lines = ["# The training path's GPU kernels, compiled offline", "",
             f"`python bench/kernel_resources.py --write` on {platform.machine()} without a GPU: Triton "
             f"{triton.__version__} (its own ptxas), torch {torch.__version__}, target sm_{arch}; the kernels' "
             f"arguments as bf16 training at batch {BATCH} x {LENGTH} tokens passes them. Resources read from the "
             "compiled binaries (cuobjdump), not measured on a GPU: spill bytes are local memory per thread, "
             "shared bytes what the launch asks for, innermost loops the SASS instructions of each loop that holds "
             "no other, per iteration, in address order (their opcodes are in the JSON).", "",
             "| model | kernel | configuration | warps | registers | spill bytes | shared bytes | SASS instructions | "
             "innermost loops |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in records:
        config = " ".join(f"{k}={v}" for k, v in sorted(r["constants"].items()))
        loops = ", ".join(str(loop["instructions"]) for loop in r["loops"]) or "-"
        lines.append(f"| {r['size']} | `{r['kernel']}` | {config} | {r['num_warps']} | {r['registers']} | "
                     f"{r['local_bytes']} | {r['shared_bytes']} | {r['sass_instructions']} | {loops} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, choices=sorted(MAX_SHARED), help="compute capability x 10")
    parser.add_argument("--size", nargs="+", choices=list(SIZES), default=list(SIZES), help="SSAMBA sizes")
    parser.add_argument("--json", type=Path, help="also write the records here")
    parser.add_argument("--write", action="store_true", help="write docs/performance/kernels.{md,json}")
    args = parser.parse_args(argv)
    records = collect(args.arch, args.size)
    text = render(records, args.arch)
    print(text)
    outputs = [args.json] if args.json else []
    if args.write:
        (ROOT / "docs" / "performance" / "kernels.md").write_text(text)
        outputs.append(ROOT / "docs" / "performance" / "kernels.json")
    for path in outputs:
        path.write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
