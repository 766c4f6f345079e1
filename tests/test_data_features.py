"""The fbank front end: parity of the batched device path with torchaudio's kaldi fbank, and the
augmentations of the reference recipe."""

import math
from pathlib import Path

import pytest
import torch
from torchaudio.compliance import kaldi

from ssamba.data.audio import read_audio
from ssamba.data.features import (
    SAMPLE_RATE,
    FbankFrontEnd,
    MelScale,
    batched_fbank,
    frames_for_samples,
    kaldi_fbank,
    mix_waveforms,
    pad_or_cut,
    resampling_rate,
    samples_for_frames,
    to_mono_16k,
)


def test_batched_fbank_matches_kaldi_per_item():
    torch.manual_seed(0)
    lengths = torch.tensor([16000 * 2, 16000 * 3 + 77, 400, 5000, 12345])
    wavs = torch.zeros(len(lengths), int(lengths.max()))
    for row, n in enumerate(lengths.tolist()):
        wav = torch.randn(n) * 0.1 + torch.sin(torch.arange(n) * 0.05)
        wavs[row, :n] = wav - wav.mean()
    batched = batched_fbank(wavs, lengths)
    assert batched.shape == (5, frames_for_samples(int(lengths.max())), 128)
    for row, n in enumerate(lengths.tolist()):
        reference = kaldi_fbank(wavs[row, :n])
        torch.testing.assert_close(batched[row, : len(reference)], reference, atol=1e-4, rtol=1e-5)
        assert (batched[row, len(reference) :] == 0).all()  # as padding the per-item fbank


def test_front_end_cpu_and_batched_paths_agree_and_normalise():
    torch.manual_seed(1)
    front = FbankFrontEnd(target_length=200, norm_mean=-5.0, norm_std=3.0)
    wavs = [torch.randn(n) * 0.05 for n in (16000, 400 + 160 * 250, 9000)]
    single = torch.stack([front(w, train=False) for w in wavs])
    padded = torch.zeros(3, max(w.numel() for w in wavs))
    for row, w in enumerate(wavs):
        padded[row, : w.numel()] = w
    batched = front.batch(padded, torch.tensor([w.numel() for w in wavs]), train=False)
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-5)
    raw = pad_or_cut(kaldi_fbank(wavs[0]), 200)
    torch.testing.assert_close(single[0], (raw - -5.0) / (2 * 3.0))
    assert single.shape == (3, 200, 128)
    assert (single[0, 99:] == (0 - -5.0) / 6.0).all()  # 1 s gives 98 frames, then zero padding


CIRCOR_RECORDING = Path(__file__).parent / "data" / "circor-mini" / "training_data" / "2530_AV.wav"


def mel(hz: float) -> float:
    return 1127.0 * math.log(1.0 + hz / 700.0)


@pytest.mark.parametrize("scale", [MelScale(), MelScale(20.0, 2000.0, 2048), MelScale(50.0, 1000.0, 4096)])
def test_a_tone_lands_in_the_mel_filter_centred_nearest_it(scale):
    tone = torch.sin(2 * math.pi * 700.0 * torch.arange(SAMPLE_RATE) / SAMPLE_RATE)
    peak = int(FbankFrontEnd(100, mel=scale).raw(tone).mean(0).argmax())
    spacing = (mel(scale.high_hz) - mel(scale.low_hz)) / 129  # 128 triangles over 130 equally spaced edges
    expected = (mel(700.0) - mel(scale.low_hz)) / spacing - 1
    assert abs(peak - expected) <= 1


def test_a_4khz_recording_fills_every_filter_of_its_own_band_and_half_of_the_default_is_empty():
    wav, rate = read_audio(str(CIRCOR_RECORDING))
    assert rate == 4000
    wav = to_mono_16k(wav, rate)
    floor = math.log(torch.finfo(torch.float32).eps)
    default = FbankFrontEnd(500).raw(wav).mean(0)
    narrow = FbankFrontEnd(500, mel=MelScale(20.0, 2000.0, 1024)).raw(wav).mean(0)
    assert int((default < floor + 1).sum()) >= 50  # nothing above 2 kHz
    assert int((narrow < floor + 1).sum()) == 0


def test_another_scale_at_512_points_is_kaldis_own_fbank_with_that_range():
    """The scale's filters are kaldi's for its range: kaldi's code, given the range, computes the same numbers
    (it fixes the FFT at 512 points, so only a 512-point scale can be checked against it)."""
    torch.manual_seed(3)
    wav = torch.randn(16000) * 0.05
    reference = kaldi.fbank(wav.unsqueeze(0), htk_compat=True, sample_frequency=16000, use_energy=False,
                            window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10,
                            low_freq=300.0, high_freq=6000.0)
    ours = FbankFrontEnd(target_length=reference.shape[0], mel=MelScale(300.0, 6000.0, 512)).raw(wav)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(FbankFrontEnd(target_length=reference.shape[0]).raw(wav), reference, atol=1e-2)


