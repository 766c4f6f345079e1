"""CirCor DigiScope heart sounds (PhysioNet Challenge 2022 training set layout).

``root/training_data.csv`` lists patients; ``root/training_data/<PID>.txt`` holds, per patient, the
recording lines (``<LOC> <PID>_<LOC>[_n].hea <...>.wav <...>.tsv``) and ``#Key: value`` fields
(Murmur, Murmur locations, Outcome, ...). Recordings are ``.wav`` or ``.flac`` (4 kHz, resampled to
16 kHz by the front end); ``.hea``/``.tsv`` files are not needed and never parsed.

Training items are crops (default 5 s every 2.5 s) carrying their patient's (or recording's)
label; evaluation items are all non-overlapping segments of each recording (or of its first
``eval_max_seconds``), so a metric can average logits per recording and aggregate recordings per
patient. Class order follows the Challenge: murmur Present=0, Unknown=1, Absent=2; outcome
Abnormal=0, Normal=1. The murmur-timing task has the heart-murmur fork's seven classes, in its order
(``TIMING_CLASSES``): a Present patient's class is its ``Systolic murmur timing``, or ``present``
when it has none (diastolic-only murmurs).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field, replace

import torch

from ssamba.constants import MURMUR_CLASSES, NO_OUTCOME, OUTCOME_CLASSES
from ssamba.data.audio import BadAudio, audio_duration
from ssamba.data.base import AudioDataModule, Item
from ssamba.errors import ConfigError, MissingFileError

log = logging.getLogger(__name__)

TIMING_CLASSES = [
    "absent",
    "unknown",
    "present-early-systolic",
    "present-mid-systolic",
    "present-late-systolic",
    "present-holosystolic",
    "present",
]
SYSTOLIC_TIMINGS = {  # "Systolic murmur timing" value -> class of a Present patient
    "Early-systolic": "present-early-systolic",
    "Mid-systolic": "present-mid-systolic",
    "Late-systolic": "present-late-systolic",
    "Holosystolic": "present-holosystolic",
}
TASKS = {"murmur": MURMUR_CLASSES, "murmur_timing": TIMING_CLASSES, "outcome": OUTCOME_CLASSES}
SPLIT_KINDS = ("holdout", "kfold")  # data.split: seeded fractions of patients, or one fold of a k-fold partition
UNLABELED_SPLIT = "unlabeled"  # train patients data.label_fraction leaves out: no split reads them


@dataclass
class Recording:
    id: str  # file stem, e.g. 49748_AV_1
    location: str
    path: str


@dataclass
class Patient:
    id: str
    murmur: str
    outcome: str | None
    murmur_locations: set[str]
    recordings: list[Recording] = field(default_factory=list)
    systolic_timing: str | None = None  # "Systolic murmur timing", e.g. Holosystolic
    additional_id: str | None = None  # "Additional ID": the same child's id in the other screening campaign


def timing_class(patient: Patient) -> str:
    """The patient's class among ``TIMING_CLASSES`` (from ``Murmur`` and ``Systolic murmur timing``)."""
    if patient.murmur != "Present":
        return patient.murmur.lower()
    if patient.systolic_timing is None:
        return "present"
    if patient.systolic_timing not in SYSTOLIC_TIMINGS:
        raise ValueError(f"patient {patient.id}: Systolic murmur timing must be one of {sorted(SYSTOLIC_TIMINGS)} "
                         f"or nan, got {patient.systolic_timing!r}")
    return SYSTOLIC_TIMINGS[patient.systolic_timing]


def _audio_path(folder: str, stem: str) -> str:
    """The recording's file whatever its container: listed as .wav, often shipped as .flac."""
    for ext in (".wav", ".flac"):
        if os.path.exists(os.path.join(folder, stem + ext)):
            return os.path.join(folder, stem + ext)
    return os.path.join(folder, stem + ".wav")  # reported as missing by the setup check


