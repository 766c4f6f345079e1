"""bench/circor_results.py: staging into parts, merging them back, resumable trainings, the interval
arithmetic and the report of the cross-validation grid, and a tiny real grid on CPU."""

import importlib.util
import itertools
import json
import math
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
from circor_fixtures import cloned_circor

REPO = Path(__file__).resolve().parents[1]
CIRCOR_MINI = REPO / "tests" / "data" / "circor-mini"


def load_bench():
    if str(REPO / "bench") not in sys.path:  # as run as a script: its helpers beside it
        sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("circor_results", REPO / "bench" / "circor_results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks the module up
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


FAKE_TRAIN = """
import json, signal, sys, time
from pathlib import Path
args = dict(a.split("=", 1) for a in sys.argv[1:])
run = Path(args["hydra.run.dir"])
last = run / "checkpoints" / "last.ckpt"
with open(run / "calls.jsonl", "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
def mark(event):  # the order of all trainings' starts and ends, for tests that run several at once
    if "timeline" in args:
        with open(args["timeline"], "a") as f:
            f.write(json.dumps([run.name, event]) + "\\n")
mark("start")
if "fail" in args or args.get("fail_run") == run.name or (
        "ckpt_path" in args and Path(args["ckpt_path"]).read_text() == "unreadable"):
    print("cannot go on")
    sys.exit(3)
def stop(*_):  # as train.py's pre-emption callback: a checkpoint, then exit 143
    last.parent.mkdir(exist_ok=True)
    last.write_text("part")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
if "rendezvous" in args:  # go on only once `meet` trainings have started (within `patience` s), else fail
    meeting = Path(args["rendezvous"])
    meeting.mkdir(exist_ok=True)
    (meeting / run.name).touch()
    waited = 0.0
    while len(list(meeting.iterdir())) < int(args.get("meet", 2)):
        if waited > float(args.get("patience", 10)):
            print("alone at the rendezvous")
            sys.exit(4)
        time.sleep(0.1)
        waited += 0.1
time.sleep(0 if "ckpt_path" in args else float(args["sleep"]))
last.parent.mkdir(exist_ok=True)
last.write_text("done")
mark("end")
if "score_checkpoint" in args:  # as train.py: the test patients' scores of a finetuning
    (run / "test_scores.json").write_text(json.dumps({"scores": {"patients": 2.0}, "patients": {}, "seconds": 0.5}))
"""


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    """bench.train runs this stand-in for train.py: it sleeps unless resumed, checkpoints on SIGTERM."""
    (tmp_path / "train.py").write_text(FAKE_TRAIN)
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    monkeypatch.setattr(bench, "MIN_START_SECONDS", 0)
    monkeypatch.setattr(bench, "GRACE_SECONDS", 20)
    return tmp_path


LAST = bench.LAST_CHECKPOINT


def calls(run_dir):
    return [json.loads(line) for line in (run_dir / "calls.jsonl").read_text().splitlines()]


def test_a_training_stopped_at_the_deadline_resumes_from_its_checkpoint_and_then_never_reruns(fake_train):
    run = fake_train / "runs" / "cell"
    assert bench.train(["sleep=60"], run, bench.Deadline(2 / 60), LAST) is None  # stopped after 2 s
    assert (run / "checkpoints" / "last.ckpt").read_text() == "part"
    first = json.loads((run / "runner.json").read_text())
    assert not first["finished"] and 1.5 < first["seconds"] < 30

    state = bench.train(["sleep=60"], run, bench.Deadline(0), LAST)
    assert state["finished"] and state["seconds"] > first["seconds"]
    assert state["devices"] == [bench.device_name()]
    assert calls(run)[1][-1] == f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    assert bench.train(["sleep=60"], run, bench.Deadline(0), LAST) == state
    assert len(calls(run)) == 2  # finished: not run again


def test_a_stop_signal_to_the_runner_checkpoints_the_training_and_stops(fake_train):
    deadline = bench.Deadline(0)
    threading.Timer(2.0, deadline.stop).start()  # what the runner's SIGTERM / SIGINT handler calls
    started = time.monotonic()
    assert bench.train(["sleep=60"], fake_train / "runs" / "cell", deadline, LAST) is None
    assert time.monotonic() - started < 30
    assert (fake_train / "runs" / "cell" / "checkpoints" / "last.ckpt").read_text() == "part"


def test_an_unresumable_checkpoint_restarts_the_training_and_a_failure_is_reported(fake_train):
    run = fake_train / "runs" / "cell"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_text("unreadable")
    assert bench.train(["sleep=0"], run, bench.Deadline(0), LAST)["finished"]
    assert [any(a.startswith("ckpt_path=") for a in call) for call in calls(run)] == [True, False]
    with pytest.raises(RuntimeError, match=r"train.py failed \(exit 3\)(.|\n)*cannot go on"):
        bench.train(["sleep=0", "fail=1"], fake_train / "runs" / "other", bench.Deadline(0), LAST)


def test_no_training_starts_too_close_to_the_deadline(fake_train, monkeypatch):
    monkeypatch.setattr(bench, "MIN_START_SECONDS", 60)
    assert bench.train(["sleep=0"], fake_train / "runs" / "cell", bench.Deadline(0.5), LAST) is None
    assert not (fake_train / "runs" / "cell").exists()


def test_a_run_of_other_settings_is_refused_not_reused_and_the_workers_may_change(fake_train):
    """Two grids sharing a --work folder (say 40 epochs of pretraining after 8) must not take each other's runs."""
    run = fake_train / "runs" / "pretrain"
    state = bench.train(["sleep=0", "trainer.max_epochs=8", "data.num_workers=5"], run, bench.Deadline(0), LAST)
    assert json.loads((run / "runner.json").read_text())["overrides"] == ["sleep=0", "trainer.max_epochs=8"]
    assert bench.train(["sleep=0", "trainer.max_epochs=8", "data.num_workers=3"], run, bench.Deadline(0), LAST) == state
    with pytest.raises(ValueError, match="holds a training of other settings .*trainer.max_epochs=40, "
                                         "trainer.max_epochs=8.*use another --work"):
        bench.train(["sleep=0", "trainer.max_epochs=40", "data.num_workers=5"], run, bench.Deadline(0), LAST)
    assert len(calls(run)) == 1


def test_a_run_finished_on_another_machine_without_its_output_is_trained_again(fake_train, capsys):
    run = fake_train / "runs" / "pretrain"
    first = bench.train(["sleep=0"], run, bench.Deadline(0), LAST)
    (run / LAST).unlink()  # what a copy of the run folders without the git-ignored checkpoints leaves
    again = bench.train(["sleep=0"], run, bench.Deadline(0), LAST)
    assert "finished earlier, but its checkpoints/last.ckpt is not here" in capsys.readouterr().out
    assert again["finished"] and again["seconds"] > first["seconds"] and (run / LAST).read_text() == "done"
    assert len(calls(run)) == 2 and not any(a.startswith("ckpt_path=") for a in calls(run)[1])


def fake_grid(fake_train, results, common, parallel=1, recipes=("murmur",)):
    """A Grid for the stand-in train.py: ``common`` goes to every training."""
    recipes = {t: f"experiment={bench.RECIPES[t]}" for t in recipes}
    settings = cell("scratch", 0, 0, 0.7)["settings"] | {"recipes": recipes, "folds": 5}  # no fold set complete
    args = bench.argparse.Namespace(out=str(fake_train / "report.md"), checkpoint="last", parallel=parallel,
                                    num_workers=2, members=1, machine_stays=False, score_max_seconds=[])
    (results / "cells").mkdir(parents=True, exist_ok=True)
    return bench.Grid(args, bench.Deadline(0), results, fake_train / "work", common, ["experiment=circor_pretrain"],
                      ["score_checkpoint=last"], settings)  # fmt: skip


def grid_jobs(grid, folds, arms, tasks=("murmur",)):
    return [job for fold in folds for arm in arms for job in bench.cell_jobs(grid, list(tasks), fold, 0, arm)]


def timeline_of(path):
    return [tuple(json.loads(line)) for line in path.read_text().splitlines()]


def test_a_pretraining_done_on_another_machine_is_done_again_before_its_remaining_finetuning(fake_train, capsys):
    results = fake_train / "committed"
    grid = fake_grid(fake_train, results, ["sleep=0"], recipes=("murmur_timing",))
    done = cell("pretrained", 0, 0, 0.7)  # the murmur cell came back from another machine; its runs stayed there
    (results / "cells" / "murmur_fold0_seed0_pretrained.json").write_text(json.dumps(done))
    jobs = bench.cell_jobs(grid, ["murmur", "murmur_timing"], 0, 0, "pretrained")
    assert [job.run_dir_name for job in jobs] == ["pretrain_fold0_seed0", "murmur_timing_fold0_seed0_pretrained"]
    assert bench.run_jobs(grid, jobs)
    out = capsys.readouterr().out
    assert "pretrain_fold0_seed0: finished elsewhere (the murmur cells started from it)" in out
    assert out.index("pretrain_fold0_seed0:") < out.index("experiment=circor_timing")  # then at once its finetuning
    pretraining = grid.work / "runs" / "pretrain_fold0_seed0"
    assert len(calls(pretraining)) == 1 and (pretraining / LAST).read_text() == "done"
    finetuning = calls(grid.work / "runs" / "murmur_timing_fold0_seed0_pretrained")
    assert f"task.pretrained={pretraining / LAST}" in finetuning[0] and "score_checkpoint=last" in finetuning[0]
    record = json.loads((results / "cells" / "murmur_timing_fold0_seed0_pretrained.json").read_text())
    assert record["pretrain_seconds"] > 0 and record["score_seconds"] == 0.5 and record["scores"] == {"patients": 2.0}
    assert record["parallel"] == 1 and record["num_workers"] == 2
    assert not (results / "runs").exists()  # run folders stay in --work


@pytest.mark.parametrize("parallel", [2, 3])
def test_parallel_trains_cells_of_different_folds_at_once(fake_train, parallel):
    """Each stand-in training waits until ``parallel`` trainings have started: only that many at once lets them
    finish, and the grid's order decides which start together (fold 0's cells, then fold 1's)."""
    results, timeline = fake_train / "results", fake_train / "timeline.jsonl"
    grid = fake_grid(fake_train, results, ["sleep=0", f"rendezvous={fake_train / 'meet'}", f"meet={parallel}",
                                           f"timeline={timeline}"], parallel, ("murmur", "murmur_timing"))
    jobs = grid_jobs(grid, [0, 1], ["scratch"], ("murmur", "murmur_timing"))[:parallel]
    assert bench.run_jobs(grid, jobs)
    cells = {p.stem: json.loads(p.read_text()) for p in (results / "cells").glob("*.json")}
    assert set(cells) == {job.run_dir_name for job in jobs}
    assert {name for name, _ in timeline_of(timeline)[:parallel]} == set(cells)  # all started before any ended
    assert all(record["parallel"] == parallel for record in cells.values())
    assert f"0.0 + 0.0 (--parallel {parallel})" in (fake_train / "report.md").read_text()


def test_one_at_a_time_cannot_meet_a_rendezvous_of_two(fake_train):
    grid = fake_grid(fake_train, fake_train / "results", ["sleep=0", f"rendezvous={fake_train / 'meet'}", "patience=1"])
    with pytest.raises(RuntimeError, match="alone at the rendezvous"):
        bench.run_jobs(grid, grid_jobs(grid, [0, 1], ["scratch"]))


def test_finetunings_start_after_their_pretraining_and_other_cells_fill_the_wait(fake_train):
    timeline = fake_train / "timeline.jsonl"
    grid = fake_grid(fake_train, fake_train / "results", ["sleep=1", f"timeline={timeline}"], 2,
                     ("murmur", "murmur_timing"))
    jobs = grid_jobs(grid, [0, 1], ["pretrained", "scratch"], ("murmur", "murmur_timing"))
    assert len(jobs) == 10 and bench.run_jobs(grid, jobs)
    events = timeline_of(timeline)
    assert len(events) == 20 and len(list((grid.results / "cells").glob("*.json"))) == 8
    for fold in (0, 1):
        pretrained_end = events.index((f"pretrain_fold{fold}_seed0", "end"))
        for task in ("murmur", "murmur_timing"):
            assert events.index((f"{task}_fold{fold}_seed0_pretrained", "start")) > pretrained_end
    # while fold 0's pretraining runs, the next training in the grid's order that needs nothing starts beside it
    assert set(events[:2]) == {("pretrain_fold0_seed0", "start"), ("murmur_fold0_seed0_scratch", "start")}
    running, most = 0, 0
    for _, event in events:
        running += 1 if event == "start" else -1
        most = max(most, running)
    assert most == 2


def test_a_failed_training_stops_the_others_which_resume_on_the_next_call(fake_train):
    grid = fake_grid(fake_train, fake_train / "results", ["sleep=60", "fail_run=murmur_fold1_seed0_scratch"], 2)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"train.py failed \(exit 3\)"):
        bench.run_jobs(grid, grid_jobs(grid, [0, 1, 2], ["scratch"]))
    assert time.monotonic() - started < 40  # not the other training's 60 s
    runs = grid.work / "runs"
    assert (runs / "murmur_fold0_seed0_scratch" / LAST).read_text() == "part"  # checkpointed, so it resumes
    assert not (runs / "murmur_fold2_seed0_scratch").exists()  # nothing new started after the failure


