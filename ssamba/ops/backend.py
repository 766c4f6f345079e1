"""Which implementation runs the bidirectional selective scan.

``torch`` is plain PyTorch and runs everywhere. ``cuda`` uses mamba-ssm's selective-scan kernel
and causal-conv1d (the ``cuda`` extra) and needs CUDA tensors. ``auto`` takes ``cuda`` when it can
and says once, in the log, which one it picked.
"""
from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "cuda")


@functools.cache
def cuda_kernels() -> tuple[object, object] | None:
    """mamba-ssm's ``selective_scan_fn`` and causal-conv1d's ``causal_conv1d_fn``, or None."""
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return selective_scan_fn, causal_conv1d_fn


def _missing_kernel_packages() -> list[str]:
    missing = []
    for module, package in (("mamba_ssm", "mamba-ssm"), ("causal_conv1d", "causal-conv1d")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    return missing


@functools.cache
def _announce(choice: str, reason: str) -> None:
    log.info("selective-scan backend: %s (%s)", choice, reason)


def resolve_backend(requested: str, on_cuda: bool) -> str:
    """Map a requested backend to the one that will run for tensors on (or off) a CUDA device."""
    if requested not in BACKENDS:
        raise ValueError(f"backend={requested!r} is not one of {', '.join(BACKENDS)}")
    if requested == "torch":
        return "torch"
    kernels = cuda_kernels() is not None
    if requested == "cuda":
        if not kernels:
            raise ImportError(
                "backend='cuda' needs the packages " + " and ".join(_missing_kernel_packages())
                + " (pip install -e '.[cuda]' on a machine with CUDA); use backend='torch' or 'auto'")
        if not on_cuda:
            raise RuntimeError("backend='cuda' needs the model and its inputs on a CUDA device; "
                               "use backend='torch' or 'auto' on CPU")
        return "cuda"
    if kernels and on_cuda:
        _announce("cuda", "mamba-ssm kernels found, tensors on CUDA")
        return "cuda"
    _announce("torch", "tensors not on CUDA" if kernels else "mamba-ssm/causal-conv1d not installed")
    return "torch"