def read_patient_file(path: str) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """``<PID>.txt`` -> ([(location, recording stem)], {key: value}) from its ``#Key: value`` lines."""
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise ValueError(f"{path}: empty patient file")
    try:
        count = int(lines[0].split()[1])
    except (IndexError, ValueError) as error:
        raise ValueError(f"{path}: first line must be '<patient> <number of recordings> <rate>'") from error
    recordings = []
    for line in lines[1 : 1 + count]:
        parts = line.split()
        wav = next((p for p in parts[1:] if p.endswith((".wav", ".flac"))), None)
        if wav is None:
            raise ValueError(f"{path}: recording line without an audio file: {line!r}")
        recordings.append((parts[0], os.path.splitext(wav)[0]))
    fields = {}
    for line in lines[1 + count :]:
        if line.startswith("#") and ":" in line:
            key, value = line[1:].split(":", 1)
            fields[key.strip()] = value.strip()
    return recordings, fields


def _clean(value: str | None) -> str | None:
    return None if value is None or value.strip().lower() in ("", "nan", "none") else value.strip()


def read_patients(root: str) -> list[Patient]:
    """All patients of a CirCor-layout folder, in ``training_data.csv`` order."""
    table = os.path.join(root, "training_data.csv")
    folder = os.path.join(root, "training_data")
    if not os.path.isfile(table) or not os.path.isdir(folder):
        raise MissingFileError(f"data.root={root!r} must hold training_data.csv and training_data/")
    with open(table, newline="") as f:
        reader = csv.DictReader(f)
        if "Patient ID" not in (reader.fieldnames or []):
            raise ConfigError(f"{table}: no 'Patient ID' column (CirCor's training_data.csv has one)")
        rows = list(reader)
    repeated = sorted(pid for pid, n in Counter(row["Patient ID"].strip() for row in rows).items() if n > 1)
    if repeated:  # each row would add the patient's recordings again and take another place in the split
        raise ValueError(f"{table}: patient(s) listed more than once: {', '.join(repeated[:5])}")
    patients = []
    for row in rows:
        pid = row["Patient ID"].strip()
        txt = os.path.join(folder, f"{pid}.txt")
        if os.path.isfile(txt):
            listed, fields = read_patient_file(txt)
        else:  # fall back to the csv row and the files on disk
            locations = row.get("Recording locations:", "").split("+")
            listed, fields = _recordings_on_disk(folder, pid, locations), row
        murmur = _clean(fields.get("Murmur")) or _clean(row.get("Murmur"))
        if murmur not in MURMUR_CLASSES:
            raise ValueError(f"patient {pid}: Murmur must be one of {MURMUR_CLASSES}, got {murmur!r}")
        outcome = _clean(fields.get("Outcome")) or _clean(row.get("Outcome"))
        if outcome is not None and outcome not in OUTCOME_CLASSES:
            raise ValueError(f"patient {pid}: Outcome must be one of {OUTCOME_CLASSES}, got {outcome!r}")
        where = _clean(fields.get("Murmur locations")) or _clean(row.get("Murmur locations")) or ""
        timing = _clean(fields.get("Systolic murmur timing")) or _clean(row.get("Systolic murmur timing"))
        recordings = [Recording(stem, loc, _audio_path(folder, stem)) for loc, stem in listed]
        locations = set(filter(None, where.split("+")))
        linked = _clean(fields.get("Additional ID")) or _clean(row.get("Additional ID"))
        patients.append(Patient(pid, murmur, outcome, locations, recordings, timing, linked))
    return patients


