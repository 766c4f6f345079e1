"""Composition of every config group choice, and the one-line errors for inconsistent values."""
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ssamba.utils.config import ConfigError, validate_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
MY_GROUPS = ["model", "mask", "task", "trainer", "logger", "callbacks"]


def compose_train(*overrides):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=["paths.output_dir=unused", *overrides])


def choices(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("group,choice", [(g, c) for g in MY_GROUPS for c in choices(g) if (g, c) != ("logger", "tensorboard")])
def test_every_choice_composes_resolves_and_validates(group, choice):
    overrides = [f'{group}="{choice}"']  # quoted: train.py does this for numeric names (mask=250)
    if group == "task" and choice == "finetune":
        overrides.append("task.pretrained=null")
    cfg = compose_train(*overrides)
    OmegaConf.resolve(cfg)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"trainer.accelerator=gpu: no CUDA device on this machine"):
            validate_config(cfg)
    else:
        validate_config(cfg)


@pytest.mark.parametrize("experiment", choices("experiment"))
def test_every_experiment_composes(experiment):
    from ssamba.utils.config import missing_keys

    cfg = compose_train(f"experiment={experiment}")
    assert cfg.task.name in ("pretrain", "finetune", "probe")
    missing = missing_keys(cfg)
    # Recipes for real datasets leave the data location and the checkpoint to finetune to the user (???).
    assert all(key.startswith("data.") or key == "task.pretrained" for key in missing), missing


@pytest.mark.parametrize("order", [["finetune_esc50", "finetune_frame"], ["finetune_frame", "finetune_esc50"]])
def test_frame_recipe_adds_frame_patches_to_a_dataset_recipe(order):
    """experiment=[<dataset recipe>,finetune_frame]: the dataset's settings with stride = patch = 128 x 2."""
    cfg = compose_train(f"experiment=[{','.join(order)}]")
    assert (cfg.data.target_length, cfg.task.scheduler.start, cfg.name) == (512, 6, "finetune_esc50_tiny")
    assert (cfg.task.fstride, cfg.task.tstride) == (cfg.model.fshape, cfg.model.tshape) == (128, 2)
    assert (cfg.model.fstride, cfg.model.tstride) == (128, 2)


def test_defaults_are_the_reference_pretraining():
    cfg = compose_train()
    assert (cfg.data._target_, cfg.model.name, cfg.mask.count, cfg.task.name) == (
        "ssamba.data.SyntheticDataModule", "tiny", 400, "pretrain")
    assert cfg.task.joint_passes == 2 and cfg.task.mse_weight == 10.0
    assert cfg.task.optimizer._target_ == "torch.optim.AdamW" and cfg.task.optimizer._partial_
    assert list(cfg.task.optimizer.betas) == [0.95, 0.999]
    assert set(cfg.logger) == {"wandb", "csv"}
    assert cfg.callbacks.model_checkpoint.save_last and cfg.callbacks.model_checkpoint.monitor == "val/acc"


@pytest.mark.parametrize("overrides,message", [
    (["trainer=ddp_sim", "trainer.strategy.process_group_backend=nccl"],
     "trainer.strategy.process_group_backend=nccl: DDP on CPU needs gloo"),
    (["trainer=cpu", "trainer.precision=16-mixed"], "trainer.precision=16-mixed: float16 does not run on CPU"),
    (["trainer=cpu", "trainer.devices=2"], "trainer.devices=2: several CPU processes need a DDP strategy"),
    (["mask.style=blocks"], "mask.style='blocks': allowed values are cluster, random"),
    (["mask.count=0"], "mask.count=0: must be a positive integer"),
    (["task.joint_passes=3"], "task.joint_passes=3: allowed values are 1, 2"),
    (["trainer=cpu", "task.cuda_graphs=true"], "task.cuda_graphs=true: CUDA graphs need a GPU"),
    (["task=finetune", "trainer=cpu", "task.cuda_graphs=true"], "task.cuda_graphs=true: CUDA graphs need a GPU"),
    (["task=finetune", "task.pooling=max"], "task.pooling='max': allowed values are mean, cls"),
    (["task=finetune", "task.loss=mse"], "task.loss='mse': allowed values are auto, bce, ce"),
    (["task=finetune", "task.pretrained=/no/such.ckpt"], "task.pretrained=/no/such.ckpt: no such checkpoint file"),
    (["task=finetune", "task.num_classes=0"], "task.num_classes=0: must be a positive integer"),
    (["ckpt_path=/no/such.ckpt"], "ckpt_path=/no/such.ckpt: no such checkpoint file"),
    (["ckpt_path=best"], "ckpt_path=best: no such checkpoint file (or 'last': the run folder's last.ckpt)"),
    (["score_checkpoint=last"], "score_checkpoint=last: allowed values are last, best or null, with task=finetune"),
    (["task=finetune", "score_checkpoint=final"], "score_checkpoint=final: allowed values are last, best or null"),
    (["task=finetune", "score_ensemble=[/no/such.ckpt]"], "score_ensemble=[...] is scored together with the run's"),
    (["task=finetune", "score_checkpoint=last", "score_ensemble=[/no/such.ckpt]"],
     "score_ensemble: no such checkpoint file /no/such.ckpt"),
    (["task=finetune", "score_max_seconds=[5]"], "score_max_seconds=[...] scores the run's checkpoint on shorter"),
    (["task=finetune", "score_checkpoint=last", "score_max_seconds=[0]"],
     "score_max_seconds=[0]: each must be a positive number of seconds"),
    (["data=audioset"], "data.root: is required"),
])
def test_inconsistent_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        validate_config(compose_train(*overrides))
    assert str(error.value).startswith(message.split(":")[0])
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_tensorboard_logger_needs_its_package():
    cfg = compose_train("logger=tensorboard")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="logger=tensorboard needs the tensorboard package"):
            validate_config(cfg)
    else:
        validate_config(cfg)


