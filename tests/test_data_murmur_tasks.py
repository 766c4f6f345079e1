"""The heart-murmur fork's label schemes: CirCor murmur timing and the earbud tree as the fork ships it.

The earbud tree is generated here in the fork's exact layout: <root>/<variant>/{train,eval}/*.flac,
a.json manifests (a bare list with absolute paths of another machine), class_labels_indices.csv.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hydra import compose, initialize_config_dir

from ssamba.data import CirCorDataModule, EarbudDataModule
from ssamba.data.__main__ import main as summary_main
from ssamba.data.circor import TIMING_CLASSES, timing_class
from ssamba.data.earbud import subject_of
from ssamba.data.manifest import read_manifest
from ssamba.utils.config import ConfigError, validate_config

ROOT = Path(__file__).resolve().parents[1]
CIRCOR_MINI = ROOT / "tests" / "data" / "circor-mini"
FAST = {"target_length": 64, "batch_size": 4, "num_workers": 0}
# a tiny encoder on the CPU
CPU_RUN = ["trainer=cpu", "logger=csv", "+model.depth=2", "+model.embed_dim=16", "model.backend=torch",
           "data.num_workers=0", "data.batch_size=4", "task.fstride=16", "task.tstride=16", "task.warmup_steps=1",
           "trainer.enable_progress_bar=false", "callbacks.model_summary=null"]
ONE_STEP = ["trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.num_sanity_val_steps=0",
            "trainer.log_every_n_steps=1"]  # unlike fast_dev_run, keeps the csv logger and every evaluation item
FORK_LABELS = ["absent", "unknown", "present-early-systolic", "present-holosystolic", "present-late-systolic",
               "present-mid-systolic"]
AUTHORS_DIR = "/files1/earbud_classification/audio_mamba/data/earbud"  # absolute paths that do not exist here
FORK_FILES = {  # folder -> (subject/session, label); Umich09 is on both sides, as in the fork's split
    "train": [("Umich09", "present-holosystolic"), ("Umich11", "absent"), ("Umich12", "unknown"),
              ("Umich13", "present-early-systolic"), ("Umich14", "absent"), ("Umich15", "present-holosystolic")],
    "eval": [("Umich09b", "present-holosystolic"), ("Umich16", "absent"), ("Umich17", "present-mid-systolic")],
}


def run_train(output_dir, *overrides):
    spec = importlib.util.spec_from_file_location("train_entry", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, *CPU_RUN, f"paths.output_dir={output_dir}"])
    return module.train(cfg)


def circor(**kwargs):
    return CirCorDataModule(**{"root": str(CIRCOR_MINI), "val_fraction": 0.2, "test_fraction": 0.2, **FAST, **kwargs})


# --- CirCor murmur timing -------------------------------------------------------------------------
def test_timing_classes_from_murmur_and_systolic_timing():
    dm = circor(task="murmur_timing")
    assert dm.label_names == TIMING_CLASSES and dm.num_classes == 7
    assert {p.id: timing_class(p) for p in dm.patients} == {
        "2530": "absent", "9979": "present-holosystolic", "9983": "unknown", "49748": "present-holosystolic",
        "50216": "absent", "50743": "absent"}
    patient = next(p for p in dm.patients if p.id == "9979")
    for value, expected in (("Early-systolic", "present-early-systolic"), ("Mid-systolic", "present-mid-systolic"),
                            ("Late-systolic", "present-late-systolic"), (None, "present")):
        patient.systolic_timing = value
        assert timing_class(patient) == expected
    patient.systolic_timing = "Early-diastolic"
    with pytest.raises(ValueError, match="patient 9979: Systolic murmur timing"):
        timing_class(patient)
    # the split does not depend on the task: both schemes score the same patients
    assert dm.assignment == circor().assignment


def test_timing_labels_at_patient_and_recording_level():
    patient_level = circor(task="murmur_timing", val_fraction=0.0, test_fraction=0.0)
    recording_level = circor(task="murmur_timing", label_level="recording", val_fraction=0.0, test_fraction=0.0)
    patient = next(p for p in patient_level.patients if p.id == "49748")  # holosystolic at AV+PV+TV, not MV
    holo, absent = TIMING_CLASSES.index("present-holosystolic"), TIMING_CLASSES.index("absent")
    assert {r.location: patient_level.recording_label(patient, r) for r in patient.recordings} == {
        "AV": holo, "PV": holo, "TV": holo, "MV": holo}
    assert {r.location: recording_level.recording_label(patient, r) for r in patient.recordings} == {
        "AV": holo, "PV": holo, "TV": holo, "MV": absent}
    unknown = next(p for p in patient_level.patients if p.id == "9983")
    assert {recording_level.recording_label(unknown, r) for r in unknown.recordings} == {1}
    targets = patient_level.patient_targets("train")
    assert targets["49748"] == {"murmur": 0, "outcome": 0, "murmur_timing": holo}


def test_summary_counts_patients_in_the_timing_classes(capsys):
    summary_main(["data=circor", "data.task=murmur_timing", f"data.root={CIRCOR_MINI}"])
    out = json.loads(capsys.readouterr().out)
    assert out["total"]["patient_labels"] == {"absent": 3, "present-holosystolic": 2, "unknown": 1}
    assert set(out["total"]["labels"]) <= set(TIMING_CLASSES)


def test_timing_finetuning_end_to_end_on_cpu(tmp_path):
    recipe = ["experiment=circor_timing", f"data.root={CIRCOR_MINI}", "data.val_fraction=0.2", "data.test_fraction=0.2"]
    score = run_train(tmp_path / "fast", *recipe, "trainer.fast_dev_run=true")
    assert score is not None and 0.0 <= score <= 1.0  # val/uar over the patients' timing classes
    run_train(tmp_path / "logged", *recipe, *ONE_STEP)
    header = (tmp_path / "logged" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("val/uar", "val/recall_present-holosystolic", "val/murmur_weighted_accuracy", "test/murmur_cost"):
        assert key in header


# --- earbud, the fork's layout ----------------------------------------------------------------------
def fork_tree(root: Path, variants=("filt", "lp", "wavs"), bare=True) -> Path:
    rng = np.random.default_rng(0)
    for variant in variants:
        (root / variant).mkdir(parents=True)
        (root / variant / "class_labels_indices.csv").write_text(
            "index,mid,display_name\n" + "".join(f"{i},{n},{n}\n" for i, n in enumerate(FORK_LABELS)))
        for folder, files in FORK_FILES.items():
            (root / variant / folder).mkdir()
            entries = []
            for k, (subject, label) in enumerate(files):
                name = f"{subject}_eb2_t0{k}_s02_v02_{variant}.flac"
                sf.write(root / variant / folder / name, rng.standard_normal(1600).astype("float32") * 0.1, 16000)
                entries.append({"wav": f"{AUTHORS_DIR}/{variant}/{folder}/{name}", "labels": label})
            manifest = entries if bare else {"data": entries}
            (root / variant / folder / "a.json").write_text(json.dumps(manifest))
    return root


def test_a_small_fraction_still_holds_out_one_and_leaves_one():
    """Rounding 5% of 11 to 0 left val (or the subject split's eval) silently empty."""
    from ssamba.data.earbud import spread_pick

    keys = [f"k{i}" for i in range(11)]
    strata = {k: (i % 3,) for i, k in enumerate(keys)}
    assert len(spread_pick(keys, strata, 0.05, seed=0)) == 1 and len(spread_pick(keys, strata, 0.99, seed=0)) == 10
    assert spread_pick(keys, strata, 0.0, seed=0) == set() and len(spread_pick(keys, strata, 0.2, seed=0)) == 2


def test_subject_from_file_names():
    assert subject_of("Umich09b_eb2_t03_s02_v02_filt") == "Umich09" == subject_of("Umich09_eb1_t01_s01_v01_lp")
    assert subject_of("Umich10_eb2_t03_s02_v02_filt") != subject_of("Umich09_eb2_t03_s02_v02_filt")
    assert subject_of("anon") == "anon"


def test_fork_layout_read_directly(tmp_path):
    root = fork_tree(tmp_path / "earbud")
    dm = EarbudDataModule(root=str(root), variant="filt", **FAST)
    assert dm.label_names == FORK_LABELS and dm.split == "fork"
    train = dm.build_items("train")
    assert all(Path(i.path).is_file() and Path(i.path).parent == root / "filt" / "train" for i in train)
    assert [dm.label_names[i.labels[0]] for i in train] == [label for _, label in FORK_FILES["train"]]
    assert train[0].meta == {"patient": "Umich09", "recording": "Umich09_eb2_t00_s02_v02_filt"}
    assert [i.id for i in dm.build_items("test")] == [i.id for i in dm.build_items("val")]
    # wav and wavs name the same variant; AST-style {"data": [...]} manifests read the same
    assert EarbudDataModule(root=str(root), variant="wav", **FAST).variant_dir == root / "wavs"
    other = fork_tree(tmp_path / "old", variants=("wav",), bare=False)
    items = EarbudDataModule(root=str(other), variant="wavs", **FAST).build_items("train")
    assert len(items) == 6 and items[0].path.startswith(str(other / "wav" / "train"))


def test_audio_a_fork_manifest_does_not_list_is_reported_once(tmp_path, caplog):
    root = fork_tree(tmp_path / "earbud", variants=("filt",))
    sf.write(root / "filt" / "train" / "Umich99_eb2_t00_s02_v02_filt.flac", np.zeros(1600, dtype="float32"), 16000)
    dm = EarbudDataModule(root=str(root), variant="filt", **FAST)
    assert len(dm.build_items("train")) == 6 and len(dm.build_items("train")) == 6
    assert caplog.text.count("1 audio file(s) in") == 1
    assert f"{root / 'filt' / 'train'} are not in its a.json and are not used, e.g. Umich99" in caplog.text


def test_fork_manifest_labels_by_mid_or_display_name_and_bad_labels(tmp_path):
    root = fork_tree(tmp_path / "earbud", variants=("lp",))
    (root / "lp" / "class_labels_indices.csv").write_text(
        "index,mid,display_name\n" + "".join(f"{i},m{i},{n}\n" for i, n in enumerate(FORK_LABELS)))
    manifest = root / "lp" / "eval" / "a.json"
    entries = json.loads(manifest.read_text())
    entries[0]["labels"] = "m3"  # by mid: present-holosystolic
    manifest.write_text(json.dumps(entries))
    dm = EarbudDataModule(root=str(root), variant="lp", **FAST)
    assert [dm.label_names[i.labels[0]] for i in dm.build_items("test")] == [
        "present-holosystolic", "absent", "present-mid-systolic"]
    entries[1]["labels"] = "murmur"
    manifest.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=r"a\.json: label\(s\) not in .*\['murmur'\]"):
        dm.build_items("test")
    manifest.write_text(json.dumps({"items": entries}))
    with pytest.raises(ValueError, match="expected a list"):
        dm.build_items("test")
    with pytest.raises(ConfigError, match=r"data.variant='filt' is not on disk.*\['lp'\]"):
        EarbudDataModule(root=str(root), variant="filt", **FAST)


