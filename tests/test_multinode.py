"""Two nodes emulated on one host: each "node" is a torchrun agent with one process (``--nnodes 2 --node-rank
0|1``, rendezvous on 127.0.0.1), running train.py with ``trainer.num_nodes=2 trainer.devices=1`` over gloo, as
on a cluster. Checks what the one-node DDP tests check, and a resume of the two-node checkpoint on one node."""
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

# 16 items, batch 2 per rank: 4 steps per epoch. The two-node run stops at step 6, in the middle of epoch 1,
# where its periodic last.ckpt was written; the one-node run resumes there with batch 4 (the same global batch).
RUN = ["logger=csv", "+model.depth=2", "+model.embed_dim=32", "model.backend=torch", "data.target_length=64",
       "mask.count=12", "mask.val_count=12", "data.num_train=16", "data.num_val=8", "data.num_test=0",
       "data.num_workers=0", "trainer.max_epochs=2", "task.warmup_steps=2", "task.figure_every_n_steps=0",
       "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", "++callbacks.progress_bar=null",
       "++callbacks.model_summary=null", "callbacks.periodic_checkpoint.every_n_train_steps=2"]
TWO_NODES = ["trainer=ddp_sim", "trainer.devices=1", "trainer.num_nodes=2", "data.batch_size=2", "trainer.max_steps=6"]
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
    results = launch_nodes(tmp, f"hydra.run.dir={tmp / 'run'}", probe(tmp / "probe"))
    for result in results:
        assert result.returncode == 0, result.stdout[-4000:]
    return tmp


def batches(records: list[dict]) -> list[dict]:
    return [r for r in records if "ids" in r]


def test_two_nodes_share_each_epoch_and_end_with_the_same_weights(two_nodes):
    ranks = [read(str(two_nodes / "probe"), rank) for rank in (0, 1)]
    steps = [[r["step"] for r in batches(records)] for records in ranks]
    assert steps[0] == steps[1] == list(range(6))
    epoch0 = [[i for r in batches(records) if r["epoch"] == 0 for i in r["ids"]] for records in ranks]
    assert len(epoch0[0]) == len(epoch0[1]) == 8  # equal shares
    assert set(epoch0[0]) | set(epoch0[1]) == ITEMS and not set(epoch0[0]) & set(epoch0[1])  # each item once
    for first, second in zip(batches(ranks[0]), batches(ranks[1])):
        assert first["masks"] != second["masks"]  # every rank draws its own masks
    assert ranks[0][-1]["weights"] == ranks[1][-1]["weights"]


def test_two_nodes_write_one_run_folder(two_nodes):
    run = two_nodes / "run"
    assert sorted(p.name for p in two_nodes.iterdir()) == ["probe", "run"]  # nothing under the default outputs
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "metrics.csv").is_file()
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6 and len(checkpoint["callbacks"]["RandomStateCheckpoint"]["ranks"]) == 2


def test_two_node_checkpoint_resumes_mid_epoch_on_one_node(two_nodes, tmp_path):
    last = two_nodes / "run" / "checkpoints" / "last.ckpt"
    command = [sys.executable, "train.py", *RUN, "trainer=cpu", "data.batch_size=4", f"ckpt_path={last}",
               f"hydra.run.dir={tmp_path / 'run'}", probe(tmp_path / "probe")]
    result = subprocess.run(command, cwd=ROOT, env=environment(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    resumed = batches(read(str(tmp_path / "probe"), 0))
    assert [(r["epoch"], r["step"]) for r in resumed] == [(1, 6), (1, 7)]
    before = [i for rank in (0, 1) for r in batches(read(str(two_nodes / "probe"), rank)) if r["epoch"] == 1
              for i in r["ids"]]
    after = [i for r in resumed for i in r["ids"]]
    assert len(before) == len(after) == 8 and set(before) | set(after) == ITEMS  # epoch 1 completed, no repeats


def test_torchrun_without_a_run_folder_is_refused(tmp_path):
    results = launch_nodes(tmp_path, "trainer.max_steps=1")
    for result in results:
        assert result.returncode != 0
    assert any("config error: hydra.run.dir: set it on the command line when torchrun starts" in result.stdout
               for result in results), results[0].stdout[-4000:]
    assert not (tmp_path / "default_outputs").exists() or not any((tmp_path / "default_outputs").rglob("*.ckpt"))
