"""The downstream recipes on what ``python -m ssamba.prepare`` writes, end to end on CPU: every recipe
trains on tiny generated downloads in the official layouts; AS-2M's balanced sampler against a hand
computation; the probe trains only its head; the fold runner of bench/downstream.py."""

import csv
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from test_prepare import audioset, esc50, iemocap, speech_commands, voxceleb1  # noqa: F401 (fixtures)
from test_train import load_train_module

from ssamba.data import ManifestDataModule
from ssamba.data.sampling import BalancedSampler, label_balanced_weights
from ssamba.models import build_encoder
from ssamba.prepare.__main__ import prepare
from ssamba.errors import ConfigError, MissingFileError, find_config_error
from ssamba.prepare.speechcommands import V1_WORDS, V2_WORDS
from ssamba.tasks import Probing, data_info


ROOT = Path(__file__).resolve().parents[1]
# 2 layers of width 32, 64 frames, batch 2: small enough for every recipe on CPU
TINY = ["trainer=cpu", "logger=csv", "++model.depth=2", "++model.embed_dim=32", "model.backend=torch",
        "data.target_length=64", "data.batch_size=2", "data.num_workers=0", "data.pin_memory=false",
        "task.pretrained=null", "callbacks.model_summary=null", "trainer.enable_progress_bar=false"]
STATS = ["--stats-items", "4", "--target-length", "64"]


def prepared(dataset: str, src: Path, dst: Path, *extra: str) -> Path:
    prepare([dataset, "--src", str(src), "--dst", str(dst), *STATS, *extra])
    return dst


def compose_recipe(recipe: str, root: Path, output_dir: Path, *overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"experiment={recipe}", *TINY, f"data.root={root}",
                                           f"paths.output_dir={output_dir}", *overrides])


def run_recipe(recipe: str, root: Path, output_dir: Path, *overrides: str) -> float | None:
    cfg = compose_recipe(recipe, root, output_dir, "trainer.fast_dev_run=true", *overrides)
    return load_train_module().train(cfg)


# --- every recipe on its prepared fixture ---------------------------------------------------------
def test_audioset_recipes(audioset, tmp_path):  # noqa: F811
    dst = prepared("audioset", audioset, tmp_path / "as")
    for recipe in ("finetune_as20k", "finetune_as2m"):
        cfg = compose_recipe(recipe, dst, tmp_path / recipe)
        assert cfg.data.train_manifest == str(dst / ("balanced_train.json" if recipe.endswith("20k") else
                                                     "full_train.json"))
        assert cfg.task.warmup_steps == 0 and not cfg.data.noise
        assert run_recipe(recipe, dst, tmp_path / recipe) is not None
    assert compose_recipe("finetune_as2m", dst, tmp_path).data.balanced_sampling


def test_esc50_recipe(esc50, tmp_path):  # noqa: F811
    dst = prepared("esc50", esc50, tmp_path / "esc50")
    cfg = compose_recipe("finetune_esc50", dst / "fold2", tmp_path / "run")
    assert cfg.data.noise and cfg.task.warmup_steps == 0  # as run_esc_patch.sh
    assert run_recipe("finetune_esc50", dst / "fold2", tmp_path / "run") is not None


@pytest.mark.parametrize("variant,words,recipe", [("v2", V2_WORDS, "finetune_speechcommands_v2"),
                                                  ("v1", V1_WORDS, "finetune_speechcommands_v1"),
                                                  ("superb12", V1_WORDS, "probe_ks12")])
def test_speechcommands_recipes(variant, words, recipe, tmp_path):
    src = speech_commands(tmp_path / "sc", words)
    dst = prepared("speechcommands", src, tmp_path / variant, "--variant", variant)
    cfg = compose_recipe(recipe, dst, tmp_path / "run")
    assert cfg.data.test_manifest == str(dst / "test.json")
    assert run_recipe(recipe, dst, tmp_path / "run") is not None


