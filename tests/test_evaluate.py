"""evaluate.py on the CirCor mini fixture with a small finetuned checkpoint built in the test."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ssamba
from ssamba.checkpoints import ConversionError
from ssamba.convert import ours_to_released
from ssamba.data import CirCorDataModule
from ssamba.data.features import MelScale
from ssamba.evaluation import (
    build_model,
    check_compatible,
    load_finetuned,
    load_members,
    recording_ids,
    score_split,
)
from ssamba.metrics.report import write_recording_predictions
from ssamba.models import ClassifierEnsemble, build_encoder
from ssamba.tasks import Finetuning, data_info

REPO = Path(__file__).resolve().parents[1]
CIRCOR_MINI = REPO / "tests" / "data" / "circor-mini"
WEIGHTS = {"Present": 5, "Unknown": 3, "Absent": 1}


def save_finetuned(path: Path, seed: int = 0, **data_overrides) -> Path:
    """A finetuning checkpoint as train.py writes it: Lightning ``state_dict`` + the ``ssamba`` record."""
    torch.manual_seed(seed)
    datamodule = CirCorDataModule(root=str(CIRCOR_MINI), target_length=128, num_workers=0, **data_overrides)
    encoder = build_encoder("tiny", depth=2, embed_dim=16, input_tdim=128, backend="torch")
    task = Finetuning(
        optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
        encoder=encoder,
        fstride=16,
        tstride=16,
        data=data_info(datamodule),
    )
    torch.save({"state_dict": task.state_dict(), "ssamba": task.checkpoint_record()}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_finetuned(tmp_path_factory.mktemp("ckpt") / "finetuned.ckpt")


def run_evaluate(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python evaluate.py`` on the CirCor mini fixture's test split, on the CPU, its outputs in ``out``;
    the test fails with the end of its stderr if it does."""
    command = [
        sys.executable, "evaluate.py", f"data.root={CIRCOR_MINI}", "data.num_workers=0", "split=test", "device=cpu",
        f"out_dir={out}", f"hydra.run.dir={out}", *overrides,
    ]  # fmt: skip
    result = subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_output(path: Path):
    lines = path.read_text().splitlines()
    classes = lines[1].split(",")
    labels = dict(zip(classes, map(int, lines[2].split(","))))
    probs = dict(zip(classes, map(float, lines[3].split(","))))
    return lines[0], labels, probs


def read_recordings(path: Path) -> list[dict[str, str]]:
    header, *rows = (line.split(",") for line in path.read_text().splitlines())
    return [dict(zip(header, row)) for row in rows]


def test_cli_scores_a_split_and_writes_challenge_files(checkpoint, tmp_path):
    out = tmp_path / "eval"
    result = run_evaluate(out, f"ckpt_path={checkpoint}", "logger=csv")
    assert "weighted_accuracy" in result.stdout  # the printed table

    summary = json.loads((out / "scores.json").read_text())
    assert summary["split"] == "test" and summary["aggregation"] == "hierarchical"
    scores = summary["scores"]
    truth = CirCorDataModule(root=str(CIRCOR_MINI)).patient_targets("test")
    assert scores["patients"] == len(truth) == 2

    # the written files alone reproduce the weighted accuracy (Challenge formula, by hand)
    hits = total = 0
    for pid, labels in truth.items():
        header, predicted, probs = read_output(out / "outputs" / f"{pid}.csv")
        assert header == f"#{pid}"
        assert sum(predicted[c] for c in WEIGHTS) == 1 and sum(predicted[c] for c in ("Abnormal", "Normal")) == 1
        assert sum(probs[c] for c in WEIGHTS) == pytest.approx(1, abs=1e-5)
        true_class = ["Present", "Unknown", "Absent"][labels["murmur"]]
        total += WEIGHTS[true_class]
        hits += WEIGHTS[true_class] * predicted[true_class]
    assert scores["weighted_accuracy"] == pytest.approx(hits / total)
    assert scores["cost"] > 0  # every mini patient has an outcome

    # each test recording's own prediction; the hierarchical rule over them gives the patients' files
    recordings = read_recordings(out / "recordings.csv")
    datamodule = CirCorDataModule(root=str(CIRCOR_MINI))
    expected = {(p.id, r.id) for p in datamodule.split_patients("test") for r in p.recordings}
    assert {(row["patient"], row["recording"]) for row in recordings} == expected
    for pid in truth:
        own = [row["prediction"] for row in recordings if row["patient"] == pid]
        patient_class = next(c for c in ("Present", "Unknown", "Absent") if c in own)
        assert read_output(out / "outputs" / f"{pid}.csv")[1][patient_class] == 1
    assert all(sum(float(row[f"p_{c}"]) for c in WEIGHTS) == pytest.approx(1, abs=1e-5) for row in recordings)
    assert (out / "confusion_matrix.png").stat().st_size > 0
    assert "test/challenge/weighted_accuracy" in (out / "metrics.csv").read_text()


