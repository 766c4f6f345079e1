"""Two nodes emulated on one host: each "node" is a torchrun agent with one process (``--nnodes 2 --node-rank
0|1``, rendezvous on 127.0.0.1), running train.py with ``trainer.num_nodes=2 trainer.devices=1`` over gloo, as
on a cluster. Checks what the one-node DDP tests check, and that the checkpoint both nodes wrote when they were
pre-empted (SIGTERM to every process, as SLURM sends it) resumes on one node."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from probes import read  # noqa: E402

# 16 items, batch 2 per rank: 4 steps per epoch. Both processes get SIGTERM as step 6 starts (epoch 1); they finish
# it and write last.ckpt at step 7, one batch before the epoch ends. The one-node run resumes there with batch 4
# (the same global batch).
RUN = ["logger=csv", "+model.depth=2", "+model.embed_dim=32", "model.backend=torch", "data.target_length=64",
       "mask.count=12", "mask.val_count=12", "data.num_train=16", "data.num_val=8", "data.num_test=0",
       "data.num_workers=0", "trainer.max_epochs=2", "task.warmup_steps=2", "task.figure_every_n_steps=0",
       "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", "++callbacks.progress_bar=null",
       "++callbacks.model_summary=null"]
TWO_NODES = ["trainer=ddp_sim", "trainer.devices=1", "trainer.num_nodes=2", "data.batch_size=2"]
PREEMPT = "+callbacks.fault={_target_: reliability_faults.SignalAtStep, step: 6, signal_name: SIGTERM}"
ITEMS = {f"synthetic-train-{i}" for i in range(16)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(tmp_path: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests"), "WANDB_MODE": "disabled",
           "SSAMBA_OUTPUTS": str(tmp_path / "default_outputs"), "CUDA_VISIBLE_DEVICES": ""}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_NUM_TASKS"):
        env.pop(key, None)
    return env


def probe(out: Path) -> str:
    return f"+callbacks.probe={{_target_: probes.RecordTraining, out: {out}}}"


def launch_nodes(tmp_path: Path, *overrides: str) -> list[subprocess.CompletedProcess]:
    """Start both nodes' torchrun agents (as each node of a cluster job would) and wait for both."""
    port = free_port()
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
                                str(node), "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port",
                                str(port), "train.py", *RUN, *TWO_NODES, *overrides],
                               cwd=ROOT, env=environment(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
              for node in (0, 1)]
    results = []
    for agent in agents:
        try:
            output, _ = agent.communicate(timeout=300)
        finally:
            agent.kill()
        results.append(subprocess.CompletedProcess(agent.args, agent.returncode, output))
    return results


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_nodes")
    results = launch_nodes(tmp, f"hydra.run.dir={tmp / 'run'}", probe(tmp / "probe"), PREEMPT)
    for result in results:  # the agents report their process's exit status 143 (SIGTERM) as a failure
        assert result.returncode != 0 and "exitcode  : 143" in result.stdout, result.stdout[-4000:]
    assert "stopping at global step 7 on SIGTERM" in results[0].stdout, results[0].stdout[-4000:]
    return tmp


def test_two_nodes_share_each_epoch_and_keep_the_same_weights(two_nodes):
    ranks = [read(str(two_nodes / "probe"), rank) for rank in (0, 1)]
    assert [r["step"] for r in ranks[0]] == [r["step"] for r in ranks[1]] == list(range(7))
    epoch0 = [[i for r in records if r["epoch"] == 0 for i in r["ids"]] for records in ranks]
    assert len(epoch0[0]) == len(epoch0[1]) == 8  # equal shares
    assert set(epoch0[0]) | set(epoch0[1]) == ITEMS and not set(epoch0[0]) & set(epoch0[1])  # each item once
    for first, second in zip(*ranks):
        assert first["masks"] != second["masks"]  # every rank draws its own masks
        assert first["weights"] == second["weights"]  # after every step


def test_two_nodes_write_one_run_folder(two_nodes):
    run = two_nodes / "run"
    assert sorted(p.name for p in two_nodes.iterdir()) == ["probe", "run"]  # nothing under the default outputs
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "metrics.csv").is_file()
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 7 and len(checkpoint["callbacks"]["RandomStateCheckpoint"]["ranks"]) == 2


def test_two_node_checkpoint_resumes_mid_epoch_on_one_node(two_nodes, tmp_path):
    last = two_nodes / "run" / "checkpoints" / "last.ckpt"
    command = [sys.executable, "train.py", *RUN, "trainer=cpu", "data.batch_size=4", f"ckpt_path={last}",
               f"hydra.run.dir={tmp_path / 'run'}", probe(tmp_path / "probe")]
    result = subprocess.run(command, cwd=ROOT, env=environment(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    resumed = read(str(tmp_path / "probe"), 0)
    assert [(r["epoch"], r["step"]) for r in resumed] == [(1, 7)]
    before = [i for rank in (0, 1) for r in read(str(two_nodes / "probe"), rank) if r["epoch"] == 1 for i in r["ids"]]
    after = resumed[0]["ids"]
    assert len(before) == 12 and len(after) == 4 and set(before) | set(after) == ITEMS  # epoch 1 done, no repeats


def test_torchrun_without_a_run_folder_is_refused(tmp_path):
    results = launch_nodes(tmp_path, "trainer.max_steps=1")
    for result in results:
        assert result.returncode != 0
    assert any("config error: hydra.run.dir: set it on the command line when torchrun starts" in result.stdout
               for result in results), results[0].stdout[-4000:]
    assert not (tmp_path / "default_outputs").exists() or not any((tmp_path / "default_outputs").rglob("*.ckpt"))
