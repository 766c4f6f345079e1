"""Selective-scan kernels: plain PyTorch everywhere; on a GPU, Triton kernels and mamba-ssm's CUDA kernels.

``backend="auto"`` takes Triton, then mamba-ssm's kernels (when installed) on CUDA tensors, PyTorch elsewhere.
"""
from .backend import BACKENDS, cuda_kernels, resolve_backend
from .bimamba import BranchWeights, bimamba_inner, bimamba_mixer
from .selective_scan import selective_scan_ref, selective_scan_torch

__all__ = ["BACKENDS", "cuda_kernels", "resolve_backend", "BranchWeights", "bimamba_inner", "bimamba_mixer",
           "selective_scan_ref", "selective_scan_torch"]
