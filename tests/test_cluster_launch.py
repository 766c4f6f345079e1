"""Sweeps through hydra-submitit-launcher: the local executor runs the cluster path on this machine
(a job folder per sweep point, submitit's logs and results, the pre-emption signal and the requeue)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit", reason="cluster sweeps need hydra-submitit-launcher (a core dependency)")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_train import TINY, column, read_metrics  # noqa: E402

BASE = [a for a in TINY if not a.startswith(("mask.", "data.target"))] + [
    "data.target_length=208", "model.fshape=8", "model.tshape=8", "model.fstride=8", "model.tstride=8",
    "mask.val_count=300"]  # 16 x 26 = 416 patches: the 250/300/400 mask files fit


def start(tmp_path, *args):
    env = {**os.environ, "SSAMBA_OUTPUTS": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("WANDB_API_KEY", None)
    return subprocess.Popen([sys.executable, "train.py", "-m", "hydra/launcher=submitit_local", *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def sweep_folder(tmp_path) -> Path:
    return next((tmp_path / "pretrain_tiny" / "multiruns").iterdir())


@pytest.mark.slow
def test_submitit_local_mask_sweep_runs_one_job_per_count(tmp_path):
    process = start(tmp_path, "mask=250,300,400", *BASE)
    output, _ = process.communicate(timeout=1800)
    assert process.returncode == 0, output[-3000:]
    sweep = sweep_folder(tmp_path)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2"]
    for job, count in zip(jobs, (250, 300, 400)):
        assert f"count: {count}" in (job / ".hydra" / "config.yaml").read_text()
        assert column(read_metrics(job), "val/acc")
        assert (job / "checkpoints" / "last.ckpt").is_file()
    submitted = sorted(p for p in (sweep / ".submitit").iterdir() if p.name.isdigit())  # one folder per job id
    assert len(submitted) == 3
    scores = []
    for folder in submitted:
        job = submitit.local.local.LocalJob(folder=folder, job_id=folder.name)
        assert job.state == "FINISHED"
        result = job.result()  # hydra's JobReturn: the job's status and train()'s monitored score
        assert result.status.name == "COMPLETED" and isinstance(result.return_value, float)
        scores.append(result.return_value)
        assert "Job completed successfully" in job.stdout()
        assert str(sweep) in job.stderr()  # the training log names the job's folder (its checkpoints)
    assert len(scores) == 3


def _task_pid(controller: int) -> int | None:
    """The training process: the child of submitit's local controller process."""
    children = Path(f"/proc/{controller}/task/{controller}/children")
    pids = children.read_text().split() if children.exists() else []
    return int(pids[0]) if pids else None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the job's process through /proc")
def test_preempted_job_saves_requeues_and_continues_in_its_folder(tmp_path):
    steps = 160  # 2 epochs of 80 batches
    process = start(tmp_path, *[a for a in TINY if not a.startswith(("trainer.max_epochs", "data.num_"))],
                    "trainer.max_epochs=2", "data.num_train=320", "data.num_val=4", "data.num_test=0",
                    "callbacks.periodic_checkpoint.every_n_train_steps=20")
    try:
        deadline = time.monotonic() + 900
        while not list(tmp_path.glob("pretrain_tiny/multiruns/*/0/checkpoints/last.ckpt")):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
            time.sleep(0.2)
        controller = int(next(sweep_folder(tmp_path).joinpath(".submitit").iterdir()).name)
        os.kill(_task_pid(controller), signal.SIGUSR2)  # what SLURM sends signal_delay_s before the limit
        output, _ = process.communicate(timeout=1800)
    finally:
        process.kill()
    assert process.returncode == 0, output[-3000:]
    job = sweep_folder(tmp_path) / "0"
    log = (job / "train.log").read_text()
    stop = log.index("stopping at global step")
    stopped_at = int(log[stop:].split()[4].rstrip(";"))
    assert 20 <= stopped_at < steps
    assert f"requeued job: continuing from {job / 'checkpoints' / 'last.ckpt'}" in log[stop:]
    steps_logged = column(read_metrics(job), "step")
    assert max(steps_logged) == steps - 1 and min(steps_logged) == 0