def test_trainings_the_deadline_leaves_no_time_for_are_counted_and_not_started(fake_train, monkeypatch, capsys):
    monkeypatch.setattr(bench, "MIN_START_SECONDS", 60)
    grid = fake_grid(fake_train, fake_train / "results", ["sleep=0"], 2)
    grid.deadline = bench.Deadline(0.5)
    assert not bench.run_jobs(grid, grid_jobs(grid, [0, 1, 2], ["scratch", "pretrained"]))
    assert "9 training(s) not started" in capsys.readouterr().out
    assert not (grid.work / "runs").exists()


def test_no_training_starts_that_the_recorded_durations_say_the_deadline_would_stop(fake_train, capsys):
    grid = fake_grid(fake_train, fake_train / "results", ["sleep=0"], 2)
    for seed, parallel, seconds in ((1, 2, 100.0), (2, 1, 400.0)):  # cells of earlier calls; this one runs --parallel 2
        record = cell("scratch", 0, seed, 0.7) | {"parallel": parallel, "finetune_seconds": seconds}
        (grid.results / "cells" / f"murmur_fold0_seed{seed}_scratch.json").write_text(json.dumps(record))
    assert bench.Durations(grid.results, 2).longest == {"pretrain": 0.0, "finetune": 100.0}
    assert bench.Durations(grid.results, 3).longest["finetune"] == 400.0  # none at --parallel 3: every cell counts
    resumed = grid.work / "runs" / "murmur_fold1_seed0_scratch"  # ran 80 s in an earlier call, then checkpointed
    (resumed / "checkpoints").mkdir(parents=True)
    (resumed / LAST).write_text("part")
    (resumed / "runner.json").write_text(json.dumps({"finished": False, "seconds": 80.0, "devices": []}))
    grid.deadline = bench.Deadline(1.0)  # 60 s: room for the resumed training's last 20 s, not for a new one's 100
    assert not bench.run_jobs(grid, grid_jobs(grid, [0, 1, 2], ["scratch"]))
    out = capsys.readouterr().out
    assert "murmur_fold0_seed0_scratch: not started: about 100 s needed" in out
    assert "murmur_fold2_seed0_scratch: not started" in out and "2 training(s) not started" in out
    assert (grid.results / "cells" / "murmur_fold1_seed0_scratch.json").is_file()
    assert not (grid.work / "runs" / "murmur_fold0_seed0_scratch").exists()


