"""Bad numbers, atomic and safe checkpoints, keys that never leak, checkpoints across scan backends."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import lightning as L
import ssamba
from ssamba.callbacks import NonFiniteGuard, NonFiniteTrainingError
from ssamba.utils.atomic_checkpoint import AtomicCheckpointIO, atomic_torch_save

ROOT = Path(__file__).resolve().parents[1]
TINY = {"depth": 2, "embed_dim": 32, "input_tdim": 64, "backend": "torch"}


# --- non-finite loss / gradients ---------------------------------------------------------------------------------
class Regression(L.LightningModule):
    """y = Wx on fixed data; ``nan_steps`` make the loss NaN, ``inf_grad_steps`` one gradient infinite."""

    def __init__(self, nan_steps=(), inf_grad_steps=(), fused=False):
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.fused = fused  # torch's fused AdamW skips a step on the device; the plain one on the guard's word
        self.nan_steps, self.inf_grad_steps = set(nan_steps), set(inf_grad_steps)
        self.weights = {}  # global step -> weights before that step

    def training_step(self, batch, batch_idx):
        self.weights[self.global_step] = self.layer.weight.detach().clone()
        loss = self.layer(batch[0]).pow(2).mean()
        return loss * float("nan") if self.global_step in self.nan_steps else loss

    def on_after_backward(self):
        if self.global_step in self.inf_grad_steps:
            self.layer.weight.grad[0, 0] = float("inf")

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1, fused=self.fused)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=2)


def fit(module, tmp_path, max_consecutive=3, max_steps=8, check_every_n_steps=50, guard_class=NonFiniteGuard):
    guard = guard_class(max_consecutive=max_consecutive, check_every_n_steps=check_every_n_steps)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[guard, L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints")])
    return trainer, guard


# (fused optimizer, check_every_n_steps): the host's decision every step; the device's, read every step or at the
# epoch's end (8 steps)
PATHS = [(False, 1), (True, 1), (True, 50)]


@pytest.mark.parametrize(("fused", "check_every"), PATHS)
def test_nonfinite_steps_are_skipped_and_counted(tmp_path, fused, check_every):
    module = Regression(nan_steps={2}, inf_grad_steps={4, 5}, fused=fused)
    trainer, guard = fit(module, tmp_path, check_every_n_steps=check_every)
    trainer.fit(module)
    assert guard.skipped == 3 and guard.consecutive == 0 and trainer.global_step == 8
    for step in (2, 4, 5):  # the skipped steps left the weights alone
        assert torch.equal(module.weights[step], module.weights[step + 1])
    assert not torch.equal(module.weights[1], module.weights[2])  # finite steps do train
    assert torch.isfinite(module.layer.weight).all()
    assert trainer.callback_metrics["train/nonfinite_steps"] == 3


@pytest.mark.parametrize(("fused", "check_every"), PATHS)
def test_consecutive_nonfinite_steps_stop_with_a_checkpoint_of_finite_weights(tmp_path, fused, check_every):
    module = Regression(nan_steps={3, 4, 5, 6}, fused=fused)
    trainer, guard = fit(module, tmp_path, max_consecutive=3, check_every_n_steps=check_every)
    # read every step: stopped right after step 5; read at the epoch's end: after step 7, which was finite
    counts = "3 in this run" if check_every == 1 else "4 in this run, stopped at global step 8"
    message = rf"3 consecutive optimizer steps .* \(global steps 3\.\.5; {counts}\)"
    with pytest.raises(NonFiniteTrainingError, match=message):
        trainer.fit(module)
    saved = torch.load(tmp_path / "checkpoints" / "nonfinite-step0000003.ckpt", weights_only=True)
    expected = module.weights[3] if check_every == 1 else module.layer.weight.detach()  # before step 3 / after 7
    assert torch.equal(saved["state_dict"]["layer.weight"], expected)
    assert torch.isfinite(saved["state_dict"]["layer.weight"]).all()
    if check_every > 1:
        assert not torch.equal(module.weights[7], expected)  # step 7 did train


class HostReadsForbidden(NonFiniteGuard):
    """The guard with every way of reading a tensor's value on the host failing inside its per-step hooks."""

    READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy")

    def _forbidding(self, hook, *args):
        def refuse(*_, **__):
            raise AssertionError("the guard read a tensor on the host inside a training step")

        saved = {name: getattr(torch.Tensor, name) for name in self.READS}
        try:
            for name in self.READS:
                setattr(torch.Tensor, name, refuse)
            return hook(*args)
        finally:
            for name, method in saved.items():
                setattr(torch.Tensor, name, method)

    def on_before_backward(self, *args):
        return self._forbidding(super().on_before_backward, *args)

    def on_before_optimizer_step(self, *args):
        return self._forbidding(super().on_before_optimizer_step, *args)


