"""Encoder passes of a training step replayed as CUDA graphs (``task.cuda_graphs``).

At the tiny width a layer's forward + backward costs the host about as long to issue as the GPU
takes to run it (docs/performance.md), so an eager training step waits on Python and kernel-launch
overhead. ``torch.cuda.make_graphed_callables`` captures each encoder pass of the step, forward and
backward, once and replays it afterwards; the heads, losses and optimizer stay eager. Pretraining
passes the mask and mask token along with the input; finetuning passes the input alone.

Each pass of a step gets its own graph and memory pool (the two masked passes of the released
objective keep their activations apart until the backward), captured for the first training
batch's shapes. A batch of any other shape (a short last batch; logged once), evaluation and
inference run the encoder eagerly.

The pools hold a whole step's activations and no eager allocation can use them, so ``release``
frees them when the task is torn down or its setting changes (the base task calls it); the next
training call captures again.
"""
from __future__ import annotations

import contextlib
import gc
import logging

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _thread_local_capture():
    """``make_graphed_callables`` captures in CUDA's ``global`` mode, in which a CUDA call from any
    other thread, such as the DataLoader's pin-memory thread pinning the next batch, invalidates the
    capture. Its captures here use ``thread_local`` mode: only this thread's calls are checked."""
    original = torch.cuda.graph.__init__

    def init(self, cuda_graph, pool=None, stream=None, capture_error_mode="thread_local"):
        original(self, cuda_graph, pool=pool, stream=stream, capture_error_mode=capture_error_mode)

    torch.cuda.graph.__init__ = init
    try:
        yield
    finally:
        torch.cuda.graph.__init__ = original


class _EncoderPass(nn.Module):
    """One graphed pass; the encoder's parameters are shared, not copied."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor, *masking: Tensor) -> Tensor:
        return self.encoder.forward_features(x, *masking)


class GraphedPasses:
    """``encode(index, x, *masking)`` for pass ``index`` of a training step: the encoder's
    ``forward_features(x, *masking)`` (``masking``: pretraining's mask and mask token, or nothing).

    Captures lazily on the first call in training mode with gradients on a CUDA device; the capture
    runs under autocast without its weight cache (graphs cannot hold it), in the step's autocast dtype.
    """

    def __init__(self, encoder: nn.Module, passes: int, warmup_iters: int = 3):
        self.encoder = encoder
        self.passes = passes
        self.warmup_iters = warmup_iters
        self.key: tuple | None = None
        self.graphed: tuple | None = None
        self.eager_calls = 0  # passes that ran eagerly for want of a graph of their shape

    @staticmethod
    def _key(inputs: tuple[Tensor, ...]) -> tuple:
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        return tuple((tuple(t.shape), t.dtype) for t in inputs), inputs[0].device, autocast

    def _capture(self, inputs: tuple[Tensor, ...], key: tuple) -> None:
        # one capture (memory pool, static input copies) per pass, so their replays may run in any
        # order and a later pass's inputs do not overwrite those an earlier pass's backward reads (the
        # sample inputs are the graph's static inputs). Inputs that take gradients (the mask token)
        # are passed as they are.
        autocast_dtype = key[-1]
        x, *masking = inputs

        def samples():
            return x.detach().clone(), *(t if t.requires_grad else t.clone() for t in masking)

        with torch.autocast("cuda", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None,
                            cache_enabled=False), _thread_local_capture():
            self.graphed = tuple(
                torch.cuda.make_graphed_callables(_EncoderPass(self.encoder), samples(),
                                                  num_warmup_iters=self.warmup_iters)
                for _ in range(self.passes))
        self.key = key

    def encode(self, index: int, x: Tensor, *masking: Tensor) -> Tensor:
        if not (x.is_cuda and self.encoder.training and torch.is_grad_enabled()):
            return self.encoder.forward_features(x, *masking)
        inputs = (x, *masking)
        key = self._key(inputs)
        if self.key is None:
            self._capture(inputs, key)
        if key != self.key:
            if not self.eager_calls:
                log.warning("CUDA graphs were captured for inputs of shapes %s; a batch of shapes %s runs "
                            "eagerly (logged once)", [shape for shape, _ in self.key[0]],
                            [shape for shape, _ in key[0]])
            self.eager_calls += 1
            return self.encoder.forward_features(x, *masking)
        return self.graphed[index](*inputs)

    def release(self) -> None:
        """Free the graphs, their memory pools and static buffers; the next training call captures anew.

        The graphed callables are classes made at capture time, so reference cycles keep them (and
        the pools) alive until a garbage collection: one runs here. The freed memory goes back to the
        driver, so that other processes and later eager steps see it."""
        if self.graphed is None:
            return
        self.graphed, self.key = None, None
        gc.collect()
        torch.cuda.empty_cache()