def test_a_pretraining_starts_only_where_a_finetuning_can_follow_it_before_the_deadline_unless_the_machine_stays(
        fake_train, capsys):
    grid = fake_grid(fake_train, fake_train / "results", ["sleep=0"], 2)
    record = cell("pretrained", 0, 1, 0.7) | {"parallel": 2, "pretrain_seconds": 30.0, "finetune_seconds": 100.0}
    (grid.results / "cells" / "murmur_fold0_seed1_pretrained.json").write_text(json.dumps(record))
    jobs = grid_jobs(grid, [0], ["pretrained"])
    pretraining, finetuning = jobs
    durations = bench.Durations(grid.results, 2)
    assert durations.needed(pretraining, bench.job_folder(grid, pretraining)) == 130.0  # its 30 s, then 100 s
    assert durations.needed(finetuning, bench.job_folder(grid, finetuning)) == 100.0
    grid.deadline = bench.Deadline(2.0)  # room for the pretraining alone, not for a finetuning after it
    assert not bench.run_jobs(grid, jobs)
    assert "pretrain_fold0_seed0: not started: about 130 s needed (the longest pretraining and finetuning " in (
        capsys.readouterr().out)
    assert not (grid.work / "runs").exists()
    grid.args.machine_stays = True  # the next call follows on this machine: the same deadline starts both
    grid.deadline = bench.Deadline(2.0)
    assert bench.run_jobs(grid, jobs)
    assert "not started" not in capsys.readouterr().out
    assert (grid.results / "cells" / "murmur_fold0_seed0_pretrained.json").is_file()


def test_a_cell_of_several_members_trains_each_with_its_seed_and_scores_them_as_one_ensemble(fake_train):
    grid = fake_grid(fake_train, fake_train / "results", ["sleep=0"], 2)
    grid.args.members, grid.args.score_max_seconds = 3, [5.0, 7.5]
    jobs = grid_jobs(grid, [0], ["pretrained"])
    cell = "murmur_fold0_seed0_pretrained"
    assert [job.run_dir_name for job in jobs] == ["pretrain_fold0_seed0", f"{cell}_member1", f"{cell}_member2", cell]
    assert bench.run_jobs(grid, jobs)
    runs = grid.work / "runs"
    member = calls(runs / f"{cell}_member2")[0]
    assert "seed=2000" in member and "data.split_seed=0" in member and "data.fold=0" in member
    assert not any(arg.startswith("score_checkpoint=") for arg in member)  # kept for the cell, not scored alone
    assert f"task.pretrained={runs / 'pretrain_fold0_seed0' / LAST}" in member  # the members share the pretraining
    own = calls(runs / cell)[0]
    assert "seed=0" in own and "score_checkpoint=last" in own and "score_max_seconds=[5,7.5]" in own
    assert not any(arg.startswith("score_max_seconds=") for arg in member)
    assert f"score_ensemble=['{runs / f'{cell}_member1' / LAST}','{runs / f'{cell}_member2' / LAST}']" in own
    record = json.loads((grid.results / "cells" / f"{cell}.json").read_text())
    seconds = [json.loads((runs / name / "runner.json").read_text())["seconds"]
               for name in (cell, f"{cell}_member1", f"{cell}_member2")]
    assert record["members"] == 3 and record["finetune_seconds"] == pytest.approx(sum(seconds))
    assert bench.Durations(grid.results, 2).longest["finetune"] == pytest.approx(sum(seconds) / 3)
    assert not (grid.results / "cells" / f"{cell}_member1.json").exists()
    assert "- each cell: 3 finetunings on its patients" in bench.render([record])
    assert "finetunings on its patients" not in bench.render([{**record, "members": 1}])
    assert bench.setting_changes({"finetune": ["a"]}, {"finetune": ["a"], "members": 3}) == [
        "- finetunings per cell, scored as one ensemble (`--members`): 1 -> 3"]


def test_a_grid_of_members_records_them_and_its_folder_refuses_another_count(fake_train, capsys, monkeypatch):
    monkeypatch.setattr(bench, "write_report", lambda *_: None)  # the stand-in's cells hold no patients to pool
    data = cloned_circor(fake_train / "circor", copies=2)
    argv = ["run", "--data", str(data), "--results", str(fake_train / "results"), "--out", str(fake_train / "r.md"),
            "--tasks", "murmur", "--folds", "2", "--seeds", "0", "--arms", "scratch", "--trainer", "cpu",
            "--num-workers", "0", "--override", "sleep=0"]  # fmt: skip
    assert bench.main([*argv, "--members", "2"]) == 0
    assert json.loads((fake_train / "results" / "grid.json").read_text())["members"] == 2
    assert "grid complete" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        bench.main([*argv, "--members", "3"])
    assert stop.value.code == 2 and "holds a grid with other settings (members)" in capsys.readouterr().err


