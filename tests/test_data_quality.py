"""ssamba.data.quality: each signal-quality statistic responds to what it is named for."""

import math

import pytest
import torch

from ssamba.data.quality import PATIENT_FEATURES, RECORDING_FEATURES, patient_quality, recording_quality

RATE = 4000


def features(wave):
    return dict(zip(RECORDING_FEATURES, recording_quality(wave, RATE).tolist()))


def test_band_shares_centroid_and_level_follow_the_signal():
    t = torch.arange(4 * RATE, dtype=torch.float64) / RATE
    low, heart, high = (torch.sin(2 * math.pi * f * t) for f in (10.0, 60.0, 800.0))
    assert features(low)["share_below_25hz"] > 0.99
    assert features(heart)["share_25_150hz"] > 0.99 and abs(features(heart)["centroid_khz"] - 0.06) < 1e-3
    assert features(high)["share_above_400hz"] > 0.99
    assert abs(features(heart)["log_rms"] - math.log(math.sqrt(0.5))) < 1e-6
    assert abs(features(0.01 * heart)["log_rms"] - features(heart)["log_rms"] - math.log(0.01)) < 1e-6


def test_flatness_crest_clipping_and_level_spread_tell_noise_clicks_and_clipping_apart():
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(4 * RATE, generator=generator, dtype=torch.float64)
    t = torch.arange(4 * RATE, dtype=torch.float64) / RATE
    tone = torch.sin(2 * math.pi * 60.0 * t)
    assert features(noise)["flatness"] > 0.4 and features(tone)["flatness"] < 0.01
    clicks = 0.01 * noise.clone()
    clicks[::RATE] = 5.0
    assert features(clicks)["crest"] > 10 * features(noise)["crest"]
    clipped = (3 * tone).clamp(-1, 1)
    assert features(clipped)["clipped_percent"] > 5 * features(tone)["clipped_percent"]  # 79% vs 9% of a sine
    bursts = noise * (t.floor() % 2)  # one second on, one off
    assert features(bursts)["frame_level_spread"] > 5 * features(noise)["frame_level_spread"]


def test_patient_rows_are_mean_min_max_and_count_and_bad_input_is_one_line():
    rows = [torch.arange(len(RECORDING_FEATURES), dtype=torch.float64) + k for k in (0.0, 2.0, 4.0)]
    patient = patient_quality(rows)
    assert patient.shape == (len(PATIENT_FEATURES),) and PATIENT_FEATURES[-1] == "recordings"
    n = len(RECORDING_FEATURES)
    assert torch.equal(patient[:n], rows[1]) and torch.equal(patient[n:2 * n], rows[0])
    assert torch.equal(patient[2 * n:3 * n], rows[2]) and patient[-1] == 3
    with pytest.raises(ValueError, match="mono recording"):
        recording_quality(torch.zeros(2, 100), RATE)
    with pytest.raises(ValueError, match="at least one recording"):
        patient_quality([])


def test_long_recordings_are_measured_in_10_s_windows_like_the_cuts_the_gate_was_fitted_on():
    generator = torch.Generator().manual_seed(1)
    t = torch.arange(10 * RATE, dtype=torch.float64) / RATE
    window = torch.sin(2 * math.pi * 60.0 * t) + 0.1 * torch.randn(10 * RATE, generator=generator, dtype=torch.float64)
    window[RATE] = 8.0  # one knock: its crest factor would grow with a longer recording's RMS average
    one = recording_quality(window, RATE)
    assert torch.allclose(recording_quality(window.repeat(3), RATE), one)  # 30 s: three windows like the first
    tail = torch.zeros(2 * RATE, dtype=torch.float64)
    assert torch.allclose(recording_quality(torch.cat([window, window, tail]), RATE), one)  # a 2 s tail is dropped
    with_half = torch.cat([window, window[: 5 * RATE]])  # a 5 s tail (half a window) counts as a window
    assert torch.allclose(recording_quality(with_half, RATE), (one + recording_quality(window[: 5 * RATE], RATE)) / 2)


def test_recordings_training_would_skip_are_skipped_and_named_not_a_crash_or_nan(tmp_path):
    """Empty, non-finite or sub-frame recordings: counted by reason; the patient keeps its usable ones."""
    from types import SimpleNamespace

    import numpy as np
    import soundfile as sf

    from ssamba.data.quality import patients_quality

    waves = {"good": np.random.default_rng(0).uniform(-0.5, 0.5, 2 * RATE), "empty": np.zeros(0),
             "nan": np.full(RATE, np.nan), "short": np.zeros(RATE // 20)}
    recordings = []
    for name, wave in waves.items():
        sf.write(tmp_path / f"{name}.wav", wave.astype("float32"), RATE, subtype="FLOAT")
        recordings.append(SimpleNamespace(id=name, path=str(tmp_path / f"{name}.wav")))
    table, skipped = patients_quality([SimpleNamespace(id="1", recordings=recordings)])
    assert sorted(skipped) == ["empty: empty", "non_finite: nan", "too_short: short"]
    assert torch.isfinite(table["1"]).all() and table["1"][-1] == 1
