"""What an offline W&B run of train.py holds: prediction tables and confusion matrices of classification
runs, checkpoint artifacts with ``logger.wandb.log_model``, pretraining's reconstruction figures.

The run folder is read back as ``wandb sync`` would read it: the records of ``run-<id>.wandb`` (a
log of length-prefixed protobuf records in 32 KiB blocks, decoded with wandb's own message types)
and the files they point to under ``files/``.
"""
import csv
import json
import os
import struct
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir

pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

from ssamba.callbacks.wandb_predictions import (  # noqa: E402
    WandbPredictions,
    first_occurrences,
    multilabel_tables,
    single_label_tables,
)
from ssamba.data import CirCorDataModule, SyntheticDataModule  # noqa: E402
from ssamba.metrics import PatientLabelSetMetrics  # noqa: E402
from ssamba.utils.config import ConfigError, validate_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_train import FINETUNE, TINY, cli, load_train_module  # noqa: E402

CIRCOR_MINI = ROOT / "tests" / "data" / "circor-mini"
SIZES = ("data.num_train=", "data.num_val=", "data.num_test=")  # test_train's synthetic data set
WANDB = [a for a in TINY if a != "logger=csv" and not a.startswith(SIZES)] + ["logger=wandb"]
SYNTHETIC = [a for a in TINY if a.startswith(SIZES)]  # 8 / 4 / 4 clips
RECORD_TYPES = {1: "full", 2: "first", 3: "middle", 4: "last"}
BLOCK = 32 * 1024


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline with its own settings folders; the staging folder train.py chooses is dropped afterwards."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    had = os.environ.pop("WANDB_DATA_DIR", None)
    yield
    os.environ.pop("WANDB_DATA_DIR", None)
    if had is not None:
        os.environ["WANDB_DATA_DIR"] = had