def test_probe_tests_its_best_checkpoint(tmp_path):
    """A real (short) probe run: the best checkpoint holds the head only, and testing loads it back."""
    src = speech_commands(tmp_path / "sc", V1_WORDS)
    dst = prepared("speechcommands", src, tmp_path / "ks12", "--variant", "superb12")
    run = tmp_path / "run"
    cfg = compose_recipe("probe_ks12", dst, run, "trainer.max_steps=-1", "trainer.max_epochs=1",
                         "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                         "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1")
    assert load_train_module().train(cfg) is not None
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    assert checkpoint["state_dict"] and all(k.startswith("head.") for k in checkpoint["state_dict"])
    assert checkpoint["ssamba"]["probe"]["num_layers"] == 1  # 2 layers in the published pairing: one pair
    with open(run / "metrics.csv", newline="") as f:
        tested = [row["test/acc"] for row in csv.DictReader(f) if row.get("test/acc")]
    assert len(tested) == 1 and 0.0 <= float(tested[0]) <= 1.0


def test_former_speechcommands_name_is_the_v2_recipe(tmp_path):
    old = compose_recipe("finetune_speechcommands", tmp_path, tmp_path)
    new = compose_recipe("finetune_speechcommands_v2", tmp_path, tmp_path)
    assert old == new


def test_probe_recipes(voxceleb1, iemocap, tmp_path):  # noqa: F811
    vox = prepared("voxceleb1", voxceleb1, tmp_path / "vox")
    assert run_recipe("probe_voxceleb1", vox, tmp_path / "vox_run") is not None
    emo = prepared("iemocap", iemocap, tmp_path / "emo")
    cfg = compose_recipe("probe_iemocap", emo / "session3", tmp_path / "emo_run")
    stats = json.loads((emo / "session3" / "stats.json").read_text())
    assert stats["manifest"] == "session3/train.json"  # sessions 1, 2, 4, 5: the held-out one is not in them
    datamodule = load_train_module().hydra.utils.instantiate(cfg.data)
    assert datamodule.norm_mean == stats["norm_mean"] and datamodule.norm_std == stats["norm_std"]
    assert run_recipe("probe_iemocap", emo / "session3", tmp_path / "emo_run") is not None


def test_missing_prepared_files_are_one_line(esc50, tmp_path):  # noqa: F811
    dst = prepared("esc50", esc50, tmp_path / "esc50", "--no-stats")
    with pytest.raises(Exception) as wrapped:  # Hydra wraps what the datamodule raises
        run_recipe("finetune_esc50", dst / "fold9", tmp_path / "run")
    error = find_config_error(wrapped.value)
    assert isinstance(error, MissingFileError)
    assert str(error) == f"data.train_manifest: no such file: {dst}/fold9/train.json"
    result = subprocess.run([sys.executable, "train.py", "experiment=probe_iemocap", *TINY, f"data.root={dst}/fold1",
                             "data.val_manifest=${data.root}/eval.json", "trainer.fast_dev_run=true"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "SSAMBA_OUTPUTS": str(tmp_path / "outputs")})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "config error" in line]
    assert len(errors) == 1 and f"data.stats_file: no such file: {dst}/fold1/stats.json" in errors[0]


# --- AS-2M balanced sampling ------------------------------------------------------------------------
def test_balanced_weights_by_hand():
    # label counts: 0 -> 3 clips, 1 -> 2 clips, 2 -> 1 clip
    labels = [(0,), (0, 1), (0, 2), (1,), ()]
    expected = [1 / 3, 1 / 3 + 1 / 2, 1 / 3 + 1, 1 / 2, 0.0]
    assert label_balanced_weights(labels).tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="no clip has a label"):
        label_balanced_weights([(), ()])


def test_balanced_sampler_is_seeded_and_splits_ranks():
    weights = label_balanced_weights([(0,)] * 8 + [(1,)] * 2)  # class 1 is rare, drawn as often as class 0
    whole = list(BalancedSampler(weights, num_samples=4000, seed=7))
    assert whole == list(BalancedSampler(weights, num_samples=4000, seed=7))
    assert abs(sum(i >= 8 for i in whole) / len(whole) - 0.5) < 0.05
    ranks = [BalancedSampler(weights, num_samples=4000, seed=7, world_size=2, rank=r) for r in (0, 1)]
    assert [len(r) for r in ranks] == [2000, 2000]
    merged = [None] * 4000
    merged[0::2], merged[1::2] = list(ranks[0]), list(ranks[1])
    assert merged == whole  # together the ranks see the one draw, each index once
    sampler = BalancedSampler(weights, seed=7)
    first = list(sampler)
    sampler.set_epoch(1)
    assert len(first) == 10 and list(sampler) != first


