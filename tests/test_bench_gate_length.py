"""bench/gate_length.py on circor-mini's full-length recordings: scores from each recording's first part
against the whole, the decisions the length changes, and its refusals."""
import math
import subprocess
import sys
from pathlib import Path

import torch

from circor_fixtures import CIRCOR_MINI
from ssamba.data.quality import PATIENT_FEATURES
from ssamba.metrics.gate import QualityGate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from gate_length import measure, report  # noqa: E402


def crest_gate(threshold: float) -> QualityGate:
    """A gate whose score is the patient's largest crest factor (peak-based, so it moves with length)."""
    weight = [1.0 if name == "max_crest" else 0.0 for name in PATIENT_FEATURES]
    n = len(PATIENT_FEATURES)
    return QualityGate(PATIENT_FEATURES, (0.0,) * n, (1.0,) * n, tuple(weight), 0.0, threshold, "a test")


def test_the_first_part_against_the_whole_and_the_decisions_it_changes():
    patients, skipped = measure(str(CIRCOR_MINI), 5.0)
    assert len(patients) == 6 and not skipped and sum(len(p["lengths"]) for p in patients) == 27
    crest = PATIENT_FEATURES.index("max_crest")
    moves = [float(p["full"][crest] - p["cut"][crest]) for p in patients]
    assert max(abs(m) for m in moves) > 0.05  # recordings are 6-32 s: 5 s sees less of them
    # a threshold between one patient's two scores flips its decision, and any other's whose scores straddle it
    i = max(range(6), key=lambda k: abs(moves[k]))
    middle = (float(patients[i]["cut"][crest]) + float(patients[i]["full"][crest])) / 2
    others = [float(p[part][crest]) for k, p in enumerate(patients) if k != i for part in ("cut", "full")]
    flips = sum(min(float(p["cut"][crest]), float(p["full"][crest])) < middle
                < max(float(p["cut"][crest]), float(p["full"][crest])) for p in patients)
    text = report(crest_gate(middle), patients, 5.0, "circor-mini", reference_scores=others + [middle + 0.01])
    assert f"**Decisions changed by the length: {flips} of 6 patients.**" in text and flips >= 1
    assert f"| {patients[i]['id']} |" in text and "| max_crest | +1.000 |" in text.split("Statistics by")[1]
    near = sum(abs(s - middle) < max(abs(m) for m in moves) for s in others + [middle + 0.01])
    assert f"{near / (len(others) + 1):.1%} of them score closer" in text


def test_a_first_part_longer_than_every_recording_is_the_whole():
    patients, _ = measure(str(CIRCOR_MINI), 1000.0)
    assert all(torch.equal(p["cut"], p["full"]) for p in patients)
    text = report(crest_gate(math.inf), patients, 1000.0, "circor-mini")
    assert "0 of 6 patients" in text and "mean +0.000, mean size 0.000, largest 0.000" in text


def test_bad_input_is_one_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "bench/gate_length.py", *args, "--out", str(tmp_path / "r.md")],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)

    not_a_gate = tmp_path / "gate.json"
    not_a_gate.write_text('{"format": 99}')
    result = run("--gate", str(not_a_gate), "--data", str(CIRCOR_MINI))
    assert result.returncode == 2 and "not a quality gate" in result.stderr and len(result.stderr.splitlines()) == 1
    crest_gate(1.0).save(tmp_path / "ok.json")
    result = run("--gate", str(tmp_path / "ok.json"), "--data", str(tmp_path))
    assert result.returncode == 2 and "training_data.csv" in result.stderr and len(result.stderr.splitlines()) == 1
    result = run("--gate", str(tmp_path / "ok.json"), "--data", str(CIRCOR_MINI), "--seconds", "0")
    assert result.returncode == 2 and "--seconds must be positive" in result.stderr
    result = run("--gate", str(tmp_path / "ok.json"), "--data", str(CIRCOR_MINI), "--seconds", "5")
    assert result.returncode == 0 and (tmp_path / "r.md").read_text().startswith("## Quality gate: first 5 s")
