"""A CirCor tree with several patients per murmur/outcome stratum, for cross-validation tests.

circor-mini has six patients, two of them alone in their stratum; k-fold needs at least k per
stratum. ``cloned_circor`` writes ``copies`` copies of each circor-mini patient under new ids (copy c
of patient 2530 is ``<c>2530``), their audio as symbolic links to the fixture's files.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

CIRCOR_MINI = Path(__file__).resolve().parent / "data" / "circor-mini"


def clone_id(pid: str, copy: int) -> str:
    return pid if copy == 0 else f"{copy}{pid}"


def cloned_circor(dst: Path, copies: int) -> Path:
    """``dst`` as a CirCor folder of ``copies`` x 6 patients (``copies`` per circor-mini patient)."""
    source = CIRCOR_MINI / "training_data"
    (dst / "training_data").mkdir(parents=True)
    with open(CIRCOR_MINI / "training_data.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    out_rows = []
    for copy in range(copies):
        for row in rows:
            pid, new = row["Patient ID"], clone_id(row["Patient ID"], copy)
            out_rows.append({**row, "Patient ID": new})
            text = (source / f"{pid}.txt").read_text()
            (dst / "training_data" / f"{new}.txt").write_text(text.replace(pid, new))
            for audio in sorted(source.glob(f"{pid}_*.wav")):
                os.symlink(audio, dst / "training_data" / audio.name.replace(pid, new, 1))
    with open(dst / "training_data.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(out_rows)
    return dst