def test_a_new_grid_records_its_partition_and_an_older_one_keeps_dealing_each_id_alone(fake_train, monkeypatch):
    monkeypatch.setattr(bench, "write_report", lambda *_: None)
    data = cloned_circor(fake_train / "circor", copies=2)
    argv = ["run", "--data", str(data), "--out", str(fake_train / "r.md"), "--tasks", "murmur", "--folds", "2",
            "--seeds", "0", "--arms", "scratch", "--trainer", "cpu", "--num-workers", "0", "--override", "sleep=0"]
    assert bench.main([*argv, "--results", str(fake_train / "new")]) == 0
    assert "data.group_linked_patients=true" in json.loads((fake_train / "new" / "grid.json").read_text())["common"]
    # a grid begun before the option: its grid.json names no partition, and it is resumed on its own
    older = fake_train / "older"
    older.mkdir()
    settings = json.loads((fake_train / "new" / "grid.json").read_text())
    settings["common"].remove("data.group_linked_patients=true")
    (older / "grid.json").write_text(json.dumps(settings))
    assert bench.main([*argv, "--results", str(older)]) == 0
    ran = [call for path in (older / "runs").rglob("calls.jsonl") for call in calls(path.parent)]
    assert ran and all("data.group_linked_patients=false" in call for call in ran)
    assert json.loads((older / "grid.json").read_text()) == settings  # unchanged


def test_run_folds_trains_only_those_folds_and_names_them_when_done(fake_train, capsys, monkeypatch):
    monkeypatch.setattr(bench, "write_report", lambda *_: None)  # the stand-in's cells hold no patients to pool
    data = cloned_circor(fake_train / "circor", copies=2)
    results = fake_train / "results"
    argv = ["run", "--data", str(data), "--results", str(results), "--out", str(fake_train / "r.md"),
            "--tasks", "murmur", "--folds", "3", "--seeds", "0", "1", "--arms", "scratch", "--trainer", "cpu",
            "--num-workers", "0", "--override", "sleep=0"]  # fmt: skip
    assert bench.main([*argv, "--run-folds", "1"]) == 0
    assert "folds 1 complete" in capsys.readouterr().out
    assert sorted(p.name for p in (results / "cells").glob("*.json")) == [
        "murmur_fold1_seed0_scratch.json", "murmur_fold1_seed1_scratch.json"]
    assert bench.main(argv) == 0  # the others' turn: fold 1's cells are not trained again
    out = capsys.readouterr().out
    assert "grid complete" in out and "fold1" not in out and len(list((results / "cells").glob("*.json"))) == 6
    with pytest.raises(SystemExit) as stop:
        bench.main([*argv, "--run-folds", "3"])
    assert stop.value.code == 2 and "--run-folds must name folds in 0..2 (--folds 3), got [3]" in (
        capsys.readouterr().err)


def test_members_need_the_last_checkpoint_and_at_least_one(tmp_path, capsys):
    for options in (["--members", "2", "--checkpoint", "best"], ["--members", "0"]):
        with pytest.raises(SystemExit) as stop:
            bench.main(["run", "--data", str(tmp_path), "--results", str(tmp_path / "r"), *options])
        assert stop.value.code == 2 and "--members must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize(("p", "df", "expected"), [(0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 3, 3.1824),
                                                    (0.975, 4, 2.7764), (0.975, 14, 2.1448), (0.95, 9, 1.8331)])
def test_t_quantiles_match_the_tables(p, df, expected):
    assert bench.t_quantile(p, df) == pytest.approx(expected, abs=1e-4)


def test_interval_is_the_corrected_resampled_t_interval():
    # by hand: mean 0.03; s^2 = (0.0004 + 0 + 0.0001 + 0.0009) / 3; times (1/4 + 1/(2 - 1)); t(0.975, 3) = 3.182446
    mean, half, n = bench.interval([0.01, 0.03, 0.02, 0.06], 1.0)
    assert (mean, n) == (pytest.approx(0.03), 4)
    assert half == pytest.approx(3.182446 * math.sqrt(1.25 * 0.0014 / 3), rel=1e-5)
    assert bench.interval([0.5, math.nan], 0.25)[1:] == (pytest.approx(math.nan, nan_ok=True), 1)


# patients of fold 0 and fold 1 (Present=0, Unknown=1, Absent=2): pooled, Present 1/1, Unknown 0/1, Absent 2/2
FOLD_PATIENTS = {
    0: {"id": ["11", "12"], "target": [0, 2], "pred": [0, 2], "probs": [[0.7, 0.1, 0.2], [0.1, 0.2, 0.7]]},
    1: {"id": ["13", "14"], "target": [1, 2], "pred": [2, 2], "probs": [[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]]},
}


def cell(arm, fold, seed, wa, cost=12000.0):
    scores = {"weighted_accuracy": wa, "uar": 0.5, "auroc": math.nan, "recall_Unknown": 0.25, "cost": cost,
              "patients": 2.0}
    settings = {"folds": 2, "checkpoint": "last", "pretrain": ["experiment=circor_pretrain"],
                "finetune": ["trainer.max_epochs=8"], "common": ["trainer=gpu", "data.split=kfold"],
                "recipes": {"murmur": "experiment=circor_murmur"}, "data": "circor-dev"}
    patients = {**FOLD_PATIENTS[fold], "class_names": ["Present", "Unknown", "Absent"], "rule": "hierarchical",
                "outcome": [-1, -1], "recordings": [4, 4]}
    return {"task": "murmur", "fold": fold, "seed": seed, "arm": arm, "cards": ["NVIDIA H100 80GB HBM3"],
            "pretrain_seconds": 60.0 if arm == "pretrained" else 0.0,
            "finetune_seconds": 120.0, "score_seconds": 3.0, "settings": settings, "scores": scores,
            "patients": patients}  # fmt: skip


def test_the_correction_is_a_test_fold_over_the_patients_the_finetuning_trained_on():
    """k - 1 folds train, less the val patients carved from them, less the labels data.label_fraction leaves out;
    paired grids take the larger ratio (the wider interval)."""
    grid = cell("scratch", 0, 0, 0.7)
    five = {**grid, "settings": {**grid["settings"], "folds": 5}}
    assert bench.test_to_train([five]) == pytest.approx(1 / (4 * 0.9))  # circor-dev: 141 over 508-509
    quarter = {**five, "settings": {**five["settings"], "finetune": ["data.label_fraction=0.25"]}}
    assert bench.test_to_train([quarter]) == pytest.approx(1 / (4 * 0.9 * 0.25))
    assert bench.test_to_train([five, quarter]) == bench.test_to_train([quarter])
    no_val = {**five, "settings": {**five["settings"], "common": ["++data.val_fraction=0"]}}
    assert bench.test_to_train([no_val]) == pytest.approx(1 / 4)


def test_arms_of_one_fold_that_scored_other_patients_are_not_paired():
    scratch, pretrained = cell("scratch", 0, 0, 0.7), cell("pretrained", 0, 0, 0.8)
    assert bench.paired_differences([scratch, pretrained], "weighted_accuracy") == [pytest.approx(0.1)]
    moved = {**pretrained, "patients": {**pretrained["patients"], "id": ["11", "99"]}}  # another partition
    with pytest.raises(ValueError, match="fold 0 seed 0: the pretrained and scratch cells scored different patients"):
        bench.paired_differences([scratch, moved], "weighted_accuracy")


