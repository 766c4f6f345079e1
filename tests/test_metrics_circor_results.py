"""bench/circor_results.py: staging into parts, merging them back, the report, and a tiny real grid."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CIRCOR_MINI = REPO / "tests" / "data" / "circor-mini"


def load_bench():
    spec = importlib.util.spec_from_file_location("circor_results", REPO / "bench" / "circor_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def test_stage_splits_by_patient_under_the_limit_and_merge_restores_the_folder(tmp_path):
    audio = sorted(p for p in (CIRCOR_MINI / "training_data").iterdir() if p.suffix in (".wav", ".flac", ".txt"))
    limit = 2 * 2**20
    parts = bench.stage(CIRCOR_MINI, tmp_path / "staged", limit)
    assert len(parts) > 1
    for part in parts:
        assert sum(p.stat().st_size for p in part.rglob("*") if p.is_file()) <= limit
    owners = {}
    for part in parts:
        for path in (part / "training_data").iterdir():
            owners.setdefault(bench.patient_of(path.name), set()).add(part)
    assert all(len(found) == 1 for found in owners.values())  # a patient never straddles parts
    assert (parts[0] / "training_data.csv").is_file()

    merged = bench.merge(parts, tmp_path / "merged")
    assert sorted(p.name for p in (merged / "training_data").iterdir()) == [p.name for p in audio]
    assert not any(p.suffix in (".hea", ".tsv") for p in (merged / "training_data").iterdir())
    from ssamba.data import CirCorDataModule

    assert len(CirCorDataModule(root=str(merged)).patients) == len(CirCorDataModule(root=str(CIRCOR_MINI)).patients)


def test_stage_refuses_a_patient_larger_than_a_part(tmp_path):
    with pytest.raises(ValueError, match="max-mib"):
        bench.stage(CIRCOR_MINI, tmp_path / "staged", 100_000)


def test_merge_refuses_duplicates_and_a_missing_table(tmp_path):
    parts = bench.stage(CIRCOR_MINI, tmp_path / "staged", 2 * 2**20)
    with pytest.raises(ValueError, match="more than one"):
        bench.merge([parts[0], parts[0]], tmp_path / "merged")
    with pytest.raises(FileNotFoundError, match="training_data.csv"):
        bench.merge(parts[1:], tmp_path / "merged")


def record(arm, seed, wa, cost, pretrain=0.0):
    scores = {"weighted_accuracy": wa, "uar": 0.5, "cost": cost, "auroc": float("nan"), "patients": 95.0}
    settings = {"pretrain": ["experiment=circor_pretrain"], "finetune": ["experiment=circor_murmur"],
                "common": ["trainer=gpu"], "shared_pretraining": False, "data": "circor-dev"}  # fmt: skip
    return {"arm": arm, "seed": seed, "device": "NVIDIA H100", "settings": settings, "scores": scores,
            "pretrain_seconds": pretrain, "finetune_seconds": 120.0}  # fmt: skip


def test_report_gives_mean_and_sample_std_per_arm(tmp_path):
    for r in [
        record("scratch", 0, 0.6, 12000),
        record("scratch", 1, 0.8, 14000),
        record("pretrained", 0, 0.7, 11000, 60),
    ]:
        (tmp_path / f"{r['arm']}_seed{r['seed']}.json").write_text(json.dumps(r))
    bench.write_report(tmp_path, tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    assert "| from scratch | 2 | 0.700 ± 0.141 | 0.500 ± 0.000 | 13000 ± 1414 | n/a | 2.0 |" in text
    assert "| circor_pretrain, then finetuned | 1 | 0.700 | 0.500 | 11000 | n/a | 1.0 pretrain + 2.0 finetune |" in text
    assert "NVIDIA H100" in text


@pytest.mark.slow
def test_tiny_grid_on_cpu_trains_scores_resumes_and_reports(tmp_path):
    data = tmp_path / "circor"
    shutil.copytree(CIRCOR_MINI, data)
    (data / "split.csv").write_text(
        "patient_id,split\n2530,train\n9979,train\n49748,train\n50216,train\n9983,val\n50743,val\n"
    )
    results, out = tmp_path / "runs", tmp_path / "report.md"
    tiny = ["+model.depth=2", "+model.embed_dim=16", "data.target_length=128", "data.batch_size=8",
            "trainer.limit_train_batches=2", "trainer.num_sanity_val_steps=0", "model.backend=torch"]  # fmt: skip
    argv = ["run", "--data", str(data), "--results", str(results), "--out", str(out), "--trainer", "cpu",
            "--seeds", "0", "--pretrain-epochs", "1", "--finetune-epochs", "1", "--num-workers", "0",
            "--override", *tiny, "--pretrain-override", "mask.count=8", "mask.val_count=8",
            "--finetune-override", "task.fstride=16", "task.tstride=16", "task.warmup_steps=1"]  # fmt: skip
    bench.main(argv)
    runs = {p.name: json.loads(p.read_text()) for p in results.glob("*.json")}
    assert set(runs) == {"scratch_seed0.json", "pretrained_seed0.json"}
    pretrained = runs["pretrained_seed0.json"]
    assert pretrained["pretrain_seconds"] > 0 and pretrained["scores"]["patients"] == 2
    assert 0 <= pretrained["scores"]["weighted_accuracy"] <= 1
    # the finetune really started from the pretraining checkpoint
    log = (results / "runs" / "pretrained_seed0" / "stdout.log").read_text()
    assert "finetuning from" in log and "pretrain_seed0" in log
    assert "| from scratch | 1 |" in out.read_text()
    bench.main(argv)  # everything is done: nothing reruns
    assert json.loads((results / "scratch_seed0.json").read_text()) == runs["scratch_seed0.json"]