def run_train(output_dir, *overrides):
    """train.py in this process with test_train's tiny model and trainer and the W&B logger."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*WANDB, f"paths.output_dir={output_dir}", *overrides])
    return load_train_module().train(cfg)


# --- reading an offline run ---------------------------------------------------------------------
def records(run_dir: Path, wait_s: float = 60.0) -> list:
    """The protobuf records of an offline run's ``.wandb`` file, in order, once its ``exit`` record is written
    (wandb's service process may still be writing the file for a moment after ``wandb.finish`` returns)."""
    (path,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + wait_s
    while True:
        found = parse_records(path.read_bytes())
        if (found and found[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def parse_records(data: bytes) -> list:
    assert data[:4] == b":W&B"
    found, pending, pos = [], b"", 7  # header: magic, a 2-byte tag and a version byte
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # too little left in the block for a record header: padding
            pos += BLOCK - pos % BLOCK
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the end of the block
            pos += BLOCK - pos % BLOCK
            continue
        if pos + 7 + length > len(data):  # a record still being written
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if RECORD_TYPES[kind] in ("full", "first") else pending + chunk
        if RECORD_TYPES[kind] in ("full", "last"):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            found.append(record)
    return found


def history(run_dir: Path) -> list[dict]:
    """Every logged row, as {key: value} (a table's fields under ``<key>/path``, ``<key>/_type``, ...)."""
    rows = []
    for record in records(run_dir):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def tables(run_dir: Path, key: str) -> list[tuple[int, dict]]:
    """(global step, table) of every row that logged the table ``key``."""
    found = []
    for row in history(run_dir):
        if row.get(f"{key}/_type") == "table-file":
            table = json.loads((run_dir / "files" / row[f"{key}/path"]).read_text())
            found.append((row["trainer/global_step"], table))
    return found


def artifacts(run_dir: Path, kind: str) -> list:
    return [r.artifact for r in records(run_dir)
            if r.WhichOneof("record_type") == "artifact" and r.artifact.type == kind]


def the_run(output_dir: Path) -> Path:
    (run_dir,) = (output_dir / "wandb").glob("offline-run-*")
    return run_dir


def metrics(output_dir: Path, key: str) -> list[float]:
    with open(output_dir / "metrics.csv") as handle:
        return [float(row[key]) for row in csv.DictReader(handle) if row.get(key)]


def as_rows(table: dict) -> list[dict]:
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def counts(confusion: dict) -> dict[tuple[str, str], float]:
    """wandb's confusion-matrix table (Actual, Predicted, nPredictions) as {(true, predicted): count}."""
    return {(actual, predicted): n for actual, predicted, n in confusion["data"]}


# --- classification runs --------------------------------------------------------------------------
def test_finetune_logs_clip_tables_and_checkpoint_artifacts(tmp_path, offline):
    run_train(tmp_path, *SYNTHETIC, *FINETUNE, "logger.wandb.log_model=true")
    run_dir = the_run(tmp_path)
    data = SyntheticDataModule(num_classes=3, num_val=4, num_test=4, target_length=64)
    names = data.label_names

    for stage, size in (("val", 4), ("test", 4)):
        ((step, table),) = tables(run_dir, f"{stage}/predictions")
        assert step == 2  # logged at the step of the evaluation (2 training steps of batch 4)
        assert table["columns"] == ["id", "true", "predicted", *[f"p_{n}" for n in names]]
        rows = as_rows(table)
        assert [r["id"] for r in rows] == [f"synthetic-{stage}-{i}" for i in range(size)]
        for i, row in enumerate(rows):
            probs = [row[f"p_{n}"] for n in names]
            assert row["true"] == names[data.generator.labels(stage, i)[0]]
            assert row["predicted"] == names[probs.index(max(probs))] and sum(probs) == pytest.approx(1.0, abs=1e-5)
        accuracy = sum(r["true"] == r["predicted"] for r in rows) / size
        assert accuracy == pytest.approx(metrics(tmp_path, f"{stage}/acc")[-1])  # the scalar the table explains
        ((_, confusion),) = tables(run_dir, f"{stage}/confusion_matrix_table")
        pairs = counts(confusion)
        assert set(pairs) == {(a, b) for a in names for b in names}
        for a in names:
            for b in names:
                assert pairs[a, b] == sum(r["true"] == a and r["predicted"] == b for r in rows)

    # log_model=true: the best and the last checkpoint, copied into the run folder for a later `wandb sync`
    models = artifacts(run_dir, "model")
    assert [sorted(a.aliases) for a in models] == [["best", "latest"], ["latest"]]
    assert {a.name for a in models} == {f"model-{run_dir.name.rsplit('-', 1)[1]}"}
    (best,) = (tmp_path / "checkpoints").glob("best-*.ckpt")
    for artifact, original in zip(models, (best, tmp_path / "checkpoints" / "last.ckpt")):
        (entry,) = artifact.manifest.contents
        staged = Path(entry.local_path)
        assert entry.path == "model.ckpt" and staged.is_relative_to(tmp_path / "wandb")
        assert staged.read_bytes() == original.read_bytes()


def test_probe_run_logs_the_same_tables(tmp_path, offline):
    run_train(tmp_path, *SYNTHETIC, "task=probe", "data.num_classes=3", "test=false")
    names = SyntheticDataModule(num_classes=3, num_val=4, target_length=64).label_names
    ((_, table),) = tables(the_run(tmp_path), "val/predictions")
    rows = as_rows(table)
    assert table["columns"] == ["id", "true", "predicted", *[f"p_{n}" for n in names]] and len(rows) == 4
    accuracy = sum(r["true"] == r["predicted"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(metrics(tmp_path, "val/acc")[-1])


def test_multilabel_run_lists_true_labels_and_top_classes(tmp_path, offline):
    run_train(tmp_path, *SYNTHETIC, *FINETUNE, "data.multilabel=true", "task.monitor=val/mAP",
              "callbacks.wandb_predictions.top_k=2", "test=false")
    run_dir = the_run(tmp_path)
    data = SyntheticDataModule(num_classes=3, num_val=4, multilabel=True, target_length=64)
    ((_, table),) = tables(run_dir, "val/predictions")
    assert table["columns"] == ["id", "true", "top1", "top1_score", "top2", "top2_score"]
    for i, row in enumerate(as_rows(table)):
        assert row["true"] == ", ".join(data.label_names[c] for c in data.generator.labels("val", i))
        assert row["top1"] != row["top2"] and 1 >= row["top1_score"] >= row["top2_score"] >= 0
    assert not tables(run_dir, "val/confusion_matrix_table"), "no single true class per clip: no confusion matrix"
    assert not artifacts(run_dir, "model"), "log_model is off by default"


def test_circor_run_logs_patient_tables_by_the_metric_rule(tmp_path, offline):
    circor = [f"data.root={CIRCOR_MINI}", "data.val_fraction=0.5", "data.test_fraction=0.0",
              "data.target_length=64", "data.batch_size=4"]
    run_train(tmp_path, "experiment=circor_murmur", *circor, "task.fstride=16", "task.tstride=16",
              "task.warmup_steps=1", "trainer.limit_train_batches=2")
    run_dir = the_run(tmp_path)
    data = CirCorDataModule(root=str(CIRCOR_MINI), val_fraction=0.5, test_fraction=0.0, target_length=64)
    val_items = data.build_items("val")
    patients = {p.id: p for p in data.patients}

    ((_, clips),) = tables(run_dir, "val/predictions")
    assert clips["columns"][:5] == ["id", "patient", "recording", "true", "predicted"]
    assert sorted(r["id"] for r in as_rows(clips)) == sorted(item.id for item in val_items)

    ((_, table),) = tables(run_dir, "val/patient_predictions")
    assert table["columns"] == ["patient", "recordings", "true", "predicted", "p_Present", "p_Unknown", "p_Absent"]
    rows = as_rows(table)
    assert sorted(r["patient"] for r in rows) == sorted({item.meta["patient"] for item in val_items})
    for row in rows:
        assert row["true"] == patients[row["patient"]].murmur
        assert row["recordings"] == len({i.meta["recording"] for i in val_items if i.meta["patient"] == row["patient"]})
    # the rows are the ones the logged patient scores were computed from
    accuracy = sum(r["true"] == r["predicted"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(metrics(tmp_path, "val/accuracy")[-1])
    ((_, confusion),) = tables(run_dir, "val/patient_confusion_matrix_table")
    assert sum(counts(confusion).values()) == len(rows)


def test_patient_table_follows_the_label_set_rule():
    """Seven timing classes, mean rule: one patient's two recordings, one per item; the patient row is the
    arg-max of the recordings' mean logits, its scores their softmax."""
    names = ["absent", "unknown", "present-early-systolic", "present-mid-systolic", "present-late-systolic",
             "present-holosystolic", "present"]
    logits = torch.zeros(3, 7)
    logits[0, 5], logits[1, 3], logits[2, 0] = 4.0, 1.0, 2.0
    rows = {"id": ["a1", "a2", "b1"], "patient": ["A", "A", "B"], "recording": ["A_AV", "A_MV", "B_AV"],
            "logits": logits, "target": torch.tensor([5, 5, 0])}
    logged = single_label_tables(rows, names, False, "val", PatientLabelSetMetrics(names, rule="mean"))
    table = logged["val/patient_predictions"]
    by_patient = {row[0]: row for row in table.data}
    assert by_patient["A"][:4] == ["A", 2, "present-holosystolic", "present-holosystolic"]
    assert by_patient["A"][4:] == pytest.approx(logits[:2].mean(0).softmax(0).tolist())
    assert by_patient["B"][:4] == ["B", 1, "absent", "absent"]
    recordings = {row[1]: row for row in logged["val/recording_predictions"].data}
    assert sorted(recordings) == ["A_AV", "A_MV", "B_AV"]
    for recording, clip in (("A_AV", 0), ("A_MV", 1), ("B_AV", 2)):  # one clip each: its own probabilities
        assert recordings[recording][0] == recording[0]
        assert recordings[recording][4:] == pytest.approx(logits[clip].softmax(0).tolist())
        assert recordings[recording][3] == names[int(logits[clip].argmax())]


def test_rows_seen_on_two_ranks_are_kept_once():
    rank0 = {"id": ["a", "c"], "logits": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "target": torch.tensor([0, 1])}
    rank1 = {"id": ["b", "a"], "logits": torch.tensor([[0.5, 0.5], [9.0, 9.0]]), "target": torch.tensor([1, 0])}
    joined = first_occurrences([rank0, rank1, {"id": []}])
    assert joined["id"] == ["a", "c", "b"] and joined["target"].tolist() == [0, 1, 1]
    assert torch.equal(joined["logits"], torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]))
    table = multilabel_tables({"id": ["x"], "true": [[0, 2]], "top": torch.tensor([[2, 1]]),
                               "top_score": torch.tensor([[0.9, 0.2]])}, ["a", "b", "c"], "test")["test/predictions"]
    assert table.data == [["x", "a, c", "c", pytest.approx(0.9), "b", pytest.approx(0.2)]]


def test_without_wandb_nothing_is_collected():
    """No W&B logger (or not a classifier): the callback decides so once and keeps nothing."""
    from lightning.pytorch.loggers import CSVLogger

    from ssamba.tasks.finetune import Finetuning

    callback = WandbPredictions()
    trainer = SimpleNamespace(loggers=[CSVLogger("unused")], sanity_checking=False,
                              strategy=SimpleNamespace(broadcast=lambda value, src: value))
    module = Finetuning.__new__(Finetuning)  # only its type matters here
    callback.setup(trainer, module, "fit")
    assert callback.active is False
    batch = {"id": ["a", "b"], "target": torch.eye(3)[:2]}
    callback.on_validation_batch_end(trainer, module, torch.zeros(2, 3), batch, 0)
    assert callback._batches == []
    with pytest.raises(ConfigError, match="callbacks.wandb_predictions.top_k=0"):
        WandbPredictions(top_k=0)


# --- pretraining ---------------------------------------------------------------------------------
def test_pretraining_logs_reconstruction_figures(tmp_path, offline):
    run_train(tmp_path, *SYNTHETIC, "task.figure_every_n_steps=1")
    run_dir = the_run(tmp_path)
    figures = [row for row in history(run_dir) if row.get("train/reconstruction/_type") == "images/separated"]
    assert [row["trainer/global_step"] for row in figures] == [0, 1]
    for row in figures:
        (image,) = row["train/reconstruction/filenames"]
        png = run_dir / "files" / image
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert len(list((tmp_path / "figures").glob("train_reconstruction_step*.png"))) == 2  # the CSV logger's copies
    assert not any(key.endswith("predictions/_type") for row in history(run_dir) for key in row)


def run_ids(output_dir: Path) -> set[str]:
    """The W&B run ids of a run folder's offline runs, from their ``run-<id>.wandb`` files (a folder's own name
    gains a suffix when two runs start within the same second)."""
    return {path.stem[len("run-"):] for path in (output_dir / "wandb").glob("offline-run-*/run-*.wandb")}


def test_a_resume_into_the_same_folder_continues_its_wandb_run(tmp_path, offline):
    run_train(tmp_path / "run", *SYNTHETIC)
    (first,) = run_ids(tmp_path / "run")
    assert (tmp_path / "run" / "wandb_run_id").read_text().strip() == first
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    run_train(tmp_path / "run", *SYNTHETIC, f"ckpt_path={last}", "trainer.max_epochs=2")
    assert run_ids(tmp_path / "run") == {first}
    # the same checkpoint resumed in another folder, or a fresh run in this one: a W&B run of its own
    run_train(tmp_path / "elsewhere", *SYNTHETIC, f"ckpt_path={last}", "trainer.max_epochs=2")
    (other,) = run_ids(tmp_path / "elsewhere")
    assert other != first


# --- configuration ---------------------------------------------------------------------------------
def compose_train(*overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[*WANDB, "paths.output_dir=unused", *overrides])


@pytest.mark.parametrize("value", ["false", "true", "all"])
def test_log_model_values(value):
    validate_config(compose_train(f"logger.wandb.log_model={value}"))


@pytest.mark.parametrize("value", ["yes", "1", "'true'"])
def test_log_model_refuses_other_values(value):
    with pytest.raises(ConfigError, match=r"^logger.wandb.log_model=.*: allowed values are false, true, all$"):
        validate_config(compose_train(f"logger.wandb.log_model={value}"))


def test_offline_staging_goes_to_the_run_folder_unless_chosen(tmp_path, monkeypatch):
    from ssamba.utils import wandb as ours

    monkeypatch.setattr(ours, "_staging_set_here", None)
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "mine"))
    ours.stage_in_run_folder(str(tmp_path / "job0"))
    assert os.environ["WANDB_DATA_DIR"] == str(tmp_path / "mine")  # the user's choice stays
    monkeypatch.delenv("WANDB_DATA_DIR")
    ours.stage_in_run_folder(str(tmp_path / "job0"))
    assert os.environ["WANDB_DATA_DIR"] == str(tmp_path / "job0" / "wandb")
    ours.stage_in_run_folder(str(tmp_path / "job1"))  # the next job of a multirun: its own folder
    assert os.environ["WANDB_DATA_DIR"] == str(tmp_path / "job1" / "wandb")
    monkeypatch.delenv("WANDB_DATA_DIR")


# --- DDP -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_tables_hold_every_rank_items_once(tmp_path):
    """Two processes, five validation clips: the sampler pads rank 1 with a repeat; rank 0 logs all five once."""
    result = cli(tmp_path, *WANDB, *FINETUNE, "trainer=ddp_sim", "data.num_train=8", "data.num_val=5", "test=false",
                 env={"WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(tmp_path / "home"),
                      "WANDB_CACHE_DIR": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr[-3000:]
    (output,) = (tmp_path / "finetune_tiny" / "runs").iterdir()
    run_dir = the_run(output)  # one W&B run: rank 0's
    ((_, table),) = tables(run_dir, "val/predictions")
    assert sorted(r["id"] for r in as_rows(table)) == [f"synthetic-val-{i}" for i in range(5)]
    ((_, confusion),) = tables(run_dir, "val/confusion_matrix_table")
    assert sum(counts(confusion).values()) == 5