def test_subject_disjoint_split_and_the_report_says_which(tmp_path, capsys):
    root = fork_tree(tmp_path / "earbud", variants=("filt",))
    fork = EarbudDataModule(root=str(root), variant="filt", **FAST)
    subjects = {s: {i.meta["patient"] for i in fork.build_items(s)} for s in ("train", "test")}
    assert subjects["train"] & subjects["test"] == {"Umich09"}  # the fork's split shares a subject
    disjoint = EarbudDataModule(root=str(root), variant="filt", split="subject", eval_fraction=0.3, **FAST)
    parts = {s: {i.meta["patient"] for i in disjoint.build_items(s)} for s in ("train", "val", "test")}
    assert not parts["train"] & parts["test"] and parts["val"] == parts["test"]
    assert parts["train"] | parts["test"] == subjects["train"] | subjects["test"] and len(parts["test"]) == 2
    assert sum(len(disjoint.build_items(s)) for s in ("train", "test")) == 9  # every recording once
    with_val = EarbudDataModule(root=str(root), variant="filt", split="subject", eval_fraction=0.3,
                                val_fraction=0.2, **FAST)
    parts = {s: {i.meta["patient"] for i in with_val.build_items(s)} for s in ("train", "val", "test")}
    assert len(parts["val"]) == 1 and not (parts["val"] & parts["train"]) and not (parts["val"] & parts["test"])
    for split, shared in (("fork", 1), ("subject", 0)):
        summary_main(["data=earbud", f"data.root={root}", f"data.split={split}"])
        out = json.loads(capsys.readouterr().out)
        assert out["split"].startswith(f"{split}: ") and out["patients_shared_with_train"] == shared
        # the totals count each recording and subject once, though val and test read the same ones here
        assert out["total"]["items"] == 9 and out["total"]["patients"] == 8, out["total"]
        assert sum(out["total"]["labels"].values()) == 9
    with pytest.raises(ConfigError, match="data.split='random'"):
        EarbudDataModule(root=str(root), variant="filt", split="random", **FAST)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ConfigError, match=rf"data.val_fraction={bad}: must be in \[0, 1\)"):
            EarbudDataModule(root=str(root), variant="filt", val_fraction=bad, **FAST)


