"""train.py score_checkpoint=...: the test patients scored in the training process give evaluate.py's numbers,
and the cross-validation runner's lean settings (validation after the last epoch only, no best checkpoint)
leave the scores unchanged."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from circor_fixtures import cloned_circor

REPO = Path(__file__).resolve().parents[1]
TINY = ["experiment=circor_murmur", "+model.depth=2", "+model.embed_dim=16", "model.backend=torch",
        "data.target_length=128", "data.batch_size=8", "data.num_workers=1", "data.split=kfold", "data.folds=2",
        "data.fold=0", "data.val_fraction=0.2", "task.fstride=16", "task.tstride=16", "task.warmup_steps=1",
        "trainer=cpu", "trainer.max_epochs=2", "trainer.limit_train_batches=3", "logger=csv", "test=false",
        "trainer.enable_progress_bar=false", "++callbacks.progress_bar=null", "seed=3"]  # fmt: skip


def run(script: str, *overrides: str) -> None:
    result = subprocess.run([sys.executable, script, *overrides], cwd=REPO, capture_output=True, text=True,
                            timeout=600, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return cloned_circor(tmp_path_factory.mktemp("circor") / "circor", copies=2)  # 12 patients, 6 tested


@pytest.mark.slow
def test_in_process_scores_are_evaluate_py_s_and_the_lean_settings_change_nothing(data, tmp_path):
    full, lean = tmp_path / "full", tmp_path / "lean"
    run("train.py", *TINY, f"data.root={data}", "score_checkpoint=last", f"hydra.run.dir={full}")
    run("train.py", *TINY, f"data.root={data}", "score_checkpoint=last", f"hydra.run.dir={lean}",
        "trainer.check_val_every_n_epoch=2", "callbacks.model_checkpoint.save_top_k=0")
    scored = json.loads((full / "test_scores.json").read_text())
    assert scored["checkpoint"] == "last" and scored["precision"] == "32" and scored["scores"]["patients"] == 6
    assert len(set(scored["patients"]["id"])) == 6 and scored["seconds"] > 0

    evaluated = tmp_path / "evaluated"
    run("evaluate.py", f"ckpt_path={full / 'checkpoints' / 'last.ckpt'}", f"data.root={data}", "data.num_workers=0",
        "data.split=kfold", "data.folds=2", "data.fold=0", "data.val_fraction=0.2", "data.split_file=null",
        "split=test", "device=cpu", f"out_dir={evaluated}", f"hydra.run.dir={evaluated}")
    plain = json.loads((evaluated / "scores.json").read_text())["scores"]  # NaN written as null
    assert same(scored["scores"], {k: math.nan if v is None else v for k, v in plain.items()})

    again = json.loads((lean / "test_scores.json").read_text())
    assert same(again["scores"], scored["scores"]) and again["patients"] == scored["patients"]
    assert sorted(p.name for p in (lean / "checkpoints").iterdir()) == ["last.ckpt"]
    assert any(p.name.startswith("best-") for p in (full / "checkpoints").iterdir())
    validated = [line for line in (lean / "metrics.csv").read_text().splitlines()[1:] if "," in line]
    header = (lean / "metrics.csv").read_text().splitlines()[0].split(",")
    epochs = {row.split(",")[header.index("epoch")] for row in validated
              if row.split(",")[header.index("val/weighted_accuracy")]}  # fmt: skip
    assert epochs == {"1"}  # validated once, after the last epoch


@pytest.mark.slow
def test_a_run_scores_its_checkpoint_with_others_as_evaluate_py_scores_their_ensemble(data, tmp_path):
    first, second, evaluated = tmp_path / "first", tmp_path / "second", tmp_path / "evaluated"
    short = [*TINY, f"data.root={data}", "trainer.max_epochs=1", "callbacks.model_checkpoint.save_top_k=0"]
    run("train.py", *short, f"hydra.run.dir={first}")
    other = first / "checkpoints" / "last.ckpt"
    run("train.py", *short, "seed=4", "score_checkpoint=last", f"score_ensemble=['{other}']", f"hydra.run.dir={second}")
    scored = json.loads((second / "test_scores.json").read_text())
    assert scored["members"] == 2 and scored["scores"]["patients"] == 6
    run("evaluate.py", f"ckpt_path=['{second / 'checkpoints' / 'last.ckpt'}','{other}']", f"data.root={data}",
        "data.num_workers=0", "data.split=kfold", "data.folds=2", "data.fold=0", "data.val_fraction=0.2",
        "data.split_file=null", "split=test", "device=cpu", f"out_dir={evaluated}", f"hydra.run.dir={evaluated}")
    ensemble = json.loads((evaluated / "scores.json").read_text())["scores"]
    assert same(scored["scores"], {k: math.nan if v is None else v for k, v in ensemble.items()})
    for pid, probs in zip(scored["patients"]["id"], scored["patients"]["probs"]):  # the ensemble's probabilities
        written = (evaluated / "outputs" / f"{pid}.csv").read_text().splitlines()
        assert written[1].split(",")[:3] == ["Present", "Unknown", "Absent"]
        assert [float(v) for v in written[3].split(",")[:3]] == pytest.approx(probs, abs=1e-6)


def test_score_checkpoint_without_test_patients_stops_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "task=finetune", "data=synthetic", "trainer=cpu", "logger=csv",
                             "score_checkpoint=last", f"paths.log_dir={tmp_path}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "config error" in line]
    assert len(errors) == 1 and "score_checkpoint=last: the data has no test split of patients" in errors[0]
