"""A corpus of broken and unusual audio files trains to completion through train.py: decodable files are used,
the rest are skipped and counted per reason at each epoch end; ``data.on_error=raise`` stops at the first one,
naming the file."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
RATE = 16_000


def _tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(0).standard_normal(t.size)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def write_corpus(folder: Path) -> dict[str, str]:
    """Write the test corpus; returns file name -> expected outcome ("used" or the skip reason)."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}

    def audio(name, data, rate, subtype, outcome="used", fmt=None):
        sf.write(folder / name, data, rate, subtype=subtype, format=fmt)
        expected[name] = outcome

    audio("clean.wav", _tone(1.0, RATE), RATE, "PCM_16")
    audio("silent.wav", np.zeros(RATE), RATE, "PCM_16")
    audio("pcm8.wav", _tone(1.0, RATE), RATE, "PCM_U8")
    audio("pcm24.wav", _tone(1.0, RATE), RATE, "PCM_24")
    audio("stereo.wav", _tone(1.0, RATE, channels=2), RATE, "PCM_16")
    audio("rate4k.wav", _tone(1.0, 4_000), 4_000, "PCM_16")
    audio("rate48k.wav", _tone(1.0, 48_000), 48_000, "PCM_16")
    audio("flac_named.wav", _tone(1.0, RATE), RATE, "PCM_16", fmt="FLAC")  # content decides, not the name
    with_nan = _tone(1.0, RATE).astype(np.float32)
    with_nan[100:200] = np.nan
    audio("nan.wav", with_nan, RATE, "FLOAT", outcome="non_finite")
    audio("empty_wav.wav", np.zeros(0), RATE, "PCM_16", outcome="empty")
    audio("short.wav", _tone(0.02, RATE), RATE, "PCM_16", outcome="too_short")
    audio("full.wav", _tone(1.0, RATE), RATE, "PCM_16")
    data = (folder / "full.wav").read_bytes()
    (folder / "truncated.wav").write_bytes(data[: len(data) // 2])  # cut inside the samples: the rest is used
    expected["truncated.wav"] = "used"
    (folder / "truncated_header.wav").write_bytes(data[:30])  # cut inside the header
    expected["truncated_header.wav"] = "unreadable"
    (folder / "zero_bytes.wav").write_bytes(b"")
    expected["zero_bytes.wav"] = "unreadable"
    (folder / "text.wav").write_text("this is not audio\n" * 50)
    expected["text.wav"] = "unreadable"
    (folder / "image.flac").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    expected["image.flac"] = "unreadable"
    return expected


TINY_RUN = ["trainer=cpu", "logger=csv", "+model.depth=2", "+model.embed_dim=32", "model.backend=torch",
            "data=audioset", "data.label_csv=null", "data.target_length=64", "data.batch_size=4",
            "data.num_workers=0", "mask.count=12", "mask.val_count=12", "task.warmup_steps=1",
            "task.figure_every_n_steps=0", "trainer.max_epochs=2", "trainer.num_sanity_val_steps=0",
            "trainer.enable_progress_bar=false", "++callbacks.progress_bar=null", "++callbacks.model_summary=null"]


def train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    keys = {o.split("=", 1)[0] for o in overrides}
    base = [o for o in TINY_RUN if o.split("=", 1)[0] not in keys]
    return subprocess.run([sys.executable, "train.py", *base, f"hydra.run.dir={tmp_path / 'run'}", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("corpus")
    expected = write_corpus(folder / "audio")
    manifest = {"data": [{"wav": f"audio/{name}", "labels": ""} for name in sorted(expected)]}
    for split in ("train", "eval"):
        (folder / f"{split}.json").write_text(json.dumps(manifest))
    return folder, expected


def test_corpus_files_decode_or_skip_as_expected(corpus):
    from ssamba.data.audio import BadAudio, prepare_waveform, read_audio

    folder, expected = corpus
    for name, outcome in expected.items():
        try:
            wav, rate = read_audio(str(folder / "audio" / name))
            prepare_waveform(wav, rate, name, 0.1)
            got = "used"
        except BadAudio as error:
            got = error.reason
        assert got == outcome, name


def test_bad_corpus_trains_to_completion_with_skip_counts_per_reason(corpus, tmp_path):
    folder, expected = corpus
    # with the sanity check's val batches too: they are read again in epoch 0's validation, counted once
    result = train(tmp_path, f"data.root={folder}", "trainer.num_sanity_val_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    reasons = ("missing", "unreadable", "empty", "too_short", "non_finite")
    want = {reason: sum(outcome == reason for outcome in expected.values()) for reason in reasons}
    for epoch in ("0", "1"):
        val = next(r for r in rows if r["epoch"] == epoch and r.get("data/skipped_unreadable_val"))
        assert {r: float(val[f"data/skipped_{r}_val"]) for r in reasons} == want  # each bad file once
        train_row = next(r for r in rows if r["epoch"] == epoch and r.get("data/skipped_unreadable_train"))
        # training replaces a bad item by a random other one, which may be bad too: at least once each
        assert all(float(train_row[f"data/skipped_{r}_train"]) >= n for r, n in want.items())
    log = (tmp_path / "run" / "train.log").read_text()  # the epoch-end warning, with example files
    assert "skipped" in log and "unreadable" in log and str(folder / "audio") in log


def test_on_error_raise_stops_at_the_first_bad_file_naming_it(corpus, tmp_path):
    folder, expected = corpus
    result = train(tmp_path, f"data.root={folder}", "data.on_error=raise")
    assert result.returncode != 0
    bad = [name for name, outcome in expected.items() if outcome != "used"]
    named = [name for name in bad if str(folder / "audio" / name) in result.stderr]
    assert named, result.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
