"""Datamodules on small fixtures: generated AST manifests, LibriSpeech and earbud trees, the real
CirCor mini set; bad-input handling; the summary command."""

import functools
import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch

from ssamba.data import (
    CirCorDataModule,
    EarbudDataModule,
    LibriSpeechDataModule,
    ManifestDataModule,
    MixtureDataModule,
    SkippedAudioReport,
)
from ssamba.data.__main__ import main as summary_main
from ssamba.data.circor import stratified_split, windows
from ssamba.errors import ConfigError

CIRCOR_MINI = Path(__file__).parent / "data" / "circor-mini"
FAST = {"batch_size": 4, "target_length": 64, "num_workers": 0, "pin_memory": False}
LABEL_CSV = "index,mid,display_name\n0,/m/a,Alpha\n1,/m/b,Beta\n2,/m/c,Gamma\n"


def write_wav(path, seconds=0.7, rate=16000, channels=1, subtype="PCM_16", seed=0):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).uniform(-0.5, 0.5, (int(seconds * rate), channels))
    sf.write(path, data, rate, subtype=subtype, format="FLAC" if path.suffix == ".flac" else "WAV")
    return path


@pytest.fixture
def audioset(tmp_path):
    """A manifest with relative, absolute and nested paths, plus a label csv."""
    root = tmp_path / "as"
    for name in ("a.wav", "sub/b.wav", "c.wav"):
        write_wav(root / name)
    (root / "class_labels_indices.csv").write_text(LABEL_CSV)
    entries = [
        {"wav": "a.wav", "labels": "/m/a,/m/c"},
        {"wav": "sub/b.wav", "labels": "/m/b"},
        {"wav": str(root / "c.wav"), "labels": "/m/c"},
    ]
    (root / "train.json").write_text(json.dumps({"data": entries}))
    (root / "eval.json").write_text(json.dumps({"data": entries[:1]}))
    return root


def manifest_module(root, **kwargs):
    args = dict(train_manifest=str(root / "train.json"), val_manifest=str(root / "eval.json"),
                label_csv=str(root / "class_labels_indices.csv"), root=str(root), **FAST)
    args.update(kwargs)
    return ManifestDataModule(**args)


def test_single_label_data_refuses_items_without_exactly_one_label(audioset):
    """An unlabelled item would train as an all-zero target (no loss) and score as class 0: one line at setup."""
    dm = manifest_module(audioset, multilabel=False)
    with pytest.raises(ValueError, match=r"train.json.*1 of 3 train items have no label or several, in single-label "
                                         r"data \(e.g. a.wav \(2\)\)"):
        dm.setup("fit")
    entries = json.loads((audioset / "train.json").read_text())["data"]
    entries[0]["labels"] = "/m/a"
    (audioset / "train.json").write_text(json.dumps({"data": [*entries, {"wav": "c.wav", "labels": ""}]}))
    with pytest.raises(ValueError, match=r"1 of 4 train items .*\(e.g. c.wav \(0\)\)"):
        manifest_module(audioset, multilabel=False).setup("fit")
    entries_ok = {"data": entries}
    (audioset / "train.json").write_text(json.dumps(entries_ok))
    manifest_module(audioset, multilabel=False, val_manifest=str(audioset / "train.json")).setup("fit")


def test_manifest_multi_hot_labels_and_relative_paths(audioset, tmp_path):
    dm = manifest_module(audioset)
    dm.setup("fit")
    batch = next(iter(dm.dataloader("train", shuffle=False)))
    assert dm.label_names == ["Alpha", "Beta", "Gamma"] and dm.multilabel and dm.num_classes == 3
    assert batch["fbank"].shape == (3, 64, 128)
    assert batch["target"].tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 1]]
    assert batch["id"][:2] == ["a.wav", "sub/b.wav"]
    moved = tmp_path / "moved"  # moving the data only needs a new root
    shutil.move(str(audioset), moved)
    dm = manifest_module(moved, train_manifest=str(moved / "eval.json"))  # relative entries only
    dm.setup("fit")
    assert dm.datasets["train"].items[0].path == str(moved / "a.wav")


