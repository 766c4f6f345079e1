"""Does a quality gate fitted on 10 s cuts decide the same on full-length recordings?

Gates (``ssamba.metrics.gate``) are fitted on circor-dev, which holds each recording's first 10 s; users
gate full-length recordings. This measures, on a CirCor folder of full-length recordings, each patient's
gate score from its recordings' first ``--seconds`` and from the whole recordings, whether the decision
(score above the threshold) changes, and which statistics move the score, in the gate's own standardised
units. ``--reference`` (the folder the gate was fitted on) adds the spread of the score over its patients,
the scale against which a drift is small or not.

    python bench/circor_results.py gate --results docs/results/circor-cv --data <circor-dev folder> --out gate.json
    python bench/gate_length.py --gate gate.json --data <CirCor folder, full length> --reference <circor-dev folder> \\
        --out docs/results/gate-length.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ssamba.data.circor import read_patients  # noqa: E402
from ssamba.data.quality import (  # noqa: E402
    PATIENT_FEATURES,
    patient_quality,
    patients_quality,
    readable_recordings,
    recording_quality,
)
from ssamba.metrics.gate import QualityGate  # noqa: E402


def measure(data: str, seconds: float) -> tuple[list[dict], list[str]]:
    """Per patient with a readable recording: its id, its recordings' lengths in seconds, and its
    :data:`PATIENT_FEATURES` from the first ``seconds`` of each recording and from the whole ones."""
    patients, skipped = [], []
    for patient in read_patients(data):
        cut, full, lengths = [], [], []
        for mono, rate in readable_recordings(patient, skipped):
            lengths.append(mono.numel() / rate)
            cut.append(recording_quality(mono[: round(seconds * rate)], rate))
            full.append(recording_quality(mono, rate))
        if full:
            patients.append({"id": patient.id, "lengths": lengths, "cut": patient_quality(cut),
                             "full": patient_quality(full)})
    return patients, skipped


def near_threshold(scores: list[float], threshold: float, moved: torch.Tensor) -> float:
    """The share of ``scores`` within the largest of ``moved`` of ``threshold``: patients whose decision a
    change of score that large could flip."""
    return sum(abs(s - threshold) < float(moved.max()) for s in scores) / len(scores)


def report(gate: QualityGate, patients: list[dict], seconds: float, data_name: str,
           reference_scores: list[float] | None = None, skipped: list[str] = ()) -> str:
    """The markdown report: decisions and scores per patient, then the statistics that move the score."""
    if not patients:
        raise ValueError("no patient with a readable recording in --data")
    cut = gate.score(torch.stack([p["cut"] for p in patients]))
    full = gate.score(torch.stack([p["full"] for p in patients]))
    scale = torch.tensor(gate.scale, dtype=torch.float64)
    weight = torch.tensor(gate.weight, dtype=torch.float64)
    drift = torch.stack([(p["full"] - p["cut"]) / scale for p in patients])  # [patients, features], standardised
    changed = int(((cut > gate.threshold) != (full > gate.threshold)).sum())
    lengths = [length for p in patients for length in p["lengths"]]
    moved = (full - cut).abs()
    near = ""
    if reference_scores and len(reference_scores) > 1:
        near = (f"; over the reference's {len(reference_scores)} patients the score's standard deviation is "
                f"{statistics.stdev(reference_scores):.3f}, and "
                f"{near_threshold(reference_scores, gate.threshold, moved):.1%} of them score closer to the "
                "threshold than the largest change")
    lines = [
        f"## Quality gate: first {seconds:g} s of each recording against the whole recording",
        "",
        f"Written {datetime.date.today().isoformat()} by `bench/gate_length.py`. Data: {data_name}, "
        f"{len(patients)} patients, {len(lengths)} recordings of {min(lengths):.1f}-{max(lengths):.1f} s"
        + (f", {len(skipped)} recordings unreadable (first: {skipped[0]})" if skipped else "") + ". "
        f"Gate: {gate.fitted_on or 'fitted elsewhere'}; threshold {gate.threshold:.3f} on its score (the "
        "regression's logit of Unknown); a patient not predicted Present becomes Unknown above it.",
        "",
        f"**Decisions changed by the length: {changed} of {len(patients)} patients.** Score, whole minus first "
        f"{seconds:g} s: mean {statistics.fmean((full - cut).tolist()):+.3f}, mean size {float(moved.mean()):.3f}, "
        f"largest {float(moved.max()):.3f}{near}.",
        "",
        f"| patient | recordings | seconds in all | score, first {seconds:g} s | score, whole | above threshold, first "
        f"{seconds:g} s | above threshold, whole |",
        "|---|---|---|---|---|---|---|",
    ]
    for p, a, b in zip(patients, cut.tolist(), full.tolist()):
        lines.append(f"| {p['id']} | {len(p['lengths'])} | {sum(p['lengths']):.1f} | {a:.3f} | {b:.3f} | "
                     f"{'yes' if a > gate.threshold else 'no'} | {'yes' if b > gate.threshold else 'no'} |")
    contribution = drift * weight
    order = contribution.abs().mean(dim=0).argsort(descending=True).tolist()
    lines += [
        "",
        "Statistics by how far they move the score (whole minus first part, in the gate's standardised units: "
        "one unit is the statistic's standard deviation over the patients it was fitted on):",
        "",
        "| statistic | gate weight | change, mean | change, largest | score change, mean | score change, largest |",
        "|---|---|---|---|---|---|",
    ]
    for i in order[:10]:
        column, moved_score = drift[:, i], contribution[:, i]
        lines.append(f"| {gate.features[i]} | {gate.weight[i]:+.3f} | {float(column.mean()):+.3f} | "
                     f"{float(column.abs().max()):.3f} | {float(moved_score.mean()):+.3f} | "
                     f"{float(moved_score.abs().max()):.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gate", required=True, help="a gate's JSON (bench/circor_results.py gate)")
    parser.add_argument("--data", required=True, help="a CirCor folder of full-length recordings")
    parser.add_argument("--seconds", type=float, default=10.0, help="the first part's length (circor-dev: 10)")
    parser.add_argument("--reference", help="the CirCor folder the gate was fitted on: adds its score's spread")
    parser.add_argument("--out", required=True, help="markdown report")
    args = parser.parse_args(argv)
    try:
        if args.seconds <= 0:
            raise ValueError(f"--seconds must be positive, got {args.seconds}")
        gate = QualityGate.load(args.gate, PATIENT_FEATURES)
        patients, skipped = measure(args.data, args.seconds)
        reference = None
        if args.reference:
            table, _ = patients_quality(read_patients(args.reference))
            reference = gate.score(torch.stack(list(table.values()))).tolist() if table else None
        text = report(gate, patients, args.seconds, Path(args.data).name, reference, skipped)
    except (ValueError, FileNotFoundError) as error:  # bad input: one line, not a traceback
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"gate by length: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