def test_loaded_classifier_reproduces_the_task(checkpoint):
    loaded = load_finetuned(str(checkpoint))
    model = loaded.build_classifier(backend="torch")
    task_state = torch.load(checkpoint, weights_only=True)["state_dict"]
    head_weight = next(v for k, v in task_state.items() if k.startswith("head.fc.weight"))
    assert torch.equal(model.head.fc.weight, head_weight)
    assert model(torch.zeros(2, 128, 128)).shape == (2, 3)
    assert loaded.label_names == ["Present", "Unknown", "Absent"]


def test_mismatched_data_is_refused(checkpoint, tmp_path):
    record = load_finetuned(str(checkpoint))
    with pytest.raises(ValueError, match="label_names"):
        check_compatible(record, ["Abnormal", "Normal"], 128)
    with pytest.raises(ValueError, match="target_length"):
        check_compatible(record, ["Present", "Unknown", "Absent"], 512)
    pretraining = tmp_path / "pretrain.ckpt"
    state = torch.load(checkpoint, weights_only=True)
    record = {key: value for key, value in state["ssamba"].items() if key != "head"} | {"task": "pretrain"}
    torch.save({"state_dict": state["state_dict"], "ssamba": record}, pretraining)
    with pytest.raises(ValueError, match="no classification head"):
        load_finetuned(str(pretraining))
    with pytest.raises(FileNotFoundError, match="ckpt_path"):
        load_finetuned(str(tmp_path / "missing.ckpt"))


def recordings_csv(model, datamodule, path: Path) -> str:
    metric = score_split(model, datamodule, "test", "hierarchical", torch.device("cpu"))
    predictions = metric.predictions()
    write_recording_predictions(predictions, *recording_ids(metric, predictions), datamodule.label_names, path)
    return path.read_text()


