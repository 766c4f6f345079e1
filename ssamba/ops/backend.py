"""Which implementation runs the bidirectional selective scan.

``torch`` is plain PyTorch and runs everywhere. ``cuda`` uses mamba-ssm's selective-scan kernel
and causal-conv1d (the ``cuda`` extra) and needs CUDA tensors. ``triton`` runs fused Triton kernels
(conv + both scan directions; the scan in Gluon, Triton's explicit-layout dialect, on NVIDIA GPUs of
compute capability >= 8.0, else in plain Triton; see docs/performance.md) and needs CUDA tensors and
the ``triton`` package, nothing compiled ahead. ``auto`` takes the fastest that can run: ``triton``,
then ``cuda``, then ``torch``, and says once, in the log, which one it picked. If the Triton kernels
fail to compile on this machine, ``auto`` falls back for the rest of the process.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "cuda", "triton")

_triton_failure: list[str] = []  # why the Triton kernels could not run here, once they failed


def cuda_kernels() -> tuple[object, object] | None:
    """mamba-ssm's ``selective_scan_fn`` and causal-conv1d's ``causal_conv1d_fn``, or None."""
    return _import_kernels()[0]


@functools.cache
def _import_kernels() -> tuple[tuple[object, object] | None, str]:
    """The kernels, or None and why not. A broken build (a library or CUDA mismatch) fails with other errors than
    ImportError; whichever it is, ``auto`` goes on without the kernels and ``cuda`` names it."""
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as error:  # any failure to import means: not usable here
        return None, f"{type(error).__name__}: {error}"
    return (selective_scan_fn, causal_conv1d_fn), ""


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package imports (it also needs a CUDA device at run time)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def gluon_scan_usable(device: torch.device, d_state: int, channels: int) -> bool:
    """Whether the Gluon scan kernels (``gluon_scan``) can run here; otherwise the ``triton`` backend
    uses its plain-Triton scan. Gluon needs a compiled (not interpreted) NVIDIA GPU of compute
    capability 8.0 or newer; the kernels hold a power-of-two number (<= 32) of states per channel and
    copy rows in pieces of at least 4 bytes (an even number of 16-bit channels per direction)."""
    if os.environ.get("TRITON_INTERPRET") == "1" or device.type != "cuda" or not _gluon_importable():
        return False
    if torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] < 8:
        return False
    return 2 <= d_state <= 32 and d_state & (d_state - 1) == 0 and channels % 2 == 0


@functools.cache
def _gluon_importable() -> bool:
    try:
        from triton.experimental import gluon  # noqa: F401
    except ImportError:
        return False
    return True


def disable_triton(reason: str) -> None:
    """Stop ``auto`` from choosing Triton in this process, e.g. after a compile failure."""
    if not _triton_failure:
        _triton_failure.append(reason)
        log.warning("Triton kernels unavailable (%s); backend 'auto' falls back", reason)


def triton_or_fallback(requested: str, fast, fallback):
    """``fast()`` (Triton kernels); under ``auto`` a compile or launch failure disables Triton for the
    process and runs ``fallback()`` instead. Errors of the inputs themselves are raised either way."""
    try:
        return fast()
    except Exception as err:
        if requested != "auto" or isinstance(err, (torch.OutOfMemoryError, ValueError, TypeError)):
            raise
        disable_triton(f"{type(err).__name__}: {err}")
        return fallback()


@functools.cache
def _announce(choice: str, reason: str) -> None:
    log.info("selective-scan backend: %s (%s)", choice, reason)


def resolve_backend(requested: str, on_cuda: bool) -> str:
    """Map a requested backend to the one that will run for tensors on (or off) a CUDA device."""
    if requested not in BACKENDS:
        raise ValueError(f"backend={requested!r} is not one of {', '.join(BACKENDS)}")
    if requested == "torch":
        return "torch"
    if requested == "triton":
        if not triton_available():
            raise ImportError("backend='triton' needs the triton package; use backend='torch' or 'auto'")
        if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("backend='triton' needs the model and its inputs on a CUDA device; "
                               "use backend='torch' or 'auto' on CPU")
        return "triton"
    if requested == "auto" and on_cuda and triton_available() and not _triton_failure:
        _announce("triton", "triton installed, tensors on CUDA")
        return "triton"
    kernels = cuda_kernels() is not None
    if requested == "cuda":
        if not kernels:
            raise ImportError(f"backend='cuda' needs mamba-ssm and causal-conv1d, which do not import here "
                              f"({_import_kernels()[1]}; pip install -e '.[cuda]' on a machine with CUDA); "
                              "use backend='torch' or 'auto'")
        if not on_cuda:
            raise RuntimeError("backend='cuda' needs the model and its inputs on a CUDA device; "
                               "use backend='torch' or 'auto' on CPU")
        return "cuda"
    if kernels and on_cuda:
        _announce("cuda", "mamba-ssm kernels found, tensors on CUDA")
        return "cuda"
    _announce("torch", "tensors not on CUDA" if kernels else "mamba-ssm/causal-conv1d do not import")
    return "torch"
