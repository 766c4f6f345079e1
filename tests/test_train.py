"""train.py end to end on synthetic data with a tiny encoder (CPU)."""
import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
# 2 layers of width 32 on 64 frames (8 x 4 = 32 patches), a few clips, no workers.
TINY = ["trainer=cpu", "logger=csv", "+model.depth=2", "+model.embed_dim=32", "model.backend=torch",
        "data.target_length=64", "data.num_train=8", "data.num_val=4", "data.num_test=4", "data.batch_size=4",
        "data.num_workers=0", "mask.count=12", "mask.val_count=12", "task.warmup_steps=2",
        "trainer.max_epochs=1", "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "callbacks.model_summary=null"]
FINETUNE = ["task=finetune", "task.fstride=16", "task.tstride=16", "data.num_classes=3"]


def load_train_module():
    spec = importlib.util.spec_from_file_location("train_entry", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_train(output_dir, *overrides):
    """Compose like ``python train.py`` and run in this process, writing to ``output_dir``."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, f"paths.output_dir={output_dir}", *overrides])
    return load_train_module().train(cfg)


def read_metrics(folder):
    with open(Path(folder) / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def column(rows, name):
    return [float(row[name]) for row in rows if row.get(name)]


def cli(tmp_path, *args, env=None, timeout=600):
    environment = {**os.environ, "SSAMBA_OUTPUTS": str(tmp_path), **(env or {})}
    environment.pop("WANDB_API_KEY", None)
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=environment)


def test_fast_dev_run_pretrain(tmp_path):
    score = run_train(tmp_path, "trainer.fast_dev_run=true")  # val/acc of the one validation batch
    assert score is not None and 0.0 <= score <= 1.0


def test_fast_dev_run_finetune_from_scratch(tmp_path):
    score = run_train(tmp_path, *FINETUNE, "trainer.fast_dev_run=true")
    assert score is not None and 0.0 <= score <= 1.0


def test_layer_lr_decay_from_the_command_line_trains_each_depth_at_its_rate(tmp_path):
    run_train(tmp_path, *FINETUNE, "task.layer_lr_decay=0.5")
    rows = read_metrics(tmp_path)
    # 2 layers: depths 0 (patch embedding, tokens), 1, 2 and 3 (final norm); "lr" is the first group's
    lowest, top, head = column(rows, "lr"), column(rows, "lr_encoder_depth3"), column(rows, "lr_head")
    assert lowest and len(lowest) == len(top) == len(head)
    assert all(t / low == pytest.approx(8.0) and h == pytest.approx(t) for low, t, h in zip(lowest, top, head))


def test_pretrain_checkpoint_hands_off_to_finetune(tmp_path):
    pre, fine = tmp_path / "pre", tmp_path / "fine"
    run_train(pre)
    checkpoints = sorted(p.name for p in (pre / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and any(name.startswith("best-") for name in checkpoints)
    assert (pre / "metrics.csv").is_file() and (pre / "hparams.yaml").is_file()
    assert list((pre / "figures").glob("train_reconstruction_step*.png"))
    checkpoint = torch.load(pre / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    record = checkpoint["ssamba"]
    assert record["task"] == "pretrain" and record["encoder"]["depth"] == 2 and record["target_length"] == 64
    assert record["norm_mean"] == pytest.approx(-3.325)

    from ssamba.data import SyntheticDataModule
    from ssamba.tasks import build_task

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, *FINETUNE, "paths.output_dir=unused",
                                          f"task.pretrained={pre / 'checkpoints' / 'last.ckpt'}"])
    task = build_task(cfg, SyntheticDataModule(num_classes=3, target_length=64))
    pretrained = checkpoint["state_dict"]["encoder.layers.1.mixer.in_proj.weight"]
    assert torch.equal(task.encoder.layers[1].mixer.in_proj.weight, pretrained)

    score = run_train(fine, *FINETUNE, f"task.pretrained={pre / 'checkpoints' / 'last.ckpt'}")
    assert score is not None
    finetuned = torch.load(fine / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert finetuned["ssamba"]["task"] == "finetune" and finetuned["ssamba"]["head"]["num_classes"] == 3
    assert column(read_metrics(fine), "test/acc")


# 128 x 2 frame patches, as experiment=pretrain_asli_frame: a 1 x 32 grid on 64 frames.
FRAME = ["model.fshape=128", "model.tshape=2", "model.fstride=128", "model.tstride=2", "mask.style=random"]


def test_frame_checkpoint_finetunes_with_the_frame_recipe_and_refuses_stride_10(tmp_path):
    """A frame-patch pretraining hands off through experiment=finetune_frame (stride 128 x 2, every frame
    pair one token); the default stride 10 would skip 8 of every 10 frames and is refused before training."""
    from ssamba.data import SyntheticDataModule
    from ssamba.tasks import build_task
    from ssamba.utils.config import ConfigError

    pre = tmp_path / "pre"
    run_train(pre, *FRAME)
    checkpoint = pre / "checkpoints" / "last.ckpt"
    pretrained = ["data.num_classes=3", f"task.pretrained={checkpoint}"]

    with pytest.raises(Exception) as error:  # model=tiny's 16 x 16 config; the checkpoint's patches decide
        run_train(tmp_path / "stride10", "task=finetune", *pretrained)
    assert "task.tstride=10: larger than the patch (128 x 2" in str(error.value)
    assert isinstance(error.value, ConfigError) or isinstance(error.value.__cause__, ConfigError)
    assert not (tmp_path / "stride10" / "metrics.csv").exists()

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, "experiment=finetune_frame", *pretrained, "paths.output_dir=unused"])
    task = build_task(cfg, SyntheticDataModule(num_classes=3, target_length=64))
    assert task.encoder.grid == (1, 32) and task.encoder.patch_embed.proj.stride == (128, 2)
    score = run_train(tmp_path / "fine", "experiment=finetune_frame", *pretrained, "trainer.fast_dev_run=true")
    assert score is not None and 0.0 <= score <= 1.0


def test_frame_recipe_from_scratch_fast_dev_run(tmp_path):
    score = run_train(tmp_path, "experiment=finetune_frame", "data.num_classes=3", "trainer.fast_dev_run=true")
    assert score is not None and 0.0 <= score <= 1.0


def test_stride_larger_than_the_patch_is_one_line_on_the_cli(tmp_path):
    result = cli(tmp_path, *TINY, *FRAME, "task=finetune", "data.num_classes=3")
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "config error" in line]
    assert len(errors) == 1 and "task.tstride=10: larger than the patch (128 x 2" in errors[0]
    assert "Traceback" not in result.stderr


def test_resume_continues_step_count_and_schedule(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    warmup = ["task.warmup_steps=6", "task.optimizer.lr=1e-3"]
    run_train(first, *warmup)  # 2 steps per epoch, 1 epoch
    last = first / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2
    run_train(second, *warmup, f"ckpt_path={last}", "trainer.max_epochs=3")
    resumed = torch.load(second / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 6 and resumed["epoch"] == 2
    rows = read_metrics(second)
    steps = [int(row["step"]) for row in rows if row.get("lr")]
    assert min(steps) == 2  # the resumed run starts where the first stopped
    lr_at = {int(row["step"]): float(row["lr"]) for row in rows if row.get("lr")}
    assert lr_at[2] == pytest.approx(1e-3 * 3 / 6)  # warm-up continues: third optimizer step


def test_bad_mask_count_fails_before_training(tmp_path):
    from ssamba.utils.config import ConfigError

    with pytest.raises(Exception) as error:
        run_train(tmp_path, "mask.count=32")
    assert "mask.count=32 must be in 1..31" in str(error.value) or isinstance(error.value.__cause__, ConfigError)
    assert not (tmp_path / "metrics.csv").exists()


@pytest.mark.slow
def test_readme_mask_sweep_runs_on_a_machine_without_a_gpu(tmp_path):
    """The README's sweep as written: the CPU quick start scales each count to its 64 patches, one job each."""
    result = cli(tmp_path, "-m", "mask=250,300,400", "trainer.fast_dev_run=true",
                 env={"CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "offline"}, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "experiment=quickstart_cpu" in result.stdout
    sweep = next((tmp_path / "pretrain_tiny" / "multiruns").iterdir())
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2"]
    for job, count, fitted in zip(jobs, (250, 300, 400), (31, 38, 50)):
        assert f"count: {count}" in (job / ".hydra" / "config.yaml").read_text()
        assert f"mask.count={count} and mask.val_count=400, stated for 512 patches, scaled to {fitted} and 50" in (
            job / "train.log").read_text()


@pytest.mark.slow
def test_mask_sweep_cli_makes_one_folder_and_wandb_run_per_job(tmp_path):
    """-m mask=250,300,400 with a grid of 16 x 26 = 416 patches (8 x 8 patches, 208 frames); W&B offline."""
    args = ["-m", "mask=250,300,400", *[a for a in TINY if not a.startswith(("logger=", "mask.", "data.target"))],
            "logger=wandb", "data.target_length=208", "model.fshape=8", "model.tshape=8", "model.fstride=8",
            "model.tstride=8", "mask.val_count=300"]
    result = cli(tmp_path, *args, env={"WANDB_MODE": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = next((tmp_path / "pretrain_tiny" / "multiruns").iterdir())
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2"]
    for job, count in zip(jobs, (250, 300, 400)):
        assert f'mask="{count}"' in (job / ".hydra" / "overrides.yaml").read_text()
        assert f"count: {count}" in (job / ".hydra" / "config.yaml").read_text()
        assert column(read_metrics(job), "val/acc")
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert list((job / "wandb").glob("offline-run-*")), "each job is its own offline W&B run"
    assert "wandb sync" in result.stdout + result.stderr


@pytest.mark.slow
def test_ddp_sim_runs_two_processes(tmp_path):
    result = cli(tmp_path, *TINY, "trainer=ddp_sim", "data.num_train=16")
    assert result.returncode == 0, result.stderr[-3000:]
    run = next((tmp_path / "pretrain_tiny" / "runs").iterdir())
    assert (run / "train_ddp_process_1.log").is_file(), sorted(p.name for p in run.iterdir())
    assert column(read_metrics(run), "val/acc") and (run / "checkpoints" / "last.ckpt").is_file()
    # Each of the 2 processes saw half of the 16 training clips: 2 steps of batch 4.
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


@pytest.mark.slow
def test_ddp_sim_multirun_runs_each_job_once(tmp_path):
    result = cli(tmp_path, "-m", *TINY, "trainer=ddp_sim", "mask.count=8,12")
    assert result.returncode == 0, result.stderr[-3000:]
    sweeps = list((tmp_path / "pretrain_tiny" / "multiruns").iterdir())
    assert len(sweeps) == 1, "DDP workers must not start sweeps of their own"
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    for job in jobs:
        assert (job / "train_ddp_process_1.log").is_file() and column(read_metrics(job), "val/acc")
    assert not (tmp_path / "pretrain_tiny" / "runs").exists()


def test_wandb_failure_does_not_stop_the_run(tmp_path):
    """Online mode without a key cannot start W&B: the run warns and goes on with the CSV log."""
    result = cli(tmp_path, *[a for a in TINY if a != "logger=csv"], "logger=wandb",
                 env={"WANDB_MODE": "online", "HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "W&B could not start" in result.stdout + result.stderr
    run = next((tmp_path / "pretrain_tiny" / "runs").iterdir())
    assert column(read_metrics(run), "val/acc")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_run(tmp_path):
    score = run_train(tmp_path, "trainer=gpu", "model.backend=auto", "task.cuda_graphs=false")
    assert score is not None
    assert column(read_metrics(tmp_path), "val/acc")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_run_with_cuda_graphs(tmp_path):
    """Both encoder passes replayed as CUDA graphs through a whole fit (bf16-mixed, drop path on),
    with loader workers and pinned memory, so the pin-memory thread works during the capture."""
    score = run_train(tmp_path, "trainer=gpu", "model.backend=auto", "task.cuda_graphs=true", "data.num_workers=2",
                      "data.pin_memory=true", "data.num_train=64")
    assert score is not None
    losses = column(read_metrics(tmp_path), "train/loss_step")
    assert losses and all(torch.isfinite(torch.tensor(float(v))) for v in losses)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_finetune_with_cuda_graphs(tmp_path):
    """Finetuning's encoder pass replayed as a CUDA graph through a whole fit, with a short last batch
    (run eagerly) and validation (eager) between epochs."""
    score = run_train(tmp_path, *FINETUNE, "trainer=gpu", "model.backend=auto", "task.cuda_graphs=true",
                      "data.num_train=70", "trainer.max_epochs=2")
    assert score is not None
    losses = column(read_metrics(tmp_path), "train/loss_step")
    assert losses and all(torch.isfinite(torch.tensor(float(v))) for v in losses)


@pytest.mark.parametrize("task", [[], FINETUNE], ids=["pretrain", "finetune"])
def test_cuda_graphs_on_a_cpu_model_fail_before_training(tmp_path, task):
    """accelerator=auto resolving to CPU: the task refuses at fit start with the key to change."""
    if torch.cuda.is_available():
        pytest.skip("auto resolves to the GPU here")
    with pytest.raises(Exception, match="task.cuda_graphs=true needs a CUDA device"):
        run_train(tmp_path, *task, "trainer=default", "task.cuda_graphs=true")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_ddp_on_two_gpus_bf16(tmp_path):
    """trainer=ddp: 2 GPU processes (NCCL, bf16-mixed); metrics reduced over both; one folder."""
    result = cli(tmp_path, *[a for a in TINY if a != "trainer=cpu"], "trainer=ddp", "trainer.devices=2",
                 "model.backend=auto", "data.num_train=16", "task.cuda_graphs=false")
    assert result.returncode == 0, result.stderr[-3000:]
    run = next((tmp_path / "pretrain_tiny" / "runs").iterdir())
    assert (run / "train_ddp_process_1.log").is_file() and column(read_metrics(run), "val/acc")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_ddp_on_two_gpus_with_cuda_graphs(tmp_path):
    """trainer=ddp with task.cuda_graphs=true: each rank captures its own graphs; the gradients still
    reach DDP's all-reduce (the run would fail or hang otherwise) and the losses stay finite."""
    result = cli(tmp_path, *[a for a in TINY if a != "trainer=cpu"], "trainer=ddp", "trainer.devices=2",
                 "model.backend=auto", "data.num_train=32", "task.cuda_graphs=true")
    assert result.returncode == 0, result.stderr[-3000:]
    run = next((tmp_path / "pretrain_tiny" / "runs").iterdir())
    losses = column(read_metrics(run), "train/loss_step")
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(v)) for v in losses)