def test_manifest_errors_name_the_problem(audioset):
    (audioset / "bad.json").write_text(json.dumps({"data": [{"wav": "a.wav", "labels": "/m/zzz"}]}))
    with pytest.raises(ValueError, match="/m/zzz"):
        manifest_module(audioset, train_manifest=str(audioset / "bad.json")).setup("fit")
    entries = [{"wav": f"gone{i}.wav", "labels": "/m/a"} for i in range(8)]
    (audioset / "missing.json").write_text(json.dumps({"data": entries}))
    with pytest.raises(FileNotFoundError, match=r"(?s)8 file\(s\) listed in .*missing.json.*gone0.wav.*and 3 more"):
        manifest_module(audioset, train_manifest=str(audioset / "missing.json")).setup("fit")
    with pytest.raises(FileNotFoundError, match="data.val_manifest"):
        manifest_module(audioset, val_manifest=str(audioset / "nope.json"))


def test_unlabeled_manifest_gives_one_zero_class(audioset):
    dm = manifest_module(audioset, label_csv=None)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert dm.num_classes == 1 and not dm.multilabel
    assert batch["target"].shape == (3, 1) and (batch["target"] == 0).all()


def test_bad_audio_is_decoded_when_possible_else_skipped_and_counted(tmp_path):
    root = tmp_path / "bad"
    write_wav(root / "good.wav")
    write_wav(root / "stereo_48k_24bit.wav", rate=48000, channels=2, subtype="PCM_24")
    write_wav(root / "low_rate_8bit.wav", rate=4000, subtype="PCM_U8")
    write_wav(root / "flac_named.wav", seed=1)  # written as WAV then renamed below
    shutil.move(str(write_wav(root / "real.flac")), root / "flac_as_wav.wav")
    write_wav(root / "tiny.wav", seconds=0.01)
    sf.write(root / "empty.wav", np.zeros((0, 1)), 16000)
    (root / "text.wav").write_text("not audio at all")
    nan = np.zeros((8000, 1))
    nan[100] = np.nan
    sf.write(root / "nan.wav", nan, 16000, subtype="FLOAT")
    names = ["good", "stereo_48k_24bit", "low_rate_8bit", "flac_named", "flac_as_wav", "tiny", "empty", "text", "nan"]
    (root / "m.json").write_text(json.dumps({"data": [{"wav": f"{n}.wav", "labels": ""} for n in names]}))
    dm = ManifestDataModule(train_manifest=str(root / "m.json"), val_manifest=str(root / "m.json"),
                            root=str(root), **{**FAST, "batch_size": 9})
    dm.setup("fit")
    val = dm.on_before_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert val["id"] == [f"{n}.wav" for n in names[:5]]  # evaluation drops the unusable ones
    assert torch.isfinite(val["fbank"]).all()
    assert dm.pop_skip_report("other") == {"missing": 0, "unreadable": 1, "empty": 1, "too_short": 1, "non_finite": 1}
    train = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert len(train["id"]) == 9 and set(train["id"]) <= {f"{n}.wav" for n in names[:5]}  # replaced
    assert sum(dm.pop_skip_report("other").values()) >= 4
    strict = ManifestDataModule(train_manifest=str(root / "m.json"), root=str(root), on_error="raise", **FAST)
    strict.setup("fit")
    for index in range(5):
        strict.datasets["train"][index]
    with pytest.raises(Exception, match=r"too_short: .*tiny\.wav"):
        strict.datasets["train"][5]


def test_all_bad_eval_batch_is_empty_not_a_crash(tmp_path):
    (tmp_path / "x.wav").write_text("junk")
    (tmp_path / "m.json").write_text(json.dumps({"data": [{"wav": "x.wav"}]}))
    dm = ManifestDataModule(val_manifest=str(tmp_path / "m.json"), root=str(tmp_path), **FAST)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["fbank"].shape == (0, 64, 128) and batch["id"] == []


