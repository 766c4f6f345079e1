"""Exact resume: a run stopped mid-epoch (SIGTERM, SIGKILL) and resumed from its last checkpoint ends with the
same weights and validation metrics as an uninterrupted run with the same seed."""
from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ssamba.callbacks.random_state import capture_rng_states, restore_rng_states
from ssamba.data.resumable import ResumableDataLoader, ResumableSampler

ROOT = Path(__file__).resolve().parents[1]


def test_sampler_order_depends_only_on_seed_and_epoch():
    data = list(range(50))
    first = ResumableSampler(data, seed=7)
    torch.manual_seed(0)
    order = list(first)
    torch.manual_seed(1)  # the global RNG plays no part
    assert list(ResumableSampler(data, seed=7)) == order and sorted(order) == data
    first.set_epoch(1)
    assert list(first) != order and sorted(first) == data
    assert list(ResumableSampler(data, seed=8)) != order


def test_sampler_skip_continues_the_same_order():
    data = list(range(23))
    sampler = ResumableSampler(data, seed=3)
    full = list(sampler)
    sampler.skip = 10
    assert list(sampler) == full[10:]
    assert list(sampler) == full  # one-shot
    assert len(sampler) == 23     # Lightning counts skipped batches as done


def test_ranks_share_an_epoch_without_repeating_items():
    data = list(range(101))
    shares = [list(ResumableSampler(data, seed=0, num_replicas=4, rank=r)) for r in range(4)]
    seen = [i for share in shares for i in share]
    assert len(seen) == len(set(seen)) == 100  # 101 % 4 = 1 item left out, none doubled
    assert len({len(share) for share in shares}) == 1


def test_loader_skips_whole_batches_and_draws_nothing_from_the_global_rng():
    loader = ResumableDataLoader(list(range(20)), batch_size=4)
    full = [batch.tolist() for batch in loader]
    loader.load_state_dict({"epoch": 0, "batches_done": 2})
    state = torch.get_rng_state()
    assert [batch.tolist() for batch in loader] == full[2:]
    assert torch.equal(torch.get_rng_state(), state)


def test_mid_epoch_resume_on_fewer_ranks_with_the_same_global_batch_continues_the_epoch():
    data = list(range(24))
    done = [i for rank in range(2) for i in list(ResumableSampler(data, seed=5, num_replicas=2, rank=rank))[:2 * 3]]
    loader = ResumableDataLoader(data, batch_size=6, seed=5)  # one rank, batch 6 = 2 ranks x 3
    loader.load_state_dict({"epoch": 0, "batches_done": 2, "batch_size": 3, "num_replicas": 2})
    rest = [i for batch in loader for i in batch.tolist()]
    assert sorted(done + rest) == data


