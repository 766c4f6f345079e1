"""Sweeps through hydra-submitit-launcher: the local executor runs the cluster path on this machine
(a job folder per sweep point, submitit's logs and results, the pre-emption signal and the requeue)."""
import csv
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
    return subprocess.Popen([sys.executable, "train.py", "-m", "hydra/launcher=local", *args], cwd=ROOT,
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
        controller = int(next(p for p in sweep_folder(tmp_path).joinpath(".submitit").iterdir() if p.name.isdigit()).name)
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
    before, after = column(read_metrics_file(job / "metrics.1.csv"), "step"), column(read_metrics(job), "step")
    assert min(before) == 0 and max(before) < min(after) and max(after) == steps - 1  # no row lost


def read_metrics_file(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_a_reused_run_folder_keeps_the_earlier_metrics(tmp_path):
    from ssamba.utils.launch import keep_earlier_metrics

    assert keep_earlier_metrics(str(tmp_path)) is None
    for attempt in (1, 2):
        (tmp_path / "metrics.csv").write_text(f"step\n{attempt}\n")
        assert keep_earlier_metrics(str(tmp_path)) == str(tmp_path / f"metrics.{attempt}.csv")
    assert not (tmp_path / "metrics.csv").exists()
    assert [(tmp_path / f"metrics.{n}.csv").read_text() for n in (1, 2)] == ["step\n1\n", "step\n2\n"]


def test_only_a_submitit_job_resumes_from_the_checkpoint_in_its_folder(tmp_path, monkeypatch):
    from ssamba.utils.launch import requeued_checkpoint

    last = tmp_path / "last.ckpt"
    last.write_bytes(b"")
    for key in ("SUBMITIT_EXECUTOR", "SUBMITIT_LOCAL_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    assert requeued_checkpoint(str(last)) is None
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert requeued_checkpoint(str(last)) == str(last)
    assert requeued_checkpoint(str(tmp_path / "missing.ckpt")) is None