def test_with_a_fused_optimizer_the_guard_decides_on_the_device_without_reading_a_value_each_step(tmp_path):
    module = Regression(nan_steps={2}, inf_grad_steps={5}, fused=True)
    trainer, guard = fit(module, tmp_path, check_every_n_steps=4, guard_class=HostReadsForbidden)
    trainer.fit(module)
    assert guard.skipped == 2 and trainer.global_step == 8
    for step in (2, 5):
        assert torch.equal(module.weights[step], module.weights[step + 1])
    assert trainer.optimizers[0].state[module.layer.weight]["step"] == 6  # skipped steps are not counted either
    assert not hasattr(trainer.optimizers[0], "found_inf")  # nothing left for a later step outside the guard
    module = Regression(nan_steps={2}, fused=False)  # the plain optimizer needs the host's decision
    trainer, guard = fit(module, tmp_path / "plain", guard_class=HostReadsForbidden)
    with pytest.raises(AssertionError, match="read a tensor on the host"):
        trainer.fit(module)


def test_nonfinite_stop_through_train_py(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    result = subprocess.run(
        [sys.executable, "train.py", "trainer=cpu", "logger=csv", "+model.depth=2", "+model.embed_dim=32",
         "model.backend=torch", "data.target_length=64", "mask.count=12", "mask.val_count=12", "data.num_train=16",
         "data.num_val=4", "data.num_test=0", "data.batch_size=4", "data.num_workers=0", "trainer.max_epochs=2",
         "task.figure_every_n_steps=0", "trainer.num_sanity_val_steps=0", "++callbacks.progress_bar=null",
         "trainer.enable_progress_bar=false", "callbacks.nonfinite_guard.max_consecutive=2",
         "+callbacks.fault={_target_: reliability_faults.NanInputAtSteps, steps: [1, 2, 3]}",
         f"hydra.run.dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "NonFiniteTrainingError: 2 consecutive optimizer steps" in result.stderr, result.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "nonfinite-step0000001.ckpt").is_file()


def test_bf16_mixed_keeps_parameters_and_the_scan_in_fp32(monkeypatch):
    import ssamba.ops.bimamba as bimamba_module
    import ssamba.ops.selective_scan as scan

    scan_dtypes, mixer_inputs = [], []
    original_prepare, original_inner = scan._prepare, bimamba_module.bimamba_inner

    def recording_prepare(*args):
        prepared = original_prepare(*args)  # what either solver computes in
        scan_dtypes.append(tuple(t.dtype for t in prepared))
        return prepared

    def recording_inner(xz, *args):
        mixer_inputs.append(xz.dtype)
        return original_inner(xz, *args)

    monkeypatch.setattr(scan, "_prepare", recording_prepare)
    monkeypatch.setattr(bimamba_module, "bimamba_inner", recording_inner)
    encoder = ssamba.build_encoder("tiny", **TINY)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = encoder.forward_features(torch.randn(2, 64, 128))
    assert set(mixer_inputs) == {torch.bfloat16}  # autocast is on: the in_proj ran in bf16
    out.float().pow(2).mean().backward()
    assert scan_dtypes and set(scan_dtypes) == {(torch.float32,) * 5}  # the SSM state h_t is fp32
    assert {p.dtype for p in encoder.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in encoder.parameters() if p.grad is not None} == {torch.float32}


# --- checkpoints --------------------------------------------------------------------------------------------------
def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"version": 1}, path)

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"version": 2, "big": torch.zeros(1000)}, path)
    assert torch.load(path, weights_only=True) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_kill_during_saving_never_leaves_a_broken_checkpoint(tmp_path):
    """SIGKILL a process that keeps rewriting a 20 MB checkpoint: the file always loads, whole."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from ssamba.utils.atomic_checkpoint import atomic_torch_save
        version = 0
        while True:
            version += 1
            atomic_torch_save({{"version": version, "weights": torch.full((5_000_000,), float(version))}},
                              {str(tmp_path / "last.ckpt")!r})
            print(version, flush=True)
    """)
    for delay in (0.0, 0.05, 0.13, 0.31):
        process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        process.stdout.readline()  # one complete version exists
        import time
        time.sleep(delay)
        process.kill()
        process.wait()
        checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
        assert torch.equal(checkpoint["weights"], torch.full((5_000_000,), float(checkpoint["version"])))


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_checkpoints_load_without_running_code(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Payload()}, path)
    io = AtomicCheckpointIO()
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        io.load_checkpoint(path)
    with pytest.raises(ValueError, match="weights_only=True only"):
        io.load_checkpoint(path, weights_only=False)
    assert not Path("PWNED").exists() and not (tmp_path / "PWNED").exists()


