"""CUDA-graph replays of the encoder passes (``task.cuda_graphs``) against the eager encoder."""
import functools
import gc
import weakref

import pytest
import torch

import ssamba
from ssamba.tasks.cuda_graphs import GraphedPasses

SMALL = dict(depth=2, embed_dim=32, input_tdim=64, drop_path_rate=0.0)


def _inputs(batch, gen, device, encoder):
    x = torch.randn(batch, 64, 128, generator=gen, device=device)
    mask = torch.rand(batch, encoder.num_patches, generator=gen, device=device) < 0.5
    return x, mask


def test_cpu_inputs_run_the_encoder_eagerly():
    encoder = ssamba.build_encoder("tiny", **SMALL, backend="torch").train()
    token = torch.nn.Parameter(torch.randn(1, 1, 32))
    passes = GraphedPasses(encoder, passes=2)
    x, mask = _inputs(2, torch.Generator().manual_seed(0), "cpu", encoder)
    out = passes.encode(1, x, mask, token)
    torch.testing.assert_close(out, encoder.forward_features(x, mask, token))
    torch.testing.assert_close(passes.encode(0, x), encoder.forward_features(x))  # finetuning: no masking
    assert passes.graphed is None  # nothing captured off the GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model", ["tiny", "ssast_tiny"])
@pytest.mark.parametrize("masked", [True, False], ids=["pretraining", "finetuning"])
def test_graphed_passes_match_the_eager_encoder(model, masked):
    """Two passes per step (pretraining: with masks and the mask token) or one (finetuning: the input
    alone), replayed over several steps with new inputs: outputs and every gradient (encoder parameters
    and the mask token) equal the eager encoder's; another batch size runs eagerly."""
    torch.manual_seed(0)
    overrides = dict(SMALL, backend="auto") if model == "tiny" else dict(SMALL, num_heads=2)
    encoder = ssamba.build_encoder(model, **overrides).cuda().train()
    token = torch.nn.Parameter(torch.randn(1, 1, 32, device="cuda"))
    params = [token, *encoder.parameters()] if masked else list(encoder.parameters())
    passes = 2 if masked else 1
    graphed = GraphedPasses(encoder, passes=passes)
    gen = torch.Generator(device="cuda").manual_seed(1)

    def masking(x_mask):
        return (x_mask[1], token) if masked else ()

    def step(encode):
        loss = 0
        for index in range(passes):
            x, mask = _inputs(4, gen, "cuda", encoder)
            loss = loss + (encode(index, x, *masking((x, mask))) ** 2).mean()
        return loss, torch.autograd.grad(loss, params)

    for _ in range(3):  # capture on the first, replays after; each step draws new inputs
        state = gen.get_state()
        loss, grads = step(graphed.encode)
        gen.set_state(state)
        loss_ref, grads_ref = step(lambda index, x, *rest: encoder.forward_features(x, *rest))
        torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-6)
        # atomics order sums differently per run; a tensor that is a near-cancelling sum (the mask
        # token's gradient) is compared against the scale of all the gradients
        scale = max(g.abs().max().item() for g in grads_ref)
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-4 * scale)
    assert graphed.graphed is not None and graphed.eager_calls == 0
    x, mask = _inputs(3, gen, "cuda", encoder)
    rest = masking((x, mask))
    torch.testing.assert_close(graphed.encode(0, x, *rest), encoder.forward_features(x, *rest))
    assert graphed.eager_calls == 1


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_auto_graphs_the_ssamba_family_only_and_only_on_a_gpu(kind):
    """``task.cuda_graphs=auto``: SSAMBA encoders (host-bound steps) get graph replays, SSAST does not;
    pretraining graphs its two passes, finetuning its one. (On a CPU, auto drops them at fit start:
    every CPU run of tests/test_train.py uses the default.)"""
    from ssamba.models import build_encoder
    from ssamba.tasks import Finetuning, MaskedPatchPretraining
    from ssamba.utils.config import ConfigError

    def task(name, cuda_graphs):
        heads = {"num_heads": 2} if name.startswith("ssast") else {}
        encoder = build_encoder(name, depth=2, embed_dim=32, input_tdim=64, **heads)
        if kind == "pretrain":
            return MaskedPatchPretraining(encoder, torch.optim.AdamW, mask={"count": 4}, cuda_graphs=cuda_graphs)
        data = {"target_length": 64, "label_names": ["a", "b"], "multilabel": False}
        return Finetuning(torch.optim.AdamW, encoder=encoder, fstride=16, tstride=16, cuda_graphs=cuda_graphs,
                          data=data)

    auto = task("ssamba_tiny", "auto")
    assert auto.graphed_passes is not None and task("ssast_tiny", "auto").graphed_passes is None
    assert auto.graphed_passes.passes == (2 if kind == "pretrain" else 1)
    assert task("ssamba_tiny", False).graphed_passes is None
    assert task("ssast_tiny", True).graphed_passes is not None
    with pytest.raises(ConfigError, match="one of true, false, auto"):
        task("ssamba_tiny", "yes")