def test_mid_epoch_resume_with_another_global_batch_is_refused():
    loader = ResumableDataLoader(list(range(24)), batch_size=4)
    with pytest.raises(RuntimeError, match="data.batch_size: .* global batch of 6 .* 1 x 4"):
        loader.load_state_dict({"epoch": 0, "batches_done": 2, "batch_size": 3, "num_replicas": 2})
    loader.load_state_dict({"epoch": 0, "batches_done": 4, "batch_size": 3, "num_replicas": 2})  # epoch complete


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    torch.save(capture_rng_states(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    restore_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


# --- end to end: train.py runs that are interrupted and resumed ------------------------------------------------------
# 16 items, batch 4: 4 optimizer steps per epoch, 2 epochs; last.ckpt every 2 steps.
TINY_RUN = ["trainer=cpu", "logger=csv", "+model.depth=2", "+model.embed_dim=32", "model.backend=torch",
            "data.target_length=64", "mask.count=12", "mask.val_count=12", "data.num_train=16", "data.num_val=8",
            "data.num_test=0", "data.batch_size=4", "data.num_workers=0", "trainer.max_epochs=2",
            "task.warmup_steps=2", "task.figure_every_n_steps=0", "trainer.num_sanity_val_steps=0",
            "trainer.enable_progress_bar=false", "++callbacks.progress_bar=null", "++callbacks.model_summary=null",
            "callbacks.periodic_checkpoint.every_n_train_steps=2"]


def train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.run([sys.executable, "train.py", *TINY_RUN, f"hydra.run.dir={run_dir}", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def fault(step: int, signal_name: str) -> str:
    return f"+callbacks.fault={{_target_: reliability_faults.SignalAtStep, step: {step}, signal_name: {signal_name}}}"


def final_state(run_dir: Path) -> tuple[dict, list]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    rows = [r for r in csv.DictReader(open(run_dir / "metrics.csv")) if r.get("val/loss")]
    last = rows[-1]
    return checkpoint, [last["epoch"], last["step"], last["val/loss"], last["val/acc"]]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("resume") / "uninterrupted"
    result = train(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("step,signal_name,exit_status,resumed_step", [
    (5, "SIGTERM", 143, 6),  # mid-epoch: checkpoint right after the batch
    (3, "SIGTERM", 143, 4),  # last batch of epoch 0: checkpoint after that epoch's validation
    (7, "SIGKILL", -9, 6),   # no warning: the periodic last.ckpt of step 6
    (5, "SIGKILL", -9, 4),   # the end-of-epoch last.ckpt
])
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(uninterrupted, tmp_path, step, signal_name,
                                                                   exit_status, resumed_step):
    stopped = train(tmp_path / "stopped", fault(step, signal_name))
    assert stopped.returncode == exit_status, stopped.stderr[-3000:]
    last = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == resumed_step
    assert not [p for p in last.parent.iterdir() if p.name.startswith(".tmp-")]  # no half-written leftovers
    resumed = train(tmp_path / "resumed", f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, expected_metrics = final_state(uninterrupted)
    got, got_metrics = final_state(tmp_path / "resumed")
    assert got_metrics == expected_metrics
    assert got["global_step"] == expected["global_step"] == 8
    for key, value in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key
    assert got["optimizer_states"][0]["param_groups"][0]["lr"] == expected["optimizer_states"][0]["param_groups"][0]["lr"]


@pytest.mark.slow
def test_a_requeue_signal_seen_by_one_rank_runs_the_requeue_handler_on_every_rank(tmp_path, monkeypatch):
    """submitit's (and Lightning's SLURM) requeue handler may hold a barrier: a rank that had not received the
    signal yet when the ranks agreed to stop must run it too, at the same step, or the others wait forever."""
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "1")  # a submitit job: its requeue signal is taken over
    fault = (f"+callbacks.fault={{_target_: reliability_faults.RequeueSignalToRankZero, step: 3, "
             f"out_dir: {tmp_path}}}")
    result = train(tmp_path / "run", "trainer=ddp_sim", "data.batch_size=2", fault)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name: p.read_text() for p in tmp_path.glob("requeued-rank*")} == {"requeued-rank0": "4",
                                                                               "requeued-rank1": "4"}
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


@pytest.mark.slow
def test_a_sigterm_during_validation_checkpoints_where_it_ends_and_exits_143(uninterrupted, tmp_path):
    """Lightning stops a validation at a SIGTERM with no checkpoint and status 0; ours finishes it, checkpoints
    the end of the epoch it closes and exits 143, and the resumed run ends as the uninterrupted one."""
    fault = ("+callbacks.fault={_target_: reliability_faults.SignalInValidation, epoch: 0, batch: 0, "
             "signal_name: SIGTERM}")
    stopped = train(tmp_path / "stopped", fault)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    last = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4  # epoch 0 complete, its validation included
    resumed = train(tmp_path / "resumed", f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, expected_metrics = final_state(uninterrupted)
    got, got_metrics = final_state(tmp_path / "resumed")
    assert got_metrics == expected_metrics
    for key, value in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key


@pytest.mark.slow
def test_a_sigterm_inside_a_gradient_accumulation_checkpoints_after_its_optimizer_step(tmp_path):
    """A checkpoint between two micro-batches of one step would drop the gradients summed so far: the SIGTERM at
    the first micro-batch of step 1 checkpoints once that step is taken (here the end of epoch 0)."""
    accumulate = "trainer.accumulate_grad_batches=2"  # 4 batches an epoch: 2 optimizer steps
    whole = train(tmp_path / "whole", accumulate)
    assert whole.returncode == 0, whole.stderr[-3000:]
    stopped = train(tmp_path / "stopped", accumulate, fault(1, "SIGTERM"))
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    last = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    resumed = train(tmp_path / "resumed", accumulate, f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, expected_metrics = final_state(tmp_path / "whole")
    got, got_metrics = final_state(tmp_path / "resumed")
    assert got_metrics == expected_metrics
    for key, value in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key


def test_resuming_with_other_input_settings_is_refused_in_one_line(uninterrupted, tmp_path):
    """Other features on resume would train one model on two kinds of input and record only the second."""
    last = uninterrupted / "checkpoints" / "last.ckpt"
    resumed = train(tmp_path / "resumed", f"ckpt_path={last}", "data.mel_low_hz=300", "data.norm_std=2.5")
    assert resumed.returncode == 2  # train.py's exit status for a configuration error
    assert ("config error: this checkpoint was trained with data.norm_std=3.74 data.mel_low_hz=20.0; this run gives "
            "data.norm_std=2.5 data.mel_low_hz=300.0") in resumed.stdout + resumed.stderr


@pytest.mark.slow
def test_resume_without_the_rng_states_would_differ(uninterrupted, tmp_path):
    """The comparison above can fail: resuming without restoring the RNG gives other masks and other weights."""
    stopped = train(tmp_path / "stopped", fault(5, "SIGTERM"))
    assert stopped.returncode == 143
    resumed = train(tmp_path / "resumed", f"ckpt_path={tmp_path / 'stopped' / 'checkpoints' / 'last.ckpt'}",
                    "callbacks.random_state=null")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, _ = final_state(uninterrupted)
    got, _ = final_state(tmp_path / "resumed")
    assert any(not torch.equal(got["state_dict"][k], v) for k, v in expected["state_dict"].items())


def test_last_checkpoint_follows_every_epoch_when_the_metric_stops_improving(tmp_path):
    """Monitoring ``epoch`` with mode=min makes epoch 0 the best for good; last.ckpt must still reach the end
    (Lightning >= 2.6's ModelCheckpoint alone leaves it at the best epoch's step 4)."""
    never_better = ["callbacks.model_checkpoint.monitor=epoch", "callbacks.model_checkpoint.mode=min",
                    "callbacks.periodic_checkpoint.every_n_train_steps=500"]
    result = train(tmp_path, *never_better)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "checkpoints"
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 8
    assert [p.name for p in folder.glob("best-*")] == ["best-epoch000-step0000004.ckpt"]