def test_report_gives_means_paired_differences_and_pooled_scores_with_hand_checked_intervals(tmp_path):
    scratch = [0.70, 0.72, 0.74, 0.76]  # (fold, seed) = (0, 0), (1, 0), (0, 1), (1, 1)
    pretrained = [0.71, 0.75, 0.76, 0.82]  # differences 0.01, 0.03, 0.02, 0.06
    (tmp_path / "cells").mkdir()
    for index, (fold, seed) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
        for arm, values in (("scratch", scratch), ("pretrained", pretrained)):
            record = cell(arm, fold, seed, values[index])
            (tmp_path / "cells" / f"murmur_fold{fold}_seed{seed}_{arm}.json").write_text(json.dumps(record))
    bench.write_report(tmp_path, tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    # scratch: mean 0.73, s^2 = 0.002 / 3, corrected x (1/4 + 1/((2 - 1) x (1 - 0.1))) = 49/36 (the val tenth of
    # the other fold trains nothing), t(0.975, 3): half-width 0.0959
    assert ("| from scratch | 4 | 0.730 [0.634, 0.826] | 0.500 [0.500, 0.500] | n/a | 0.250 [0.250, 0.250] | "
            "12000 [12000, 12000] | 2.0 | NVIDIA H100 80GB HBM3 |") in text
    # paired: mean 0.03, s^2 = 0.0014 / 3, the same correction: half-width 0.0802
    assert "| 4 | +0.030 [-0.050, +0.110] | +0.000 [+0.000, +0.000] | n/a |" in text
    # pooled over both folds: weighted accuracy (5 + 0 + 2) / (5 + 3 + 2), UAR (1 + 0 + 1) / 3
    assert "| scratch | 0 | 0.700 | 0.667 | 1.000 | 0.000 | n/a | 4 |" in text
    assert "| 1 | 1 | pretrained | 0.820 | 0.500 | n/a | 0.250 | 12000 | 2 | NVIDIA H100 80GB HBM3 | 1.0 + 2.0 |" in text
    assert "Nadeau-Bengio: s² (1/n + 1.111), 1.111 a test fold's size over the patients its models trained on" in text
    assert "Incomplete grid" not in text
    (tmp_path / "cells" / "murmur_fold1_seed1_pretrained.json").unlink()
    bench.write_report(tmp_path, tmp_path / "report.md")
    assert "**Incomplete grid: 7 of the 8 cells** (label schemes murmur; seeds 0, 1;" in (tmp_path / "report.md").read_text()
    bench.main(["report", "--results", str(tmp_path), "--out", str(tmp_path / "report.md"), "--seeds", "0", "1", "2",
                "--tasks", "murmur", "murmur_timing"])
    assert ("**Incomplete grid: 7 of the 24 cells** (label schemes murmur, murmur_timing; seeds 0, 1, 2; 2 folds; "
            "arms pretrained, scratch)") in (tmp_path / "report.md").read_text()
    for path in (tmp_path / "cells").glob("*_pretrained.json"):  # a screen of one arm counts that arm's cells
        path.unlink()
    bench.main(["report", "--results", str(tmp_path), "--out", str(tmp_path / "report.md"), "--arms", "scratch"])
    assert "Incomplete grid" not in (tmp_path / "report.md").read_text()
    bench.main(["report", "--results", str(tmp_path), "--out", str(tmp_path / "report.md")])
    assert "**Incomplete grid: 4 of the 8 cells**" in (tmp_path / "report.md").read_text()


def test_report_rewrites_the_readme_summary_between_its_markers_only(tmp_path, capsys):
    write_cells(tmp_path, "scratch", [0.70, 0.72, 0.74, 0.76])
    write_cells(tmp_path, "pretrained", [0.71, 0.75, 0.76, 0.82])
    readme = tmp_path / "README.md"
    start, end = bench.README_MARKERS
    readme.write_text(f"# Title\n\nbefore\n{start}\nold table\n{end}\nafter\n")
    args = ["report", "--results", str(tmp_path), "--out", str(tmp_path / "report.md"), "--readme", str(readme)]
    assert bench.main(args) == 0
    text = readme.read_text()
    assert text.startswith(f"# Title\n\nbefore\n{start}\n8 of the grid's 8 cells:") and "old table" not in text
    assert text.endswith(f"{end}\nafter\n")
    # the intervals of test_report_gives_means_paired_differences_and_pooled_scores_with_hand_checked_intervals
    assert ("| `murmur` | from scratch | 4 | 0.730 [0.634, 0.826] | 0.500 [0.500, 0.500] | 0.250 [0.250, 0.250] | - "
            "| 2.0 |") in text
    assert "| `murmur` | circor_pretrain, then finetuned | 4 | 0.760 " in text and text.count("| `murmur` |") == 2
    assert ("Pretrained minus scratch, pair by pair: +0.030 [-0.050, +0.110] in murmur weighted accuracy "
            "(`murmur`, 4 pairs): every interval spans 0, so no ordering of the arms is claimed.") in text
    write_cells(tmp_path, "pretrained", [0.73, 0.751, 0.769, 0.79])  # differences 0.03, 0.031, 0.029, 0.03
    bench.main(args)
    assert "(`murmur`, 4 pairs): the interval of murmur weighted accuracy (`murmur`) excludes 0." in readme.read_text()
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit) as exit_:
        bench.main(args)
    assert exit_.value.code == 2 and "has no block between the lines" in capsys.readouterr().err
    assert readme.read_text() == "no markers\n"


def write_cells(folder, arm, values, finetune=None, seeds=(0, 1)):
    """Cells of (fold, seed) = (0, 0), (1, 0), (0, 1), (1, 1) with these weighted accuracies."""
    (folder / "cells").mkdir(parents=True, exist_ok=True)
    for value, (seed, fold) in zip(values, itertools.product(seeds, (0, 1))):
        record = cell(arm, fold, seed, value)
        if finetune is not None:
            record["settings"]["finetune"] = finetune
        (folder / "cells" / f"murmur_fold{fold}_seed{seed}_{arm}.json").write_text(json.dumps(record))


def test_compare_pairs_two_recipes_by_fold_and_seed_with_hand_checked_intervals(tmp_path):
    write_cells(tmp_path / "base", "scratch", [0.70, 0.72, 0.74, 0.76])
    write_cells(tmp_path / "longer", "scratch", [0.71, 0.75, 0.76, 0.82], finetune=["trainer.max_epochs=20"])
    write_cells(tmp_path / "longer", "scratch", [0.9, 0.9], finetune=["trainer.max_epochs=20"], seeds=(2,))  # no pair
    out = tmp_path / "compare.md"
    assert bench.main(["compare", "--base", str(tmp_path / "base"), "--other", str(tmp_path / "longer"),
                       "--out", str(out)]) == 0
    text = out.read_text()
    assert "- finetune: adds `trainer.max_epochs=20`; drops `trainer.max_epochs=8`" in text
    assert "4 pairs (seeds 0, 1)." in text
    assert "| `base` (scratch) | 0.730 [0.634, 0.826] |" in text
    # the differences 0.01, 0.03, 0.02, 0.06: as the report's paired difference
    assert "| difference | +0.030 [-0.050, +0.110] | +0.000 [+0.000, +0.000] | n/a |" in text
    # the cells' own spread and their correlation, pair by pair (constant or missing scores have none)
    assert "| sd, `base` | 0.026 | 0.000 | n/a | 0.000 | 0 |" in text
    assert "| sd, `longer` | 0.045 | 0.000 | n/a | 0.000 | 0 |" in text
    assert "| correlation | 0.97 | n/a | n/a | n/a | n/a |" in text


