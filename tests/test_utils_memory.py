"""The CPU memory check of train.py (ssamba.utils.memory): what it measures, what it reads, and the refusal."""
import pytest
import torch

from ssamba.errors import ConfigError
from ssamba.models import build_encoder
from ssamba.utils import memory

SMALL = dict(depth=2, embed_dim=32, backend="torch")


def test_the_activations_kept_for_the_backward_grow_with_the_clip_and_leave_the_random_state_alone():
    short = memory.saved_bytes_per_clip(build_encoder("tiny", input_tdim=128, **SMALL))
    encoder = build_encoder("tiny", input_tdim=256, **SMALL)
    state = torch.get_rng_state()
    long = memory.saved_bytes_per_clip(encoder)
    assert torch.equal(torch.get_rng_state(), state)  # a seeded run draws the same numbers, measured or not
    assert 0 < short and 1.6 < long / short < 2.4  # 16 and 32 time patches (8 frequency rows each), plus the cls


def test_available_memory_is_meminfo_lowered_to_a_cgroup_limit(tmp_path, monkeypatch):
    meminfo, cgroup = tmp_path / "meminfo", tmp_path / "cgroup"
    cgroup.mkdir()
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:   20000000 kB\n")
    monkeypatch.setattr(memory, "MEMINFO", meminfo)
    monkeypatch.setattr(memory, "CGROUP", cgroup)
    assert memory.available_bytes() == 20000000 * 1024  # no cgroup files: MemAvailable
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("1000\n")
    assert memory.available_bytes() == 20000000 * 1024  # no limit set
    (cgroup / "memory.max").write_text(f"{8 * memory.GIB}\n")
    assert memory.available_bytes() == 8 * memory.GIB - 1000
    monkeypatch.setattr(memory, "MEMINFO", tmp_path / "absent")
    assert memory.available_bytes() is None


def test_a_step_is_refused_only_where_its_activations_alone_exceed_the_memory(monkeypatch):
    encoder = build_encoder("tiny", input_tdim=128, **SMALL)
    per_clip = memory.saved_bytes_per_clip(encoder)
    monkeypatch.setattr(memory, "available_bytes", lambda: 10 * per_clip)
    assert memory.cpu_step_problem(encoder, batch_size=5, passes=2) is None  # 10 clip-passes: fits exactly
    problem = memory.cpu_step_problem(encoder, batch_size=4, passes=2, processes=2)
    assert "1 x" not in problem and "(2 x 4 clips x 2 encoder pass(es)" in problem
    assert "lower data.batch_size (under 2:" in problem and "\n" not in problem
    monkeypatch.setattr(memory, "available_bytes", lambda: per_clip // 2)
    assert "shorten the clips (data.target_length)" in memory.cpu_step_problem(encoder, 1, 1)
    monkeypatch.setattr(memory, "available_bytes", lambda: None)
    assert memory.cpu_step_problem(encoder, 10**6, 2) is None  # nothing to compare with: no refusal


def test_train_refuses_a_cpu_step_that_cannot_fit_before_training(tmp_path, monkeypatch):
    from test_train import run_train

    monkeypatch.setattr(memory, "available_bytes", lambda: 1024)
    with pytest.raises(ConfigError, match="a training step on CPU keeps at least .* GiB of activations"):
        run_train(tmp_path, "trainer.fast_dev_run=true")
    assert not (tmp_path / "metrics.csv").exists()