class _Probe(L.LightningModule):
    """Smallest module that consumes data batches, to exercise the hooks inside a Trainer."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, _):
        return (batch["fbank"].mean() * self.weight).sum() + self.weight.sum()

    def validation_step(self, batch, _):
        assert "skipped" not in batch

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_skip_counts_reported_at_epoch_end_in_a_trainer(audioset, caplog):
    (audioset / "broken.wav").write_text("junk")
    (audioset / "t.json").write_text(json.dumps({"data": [{"wav": "a.wav"}, {"wav": "broken.wav"}]}))
    dm = ManifestDataModule(train_manifest=str(audioset / "t.json"), val_manifest=str(audioset / "t.json"),
                            root=str(audioset), features_on_device=True, **FAST)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    with caplog.at_level(logging.WARNING, logger="ssamba.data.base"):
        trainer.fit(_Probe(), datamodule=dm)
    assert any(isinstance(c, SkippedAudioReport) for c in trainer.callbacks)
    assert trainer.callback_metrics["data/skipped_unreadable_val"] == 1
    assert trainer.callback_metrics["data/skipped_unreadable_train"] >= 1
    assert "broken.wav" in caplog.text


def test_librispeech_tree(tmp_path):
    for subset, n in (("train-clean-100", 3), ("dev-clean", 2)):
        for i in range(n):
            write_wav(tmp_path / "LibriSpeech" / subset / "19" / "198" / f"19-198-{i:04d}.flac", seconds=0.5)
    dm = LibriSpeechDataModule(str(tmp_path), train_subsets=["train-clean-100"], val_subsets=["dev-clean"],
                               test_subsets=[], **FAST)
    assert dm.splits == ("train", "val")
    dm.setup("fit")
    batch = next(iter(dm.dataloader("train", shuffle=False)))
    assert batch["id"] == ["19-198-0000", "19-198-0001", "19-198-0002"]
    assert batch["target"].shape == (3, 1) and dm.num_classes == 1
    with pytest.raises(FileNotFoundError, match="train-other-500"):
        LibriSpeechDataModule(str(tmp_path), train_subsets=["train-other-500"], **FAST).setup("fit")


def mixture_sources(audioset, tmp_path) -> dict:
    """The AudioSet fixture's three clips and two generated LibriSpeech ones, as a mixture's sources."""
    for i in range(2):
        write_wav(tmp_path / "LibriSpeech" / "train-clean-100" / "1" / "2" / f"1-2-{i}.flac", seconds=0.3)
    sources = {
        "audioset": manifest_module(audioset, label_csv=None),
        "librispeech": LibriSpeechDataModule(str(tmp_path), train_subsets=["train-clean-100"], val_subsets=[],
                                             test_subsets=[]),
    }
    return sources


def test_mixture_weights_draw_sources_in_proportion(audioset, tmp_path):
    sources = mixture_sources(audioset, tmp_path)
    dm = MixtureDataModule(sources, weights={"audioset": 1.0, "librispeech": 3.0}, samples_per_epoch=400, **FAST)
    dm.setup("fit")
    assert dm.splits == ("train", "val") and dm.num_classes == 1
    assert len(dm.datasets["train"]) == 5
    loader = dm.train_dataloader()
    drawn = Counter(dm.datasets["train"].items[i].id.split("/")[0] for i in loader.sampler)
    assert sum(drawn.values()) == 400 and 0.65 < drawn["librispeech"] / 400 < 0.85
    batch = next(iter(loader))
    assert batch["fbank"].shape == (4, 64, 128) and (batch["target"] == 0).all()
    with pytest.raises(ValueError, match=r"a non-negative weight for each of \['audioset', 'librispeech'\]"):
        MixtureDataModule(sources, weights={"audioset": 1.0}, **FAST)  # a forgotten source would never be drawn


def test_mixture_stand_ins_for_unusable_audio_follow_the_weights(audioset, tmp_path):
    """A source weighted 0 is left out of training, also as the stand-in for an unusable file."""
    sources = mixture_sources(audioset, tmp_path)
    dm = MixtureDataModule(sources, weights={"audioset": 1.0, "librispeech": 0.0}, samples_per_epoch=40, **FAST)
    dm.setup("fit")
    (audioset / "a.wav").write_bytes(b"not audio")
    dm.train_dataloader()
    dataset = dm.datasets["train"]
    bad = next(i for i, item in enumerate(dataset.items) if item.id == "audioset/a.wav")
    torch.manual_seed(0)
    stand_ins = Counter(dataset[bad]["id"].split("/")[0] for _ in range(40))
    assert stand_ins == {"audioset": 40}


@pytest.fixture
def earbud(tmp_path):
    root = tmp_path / "earbud"
    for variant in ("filt", "lp"):
        for split, names in (("train", ["r1", "r2", "r3", "r4"]), ("eval", ["r5", "r6"])):
            for name in names:
                write_wav(root / variant / split / f"{name}.wav", seconds=0.4)
    (root / "class_labels_indices.csv").write_text("index,mid,display_name\n0,normal,Normal\n1,abnormal,Abnormal\n")
    rows = [("r1", "normal"), ("r2", "abnormal"), ("r3", "normal"), ("r4", "abnormal"), ("r5", "Abnormal"),
            ("r6", "normal")]
    (root / "labels.csv").write_text("filename,labels\n" + "".join(f"{n}.wav,{lab}\n" for n, lab in rows))
    return root


def earbud_module(root, **kwargs):
    args = dict(root=str(root), variant="lp", labels=str(root / "labels.csv"),
                label_csv=str(root / "class_labels_indices.csv"), **FAST)
    args.update(kwargs)
    return EarbudDataModule(**args)


def test_earbud_variants_labels_and_splits(earbud):
    dm = earbud_module(earbud)
    dm.setup("fit")
    assert dm.label_names == ["Normal", "Abnormal"]
    assert [i.path.split("/")[-3] for i in dm.datasets["train"].items] == ["lp"] * 4
    val = next(iter(dm.val_dataloader()))
    assert val["id"] == ["r5", "r6"] and val["target"].argmax(1).tolist() == [1, 0]
    held = earbud_module(earbud, val_fraction=0.5)
    train_ids = {i.id for i in held.build_items("train")}
    val_items = held.build_items("val")
    assert len(val_items) == 2 and not train_ids & {i.id for i in val_items}
    assert sorted(i.labels for i in val_items) == [(0,), (1,)]  # stratified
    with pytest.raises(ValueError, match=r"data.variant='wav'.*\['filt', 'lp'\]"):
        earbud_module(earbud, variant="wav")


def test_earbud_json_labels_and_unlabeled_file(earbud):
    entries = [{"wav": f"anything/r{i}.flac", "labels": "normal"} for i in range(1, 7)]
    (earbud / "labels.json").write_text(json.dumps({"data": entries}))
    dm = earbud_module(earbud, labels=str(earbud / "labels.json"))
    assert all(i.labels == (0,) for i in dm.build_items("train"))
    write_wav(earbud / "lp" / "train" / "r9.wav")
    with pytest.raises(ValueError, match="r9.wav"):
        earbud_module(earbud).build_items("train")


def circor(**kwargs):
    args = {"root": str(CIRCOR_MINI), "val_fraction": 0.2, "test_fraction": 0.2, "target_length": 498,
                "batch_size": 64, "num_workers": 0}
    args.update(kwargs)
    return CirCorDataModule(**args)


def test_circor_split_is_patient_disjoint_stratified_and_seeded():
    dm = circor()
    by_split = {s: {p.id for p in dm.split_patients(s)} for s in dm.splits}
    assert sum(map(len, by_split.values())) == 6 and set.union(*by_split.values()) == {p.id for p in dm.patients}
    assert [len(by_split[s]) for s in ("train", "val", "test")] == [4, 1, 1]
    assert stratified_split(dm.patients, dm.fractions, 0) == dm.assignment
    big = [type(dm.patients[0])(str(i), ["Present", "Unknown", "Absent"][i % 3], "Normal", set()) for i in range(300)]
    split = stratified_split(big, {"val": 0.1, "test": 0.2}, seed=3)
    counts = Counter((split[p.id], p.murmur) for p in big)
    assert all(counts["test", m] == 20 and counts["val", m] == 10 for m in ("Present", "Unknown", "Absent"))
    assert split != stratified_split(big, {"val": 0.1, "test": 0.2}, seed=4)


def test_circor_crops_and_segments_counts():
    assert windows(12.0, 5.0, 2.5, float("inf")) == [(0.0, 5.0), (2.5, 5.0), (5.0, 5.0)]
    assert windows(13.0, 5.0, 5.0, 2.5) == [(0.0, 5.0), (5.0, 5.0), (10.0, 3.0)]
    assert windows(12.0, 5.0, 5.0, 2.5) == [(0.0, 5.0), (5.0, 5.0)]
    assert windows(3.0, 5.0, 5.0, 2.5) == [(0.0, 3.0)]
    dm = circor()
    for split, (length, hop) in (("train", (5.0, 2.5)), ("test", (5.0, 5.0))):
        items = dm.build_items(split)
        for patient in dm.split_patients(split):
            for rec in patient.recordings:
                seconds = sf.info(rec.path).duration
                mine = [i for i in items if i.meta["recording"] == rec.id]
                full = int((seconds - length) // hop) + 1
                extra = int(split == "test" and seconds - full * length >= 2.5)
                assert len(mine) == full + extra, (rec.id, seconds)


def test_circor_eval_max_seconds_shortens_val_and_test_recordings_only():
    whole, short = circor(), circor(eval_max_seconds=6.0)
    assert short.build_items("train") == whole.build_items("train")
    for split in ("val", "test"):
        items = short.build_items(split)
        assert items and all(i.start + i.duration <= 6.0 for i in items)
        assert all(i.start == 0.0 and i.duration == 5.0 for i in items)  # 6 s: one segment, the 1 s after it dropped
        assert len(whole.build_items(split)) > len(items)
    short.setup("test")
    assert len(short.datasets["test"]) == len(short.build_items("test"))
    short.set_eval_max_seconds(None)  # scored whole again from the next use
    assert "test" not in short.datasets and len(short.dataloader("test").dataset) == len(whole.build_items("test"))
    for bad in (0, -1.0, float("nan"), "5", True):
        with pytest.raises(ValueError, match="data.eval_max_seconds must be a positive number"):
            circor(eval_max_seconds=bad)


def test_circor_batches_carry_patient_recording_and_labels():
    dm = circor(features_on_device=True)
    dm.setup("test")
    batch = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    assert batch["fbank"].shape[1:] == (498, 128)
    pid = batch["patient"][0]
    assert all(r.startswith(pid + "_") for r in batch["recording"])
    truth = dm.patient_targets("test")[pid]
    assert batch["target"].argmax(1).eq(truth["murmur"]).all()
    assert batch["outcome"].eq(truth["outcome"]).all()
    assert dm.label_names == ["Present", "Unknown", "Absent"]
    metric = hydra.utils.instantiate(dm.extra_metrics()["challenge"])  # what finetuning adds for CirCor
    fields = {k: batch[k] for k in ("patient", "recording", "id", "outcome")}
    metric.update(batch["target"] * 5, batch["target"], **fields)  # perfect logits
    assert metric.compute()["weighted_accuracy"] == 1


def test_circor_recording_level_labels_follow_murmur_locations():
    dm = circor(label_level="recording", val_fraction=0.0, test_fraction=0.0)
    patient = next(p for p in dm.patients if p.id == "49748")  # murmur at AV+PV+TV, not MV
    labels = {r.location: dm.recording_label(patient, r) for r in patient.recordings}
    assert labels == {"AV": 0, "PV": 0, "TV": 0, "MV": 2}
    outcome = circor(task="outcome")
    assert outcome.label_names == ["Abnormal", "Normal"] and outcome.num_classes == 2


def test_circor_split_file(tmp_path):
    (tmp_path / "split.csv").write_text("patient_id,split\n" + "".join(
        f"{pid},{'val' if pid == '9979' else 'train'}\n" for pid in ("2530", "9979", "9983", "49748", "50216", "50743")))
    dm = circor(split_file=str(tmp_path / "split.csv"))
    assert dm.splits == ("train", "val") and [p.id for p in dm.split_patients("val")] == ["9979"]
    with open(tmp_path / "split.csv", "a") as f:
        f.write("9979,train\n")  # a second, conflicting row: refused, not the last one winning
    with pytest.raises(ValueError, match="split.csv: patient.s. listed more than once: 9979"):
        circor(split_file=str(tmp_path / "split.csv")).split_patients("val")


def test_a_patient_listed_twice_in_the_table_is_refused(tmp_path):
    """Each row would add the patient's recordings again and take another place in the stratified split."""
    from ssamba.data.circor import read_patients

    root = tmp_path / "circor"
    shutil.copytree(CIRCOR_MINI, root)
    rows = (root / "training_data.csv").read_text().splitlines()
    (root / "training_data.csv").write_text("\n".join([*rows, rows[1]]) + "\n")
    with pytest.raises(ValueError, match=f"training_data.csv: patient.s. listed more than once: {rows[1].split(',')[0]}"):
        read_patients(str(root))