def project_sources(root: Path) -> list[Path]:
    """The project's own .py files under ``root``: not tests, builds, or an environment installed inside it."""
    found = []
    for folder, subfolders, files in os.walk(root):
        if Path(folder, "pyvenv.cfg").exists():
            subfolders.clear()
            continue
        subfolders[:] = [d for d in subfolders if d not in {".git", "tests", "build", "site-packages"}]
        found.extend(Path(folder, name) for name in files if name.endswith(".py"))
    return found


def test_source_scan_skips_an_environment_inside_the_checkout(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mine.py").write_text("x = 1\n")
    venv = tmp_path / ".venv" / "lib" / "python3.11" / "site-packages" / "dep"
    venv.mkdir(parents=True)
    (tmp_path / ".venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (venv / "theirs.py").write_text("x = 2\n")
    other = tmp_path / "env2" / "site-packages"
    other.mkdir(parents=True)
    (other / "theirs.py").write_text("x = 3\n")
    assert [p.relative_to(tmp_path).as_posix() for p in project_sources(tmp_path)] == ["pkg/mine.py"]


def test_every_torch_load_in_the_repo_is_weights_only():
    sources = project_sources(ROOT)
    calls = [(p, m) for p in sources for m in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", p.read_text())]
    assert calls
    unsafe = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p, m in calls if "weights_only=True" not in m.group(0)]
    assert not unsafe
    risky = re.compile(r"\bpickle\.loads?\(|(?<![\w.])eval\(|(?<![\w.])exec\(|yaml\.unsafe_load|allow_pickle=True")
    assert not [str(p) for p in sources if risky.search(p.read_text())]


def test_a_checkpoint_record_cannot_smuggle_a_target_into_evaluate(tmp_path):
    """evaluate.py copies the record's input settings into the data config: numbers only."""
    from hydra import compose, initialize_config_dir

    sys.path.insert(0, str(ROOT))
    import evaluate

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "ssamba": {"encoder": {}, "head": {},
                "target_length": {"_target_": "os.makedirs", "name": str(marker)}}}, path)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"ckpt_path={path}", "data=synthetic", "paths.output_dir=unused"])
    with pytest.raises(ValueError, match=r"checkpoint\['ssamba'\]\['target_length'\]=.*expected an integer"):
        evaluate.evaluate(cfg)
    assert not marker.exists()


def test_checkpoint_saved_with_the_cuda_backend_runs_on_cpu(tmp_path):
    encoder = ssamba.build_encoder("tiny", **TINY)
    config = {**dataclasses.asdict(encoder.config), "backend": "cuda"}  # as trained on a GPU with mamba-ssm
    record = {"encoder": config, "norm_mean": -4.0, "norm_std": 4.0, "target_length": 64, "task": "pretrain",
              "label_names": ["unlabeled"]}
    path = tmp_path / "gpu.ckpt"
    atomic_torch_save({"state_dict": {f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                       "ssamba": record}, path)
    model = ssamba.load(path, backend="auto")
    wav = torch.randn(16_000)
    assert torch.allclose(model.embed(wav, 16_000).clip, ssamba.load(path, backend="torch").embed(wav, 16_000).clip)
    encoder.eval()
    fbank = torch.randn(1, 64, 128)
    assert torch.allclose(model.encoder.forward_features(fbank), encoder.forward_features(fbank), atol=1e-6)


# --- keys ----------------------------------------------------------------------------------------------------------
def test_wandb_key_never_lands_in_configs_logs_or_checkpoints(tmp_path):
    key = "0123456789abcdef" * 2 + "feedc0ffee"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_API_KEY": key, "WANDB_MODE": "offline"}
    result = subprocess.run(
        [sys.executable, "train.py", "trainer=cpu", "logger=wandb", "+model.depth=2", "+model.embed_dim=32",
         "model.backend=torch", "data.target_length=64", "mask.count=12", "mask.val_count=12", "data.num_train=8",
         "data.num_val=4", "data.num_test=0", "data.batch_size=4", "data.num_workers=0", "trainer.max_epochs=1",
         "task.figure_every_n_steps=0", "trainer.num_sanity_val_steps=0", "++callbacks.progress_bar=null",
         "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert key not in result.stdout + result.stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" for p in files) and any(p.name == "config.yaml" for p in files)
    leaking = [str(p) for p in files if key.encode() in p.read_bytes()]
    assert not leaking
