"""Embeddings API, long audio, ssamba.load and the embed command, on CPU with tiny encoders."""
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import ssamba
from ssamba.data.features import FbankFrontEnd, samples_for_frames
from ssamba.embed import AudioEmbedder
from ssamba.embed.__main__ import main
from ssamba.models import build_encoder

TINY = {"ssamba_tiny": {"embed_dim": 32, "depth": 4, "d_state": 4, "input_tdim": 64, "backend": "torch"},
        "ssast_tiny": {"embed_dim": 32, "depth": 2, "num_heads": 4, "input_tdim": 64}}
MEAN, STD = -3.0, 4.0


def embedder(name="ssamba_tiny", **extra):
    torch.manual_seed(0)
    return AudioEmbedder(build_encoder(name, **{**TINY[name], **extra}), MEAN, STD)


def audio(seconds, rate=16_000, seed=0):
    return torch.randn(int(seconds * rate), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(TINY))
def test_input_length_audio_matches_the_training_front_end(name):
    model = embedder(name)
    wav = audio(samples_for_frames(64) / 16_000)
    wav = wav - wav.mean()
    result = model.embed(wav, 16_000)
    fbank = FbankFrontEnd(target_length=64, norm_mean=MEAN, norm_std=STD)(wav, train=False)
    with torch.no_grad():
        tokens = model.encoder(fbank.unsqueeze(0))[0, model.encoder.num_prefix_tokens:]
    assert result.patches.shape == (8, 4, 32) and result.frames.shape == (4, 32) and result.clip.shape == (32,)
    torch.testing.assert_close(result.clip, tokens.mean(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.patches.flatten(0, 1), tokens, atol=1e-4, rtol=1e-4)
    assert result.hop_seconds == pytest.approx(0.16)


def test_short_audio_at_another_rate_keeps_only_columns_with_audio():
    model = embedder()
    result = model.embed(audio(0.3, rate=4_000).numpy(), 4_000)  # 30 frames -> 2 columns of 16
    assert result.frames.shape == (2, 32)
    stereo = torch.stack([audio(0.3, 8_000), audio(0.3, 8_000, seed=1)])
    assert model.embed(stereo, 8_000).frames.shape == (2, 32)
    with pytest.raises(ValueError, match="too short"):
        model.embed(torch.randn(100), 16_000)
    with pytest.raises(ValueError, match="NaN"):
        model.embed(torch.full((16_000,), float("nan")), 16_000)


@pytest.mark.parametrize("frames", [50, 56, 64])
def test_audio_up_to_the_input_length_is_padded_on_the_trained_grid_with_overlapping_patches(frames):
    # stride 10 < patch 16 (a finetuned grid): columns starting near the end reach past the input, and audio that
    # fits the input must still run as in training (padded), not on a grid stretched to reach them
    model = embedder()
    model.encoder.set_grid(fstride=10, tstride=10)
    fbank = torch.randn(frames, 128) * STD + MEAN
    result = model.embed_fbank(fbank)
    padded = torch.cat([fbank, fbank.new_zeros(64 - frames, 128)])
    with torch.no_grad():
        tokens = model.encoder(((padded - MEAN) / (2 * STD)).unsqueeze(0))[0, model.encoder.num_prefix_tokens:]
    f_dim, t_dim = model.encoder.grid
    expected = tokens.unflatten(0, (f_dim, t_dim))[:, :min(math.ceil(frames / 10), t_dim)]
    torch.testing.assert_close(result.patches, expected, atol=1e-5, rtol=1e-5)


def test_integer_pcm_is_scaled_and_a_soundfile_layout_is_refused():
    """Readers hand over int16 (scipy.io.wavfile) or [samples, channels] (soundfile): the first is the same audio
    as its float copy, the second would be averaged over the wrong axis, so it is refused in one line."""
    model = embedder()
    wav = (audio(0.5) * 0.1).clamp(-1, 1)
    pcm = (wav * 2**15).round().to(torch.int16)
    torch.testing.assert_close(model.embed(pcm, 16_000).clip, model.embed(pcm.float() / 2**15, 16_000).clip)
    assert not torch.allclose(model.embed(pcm.float(), 16_000).clip, model.embed(pcm, 16_000).clip, atol=1e-3)
    stereo = torch.stack([wav, wav])
    with pytest.raises(ValueError, match=r"shape \(8000, 2\) looks like \[samples, channels\].*transposed"):
        model.embed(stereo.T.numpy(), 16_000)
    torch.testing.assert_close(model.embed(stereo.T.numpy().T, 16_000).clip, model.embed(wav, 16_000).clip)
    with pytest.raises(ValueError, match="dtype torch.uint8"):
        model.embed(torch.zeros(8000, dtype=torch.uint8), 16_000)


def test_ssast_long_audio_runs_in_windows_of_the_input_length():
    model = embedder("ssast_tiny")
    model.window_batch = 2  # 3 windows: exercises batching
    wav = audio(1.5)  # 148 frames -> 10 columns -> windows of 4 columns
    fbank = model.fbank(wav, 16_000)
    result = model.embed_fbank(fbank)
    assert result.frames.shape == (10, 32)
    second_window = model.embed_fbank(fbank[64:128])
    torch.testing.assert_close(result.patches[:, 4:8], second_window.patches, atol=1e-5, rtol=1e-5)


def test_ssamba_long_audio_runs_in_one_pass_and_restores_the_encoder():
    model = embedder("ssamba_tiny")
    encoder = model.encoder
    pos_embed, config = encoder.pos_embed, dataclasses.replace(encoder.config)
    fbank = model.fbank(audio(3.0), 16_000)  # 298 frames: 19 columns, beyond the 4 of the input grid
    result = model.embed_fbank(fbank)
    assert result.frames.shape == (math.ceil(298 / 16), 32)
    assert encoder.pos_embed is pos_embed and encoder.config == config and encoder.grid == (8, 4)
    windowed = model.embed_fbank(fbank, window=True)
    assert windowed.frames.shape == result.frames.shape
    assert not torch.allclose(windowed.frames, result.frames, atol=1e-3)  # one context vs separate windows


def test_layers_can_be_chosen():
    model = embedder("ssamba_tiny")  # 4 layers run as 2 bidirectional pairs
    assert model.num_layers == 2
    wav = audio(0.5)
    first, last = model.embed(wav, 16_000, layer=0), model.embed(wav, 16_000)
    assert first.layer == 0 and not torch.allclose(first.clip, last.clip)
    torch.testing.assert_close(model.embed(wav, 16_000, layer=-2).clip, first.clip)
    with pytest.raises(IndexError, match="layer=2 is out of range"):
        model.embed(wav, 16_000, layer=2)


def _save_checkpoint(model, path):
    encoder = model.encoder
    checkpoint = {"state_dict": {f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                  "ssamba": {"encoder": dataclasses.asdict(encoder.config), "norm_mean": MEAN, "norm_std": STD,
                             "target_length": 64, "task": "pretrain", "label_names": []}}
    torch.save(checkpoint, path)


def test_load_gives_the_same_embeddings(tmp_path):
    model = embedder("ssast_tiny")
    _save_checkpoint(model, tmp_path / "m.ckpt")
    loaded = ssamba.load(tmp_path / "m.ckpt")
    assert not loaded.training and loaded.metadata["task"] == "pretrain"
    wav = audio(1.0)
    torch.testing.assert_close(loaded.embed(wav, 16_000).frames, model.embed(wav, 16_000).frames, rtol=0, atol=0)


def test_embed_command_writes_npz_and_reports_unusable_files(tmp_path, capsys):
    model = embedder("ssamba_tiny")
    _save_checkpoint(model, tmp_path / "m.ckpt")
    root = tmp_path / "audio"
    (root / "sub").mkdir(parents=True)
    sf.write(root / "a.wav", audio(0.5).numpy() * 0.1, 16_000)
    sf.write(root / "sub" / "b.flac", audio(1.2, 4_000).numpy() * 0.1, 4_000)
    (root / "broken.wav").write_bytes(b"not audio")
    (root / "notes.txt").write_text("ignored")

    out = tmp_path / "emb.npz"
    assert main([str(root), str(out), f"ckpt={tmp_path / 'm.ckpt'}", "frames=true", "device=cpu"]) == 0
    data = np.load(out)
    assert list(data["names"]) == ["a.wav", "sub/b.flac"]
    assert data["clip"].shape == (2, 32)
    assert list(data["frame_offsets"]) == [0, 3, 11] and data["frames"].shape == (11, 32)
    assert list(data["skipped"]) == ["broken.wav: unreadable"]
    assert "broken.wav" in capsys.readouterr().err
    expected = model.embed(sf.read(root / "a.wav", dtype="float32")[0], 16_000).clip.numpy()
    np.testing.assert_allclose(data["clip"][0], expected, atol=1e-5)

    with pytest.raises(SystemExit):
        main([str(root), str(out)])  # no ckpt=


def test_embed_command_runs_as_documented():
    repo = Path(__file__).parents[1]
    result = subprocess.run([sys.executable, "-m", "ssamba.embed", "--help"], cwd=repo, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m ssamba.embed")


def test_embed_command_refuses_a_missing_checkpoint_or_folder_in_one_line(tmp_path):
    repo = Path(__file__).parents[1]
    _save_checkpoint(embedder("ssast_tiny"), tmp_path / "m.ckpt")
    (tmp_path / "empty").mkdir()
    cases = (([str(tmp_path), "o.npz", "ckpt=gone.ckpt"], "ckpt=gone.ckpt: checkpoint 'gone.ckpt' does not exist"),
             ([str(tmp_path / "gone"), "o.npz", f"ckpt={tmp_path / 'm.ckpt'}"],
              f"audio directory {str(tmp_path / 'gone')!r} does not exist"),
             ([str(tmp_path / "empty"), "o.npz", f"ckpt={tmp_path / 'm.ckpt'}"], "no audio files"))
    for arguments, message in cases:
        result = subprocess.run([sys.executable, "-m", "ssamba.embed", *arguments, "device=cpu"], cwd=tmp_path,
                                env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True, text=True)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert result.stderr.strip().startswith(f"python -m ssamba.embed: {message}")


def test_benchmark_script_runs_in_smoke_mode(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))  # as run as a script: helpers beside it
    spec = importlib.util.spec_from_file_location("bench_embed", Path(__file__).parents[1] / "bench" / "embed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--smoke", "--modes", "ssamba", "ssast", "ssast-windowed", "--out", str(tmp_path / "perf")])
    rows = json.loads((tmp_path / "perf.json").read_text())["rows"]
    assert [(r["mode"], r["tokens"]) for r in rows][:3] == [("ssamba", 64), ("ssast", 64), ("ssast-windowed", 64)]
    assert all(r["seconds"] > 0 for r in rows)
    text = (tmp_path / "perf.md").read_text()
    assert "| ssamba_tiny | ssamba (torch scan) | 256 | 2 |" in text
    timed = [dict(model=f"{mode}_tiny", mode=mode, tokens=64, batch=2, seconds=seconds, peak_gib=peak)
             for mode, seconds, peak in (("ssamba", 3.0, 1.0), ("ssast", 4.0, 0.5))]
    assert bench.markdown(timed, "t").endswith("- 64 tokens: SSAMBA takes 0.75x SSAST's time and 2.00x its peak "
                                               "memory (SDPA kernels)\n")
    (tmp_path / "perf.md").unlink()
    bench.main(["--render", str(tmp_path / "perf.json"), "--out", str(tmp_path / "perf")])
    assert (tmp_path / "perf.md").read_text() == text
    monkeypatch.chdir(tmp_path)  # without --out a smoke run writes nothing, where a measured run would write
    (tmp_path / "docs" / "performance").mkdir(parents=True)
    bench.main(["--smoke", "--modes", "ssast", "--tokens", "64"])
    assert not list((tmp_path / "docs").rglob("embed.*"))