def test_summary_command_for_circor(capsys):
    summary_main(["data=circor", f"data.root={CIRCOR_MINI}", "data.val_fraction=0.2", "data.test_fraction=0.2"])
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"splits", "total", "split", "patients_shared_with_train"}
    assert set(out["splits"]) == {"train", "val", "test"} and out["patients_shared_with_train"] == 0
    assert out["split"] == "patient-wise, stratified on murmur and outcome, val 0.2 / test 0.2 of patients, seed 0"
    total = out["total"]
    assert total["patients"] == 6 and total["recordings"] == 27
    assert total["patient_labels"] == {"Absent": 3, "Present": 2, "Unknown": 1}
    assert total["items"] == sum(s["items"] for s in out["splits"].values())
    assert total["hours"] == pytest.approx(sum(sf.info(p).duration for p in CIRCOR_MINI.glob("*/*.wav")) / 3600,
                                           abs=1e-3)
    assert sum(total["labels"].values()) == total["items"] and total["skipped"] == {}
    for part in out["splits"].values():
        assert set(part) == {"items", "hours", "labels", "skipped", "patients", "recordings", "patient_labels"}


def test_summary_command_refuses_a_bad_value_in_one_line(tmp_path, capsys):
    for overrides, message in (([f"data.root={tmp_path}"], "must hold training_data.csv and training_data/"),
                               ([f"data.root={CIRCOR_MINI}", "data.label_fraction=2"], "data.label_fraction must be")):
        with pytest.raises(SystemExit) as stop:
            summary_main(["data=circor", *overrides])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith("python -m ssamba.data: config error: ") and message in err
        assert err.count("\n") == 1