def patient_groups(patients: list[Patient]) -> list[list[Patient]]:
    """Patients linked through ``Additional ID`` (a child screened in both CirCor campaigns has an id in each) as
    one group, the others alone; groups in the order of their first member. Splits deal whole groups, so no
    child is trained on under one id and tested under the other."""
    index = {patient.id: i for i, patient in enumerate(patients)}
    parent = list(range(len(patients)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, patient in enumerate(patients):
        j = index.get(patient.additional_id) if patient.additional_id else None
        if j is not None:
            parent[root(i)] = root(j)
    groups: dict[int, list[Patient]] = {}
    for i, patient in enumerate(patients):
        groups.setdefault(root(i), []).append(patient)
    return list(groups.values())


def _recordings_on_disk(folder: str, pid: str, locations: list[str]) -> list[tuple[str, str]]:
    stems = sorted(
        os.path.splitext(name)[0]
        for name in os.listdir(folder)
        if name.startswith(f"{pid}_") and name.endswith((".wav", ".flac"))
    )
    return [(stem.split("_")[1], stem) for stem in stems] if stems else [(loc, f"{pid}_{loc}") for loc in locations]


def _shuffled_strata(patients: list[Patient], seed: int) -> list[tuple[str, list[list[str]]]]:
    """(stratum, groups of patient ids) by stratum name, each shuffled by ``seed``; strata are (murmur, outcome),
    a group's those of its first member (:func:`patient_groups`; without links every group is one patient)."""
    generator = torch.Generator().manual_seed(seed)
    strata: dict[str, list[list[str]]] = {}
    for group in patient_groups(patients):
        strata.setdefault(f"{group[0].murmur}/{group[0].outcome}", []).append([p.id for p in group])
    return [(key, [strata[key][i] for i in torch.randperm(len(strata[key]), generator=generator).tolist()])
            for key in sorted(strata)]


def stratified_split(patients: list[Patient], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Patient id -> split, stratified on (murmur, outcome) and reproducible from ``seed``.

    Patients (linked ones as a group) are ordered by stratum (shuffled within), then every split takes
    an evenly spaced selection of that order: each stratum is represented in proportion, and totals are
    exact in groups (in patients where no patients are linked).
    """
    order = [group for _, groups in _shuffled_strata(patients, seed) for group in groups]
    total, assignment = len(order), {}
    for split in ("test", "val"):
        chosen = _evenly_spaced(len(order), min(round(fractions.get(split, 0.0) * total), len(order)))
        assignment.update({pid: split for k in chosen for pid in order[k]})
        order = [group for k, group in enumerate(order) if k not in chosen]
    assignment.update({pid: "train" for group in order for pid in group})
    return assignment


def _evenly_spaced(length: int, count: int) -> set[int]:
    """``count`` positions spread evenly over ``range(length)``."""
    return {k for k in range(length) if (k + 1) * count // length > k * count // length}


def stratified_subset(patients: list[Patient], fraction: float, seed: int) -> set[str]:
    """The ids of ``fraction`` of ``patients`` (at least one), stratified on (murmur, outcome) as
    :func:`stratified_split` is, reproducible from ``seed``."""
    order = [group for _, groups in _shuffled_strata(patients, seed) for group in groups]
    return {pid for k in _evenly_spaced(len(order), max(1, round(fraction * len(order)))) for pid in order[k]}


def stratified_folds(patients: list[Patient], folds: int, seed: int) -> dict[str, int]:
    """Patient id -> fold in ``0..folds-1``, stratified on (murmur, outcome), reproducible from ``seed``.

    The stratum-ordered, shuffled patients (linked ones as a group) are dealt to the folds in turn, so
    every fold holds each stratum's share to within one group and fold sizes differ by at most one
    (without linked patients). A stratum with fewer groups than folds would leave a fold without it,
    and is refused.
    """
    strata = _shuffled_strata(patients, seed)
    small = [(key, len(groups)) for key, groups in strata if len(groups) < folds]
    if small:
        key, count = min(small, key=lambda pair: pair[1])
        raise ConfigError(f"data.folds={folds}: stratum {key} (murmur/outcome) has only {count} patient(s), "
                          f"fewer than the folds; use data.folds<={count}")
    order = [group for _, groups in strata for group in groups]
    return {pid: k % folds for k, group in enumerate(order) for pid in group}


def kfold_split(patients: list[Patient], folds: int, fold: int, val_fraction: float, seed: int) -> dict[str, str]:
    """Patient id -> split for cross-validation fold ``fold``: its patients are ``test``; ``val_fraction``
    of the other folds' patients (stratified, same ``seed``) are ``val``, the rest ``train``."""
    fold_of = stratified_folds(patients, folds, seed)
    rest = [p for p in patients if fold_of[p.id] != fold]
    assignment = stratified_split(rest, {"val": val_fraction}, seed)
    assignment.update({pid: "test" for pid, k in fold_of.items() if k == fold})
    return assignment


def read_split_file(path: str) -> dict[str, str]:
    """A csv with columns ``patient_id,split`` (split in train/val/test)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"patient_id", "split"} <= set(rows[0]):
        raise ValueError(f"{path}: expected columns patient_id,split")
    bad = {row["split"] for row in rows} - {"train", "val", "test"}
    if bad:
        raise ValueError(f"{path}: unknown split name(s) {sorted(bad)}; allowed: train, val, test")
    repeated = sorted(pid for pid, n in Counter(row["patient_id"].strip() for row in rows).items() if n > 1)
    if repeated:
        raise ValueError(f"{path}: patient(s) listed more than once: {', '.join(repeated[:5])}")
    return {row["patient_id"].strip(): row["split"].strip() for row in rows}


def is_length(seconds: object) -> bool:
    """A length of recording to score: a positive number of seconds (not a bool, not NaN)."""
    return not isinstance(seconds, bool) and isinstance(seconds, (int, float)) and seconds > 0


def check_eval_max_seconds(seconds: float | None) -> None:
    if seconds is not None and not is_length(seconds):
        raise ConfigError(f"data.eval_max_seconds must be a positive number of seconds or null, got {seconds!r}")


def windows(duration: float, length: float, hop: float, min_last: float) -> list[tuple[float, float]]:
    """(start, seconds) windows of ``length`` every ``hop`` s over a recording of ``duration`` s.

    The part after the last full window becomes one more window when it lasts >= ``min_last`` s;
    a recording shorter than ``length`` gives one window (zero-padded by the front end).
    """
    if duration <= length:
        return [(0.0, duration)]
    out = []
    count = math.floor((duration - length) / hop + 1e-6) + 1
    out = [(round(k * hop, 6), length) for k in range(count)]
    end = out[-1][0] + length
    if duration - end >= min_last:
        out.append((end, round(duration - end, 6)))
    return out


class CirCorDataModule(AudioDataModule):
    """``data=circor``: murmur, murmur-timing or outcome classification on CirCor DigiScope recordings.

    The split depends on patients' murmur and outcome only, never on ``task``: murmur and
    murmur-timing runs with the same split options score the same patients. ``split=kfold`` makes
    fold ``fold`` of a stratified ``folds``-fold partition the test patients and carves val from the
    other folds, so pretraining and finetuning on a fold never read its test patients.
    """

    multilabel = False
    meta_keys = ("patient", "recording", "outcome")

    def __init__(
        self,
        root: str,
        task: str = "murmur",
        label_level: str = "patient",
        split_file: str | None = None,
        split: str = "holdout",
        folds: int = 5,
        fold: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.25,
        split_seed: int = 0,
        group_linked_patients: bool = True,
        label_fraction: float = 1.0,
        crop_seconds: float = 5.0,
        crop_hop_seconds: float = 2.5,
        segment_seconds: float = 5.0,
        min_segment_seconds: float = 2.5,
        eval_max_seconds: float | None = None,
        aggregation: str = "hierarchical",
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_eval_max_seconds(eval_max_seconds)
        if task not in TASKS:
            raise ConfigError(f"data.task must be one of {sorted(TASKS)}, got {task!r}")
        if label_level not in ("patient", "recording"):
            raise ConfigError(f"data.label_level must be 'patient' or 'recording', got {label_level!r}")
        if split not in SPLIT_KINDS:
            raise ConfigError(f"data.split must be one of {list(SPLIT_KINDS)}, got {split!r}")
        if split == "kfold":
            if split_file is not None:
                raise ConfigError("data.split_file and data.split=kfold exclude each other: set data.split_file=null")
            if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
                raise ConfigError(f"data.folds must be an integer >= 2, got {folds!r}")
            if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds:
                raise ConfigError(f"data.fold must be an integer in 0..{folds - 1} (data.folds={folds}), got {fold!r}")
        if isinstance(label_fraction, bool) or not isinstance(label_fraction, (int, float)) or not (
                0 < label_fraction <= 1):
            raise ConfigError(f"data.label_fraction must be in (0, 1], got {label_fraction!r}")
        if split_file is not None and not os.path.isfile(split_file):
            raise MissingFileError(f"data.split_file: no such file: {split_file}")
        self.root = os.path.expanduser(root)
        self.aggregation = aggregation
        self.task = task
        self.label_level = label_level
        self.label_names = list(TASKS[task])
        self.split_file = split_file
        self.split = split
        self.folds, self.fold = folds, fold
        self.fractions = {"val": val_fraction, "test": test_fraction}
        self.split_seed = split_seed
        self.group_linked_patients = group_linked_patients
        self.label_fraction = label_fraction
        self.crop = (crop_seconds, crop_hop_seconds)
        self.segment = (segment_seconds, min_segment_seconds)
        self.eval_max_seconds = eval_max_seconds
        self._patients: list[Patient] | None = None
        self._assignment: dict[str, str] | None = None
        self.setup_skipped: dict[str, Counter] = {}
        if task == "murmur_timing":  # an unknown timing value fails here, not mid-training
            for patient in self.patients:
                timing_class(patient)
        if split == "kfold":  # too few patients of a stratum for the folds fails here, not at setup
            self._assignment = self._assign()

    def set_eval_max_seconds(self, seconds: float | None) -> None:
        """Score val and test on each recording's first ``seconds`` (None: all of it) from now on: their
        items are rebuilt at next use. How a score moves with the length scored is what shows whether a
        model depends on the length its data was cut to."""
        check_eval_max_seconds(seconds)
        self.eval_max_seconds = seconds
        for split in ("val", "test"):
            self.datasets.pop(split, None)

    @property
    def patients(self) -> list[Patient]:
        if self._patients is None:
            self._patients = read_patients(self.root)
        return self._patients

    @property
    def assignment(self) -> dict[str, str]:
        """Patient id -> train / val / test (or :data:`UNLABELED_SPLIT`, with ``label_fraction`` below 1)."""
        if self._assignment is None:
            self._assignment = self._assign()
        return self._assignment

    def _assign(self) -> dict[str, str]:
        patients = self.patients if self.group_linked_patients else [
            replace(p, additional_id=None) for p in self.patients]
        if self.split_file:
            assignment = read_split_file(self.split_file)
            unknown = [p.id for p in self.patients if p.id not in assignment]
            if unknown:
                raise ValueError(f"{self.split_file}: no split for patient(s) {unknown[:5]}")
        elif self.split == "kfold":
            assignment = kfold_split(patients, self.folds, self.fold, self.fractions["val"], self.split_seed)
        else:
            assignment = stratified_split(patients, self.fractions, self.split_seed)
        apart = [group for group in patient_groups(self.patients) if len({assignment[p.id] for p in group}) > 1]
        if apart:
            log.warning("%d child(ren) screened in both campaigns (linked by Additional ID) have ids in different "
                        "splits, e.g. %s: one id may train and the other be scored%s", len(apart),
                        " / ".join(p.id for p in apart[0]),
                        "" if self.split_file else " (data.group_linked_patients=true keeps them together)")
        if self.label_fraction < 1:  # after the check: keeping or dropping a training id's labels leaks nothing
            train = [p for p in patients if assignment[p.id] == "train"]
            kept = stratified_subset(train, self.label_fraction, self.split_seed)
            assignment.update({p.id: UNLABELED_SPLIT for p in train if p.id not in kept})
        return assignment

    @property
    def splits(self) -> tuple[str, ...]:
        present = {self.assignment[p.id] for p in self.patients}
        return tuple(s for s in ("train", "val", "test") if s in present)

    def split_patients(self, split: str) -> list[Patient]:
        return [p for p in self.patients if self.assignment[p.id] == split]

    @property
    def split_description(self) -> str:
        if self.split_file:
            text = f"patient-wise, data.split_file={self.split_file}"
        elif self.split == "kfold":
            text = (f"patient-wise stratified {self.folds}-fold cross-validation, fold {self.fold} as test, "
                    f"val {self.fractions['val']:g} of the other folds' patients, seed {self.split_seed}")
        else:
            text = (f"patient-wise, stratified on murmur and outcome, val {self.fractions['val']:g} / "
                    f"test {self.fractions['test']:g} of patients, seed {self.split_seed}")
        if self.label_fraction < 1:
            left = sum(split == UNLABELED_SPLIT for split in self.assignment.values())
            text += f"; training on {self.label_fraction:g} of the train patients ({left} left out)"
        return text

    def patient_targets(self, split: str) -> dict[str, dict[str, int]]:
        """Patient id -> {"murmur": index, "outcome": index or -1} (plus "murmur_timing": index for
        that task), for patient-level scoring."""
        targets = {}
        for p in self.split_patients(split):
            targets[p.id] = {"murmur": MURMUR_CLASSES.index(p.murmur), "outcome": self._outcome_index(p)}
            if self.task == "murmur_timing":
                targets[p.id]["murmur_timing"] = TIMING_CLASSES.index(timing_class(p))
        return targets

    def patient_label(self, patient: Patient) -> str | None:
        """The patient's class name in this task (None: no outcome for data.task=outcome)."""
        if self.task == "outcome":
            return patient.outcome
        return timing_class(patient) if self.task == "murmur_timing" else patient.murmur

    @staticmethod
    def _outcome_index(patient: Patient) -> int:
        return OUTCOME_CLASSES.index(patient.outcome) if patient.outcome else NO_OUTCOME

    def extra_metrics(self) -> dict:
        """Patient-level scores for the finetuning task (segments -> recordings -> patients), as configs the
        task factory instantiates, so that the data does not import the metrics: the Challenge's for murmur
        and outcome; for murmur timing, the label-set scores and the Challenge's murmur scores of the timing
        classes collapsed to Present (``murmur_<score>``)."""
        return {"challenge": {"_target_": "ssamba.metrics.patient_metrics", "class_names": list(self.label_names),
                              "rule": self.aggregation}}

    def recording_label(self, patient: Patient, recording: Recording) -> int:
        """The label of one recording's items: the patient's, except with ``label_level=recording``,
        where a Present patient's recording at a location not in "Murmur locations" is Absent."""
        name = self.patient_label(patient)
        if name is None:
            raise ConfigError(f"patient {patient.id} has no Outcome, needed by data.task=outcome")
        if self.task != "outcome" and self.label_level == "recording" and patient.murmur == "Present":
            if recording.location not in patient.murmur_locations:
                name = "Absent" if self.task == "murmur" else "absent"
        return self.label_names.index(name)

    def build_items(self, split: str) -> list[Item]:
        if split == "train":
            log.info("circor %s, split %s", self.root, self.split_description)  # scores depend on it
            length, hop, min_last = *self.crop, math.inf
        else:
            length, min_last = self.segment
            hop = length
        skipped = self.setup_skipped.setdefault(split, Counter())
        skipped.clear()
        items = []
        for patient in self.split_patients(split):
            if self.task != "outcome" and self.label_level == "recording" and patient.murmur == "Present" and not any(
                r.location in patient.murmur_locations for r in patient.recordings
            ):
                log.warning("patient %s: Present, but no recording at its Murmur locations %s: with "
                            "data.label_level=recording every item is absent", patient.id,
                            sorted(patient.murmur_locations))
            for recording in patient.recordings:
                if not os.path.exists(recording.path):  # left to the setup check: one clear error
                    items.append(Item(recording.id, recording.path))
                    continue
                try:
                    duration = audio_duration(recording.path)
                except BadAudio as error:
                    if self.on_error == "raise":
                        raise
                    skipped[error.reason] += 1
                    log.warning("skipping %s", error)
                    continue
                if split != "train" and self.eval_max_seconds is not None:
                    duration = min(duration, self.eval_max_seconds)
                label = self.recording_label(patient, recording)
                meta = {
                    "patient": patient.id,
                    "recording": recording.id,
                    "outcome": torch.tensor(self._outcome_index(patient)),
                }
                for start, seconds in windows(duration, length, hop, min_last):
                    items.append(Item(f"{recording.id}@{start:g}", recording.path, (label,), start, seconds, meta))
        return items