def test_the_cpu_and_batched_paths_agree_on_another_scale():
    torch.manual_seed(2)
    front = FbankFrontEnd(target_length=150, mel=MelScale(20.0, 2000.0, 2048))
    wavs = [torch.randn(n) * 0.05 for n in (16000, 9000)]
    single = torch.stack([front(w, train=False) for w in wavs])
    padded = torch.zeros(2, 16000)
    padded[1, :9000] = wavs[1]
    padded[0] = wavs[0]
    torch.testing.assert_close(front.batch(padded, torch.tensor([16000, 9000]), train=False), single)


@pytest.mark.parametrize("args, message", [
    ((20.0, 2000.0, 512), "21 of the 128 mel filters fall between FFT bins.*fft_size=1024"),
    ((0.0, 9000.0), "mel_high_hz <= 8000"),
    ((500.0, 400.0), "mel_low_hz < mel_high_hz"),
    ((20.0, 8000.0, 1000), "fft_size=1000: a power of two >= 512"),
    ((20.0, 8000.0, 256), "fft_size=256"),
    (("low", 8000.0), "mel_low_hz='low': a frequency in Hz"),
])
def test_a_mel_scale_that_cannot_work_is_refused_in_one_line(args, message):
    with pytest.raises(ValueError, match=message):
        MelScale(*args)


def test_the_default_scale_is_kaldis_and_a_config_number_is_one_scale():
    assert MelScale().is_kaldi and MelScale(20, 8000, 512).is_kaldi
    assert MelScale(20, 2000, 2048) == MelScale(20.0, 2000.0, 2048) and not MelScale(20, 2000, 2048).is_kaldi


def test_a_rate_off_the_50_hz_grid_resamples_as_its_nearest_point_on_it():
    """22051 Hz would build torchaudio's exact 22051:16000 filter (about 30 s and 12 GB); 22050 Hz is 441:320."""
    assert [resampling_rate(r) for r in (16000, 44100, 8000, 4000, 22050, 8001, 22051, 44124, 7)] == [
        16000, 44100, 8000, 4000, 22050, 8000, 22050, 44100, 50]
    wav = torch.randn(22051)
    torch.testing.assert_close(to_mono_16k(wav, 22051), to_mono_16k(wav, 22050))


def test_frame_arithmetic():
    assert frames_for_samples(samples_for_frames(1024)) == 1024
    assert kaldi_fbank(torch.randn(samples_for_frames(1024))).shape == (1024, 128)
    assert frames_for_samples(399) == 0


def test_specaugment_only_when_training_and_within_width():
    torch.manual_seed(2)
    front = FbankFrontEnd(target_length=300, norm_mean=0.0, norm_std=0.5, freqm=20, timem=40)
    fbank = torch.full((8, 300, 128), 3.0)
    assert torch.equal(front.finish(fbank, train=False), fbank)
    masked = front.finish(fbank, train=True)
    freq_masked = (masked == 0).all(dim=1).sum(dim=1)  # masked bins are zero across all frames
    time_masked = (masked == 0).all(dim=2).sum(dim=1)
    assert (freq_masked < 20).all() and (time_masked < 40).all()
    assert (freq_masked + time_masked > 0).any()
    assert not torch.equal(masked[0], masked[1]) or not torch.equal(masked[2], masked[3])  # per-item masks


def test_noise_and_roll():
    torch.manual_seed(3)
    front = FbankFrontEnd(target_length=50, norm_mean=0.0, norm_std=0.5, noise=True)
    ramp = torch.arange(50.0)[None, :, None].expand(4, 50, 128)
    out = front.finish(ramp, train=True)
    shifts = [(torch.argmin(row[:, 0]).item()) for row in out]
    for row, shift in zip(out, shifts):
        noise = row - torch.roll(ramp[0], shift, dims=0)
        assert (noise >= 0).all() and (noise < 0.1).all()
    assert torch.equal(front.finish(ramp, train=False), ramp)


def test_mixup_of_waveforms_fits_length_and_recentres():
    first, second = torch.ones(100), torch.full((60,), 3.0)
    mixed = mix_waveforms(first, second, 0.25)
    expected = torch.cat([torch.full((60,), 0.25 + 0.75 * 3), torch.full((40,), 0.25)])
    torch.testing.assert_close(mixed, expected - expected.mean())


@pytest.mark.parametrize("rate", [4000, 16000, 44100])
def test_to_mono_16k_downmixes_resamples_and_removes_mean(rate):
    stereo = torch.stack([torch.ones(rate), torch.full((rate,), 3.0)]) + torch.randn(2, rate) * 0.1
    wav = to_mono_16k(stereo, rate)
    assert wav.dim() == 1 and abs(wav.numel() - 16000) <= 1
    assert abs(wav.mean().item()) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_fbank_on_cuda_matches_kaldi_on_cpu():
    torch.manual_seed(4)
    lengths = torch.tensor([16000 * 10, 16000 * 4 + 5, 401])
    wavs = torch.zeros(3, int(lengths.max()))
    for row, n in enumerate(lengths.tolist()):
        wav = torch.randn(n) * 0.1
        wavs[row, :n] = wav - wav.mean()
    front = FbankFrontEnd(target_length=1024)
    on_gpu = front.batch(wavs.cuda(), lengths.cuda(), train=False).cpu()
    reference = torch.stack([front(wavs[row, :n], train=False) for row, n in enumerate(lengths.tolist())])
    torch.testing.assert_close(on_gpu, reference, atol=2e-4, rtol=1e-4)