def test_lightning_keeps_the_sampler_under_ddp():
    """Lightning wraps a plain sampler in its DistributedSamplerWrapper under DDP (every rank would then
    draw the whole epoch and take a share of it); a DistributedSampler, as ours, is left as it is."""
    import lightning as L
    from lightning.pytorch.trainer.states import RunningStage
    from torch.utils.data import DataLoader, RandomSampler

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    ours = BalancedSampler(torch.ones(10), seed=1, world_size=2, rank=1)
    for sampler, kept in ((ours, True), (RandomSampler(range(10)), False)):
        loader = DataLoader(list(range(10)), sampler=sampler, batch_size=2)
        prepared_loader = trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING)
        assert (prepared_loader.sampler is sampler) == kept


def test_datamodule_uses_the_sampler_in_training(audioset, tmp_path):  # noqa: F811
    dst = prepared("audioset", audioset, tmp_path / "as", "--no-stats")
    dm = ManifestDataModule(train_manifest=str(dst / "full_train.json"),
                            label_csv=str(dst / "class_labels_indices.csv"),
                            balanced_sampling=True, samples_per_epoch=6, sampling_seed=3, batch_size=2,
                            target_length=32, num_workers=0)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, BalancedSampler) and len(loader.sampler) == 6 and loader.sampler.seed == 3
    # full_train.json: Speech+Music, Music (balanced csv), Music+Car (unbalanced); Music is on 3 clips
    assert loader.sampler.weights.tolist() == pytest.approx([1 + 1 / 3, 1 / 3, 1 / 3 + 1])


# --- probing --------------------------------------------------------------------------------------
def tiny_probe(family: str = "ssamba", **kwargs) -> Probing:
    torch.manual_seed(0)
    extra = {"backend": "torch"} if family == "ssamba" else {}
    encoder = build_encoder(f"{family}_tiny", depth=4, embed_dim=48, input_tdim=64, **extra)
    data = {"target_length": 64, "norm_mean": 0.0, "norm_std": 1.0, "label_names": ["a", "b", "c"],
            "multilabel": False}
    return Probing(functools.partial(torch.optim.Adam, lr=1e-2), encoder=encoder, data=data, **kwargs)


def test_probe_projector_width_is_checked_as_a_config_value():
    with pytest.raises(ConfigError, match=r"task.projector_dim=0: must be >= 1 \(or null: one linear layer\)"):
        tiny_probe(projector_dim=0)


@pytest.mark.parametrize("family,layers", [("ssamba", 2), ("ssast", 4)])
def test_probe_trains_only_the_head(family, layers):
    task = tiny_probe(family)
    assert task.head.layer_weights.numel() == layers  # SSAMBA's published pairing: one output per pair
    before = {k: v.clone() for k, v in task.encoder.state_dict().items()}
    optimizer = task.configure_optimizers()
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in task.head.parameters()}
    task.train()
    assert not task.encoder.training
    fbank, target = torch.randn(4, 64, 128), torch.eye(3)[[0, 1, 2, 0]]
    loss = task.loss(task(fbank), target)
    loss.backward()
    assert task.head.layer_weights.grad is not None and task.head.layer_weights.grad.abs().sum() > 0
    assert all(p.grad is None for p in task.encoder.parameters())
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in task.encoder.state_dict().items())