def test_a_checkpoint_carries_its_mel_scale_to_evaluation_and_to_embeddings(tmp_path):
    narrow = {"mel_high_hz": 2000.0, "fft_size": 2048}
    path = save_finetuned(tmp_path / "narrow.ckpt", **narrow)
    record = torch.load(path, weights_only=True)["ssamba"]
    assert (record["mel_low_hz"], record["mel_high_hz"], record["fft_size"]) == (20.0, 2000.0, 2048)
    loaded = load_finetuned(str(path))
    assert (loaded.mel_low_hz, loaded.mel_high_hz, loaded.fft_size) == (20.0, 2000.0, 2048)

    # evaluate.py computes the checkpoint's features, whatever the data config's scale (here the default)
    out = tmp_path / "eval"
    run_evaluate(out, f"ckpt_path={path}", "logger=csv", "backend=torch")
    model = build_model([loaded], backend="torch")
    data = functools.partial(CirCorDataModule, root=str(CIRCOR_MINI), target_length=128, num_workers=0)
    written = (out / "recordings.csv").read_text()
    assert written == recordings_csv(model, data(**narrow), tmp_path / "narrow.csv")
    assert written != recordings_csv(model, data(), tmp_path / "default.csv")

    embedder = ssamba.load(path)
    assert embedder.mel == MelScale(20.0, 2000.0, 2048)
    folder = ssamba.save_pretrained(embedder, tmp_path / "folder")
    assert ssamba.load(folder).mel == embedder.mel
    # a reader older than the scale must refuse the folder, not compute kaldi's features for it
    assert json.loads((folder / "config.json").read_text())["format_version"] == 2
    with pytest.raises(ConversionError, match="released layout stores no mel scale.*--to-folder"):
        ours_to_released(torch.load(path, weights_only=True))
    # a checkpoint written before the scale could be set was computed with kaldi's
    state = torch.load(path, weights_only=True)
    old = {key: value for key, value in state["ssamba"].items() if not key.startswith(("mel_", "fft_"))}
    torch.save({**state, "ssamba": old}, tmp_path / "old.ckpt")
    assert ssamba.load(tmp_path / "old.ckpt").mel.is_kaldi
    torch.save({**state, "ssamba": {**state["ssamba"], "fft_size": 1024.5}}, tmp_path / "odd.ckpt")
    with pytest.raises(ValueError, match=r"ckpt_path=.*\[.fft_size.\]=1024.5: expected an integer"):
        load_finetuned(str(tmp_path / "odd.ckpt"))


def test_evaluate_gives_a_datamodule_the_mel_keys_only_where_it_has_them_or_the_scale_is_not_kaldis(tmp_path):
    """A datamodule of the user's without the mel keys (docs/architecture.md) still evaluates a kaldi-scale model."""
    sys.path.insert(0, str(REPO))
    from omegaconf import OmegaConf

    from evaluate import input_settings

    kaldi, narrow = load_finetuned(str(save_finetuned(tmp_path / "kaldi.ckpt"))), load_finetuned(
        str(save_finetuned(tmp_path / "narrow.ckpt", mel_high_hz=2000.0, fft_size=2048)))
    bare, ours = OmegaConf.create({"_target_": "custom.DataModule"}), OmegaConf.create({"mel_high_hz": 4000.0})
    assert set(input_settings(kaldi, bare)) == {"target_length", "norm_mean", "norm_std"}
    assert input_settings(kaldi, ours)["mel_high_hz"] == 8000.0 and "fft_size" not in input_settings(kaldi, ours)
    assert {k: input_settings(narrow, bare)[k] for k in ("mel_low_hz", "mel_high_hz", "fft_size")} == {
        "mel_low_hz": 20.0, "mel_high_hz": 2000.0, "fft_size": 2048}


def test_an_ensemble_refuses_members_of_different_mel_scales(checkpoint, tmp_path):
    narrow = save_finetuned(tmp_path / "narrow.ckpt", mel_high_hz=2000.0, fft_size=2048)
    with pytest.raises(ValueError, match="has mel_high_hz=8000.0 but .* has 2000.0"):
        load_members([str(narrow), str(checkpoint)])