def test_summary_command_counts_skipped_files(audioset, capsys):
    (audioset / "broken.wav").write_text("junk")
    (audioset / "t.json").write_text(json.dumps({"data": [{"wav": "a.wav", "labels": "/m/a"},
                                                          {"wav": "broken.wav", "labels": "/m/b"},
                                                          {"wav": "gone.wav", "labels": "/m/b"}]}))
    summary_main(["data=audioset", f"data.root={audioset}", f"data.train_manifest={audioset}/t.json",
                  "data.val_manifest=null"])
    out = json.loads(capsys.readouterr().out)
    assert out["splits"]["train"] == {"items": 1, "hours": round(0.7 / 3600, 4), "labels": {"Alpha": 1},
                                      "skipped": {"missing": 1, "unreadable": 1}}
    assert out["total"]["skipped"] == {"missing": 1, "unreadable": 1}


def test_asli_config_composes_nested_sources(audioset, tmp_path):
    from hydra.utils import instantiate

    from ssamba.data.cli import compose_data_config

    write_wav(tmp_path / "ls" / "LibriSpeech" / "dev-clean" / "1" / "2" / "1-2-0.flac", seconds=0.3)
    write_wav(tmp_path / "ls" / "LibriSpeech" / "train-clean-100" / "1" / "2" / "1-2-1.flac", seconds=0.3)
    (audioset / "unbalanced_train.json").write_text((audioset / "train.json").read_text())  # ssamba.prepare's name
    cfg = compose_data_config(["data=asli", f"data.sources.audioset.root={audioset}",
                               f"data.sources.librispeech.root={tmp_path / 'ls'}",
                               "data.sources.librispeech.train_subsets=[train-clean-100]",
                               "data.num_workers=0", "data.target_length=32", "data.batch_size=8"])
    dm = instantiate(cfg)
    dm.setup("fit")
    batch = next(iter(dm.dataloader("train", shuffle=False)))
    assert batch["id"] == ["audioset/a.wav", "audioset/sub/b.wav", f"audioset/{audioset}/c.wav", "librispeech/1-2-1"]
    assert batch["target"].shape == (4, 1)
    assert len(dm.datasets["val"]) == 2