def test_thread_local_capture_is_scoped():
    """The capture-mode default is changed only while the encoder passes are captured."""
    from ssamba.tasks.cuda_graphs import _thread_local_capture

    original = torch.cuda.graph.__init__
    with _thread_local_capture():
        import inspect

        assert inspect.signature(torch.cuda.graph.__init__).parameters["capture_error_mode"].default == "thread_local"
    assert torch.cuda.graph.__init__ is original


class _Captured:
    """Stands for what a capture leaves: ``make_graphed_callables`` makes classes, which sit in
    reference cycles, so only a garbage collection frees the graphs and their pools."""

    def __init__(self):
        self.cycle = self


def test_release_collects_the_graphs_and_a_new_setting_or_teardown_releases():
    from ssamba.tasks import MaskedPatchPretraining

    task = MaskedPatchPretraining(ssamba.build_encoder("tiny", **SMALL), torch.optim.AdamW, mask={"count": 4},
                                  cuda_graphs=True)
    first = task.graphed_passes
    captured = _Captured()
    alive = weakref.ref(captured)
    first.graphed, first.key = (captured,), "shapes"
    del captured
    enabled = gc.isenabled()
    gc.disable()  # only release's own collection may free it
    try:
        task.teardown("fit")
        assert alive() is None and first.graphed is None and first.key is None
    finally:
        if enabled:
            gc.enable()
    assert task.graphed_passes is first  # captured again on the next training step
    first.graphed = (_Captured(),)
    task.use_cuda_graphs(False, passes=2)  # a new setting drops the old graphs
    assert first.graphed is None and task.graphed_passes is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_fitted_graphed_task_gives_its_pools_back_for_an_eager_one():
    """Fit with graph replays, then without, in one process (a notebook flipping ``task.cuda_graphs``):
    at the end of the first fit its graph pools are freed although the task and trainer are kept, once
    both are dropped their memory is back, and the eager fit runs."""
    import lightning as L

    from ssamba.tasks import MaskedPatchPretraining

    def fit(cuda_graphs):
        torch.manual_seed(0)
        encoder = ssamba.build_encoder("tiny", input_tdim=256, backend="auto")  # 24 layers, 129 tokens
        task = MaskedPatchPretraining(encoder, functools.partial(torch.optim.AdamW, lr=1e-4), mask={"count": 40},
                                      cuda_graphs=cuda_graphs)
        batches = [{"fbank": torch.randn(16, 256, 128)} for _ in range(4)]
        trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=4, precision="bf16-mixed", logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0)
        trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
        assert trainer.global_step == 4
        return trainer, task

    gc.collect()
    torch.cuda.empty_cache()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    trainer, task = fit(True)
    assert task.graphed_passes.graphed is None
    peak = torch.cuda.max_memory_reserved() - reserved
    # what stays: weights, gradients and the optimizer's state (~0.1 GB), not a step's activations
    assert torch.cuda.memory_reserved() - reserved < 0.25 * peak
    del trainer, task
    gc.collect()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() - allocated < 0.02 * peak
    torch.cuda.reset_peak_memory_stats()
    trainer, task = fit(False)
    assert task.graphed_passes is None