def test_earbud_recipes_require_a_pretrained_checkpoint():
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=earbud_filt", "data.root=/earbud"])
    with pytest.raises(ConfigError, match=r"^task.pretrained: this recipe needs it set"):
        validate_config(cfg)


def test_training_on_the_fork_tree_scores_subjects(tmp_path):
    root = fork_tree(tmp_path / "earbud", variants=("filt",))
    data = ["task=finetune", "data=earbud", f"data.root={root}", "data.target_length=64", "data.split=subject",
            "data.aggregation=hierarchical", "task.monitor=val/uar"]
    score = run_train(tmp_path / "fast", *data, "trainer.fast_dev_run=true")
    assert score is not None and 0.0 <= score <= 1.0
    run_train(tmp_path / "run", *data, *ONE_STEP)
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("val/uar", "val/patients", "val/recall_present-holosystolic", "test/murmur_weighted_accuracy"):
        assert key in header


def test_one_json_reader_for_ast_and_fork_manifests(tmp_path):
    entries = [{"wav": "a.wav", "labels": "m1,m2"}, {"wav": "b.wav", "labels": ""}]
    index = {"m1": 0, "m2": 1}
    for name, content in (("ast.json", {"data": entries}), ("fork.json", entries)):
        (tmp_path / name).write_text(json.dumps(content))
        items = read_manifest(str(tmp_path / name), None, index)
        assert [(Path(i.path).name, i.labels) for i in items] == [("a.wav", (0, 1)), ("b.wav", ())]
    (tmp_path / "bad.json").write_text(json.dumps([{"wav": "a.wav"}, {"file": "b.wav"}]))
    with pytest.raises(ValueError, match=r"bad\.json: entry 1 has no 'wav' key"):
        read_manifest(str(tmp_path / "bad.json"), None, index)
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match=r"broken\.json: not JSON"):
        read_manifest(str(tmp_path / "broken.json"), None, index)