def test_mixup_mixes_waveforms_and_labels(audioset):
    torch.manual_seed(0)
    dm = manifest_module(audioset, mixup=1.0)
    dm.setup("fit")
    targets = torch.stack([dm.datasets["train"][1]["target"] for _ in range(20)])  # item labelled Beta only
    assert (targets[:, 1] > 0.2).all() and (targets[:, 1] < 1).any()  # lambda ~ Beta(10, 10) around 0.5
    assert not dm.datasets["val"].mixup


def test_stats_utility_on_a_known_signal(tmp_path):
    from ssamba.data.features import kaldi_fbank, to_mono_16k
    from ssamba.data.stats import fbank_stats

    paths = [write_wav(tmp_path / f"{i}.wav", seconds=0.5, seed=i) for i in range(3)]
    (tmp_path / "m.json").write_text(json.dumps({"data": [{"wav": p.name} for p in paths]}))
    dm = ManifestDataModule(train_manifest=str(tmp_path / "m.json"), root=str(tmp_path), target_length=48)
    stats = fbank_stats(dm, items=10)
    values = torch.cat([kaldi_fbank(to_mono_16k(torch.from_numpy(sf.read(p, dtype="float32")[0])[None], 16000))
                        for p in paths])  # 48 frames each: no padding
    assert stats["items"] == 3
    assert stats["norm_mean"] == pytest.approx(values.mean().item(), abs=1e-3)
    assert stats["norm_std"] == pytest.approx(values.std().item(), abs=1e-3)
    assert stats["sample_rates"] == {"16000": 3} and stats["mel_filters_above_nyquist"] == 0


