"""Exact resume with ``data=shards``: litdata's loader state travels in our checkpoint, so a run killed mid-epoch
and resumed trains the same items in the same order, with the same masks, to the same weights."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("litdata", reason="streaming needs the litdata package (a core dependency)")
from ssamba.data import SyntheticDataModule  # noqa: E402
from ssamba.data.streaming import write_shards  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from probes import read  # noqa: E402

# 16 items, batch 2: 8 steps per epoch, 2 epochs; last.ckpt every 3 steps. Killed at step 11 (epoch 1), the run
# resumes from step 9 (one batch into epoch 1); with last.ckpt every 4 steps, killed at step 10 it resumes from the
# end of epoch 0 (step 8), where Lightning restores no loader state.
RUN = ["trainer=cpu", "logger=csv", "data=shards", "+model.depth=2", "+model.embed_dim=32", "model.backend=torch",
       "data.target_length=64", "mask.count=12", "mask.val_count=12", "data.batch_size=2", "trainer.max_epochs=2",
       "task.warmup_steps=2", "task.figure_every_n_steps=0", "trainer.num_sanity_val_steps=0",
       "trainer.enable_progress_bar=false", "++callbacks.progress_bar=null", "++callbacks.model_summary=null"]


def kill_at(step: int) -> str:
    return f"+callbacks.fault={{_target_: reliability_faults.SignalAtStep, step: {step}, signal_name: SIGKILL}}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    source = SyntheticDataModule(num_train=16, num_val=4, num_test=0, target_length=64)
    for split in ("train", "val"):  # ~4 KB chunks: one or two clips each, so the shuffle spans many chunks
        write_shards(source, split, str(root / split), chunk_bytes="4KB", workers=1)
    return root


def train(shards: Path, out: Path, workers: int, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests"), "WANDB_MODE": "disabled"}
    command = [sys.executable, "train.py", *RUN, f"data.train_dir={shards / 'train'}", f"data.val_dir={shards / 'val'}",
               f"data.num_workers={workers}", f"hydra.run.dir={out / 'run'}",
               f"+callbacks.probe={{_target_: probes.RecordTraining, out: {out / 'probe'}}}", *overrides]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("workers,every,kill,resumed_at", [(0, 3, 11, 9), (2, 3, 11, 9), (2, 4, 10, 8)],
                         ids=["mid-epoch", "mid-epoch-2-workers", "epoch-end-2-workers"])
def test_killed_streaming_run_resumes_with_the_same_items_order_and_weights(shards, tmp_path, workers, every, kill,
                                                                            resumed_at):
    periodic = f"callbacks.periodic_checkpoint.every_n_train_steps={every}"
    full = train(shards, tmp_path / "full", workers, periodic)
    assert full.returncode == 0, full.stderr[-3000:]
    stopped = train(shards, tmp_path / "stopped", workers, periodic, kill_at(kill))
    assert stopped.returncode == -9, stopped.stderr[-3000:]
    last = tmp_path / "stopped" / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == resumed_at
    if resumed_at == 9:
        loader_state = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
        assert loader_state["num_samples_yielded"] == 2  # litdata's position: one batch into epoch 1
    resumed = train(shards, tmp_path / "resumed", workers, periodic, f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected = read(str(tmp_path / "full" / "probe"), 0)
    got = read(str(tmp_path / "resumed" / "probe"), 0)
    assert [r["step"] for r in got] == list(range(resumed_at, 16))
    assert sorted(i for r in expected[:8] for i in r["ids"]) == sorted(f"synthetic-train-{i}" for i in range(16))
    assert [r["ids"] for r in expected[:8]] != [r["ids"] for r in expected[8:]]  # epochs differ in order
    assert got == expected[resumed_at:]  # items, order, masks and the weights after each step