def test_probe_checkpoint_holds_the_head_and_a_pointer():
    task = tiny_probe()
    checkpoint = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(checkpoint)
    assert all(k.startswith("head.") for k in checkpoint["state_dict"])
    record = checkpoint["ssamba"]["probe"]
    assert record["pretrained"] is None and len(record["encoder_sha256"]) == 64
    other = tiny_probe()
    with torch.no_grad():
        other.head.layer_weights.zero_()
    other.on_load_checkpoint(checkpoint)
    other.load_state_dict(checkpoint["state_dict"])  # strict: the encoder was put back
    assert torch.equal(other.head.layer_weights, task.head.layer_weights)
    with torch.no_grad():
        other.encoder.pos_embed.add_(1.0)
    other._fingerprint = None
    with pytest.raises(ValueError, match="whose weights differ"):
        other.on_load_checkpoint({**checkpoint, "state_dict": dict(checkpoint["state_dict"])})



def test_checkpoint_reader_names_the_encoder_of_a_probe_checkpoint(tmp_path):
    from ssamba.checkpoints import ConversionError, load_checkpoint

    task = tiny_probe()
    checkpoint = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "probe.ckpt")
    with pytest.raises(ConversionError, match=r"^probe.ckpt is a probe checkpoint: .*task.pretrained=None"):
        load_checkpoint(tmp_path / "probe.ckpt")


def test_probe_data_info_matches_the_datamodule(esc50, tmp_path):  # noqa: F811
    dst = prepared("esc50", esc50, tmp_path / "esc50", "--no-stats")
    dm = ManifestDataModule(train_manifest=str(dst / "fold1" / "train.json"),
                            label_csv=str(dst / "fold1" / "class_labels_indices.csv"), multilabel=False,
                            target_length=64)
    encoder = build_encoder("ssamba_tiny", depth=2, embed_dim=32, backend="torch")
    task = Probing(functools.partial(torch.optim.Adam, lr=1e-3), encoder=encoder, data=data_info(dm))
    assert task.encoder.grid == (8, 4) and task.num_classes == 2  # the pretraining grid (16 x 16) on 64 frames


# --- the fold runner ------------------------------------------------------------------------------
RUNNER_OVERRIDES = ["++model.depth=2", "++model.embed_dim=32", "model.backend=torch", "data.target_length=64",
                    "data.batch_size=2", "data.num_workers=0", "callbacks.model_summary=null",
                    "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                    "trainer.num_sanity_val_steps=0"]


def runner(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/downstream.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_fold_runner_on_two_folds(esc50, tmp_path):  # noqa: F811
    dst = prepared("esc50", esc50, tmp_path / "esc50", "--no-stats")
    report = tmp_path / "downstream.md"
    report.write_text("# Downstream results\n")
    args = ["run", "esc50", "--data", str(dst), "--folds", "1", "2", "--trainer", "cpu", "--results",
            str(tmp_path / "results"), "--report", str(report), "--override", *RUNNER_OVERRIDES]
    first = runner(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout[first.stdout.index("{"):first.stdout.rindex("}") + 1])
    assert list(summary["runs"]) == ["fold1", "fold2"] and summary["metric"] == "val/acc"
    values = list(summary["runs"].values())
    assert summary["mean"] == pytest.approx(sum(values) / 2) and all(0 <= v <= 1 for v in values)
    lines = report.read_text().splitlines()
    assert lines[0] == "# Downstream results"
    assert lines[-1].startswith("| ESC-50 | tiny (random init) | none | val/acc |")
    again = runner(*args)  # finished folds are kept, not trained again
    assert again.returncode == 0 and again.stdout.count("done earlier, kept") == 2
    assert len(report.read_text().splitlines()) == len(lines) + 1


def test_fold_runner_bad_input_is_one_line(esc50, tmp_path):  # noqa: F811
    dst = prepared("esc50", esc50, tmp_path / "esc50", "--no-stats")
    wrong = runner("run", "esc50", "--data", str(dst), "--folds", "7")
    assert wrong.returncode == 1
    assert wrong.stderr.strip() == ("bench/downstream.py esc50: --folds: fold7 is not one of ESC-50's folds "
                                    "fold1, fold2, fold3, fold4, fold5")
    missing = runner("run", "iemocap", "--data", str(dst))
    assert missing.returncode == 1 and "\n" not in missing.stderr.strip()
    assert missing.stderr.startswith(f"bench/downstream.py iemocap: {dst / 'session1' / 'train.json'} not found")
