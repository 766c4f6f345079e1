"""The training path's GPU kernels compile for the H100 and the A100 on a machine without either
(bench/kernel_resources.py): a Gluon or Triton edit that does not build, spills registers or asks for more
shared memory than the chip has fails here, on CPU, before any GPU time is spent. (What they compute is tests/test_ops_triton.py's and,
on a GPU, tests/test_ops_gpu.py's.)"""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNEL_MODULES = ("gluon_scan", "triton_conv", "triton_gate", "triton_norm", "triton_scan")


def ops_kernels() -> set[str]:
    """Every launchable kernel in ssamba.ops (its helpers are jit functions too, without the suffix)."""
    from triton.runtime.jit import JITFunction

    names = set()
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"ssamba.ops.{name}")
        names |= {v.fn.__name__ for v in vars(module).values() if isinstance(v, JITFunction)
                  and v.fn.__name__.endswith("_kernel")}
    return names


@pytest.mark.parametrize("arch", [90, 80])
def test_every_kernel_compiles_without_spills_within_shared_memory(tmp_path, arch):
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").is_file():
        pytest.skip("this Triton build ships no NVIDIA tools")
    out = tmp_path / "kernels.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "kernel_resources.py"), "--json", str(out),
                           "--arch", str(arch)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = json.loads(out.read_text())
    assert {r["size"] for r in records} == {"tiny", "small", "base"}
    for size in ("tiny", "small", "base"):  # the path reaches every kernel at every size
        assert {r["kernel"] for r in records if r["size"] == size} == ops_kernels()
    for r in records:
        assert r["local_bytes"] == 0, f"{r['size']} {r['kernel']} {r['constants']} spills {r['local_bytes']} bytes"
        assert 0 < r["registers"] <= 255 and r["shared_bytes"] <= {90: 227, 80: 163}[arch] * 1024
        assert r["sass_instructions"] > 0
    # the Gluon scan's configurations as _config chooses them: one thread per channel at every size
    scan_bwd = {r["size"]: r["constants"] for r in records if r["kernel"] == "_scan_bwd_kernel"}
    assert all(constants["SPLIT"] == 1 for constants in scan_bwd.values())
    assert all(constants["T"] == 16 for constants in scan_bwd.values())
    # the scan's steps are its innermost loops: the forward's group of steps, the backward's recompute and adjoint
    loops = {(r["size"], r["kernel"]): r["loops"] for r in records}
    assert len(loops["tiny", "_scan_fwd_kernel"]) == 1 and len(loops["tiny", "_scan_bwd_kernel"]) == 2
    for loop in loops["tiny", "_scan_bwd_kernel"]:
        assert loop["opcodes"]["MUFU"] > 0 and sum(loop["opcodes"].values()) == loop["instructions"]


def test_innermost_loops_are_the_loops_that_hold_no_other():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from kernel_resources import innermost_loops
    finally:
        sys.path.pop(0)
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   FMUL R2, R2, R3 ;
        /*0020*/                   FFMA.FTZ R2, R2, R3, R4 ;
        /*0030*/               @P0 BRA 0x10 ;
        /*0040*/                   LDS.128 R4, [R5] ;
        /*0050*/              @!P1 BRA 0x0 ;
        /*0060*/                   FADD R2, R2, R3 ;
        /*0070*/                   BRA 0x90 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90 ;
    """
    # 0x10-0x30 is inside 0x0-0x50; 0x90 branching to itself is the end-of-code trap, not a loop; 0x70 jumps ahead
    assert innermost_loops(sass) == [{"instructions": 3, "opcodes": {"FMUL": 1, "FFMA": 1, "BRA": 1}}]