def test_compare_refuses_cells_that_scored_other_patients_or_folds(tmp_path, capsys):
    write_cells(tmp_path / "base", "scratch", [0.70, 0.72, 0.74, 0.76])
    write_cells(tmp_path / "other", "pretrained", [0.71, 0.75, 0.76, 0.82])
    moved = tmp_path / "other" / "cells" / "murmur_fold1_seed1_pretrained.json"
    record = json.loads(moved.read_text())
    record["patients"]["id"] = ["13", "15"]
    moved.write_text(json.dumps(record))
    args = ["compare", "--base", str(tmp_path / "base"), "--other", str(tmp_path / "other"), "--out",
            str(tmp_path / "compare.md")]
    with pytest.raises(SystemExit) as exit_:
        bench.main([*args, "--other-arm", "pretrained"])
    assert exit_.value.code == 2
    assert "murmur fold 1 seed 1: the two grids scored different patients" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(args)  # no scratch cell in "other"
    assert "no (label scheme, fold, seed) cell of arm scratch" in capsys.readouterr().err
    record["settings"]["folds"] = 3
    for path in (tmp_path / "other" / "cells").glob("*.json"):
        path.write_text(json.dumps({**json.loads(path.read_text()), "settings": record["settings"]}))
    with pytest.raises(ValueError, match="2 and 3 folds"):
        bench.render_comparison(tmp_path / "base", tmp_path / "other", "scratch", "pretrained")
    assert not (tmp_path / "compare.md").exists()


def test_pooling_refuses_a_patient_tested_twice():
    with pytest.raises(ValueError, match="two folds"):
        bench.pooled_scores([cell("scratch", 0, 0, 0.7), cell("scratch", 0, 0, 0.7)])


def test_a_results_folder_refuses_a_grid_with_other_settings(tmp_path):
    bench.check_grid(tmp_path, {"folds": 5, "finetune": ["trainer.max_epochs=8"]})
    bench.check_grid(tmp_path, {"folds": 5, "finetune": ["trainer.max_epochs=8"]})
    with pytest.raises(ValueError, match=r"other settings \(finetune\): use another --results"):
        bench.check_grid(tmp_path, {"folds": 5, "finetune": ["trainer.max_epochs=9"]})


@pytest.mark.slow
def test_tiny_cross_validation_grid_on_cpu_trains_scores_resumes_and_reports(tmp_path, capsys):
    data = cloned_circor(tmp_path / "circor", copies=2)  # 12 patients, two per stratum at least
    results, out = tmp_path / "runs", tmp_path / "report.md"
    tiny = ["+model.depth=2", "+model.embed_dim=16", "data.target_length=128", "data.batch_size=8",
            "trainer.limit_train_batches=2", "trainer.num_sanity_val_steps=0", "model.backend=torch",
            "data.val_fraction=0.2"]  # fmt: skip
    argv = ["run", "--data", str(data), "--results", str(results), "--out", str(out), "--trainer", "cpu",
            "--tasks", "murmur", "murmur_timing", "--folds", "2", "--seeds", "0", "--pretrain-epochs", "1",
            "--finetune-epochs", "1", "--num-workers", "0", "--override", *tiny,
            "--pretrain-override", "mask.count=8", "mask.val_count=8",
            "--finetune-override", "task.fstride=16", "task.tstride=16", "task.warmup_steps=1"]  # fmt: skip
    bench.main([*argv, "--parallel", "3"])
    assert "grid complete" in capsys.readouterr().out
    cells = {p.stem: json.loads(p.read_text()) for p in (results / "cells").glob("*.json")}
    assert set(cells) == {f"{task}_fold{fold}_seed0_{arm}" for task in ("murmur", "murmur_timing")
                          for fold in (0, 1) for arm in ("scratch", "pretrained")}  # fmt: skip
    for fold in (0, 1):
        # every patient is scored once per seed, in its own fold
        ids = [cells[f"murmur_fold{fold}_seed0_scratch"]["patients"]["id"] for fold in (0, 1)]
        assert sorted(ids[0] + ids[1]) == sorted(set(ids[0] + ids[1])) and len(ids[0] + ids[1]) == 12
        # one pretraining per fold serves both label schemes; it saw the fold's options
        config = (results / "runs" / f"pretrain_fold{fold}_seed0" / ".hydra" / "overrides.yaml").read_text()
        assert "data.split=kfold" in config and f"data.fold={fold}" in config and "data.split_seed=0" in config
        for task in ("murmur", "murmur_timing"):
            record = cells[f"{task}_fold{fold}_seed0_pretrained"]
            assert record["pretrain_seconds"] > 0 and record["finetune_seconds"] > 0
            assert record["cards"] == [bench.device_name()] and record["scores"]["patients"] == 6
            times = record["wall_times"]["finetune"]  # where the finetuning's wall time went
            assert times["steps"] == 2 and times["validations"] == 1 and times["checkpoint_saves"] == 1  # no sanity
            assert times["after_fit_seconds"] >= record["score_seconds"] > 0 and times["start_seconds"] > 0
            assert times["seconds"] == pytest.approx(record["finetune_seconds"], abs=1e-3)  # one attempt
            assert record["wall_times"]["pretrain"]["steps"] == 2
            log = (results / "runs" / f"{task}_fold{fold}_seed0_pretrained" / "stdout.log").read_text()
            assert "finetuning from" in log and f"pretrain_fold{fold}_seed0" in log
    assert 0 <= cells["murmur_timing_fold0_seed0_scratch"]["scores"]["murmur_weighted_accuracy"] <= 1
    for record in cells.values():  # each cell keeps its recordings, from which the recorded rule is recomputed
        kept = record["patients"]["recording_rows"]
        assert set(kept["patient"]) == set(record["patients"]["id"]) and len(kept["id"]) == len(set(kept["id"]))
        assert len(kept["id"]) == sum(record["patients"]["recordings"])
        if record["task"] == "murmur":
            assert bench.hierarchical(bench.recording_log_probs(record)) == record["patients"]["pred"]
    text = out.read_text()
    assert "### `murmur`" in text and "### `murmur_timing`" in text and "Pooled out-of-fold" in text
    assert "| 2 | " in text.split("Paired difference")[1]  # two (fold, seed) pairs per scheme

    bench.main(argv)  # everything is done: nothing reruns
    second = capsys.readouterr().out
    assert "train.py" not in second and "grid complete" in second
    assert json.loads((results / "cells" / "murmur_fold0_seed0_scratch.json").read_text()) == cells[
        "murmur_fold0_seed0_scratch"]

    # a cell trained alone scores as it did among three trainings at once
    again = "murmur_fold1_seed0_pretrained"
    (results / "cells" / f"{again}.json").unlink()
    shutil.rmtree(results / "runs" / again)
    bench.main([*argv, "--score-max-seconds", "5"])  # and scored on each recording's first 5 s as well
    assert capsys.readouterr().out.count("+ ") == 1  # that finetuning only: its pretraining is still here
    alone = json.loads((results / "cells" / f"{again}.json").read_text())
    assert alone["parallel"] == 1 and cells[again]["parallel"] == 3
    assert alone["scores"] == cells[again]["scores"] and alone["patients"] == cells[again]["patients"]
    short = alone["by_max_seconds"]["5"]
    assert short["patients"] == 6 and 0 <= short["weighted_accuracy"] <= 1
    assert short != alone["scores"]  # fewer segments per recording: other mean logits
    table = out.read_text().split("Scored again on each recording's first N s only")[1]
    assert "| pretrained | first 5 s | 1 |" in table and "| pretrained | first 5 s minus whole | 1 |" in table
    assert "scratch | first" not in table.split("### ")[0]  # only the cell that was scored so