def test_cli_prints_one_line_and_exits_2(tmp_path):
    """The grid check needs the built model: it still stops before training, with one line."""
    result = subprocess.run(
        [sys.executable, "train.py", "trainer=cpu", "logger=csv", "+model.depth=2", "+model.embed_dim=32",
         "data.target_length=64", "mask.count=40", f"paths.log_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "config error" in line]
    assert len(errors) == 1
    assert "mask.count=40 must be in 1..31" in errors[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize("overrides,message", [
    (["data.batch_size=0"], "data.batch_size=0: must be an integer >= 1"),
    (["data.num_workers=-1"], "data.num_workers=-1: must be an integer >= 0"),
    (["data.label_fraction=1.5"], "data.label_fraction must be in (0, 1], got 1.5"),  # raised in Hydra's instantiate
    (["task.optimizer.lr=-1"], "task.optimizer: Invalid learning rate: -1"),  # raised by torch, when fit starts
    (["data.root=."], "data.root='.' must hold training_data.csv and training_data/"),  # data not where it is said
])
def test_values_refused_while_building_the_run_are_one_line(tmp_path, overrides, message):
    mini = f"data.root={ROOT / 'tests' / 'data' / 'circor-mini'}"
    root = [] if any(o.startswith("data.root=") for o in overrides) else [mini]
    result = subprocess.run(
        [sys.executable, "train.py", "experiment=circor_murmur", *root, "trainer=cpu", "logger=csv",
         "trainer.fast_dev_run=true", f"paths.log_dir={tmp_path}", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "config error" in line]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in result.stderr


def test_cpu_quickstart_is_added_only_to_the_default_pretraining_when_nothing_was_chosen(monkeypatch):
    from ssamba.utils import launch

    monkeypatch.setattr(launch.torch.cuda, "is_available", lambda: False)
    assert launch.with_cpu_quickstart(["train.py", "model=tiny"])[-1] == "experiment=quickstart_cpu"
    defaults_chosen = ["train.py", "task=pretrain", "data=synthetic"]
    assert launch.with_cpu_quickstart(defaults_chosen)[-1] == "experiment=quickstart_cpu"
    for chosen in ("trainer=cpu", "experiment=pretrain_asli", "--cfg", "task=finetune", "data=circor",
                   "hydra/launcher=slurm"):  # the jobs run on the cluster's machines, not this one
        assert launch.with_cpu_quickstart(["train.py", chosen]) == ["train.py", chosen]
    monkeypatch.setattr(launch.torch.cuda, "is_available", lambda: True)
    assert launch.with_cpu_quickstart(["train.py", "model=tiny"]) == ["train.py", "model=tiny"]


def test_the_plugins_bare_launchers_are_refused_naming_ours():
    from ssamba.utils.launch import refuse_plugin_launchers

    assert refuse_plugin_launchers(["train.py", "-m", "hydra/launcher=slurm"]) == ["train.py", "-m", "hydra/launcher=slurm"]
    result = subprocess.run([sys.executable, "train.py", "-m", "hydra/launcher=submitit_local"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().endswith("use hydra/launcher=local "
                                                                    "(conf/hydra/launcher/local.yaml)")


def test_launcher_configs_extend_the_plugins_without_deprecated_schema_matching():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, target in (("slurm", "SlurmLauncher"), ("local", "LocalLauncher")):
            with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
                launcher = compose("train", overrides=[f"hydra/launcher={name}"], return_hydra_config=True).hydra.launcher
            assert launcher._target_.endswith(target) and launcher.timeout_min == 1440


def test_numeric_mask_choices_are_quoted_for_hydra():
    from ssamba.utils.launch import quote_numeric_choices

    assert quote_numeric_choices(["train.py", "-m", "mask=250,300,400", "mask.count=7", "model=tiny"]) == [
        "train.py", "-m", 'mask="250","300","400"', "mask.count=7", "model=tiny"]
    cfg = compose_train('mask="300"')
    assert cfg.mask.count == 300 and cfg.mask.val_count == 400


def test_ddp_worker_of_a_multirun_job_runs_only_that_job(monkeypatch):
    import json

    from ssamba.utils.launch import JOB_ENV, ddp_worker_argv

    argv = ["train.py", "-m", "mask.count=8,12", 'hydra.run.dir="x"', "hydra.job.name=train_ddp_process_1",
            "hydra.output_subdir=null"]
    monkeypatch.setenv(JOB_ENV, json.dumps(["mask.count=12", 'hydra.run.dir="/runs/1"']))
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert ddp_worker_argv(argv) == argv  # the launching process keeps its sweep
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert ddp_worker_argv(argv) == ["train.py", "mask.count=12", 'hydra.run.dir="/runs/1"',
                                     "hydra.job.name=train_ddp_process_1", "hydra.output_subdir=null"]


def recipes(task_name):
    return [name for name in choices("experiment") if compose_train(f"experiment={name}").task.name == task_name]


@pytest.mark.parametrize("experiment", recipes("pretrain"))
def test_a_mask_choice_on_the_command_line_wins_over_every_pretraining_recipe(experiment):
    """A recipe that pinned mask.count would turn a mask sweep into identical jobs."""
    counts = [compose_train(f"experiment={experiment}", f'mask="{count}"').mask.count for count in (250, 300, 400)]
    assert counts == [250, 300, 400]