def test_cli_scores_the_timing_label_set_and_writes_predictions(tmp_path):
    """data.task=murmur_timing: label-set scores, the collapsed Challenge scores and predictions.csv."""
    checkpoint = save_finetuned(tmp_path / "timing.ckpt", task="murmur_timing")
    out = tmp_path / "eval"
    run_evaluate(out, f"ckpt_path={checkpoint}", "data.task=murmur_timing", "logger=csv")
    scores = json.loads((out / "scores.json").read_text())["scores"]
    assert {"uar", "recall_present-holosystolic", "murmur_weighted_accuracy", "patients"} <= set(scores)
    rows = (out / "predictions.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:3] == ["patient", "target", "prediction"] and len(header) == 3 + 7
    assert len(rows) - 1 == scores["patients"]
    assert not (out / "outputs").exists()  # Challenge output files are for the Challenge's label sets
    recordings = read_recordings(out / "recordings.csv")
    assert list(recordings[0])[:4] == ["patient", "recording", "target", "prediction"] and len(recordings[0]) == 4 + 7
    assert {row["patient"] for row in recordings} == {row.split(",")[0] for row in rows[1:]}


def test_an_ensemble_averages_its_members_probabilities():
    members = [torch.nn.Linear(4, 3) for _ in range(3)]
    x = torch.randn(5, 4)
    mean = torch.stack([m(x).softmax(-1) for m in members]).mean(0)
    torch.testing.assert_close(ClassifierEnsemble(members)(x).softmax(-1), mean)
    multilabel = torch.stack([m(x).sigmoid() for m in members]).mean(0)
    torch.testing.assert_close(ClassifierEnsemble(members, multilabel=True)(x).sigmoid(), multilabel)


def test_an_ensemble_of_one_model_twice_scores_as_the_model_and_mismatched_members_are_refused(checkpoint, tmp_path):
    datamodule = CirCorDataModule(root=str(CIRCOR_MINI), target_length=128, num_workers=0)
    device = torch.device("cpu")

    def predictions(paths):
        model = build_model(load_members([str(p) for p in paths]), backend="torch")
        return score_split(model, datamodule, "test", "hierarchical", device).predictions()

    single, twice = predictions([checkpoint]), predictions([checkpoint, checkpoint])
    torch.testing.assert_close(twice.probs, single.probs)
    assert torch.equal(twice.preds, single.preds)
    other = predictions([checkpoint, save_finetuned(tmp_path / "seed1.ckpt", seed=1)])
    assert not torch.allclose(other.probs, single.probs)  # the second member counts
    timing = save_finetuned(tmp_path / "timing.ckpt", task="murmur_timing")
    with pytest.raises(ValueError, match="has label_names=.*an ensemble's models must share it"):
        load_members([str(checkpoint), str(timing)])


def test_cli_scores_a_list_of_checkpoints_as_one_ensemble(checkpoint, tmp_path):
    second = save_finetuned(tmp_path / "seed1.ckpt", seed=1)
    out = tmp_path / "eval"
    result = run_evaluate(out, f"ckpt_path=[{checkpoint},{second}]")
    assert "ensemble of 2" in " ".join(result.stdout.split())  # the table title, however the table wraps it
    summary = json.loads((out / "scores.json").read_text())
    assert summary["ckpt_path"] == [str(checkpoint), str(second)] and summary["scores"]["patients"] == 2


def test_the_quality_gate_makes_only_non_present_patients_unknown_and_counts_unreadable_ones(checkpoint, tmp_path):
    """evaluate.py quality_gate=...: a gate that flags every patient turns each prediction but Present into
    Unknown; a patient none of whose recordings can be read keeps the model's prediction, counted; scores.json
    holds the scores with and without the gate."""
    import dataclasses
    import shutil

    from ssamba.data.quality import PATIENT_FEATURES
    from ssamba.evaluation import gate_predictions
    from ssamba.metrics.gate import QualityGate

    n = len(PATIENT_FEATURES)
    QualityGate(PATIENT_FEATURES, (0.0,) * n, (1.0,) * n, (0.0,) * n, 0.0, -1.0).save(tmp_path / "gate.json")
    root = tmp_path / "circor"
    shutil.copytree(CIRCOR_MINI, root)
    datamodule = CirCorDataModule(root=str(root), target_length=128, num_workers=0)
    metric = score_split(build_model(load_members([str(checkpoint)]), backend="torch"), datamodule, "test",
                         "hierarchical", torch.device("cpu"), "32")
    predictions = metric.predictions()
    assert len(predictions.preds) == 2
    for preds, want in (([2, 0], [1, 0]), ([0, 2], [0, 1]), ([1, 2], [1, 1])):
        chosen = dataclasses.replace(predictions, preds=torch.tensor(preds))
        gated, summary = gate_predictions(tmp_path / "gate.json", datamodule, "test", metric, chosen)
        assert gated.preds.tolist() == want and summary["made_unknown"] == sum(p == 2 for p in preds)
        assert summary["patients_without_readable_recording"] == summary["recordings_skipped"] == 0
    first = metric.patient_id(predictions.patient[0].item())
    for wav in (root / "training_data").glob(f"{first}_*.wav"):
        wav.write_bytes(b"not audio")
    gated, summary = gate_predictions(tmp_path / "gate.json", datamodule, "test", metric,
                                      dataclasses.replace(predictions, preds=torch.tensor([2, 2])))
    assert gated.preds.tolist() == [2, 1] and summary["patients_without_readable_recording"] == 1
    assert summary["recordings_skipped"] >= 1

    out = tmp_path / "eval"
    run_evaluate(out, f"ckpt_path={checkpoint}", f"quality_gate={tmp_path / 'gate.json'}")
    summary = json.loads((out / "scores.json").read_text())
    assert set(summary["quality_gate"]) >= {"made_unknown", "threshold", "scores_without_gate"}
    for pid in CirCorDataModule(root=str(CIRCOR_MINI)).patient_targets("test"):
        _, predicted, _ = read_output(out / "outputs" / f"{pid}.csv")
        assert predicted["Absent"] == 0  # every patient is Present or, gated, Unknown


def test_the_quality_gate_refuses_label_sets_other_than_the_challenge_murmur_classes(tmp_path):
    from ssamba.errors import ConfigError
    from ssamba.evaluation import check_gate_applies, gate_predictions

    timing = CirCorDataModule(root=str(CIRCOR_MINI), task="murmur_timing", num_workers=0)
    with pytest.raises(ConfigError, match="corrects the Challenge's murmur classes"):
        check_gate_applies(timing)  # evaluate.py asks before inference
    with pytest.raises(ConfigError, match="corrects the Challenge's murmur classes"):
        gate_predictions(tmp_path / "gate.json", timing, "test", None, None)


def test_data_without_patients_or_with_several_labels_is_refused_before_inference(checkpoint, tmp_path):
    from types import SimpleNamespace

    from ssamba.data import SyntheticDataModule
    from ssamba.errors import ConfigError
    from ssamba.evaluation import check_scorable

    with pytest.raises(ConfigError, match="SyntheticDataModule gives no patient of its items"):
        check_scorable(SyntheticDataModule(num_val=2))
    with pytest.raises(ConfigError, match="data.multilabel=true: patient-level scoring takes one class per item"):
        check_scorable(SimpleNamespace(meta_keys=("patient", "recording"), multilabel=True))
    command = [sys.executable, "evaluate.py", f"ckpt_path={checkpoint}", "data=synthetic", "data.num_val=2",
               "data.num_workers=0", "device=cpu", f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "config error" in line]
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(errors) == 1, result.stderr[-2000:]
    command[2] = f"ckpt_path={tmp_path / 'no.ckpt'}"  # a mistyped path is the commonest mistake
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "config error" in line]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(errors) == 1 and errors[0].endswith("no.ckpt: no such file")


def test_evaluate_config_composes_with_every_data_config():
    from hydra import compose, initialize_config_dir

    for data in sorted(p.stem for p in (REPO / "conf" / "data").glob("*.yaml")):
        with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            cfg = compose("evaluate", overrides=[f"data={data}", "ckpt_path=x.ckpt"])
        every_value(cfg.data)  # e.g. data=shards reads ${seed}


def every_value(node):
    """Resolve every value of a config (a value the user must give, ``???``, may stay missing)."""
    from omegaconf import DictConfig, ListConfig
    from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        try:
            value = node[key]
        except (MissingMandatoryValue, InterpolationToMissingValueError):
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            every_value(value)
