"""Whether one training step can fit in this machine's memory when it trains on CPU.

A GPU recipe started on a laptop or a small CPU server (CirCor pretraining keeps about 30 GiB of activations
per step at its batch of 64: SSAMBA-tiny keeps 0.23 GiB a clip of 512 frames, two passes) is otherwise
killed by the kernel's out-of-memory killer during its first step, with no message of ours. The check
measures what autograd keeps for the backward of one clip through the encoder and refuses, in one line, a
step that needs more than the memory available for those activations alone: a lower bound on the step's
peak, so it only refuses steps that cannot fit.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

GIB = 1024**3
MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")  # cgroup v2: memory.max and memory.current of this process's group


def available_bytes() -> int | None:
    """Memory a new allocation can get: ``MemAvailable``, lowered to a cgroup limit's headroom where a container
    sets one; None where neither can be read (not Linux)."""
    try:
        fields = dict(line.split(":", 1) for line in MEMINFO.read_text().splitlines() if ":" in line)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int((CGROUP / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return available


def saved_bytes(fn: Callable[[], object], leaves: bool = True) -> int:
    """Bytes autograd keeps for the backward while ``fn`` runs, each storage counted once; ``leaves=False`` leaves
    out tensors that are leaves requiring grad (parameters, which exist whatever the batch)."""
    storages: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        if leaves or not (tensor.is_leaf and tensor.requires_grad):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        fn()
    return sum(storages.values())


def saved_bytes_per_clip(encoder: nn.Module) -> int:
    """Bytes of the activations autograd keeps for the backward of one random clip through ``encoder`` at the
    grid it is laid out for (parameters not counted). The random state is restored after, so a seeded run draws
    the same numbers whether or not it was measured."""
    cfg = encoder.config
    with torch.random.fork_rng(), torch.enable_grad():
        clip = torch.randn(1, cfg.input_tdim, cfg.input_fdim)
        return saved_bytes(lambda: encoder(clip), leaves=False)


def cpu_step_problem(encoder: nn.Module, batch_size: int, passes: int, processes: int = 1) -> str | None:
    """One line saying why a CPU training step of ``batch_size`` clips per process through ``passes`` encoder
    passes cannot fit, or None when it may (or when the memory available cannot be read)."""
    available = available_bytes()
    if available is None:
        return None
    per_clip = saved_bytes_per_clip(encoder)
    needed = per_clip * batch_size * passes * processes
    if needed <= available:
        return None
    bound = available // (per_clip * passes * processes)
    advice = (f"lower data.batch_size (under {bound}: the step needs more than these activations)" if bound
              else "shorten the clips (data.target_length)")
    return (f"a training step on CPU keeps at least {needed / GIB:.1f} GiB of activations for its backward "
            f"({processes} x {batch_size} clips x {passes} encoder pass(es) x {per_clip / GIB:.3f} GiB, measured on "
            f"one clip), more than the {available / GIB:.1f} GiB available: {advice}, or train on a GPU (trainer=gpu)")