def rule_cell(fold, seed, target, probs, arm="scratch"):
    record = cell(arm, fold, seed, 0.5)
    ids = [f"{fold}{index}" for index in range(len(target))]
    record["patients"].update(id=ids, target=target, probs=probs, pred=[2] * len(target),
                              outcome=[-1] * len(target), recordings=[4] * len(target))
    return record


def test_decision_rules_fit_nothing_on_the_scored_fold_and_average_seeds_per_patient(tmp_path, capsys):
    # fold 1 (the other fold of fold 0): an Unknown patient one offset of 0.25 to 0.75 turns Unknown, an Absent one
    # that turns at 0.78, an Absent one a Present offset of 0.69 turns Present: best offsets (0, 0.25), the smallest
    fold1 = rule_cell(1, 0, [1, 2, 2], [[0.1, 0.4, 0.5], [0.05, 0.3, 0.65], [0.3, 0.1, 0.6]])
    fold0 = rule_cell(0, 0, [1, 0], [[0.1, 0.42, 0.48], [0.2, 0.3, 0.5]])
    weights = [5.0, 3.0, 1.0]
    assert bench.fitted_offsets([fold1], weights) == (0.0, 0.25)
    flipped = rule_cell(0, 0, [2, 2], fold0["patients"]["probs"])  # the fold's own targets choose nothing
    for scored in (fold0, flipped):
        rules = bench.rule_predictions([scored, fold1])
        assert rules["fitted offsets"][(0, 0, "scratch")] == [1, 2]
        assert rules["recorded"][(0, 0, "scratch")] == [2, 2] and rules["mean"][(0, 0, "scratch")] == [2, 2]
        assert rules["challenge weights"][(0, 0, "scratch")] == [1, 0]  # 5 x 0.2 > 3 x 0.3 > 1 x 0.5
        assert rules["seed ensemble"] == {}  # one seed: no patient has a second prediction
    # seed 1 scores the same patients in the same folds: the ensemble averages each patient's two rows
    seed1 = [rule_cell(0, 1, [1, 0], [[0.1, 0.1, 0.8], [0.9, 0.05, 0.05]]),
             rule_cell(1, 1, [1, 2, 2], fold1["patients"]["probs"])]
    rules = bench.rule_predictions([fold0, fold1, *seed1])
    assert rules["seed ensemble"][(0, 0, "scratch")] == [2, 0]  # [0.1, 0.26, 0.64], [0.55, 0.175, 0.275]
    assert rules["seed ensemble"][(0, 1, "scratch")] == [2, 0]
    # the report scores every rule as the grid does, with the difference from the recorded predictions
    def write(records):
        (tmp_path / "cells").mkdir(exist_ok=True)
        for r in records:
            (tmp_path / "cells" / f"murmur_fold{r['fold']}_seed{r['seed']}_scratch.json").write_text(json.dumps(r))

    write([fold0, fold1, *seed1])
    assert bench.main(["rules", "--results", str(tmp_path), "--out", str(tmp_path / "rules.md")]) == 0
    text = (tmp_path / "rules.md").read_text()
    # fold 0, seed 0: the offsets get the Unknown patient (3 of 5 + 3), the recorded Absent for both get none
    assert bench.patient_scores_of([fold0], [1, 2])["weighted_accuracy"] == 3 / 8
    assert bench.patient_scores_of([fold0])["weighted_accuracy"] == 0.0
    assert "| recorded | 4 |" in text and "| fitted offsets | 4 |" in text and "| seed ensemble | 4 |" in text
    assert "### circor_pretrain" not in text
    for record in (fold0, fold1, *seed1):
        record["patients"]["class_names"] = ["absent", "unknown", "present"]
    write([fold0, fold1, *seed1])
    with pytest.raises(SystemExit) as exit_:
        bench.main(["rules", "--results", str(tmp_path), "--out", str(tmp_path / "rules.md")])
    assert exit_.value.code == 2 and "decision rules need the Challenge's murmur classes" in capsys.readouterr().err


def with_recordings(record, rows):
    """``record`` with kept recordings: (patient, recording, probabilities) rows, stored as their log (logits)."""
    record["patients"]["recording_rows"] = {
        "patient": [row[0] for row in rows], "id": [row[1] for row in rows],
        "target": [2] * len(rows), "logits": [[math.log(p) for p in row[2]] for row in rows],
    }  # fmt: skip
    return record