def test_stats_name_the_band_of_audio_recorded_below_16khz(tmp_path):
    from ssamba.data.stats import band_hint, fbank_stats

    paths = [write_wav(tmp_path / f"{i}.wav", seconds=0.5, rate=4000, seed=i) for i in range(2)]
    paths.append(write_wav(tmp_path / "wide.wav", seconds=0.5, rate=8000))
    (tmp_path / "m.json").write_text(json.dumps({"data": [{"wav": p.name} for p in paths]}))
    data = functools.partial(ManifestDataModule, train_manifest=str(tmp_path / "m.json"),
                             root=str(tmp_path), target_length=48)
    stats = fbank_stats(data(), items=10)
    assert stats["sample_rates"] == {"4000": 2, "8000": 1}
    assert stats["mel_filters_above_nyquist"] == 60  # filter centres above 2 kHz on kaldi's scale
    hint = band_hint(data().mel, 4000, 60)
    assert "recorded at 4000 Hz" in hint and "data.mel_high_hz=2000 data.fft_size=1024 puts them all" in hint
    assert fbank_stats(data(mel_high_hz=2000, fft_size=1024), items=10)["mel_filters_above_nyquist"] == 0


def test_a_stats_file_of_another_mel_scale_is_refused(tmp_path):
    """stats.json records the scale its statistics were computed on; normalising another scale's features with
    them would be silently wrong. A file without a scale (written before it could be set) is kaldi's."""
    from ssamba.data.stats import fbank_stats

    path = write_wav(tmp_path / "a.wav", seconds=0.5)
    (tmp_path / "m.json").write_text(json.dumps({"data": [{"wav": path.name}]}))
    data = functools.partial(ManifestDataModule, train_manifest=str(tmp_path / "m.json"), root=str(tmp_path),
                             target_length=48)
    narrow = {"mel_high_hz": 2000, "fft_size": 1024}
    stats = fbank_stats(data(**narrow), items=1)
    assert (stats["mel_low_hz"], stats["mel_high_hz"], stats["fft_size"]) == (20.0, 2000.0, 1024)
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    assert data(stats_file=str(tmp_path / "stats.json"), **narrow).norm_mean == stats["norm_mean"]
    with pytest.raises(ConfigError, match="another mel scale .*mel_high_hz=2000.*data.mel_high_hz=8000"):
        data(stats_file=str(tmp_path / "stats.json"))
    (tmp_path / "old.json").write_text(json.dumps({"norm_mean": -5.0, "norm_std": 4.0}))
    assert data(stats_file=str(tmp_path / "old.json")).norm_mean == -5.0
    with pytest.raises(ConfigError, match="another mel scale"):
        data(stats_file=str(tmp_path / "old.json"), **narrow)