def test_recording_rules_fit_offsets_on_the_other_folds_and_average_recordings_over_seeds(tmp_path):
    # the other fold: Absent patient 10's one recording leans Present (0.5 against 0.4); Present patient 11's
    # clearly Present: a Present offset of -0.25 (the smallest shift that scores both right) is fitted there
    fold1 = with_recordings(rule_cell(1, 0, [2, 0], [[0.5, 0.1, 0.4], [0.7, 0.1, 0.2]]),
                            [("10", "10a", [0.5, 0.1, 0.4]), ("11", "11a", [0.7, 0.1, 0.2])])
    fold1["patients"]["pred"] = [0, 0]
    assert bench.fitted_recording_offsets(bench.recording_log_probs(fold1), fold1["patients"]["target"],
                                          [5.0, 3.0, 1.0]) == (-0.25, 0.0)
    # the scored fold: Absent 00 (0.5 against 0.45 at its recording) turns Absent; Present 01 stays Present
    # through its second recording, which the hierarchical rule needs only one of
    recordings = [("00", "00a", [0.5, 0.05, 0.45]), ("01", "01a", [0.2, 0.1, 0.7]), ("01", "01b", [0.6, 0.1, 0.3])]
    fold0 = with_recordings(rule_cell(0, 0, [2, 0], [[0.5, 0.05, 0.45], [0.4, 0.1, 0.5]]), recordings)
    fold0["patients"]["pred"] = [0, 0]
    assert bench.hierarchical(bench.recording_log_probs(fold0)) == fold0["patients"]["pred"]  # the recorded rule
    flipped = with_recordings(rule_cell(0, 0, [0, 2], fold0["patients"]["probs"]), recordings)
    for scored in (fold0, flipped):  # the fold's own targets choose nothing
        rules = bench.rule_predictions([scored, fold1])
        assert rules["recording offsets"][(0, 0, "scratch")] == [2, 0]
        assert rules["seed ensemble, recordings"] == {}  # one seed
    # seed 1 scored the same recordings: each is averaged over the two seeds before the hierarchical rule
    seed1 = [with_recordings(rule_cell(0, 1, [2, 0], [[0.3, 0.1, 0.6], [0.3, 0.15, 0.55]]),
                             [("00", "00a", [0.3, 0.1, 0.6]), ("01", "01a", [0.1, 0.1, 0.8]),
                              ("01", "01b", [0.5, 0.2, 0.3])]),
             with_recordings(rule_cell(1, 1, [2, 0], fold1["patients"]["probs"]),
                             [("10", "10a", [0.5, 0.1, 0.4]), ("11", "11a", [0.7, 0.1, 0.2])])]
    rules = bench.rule_predictions([fold0, fold1, *seed1])
    # 00a: [0.4, 0.075, 0.525] Absent; 01a [0.15, 0.1, 0.75] Absent, 01b [0.55, 0.15, 0.3] Present
    assert rules["seed ensemble, recordings"][(0, 0, "scratch")] == [2, 0]
    # cells scored before cells kept their recordings take no part in these rules
    rules = bench.rule_predictions([rule_cell(0, 0, [2, 0], fold0["patients"]["probs"]), fold1])
    assert rules["recording offsets"] == {} and rules["seed ensemble, recordings"] == {}
    (tmp_path / "cells").mkdir()
    for r in (fold0, fold1, *seed1):
        (tmp_path / "cells" / f"murmur_fold{r['fold']}_seed{r['seed']}_scratch.json").write_text(json.dumps(r))
    assert bench.main(["rules", "--results", str(tmp_path), "--out", str(tmp_path / "rules.md")]) == 0
    text = (tmp_path / "rules.md").read_text()
    assert "| recording offsets | 4 |" in text and "| seed ensemble, recordings | 4 |" in text


def test_quality_gate_turns_only_non_present_predictions_unknown_and_is_fitted_on_the_other_folds(tmp_path, capsys):
    from ssamba.data.quality import PATIENT_FEATURES

    def rows(table):  # two informative statistics, the rest constant
        return {pid: values + [0.0] * (len(PATIENT_FEATURES) - 2) for pid, values in table.items()}

    # the other fold: Unknown patients have a high first feature, the others a low one; all predicted Absent
    others = rule_cell(1, 0, [1, 1, 2, 2, 0], [[0.1, 0.2, 0.7]] * 5)
    others["patients"]["pred"] = [2, 2, 2, 2, 0]
    quality = rows({"10": [3.0, 0.0], "11": [2.5, 1.0], "12": [0.0, 0.5], "13": [-0.5, 0.0], "14": [0.2, 1.0],
                    "00": [2.8, 0.5], "01": [3.0, 0.5], "02": [0.1, 0.5]})
    scored = rule_cell(0, 0, [1, 0, 2], [[0.1, 0.2, 0.7]] * 3)
    scored["patients"]["pred"] = [2, 0, 2]
    # a high score makes Absent Unknown, never Present: the Present prediction stays
    assert bench.quality_gate(scored, [others], quality) == [1, 0, 2]
    flipped = rule_cell(0, 0, [2, 2, 1], scored["patients"]["probs"])  # the fold's own targets choose nothing
    flipped["patients"]["pred"] = [2, 0, 2]
    assert bench.quality_gate(flipped, [others], quality) == [1, 0, 2]
    assert bench.rule_predictions([scored, others], quality)["quality gate"][(0, 0, "scratch")] == [1, 0, 2]
    assert bench.rule_predictions([scored, others])["quality gate"] == {}  # no quality features: no gate
    no_unknown = rule_cell(1, 0, [2, 2, 0, 2, 2], [[0.1, 0.2, 0.7]] * 5)  # nothing to fit on: the cell is left out
    assert bench.quality_gate(scored, [no_unknown], quality) is None
    del quality["01"]
    with pytest.raises(ValueError, match="patient 01 of the cells has no recording in --data"):
        bench.quality_gate(scored, [others], quality)


def test_rules_with_data_read_the_recordings_and_add_the_quality_gate(tmp_path, capsys):
    data = cloned_circor(tmp_path / "circor", copies=2)
    patients = [row.split(",")[0] for row in (data / "training_data.csv").read_text().splitlines()[1:]]
    murmur = {"Present": 0, "Unknown": 1, "Absent": 2}
    classes = {row.split(",")[0]: murmur[row.split(",")[7]]
               for row in (data / "training_data.csv").read_text().splitlines()[1:]}
    (tmp_path / "cells").mkdir()
    for fold, ids in enumerate((patients[:6], patients[6:])):  # each fold holds one copy of the Unknown patient
        record = rule_cell(fold, 0, [classes[i] for i in ids], [[0.2, 0.1, 0.7]] * len(ids))
        record["patients"]["id"] = ids
        (tmp_path / "cells" / f"murmur_fold{fold}_seed0_scratch.json").write_text(json.dumps(record))
    out = tmp_path / "rules.md"
    assert bench.main(["rules", "--results", str(tmp_path), "--data", str(data), "--out", str(out)]) == 0
    text = out.read_text()
    assert "signal quality: 12 patients" in capsys.readouterr().out
    assert "- **quality gate**:" in text and "| quality gate | 2 |" in text
    bench.main(["rules", "--results", str(tmp_path), "--out", str(out)])
    assert "quality gate" not in out.read_text()
    # the same gate for evaluate.py, fitted on every fold's predictions at once
    from ssamba.data.quality import PATIENT_FEATURES
    from ssamba.metrics.gate import QualityGate

    assert bench.main(["gate", "--results", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "g.json")]) == 0
    assert "fitted on 2 cells (12 patient predictions, 2 Unknown)" in capsys.readouterr().out
    gate = QualityGate.load(tmp_path / "g.json", PATIENT_FEATURES)
    assert "scratch arm's 2 murmur cells" in gate.fitted_on
    with pytest.raises(SystemExit):
        bench.main(["gate", "--results", str(tmp_path), "--data", str(data), "--arm", "pretrained", "--out",
                    str(tmp_path / "g.json")])
    assert "no `murmur` cells of arm pretrained" in capsys.readouterr().err
    broken = next((data / "training_data").glob(f"{patients[0]}_*.wav"))  # one unreadable, one missing recording
    broken.unlink()
    broken.write_bytes(b"not audio")
    next((data / "training_data").glob(f"{patients[1]}_*.wav")).unlink()
    assert bench.main(["rules", "--results", str(tmp_path), "--data", str(data), "--out", str(out)]) == 0
    assert "signal quality: 12 patients, 2 recordings skipped (first: " in capsys.readouterr().out
