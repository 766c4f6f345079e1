"""``python -m ssamba.prepare`` on downloads rebuilt in the official layouts with tiny generated
audio: counts, manifests the datamodule reads, idempotence, and one-line errors for bad layouts."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ssamba.data import ManifestDataModule
from ssamba.prepare.__main__ import main, prepare
from ssamba.prepare.audioset import name_keys, pick
from ssamba.prepare.speechcommands import SUPERB_WORDS, V1_WORDS, V2_WORDS

FAST = {"batch_size": 4, "target_length": 32, "num_workers": 0, "pin_memory": False}


def write_wav(path, seconds=0.15, rate=16000, seed=0):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).uniform(-0.5, 0.5, int(seconds * rate))
    sf.write(path, data, rate, subtype="PCM_16", format="FLAC" if path.suffix == ".flac" else "WAV")
    return path


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_twice(argv: list[str], dst: Path) -> dict:
    """Prepare twice: the second run must write nothing and leave every file untouched."""
    first = prepare(argv)
    before = snapshot(dst)
    second = prepare(argv)
    assert second["written"] == [] and second["unchanged"] == len(first["written"])
    assert snapshot(dst) == before
    assert {k: v for k, v in first.items() if k not in ("written", "unchanged")} == \
        {k: v for k, v in second.items() if k not in ("written", "unchanged")}
    return first


def one_line_error(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = str(exit_info.value.code)
    assert "\n" not in message and message.startswith(f"ssamba.prepare {argv[0]}: ")
    return message


def datamodule(dst: Path, train: str, val: str | None = None, label_csv: str | None = "class_labels_indices.csv",
               **kwargs) -> ManifestDataModule:
    return ManifestDataModule(
        train_manifest=str(dst / train), val_manifest=None if val is None else str(dst / val),
        label_csv=None if label_csv is None else str(dst / label_csv), root=str(dst), **FAST, **kwargs)


def manifest(path: Path) -> list[dict]:
    return json.loads(path.read_text())["data"]


# --- AudioSet -----------------------------------------------------------------------------------
SEGMENTS_HEADER = ("# Segments csv created Sun Mar  5 10:54:31 2017\n"
                   "# num_ytids={n}, num_segs={n}, num_unique_labels=3, num_positive_labels=5\n"
                   "# YTID, start_seconds, end_seconds, positive_labels\n")


def segments(path: Path, rows: list[tuple[str, str, str]]) -> None:
    path.write_text(SEGMENTS_HEADER.format(n=len(rows)) + "".join(
        f'{ytid}, {start}, {float(start) + 10:.3f}, "{labels}"\n' for ytid, start, labels in rows))


@pytest.fixture
def audioset(tmp_path):
    src = tmp_path / "audioset"
    src.mkdir()
    (src / "class_labels_indices.csv").write_text(
        'index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/04rlf,"Music"\n2,/m/0k4j,"Car, vehicle"\n')
    segments(src / "balanced_train_segments.csv", [
        ("--PJHxphWEs", "30.000", "/m/09x0r,/m/04rlf"),  # <YTID>.wav
        ("YxAbcdefghi", "0.000", "/m/04rlf"),           # Y<YTID>.wav of a YTID starting with Y
        ("--ZhevVpy1s", "50.000", "/m/0k4j"),           # not downloaded
    ])
    segments(src / "eval_segments.csv", [
        ("0FMdORf5iGs", "30.000", "/m/0k4j"),           # <YTID>_<ms>_<ms>.flac
        ("a1b2c3d4e5f", "10.000", "/m/09x0r"),          # <YTID>_<s>_<s>.wav
        ("broken_clip", "0.000", "/m/09x0r"),           # unreadable
    ])
    segments(src / "unbalanced_train_segments.csv", [("uNbAlAnCeD1", "20.000", "/m/04rlf,/m/0k4j")])
    clips = src / "audio"
    write_wav(clips / "balanced" / "--PJHxphWEs.wav")
    write_wav(clips / "balanced" / "YYxAbcdefghi.wav")
    write_wav(clips / "eval" / "0FMdORf5iGs_30000_40000.flac")
    write_wav(clips / "eval" / "a1b2c3d4e5f_10.000_20.000.wav")
    (clips / "eval" / "broken_clip.wav").write_bytes(b"not audio at all")
    write_wav(clips / "unbalanced" / "uNbAlAnCeD1.wav")
    return src


def test_audioset(audioset, tmp_path):
    dst = tmp_path / "prepared"
    report = run_twice(["audioset", "--src", str(audioset), "--dst", str(dst), "--no-stats"], dst)
    counts = {name: part["items"] for name, part in report["manifests"].items()}
    assert counts == {"balanced_train.json": 2, "eval.json": 2, "unbalanced_train.json": 1, "full_train.json": 3}
    assert report["missing"] == {"balanced_train_segments.csv": 1, "eval_segments.csv": 0,
                                 "unbalanced_train_segments.csv": 0}
    assert report["skipped"] == {"missing": 1, "unreadable": 1}
    assert report["clips"] == 5 and report["hours"] == pytest.approx(5 * 0.15 / 3600, abs=1e-4)
    assert manifest(dst / "balanced_train.json")[0] == {
        "wav": str(audioset / "audio" / "balanced" / "--PJHxphWEs.wav"), "labels": "/m/09x0r,/m/04rlf"}
    dm = datamodule(dst, "full_train.json", "eval.json")
    assert dm.label_names == ["Speech", "Music", "Car, vehicle"] and dm.multilabel
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["fbank"].shape == (3, 32, 128) and batch["target"].sum().item() == 5


def test_audioset_clip_names():
    assert name_keys("--PJHxphWEs") == [("--PJHxphWEs", None)]
    assert name_keys("Y--PJHxphWEs") == [("--PJHxphWEs", None)]
    assert name_keys("YxAbcdefghi") == [("YxAbcdefghi", None)]  # an 11-character YTID starting with Y
    assert name_keys("--PJHxphWEs_30000_40000") == [("--PJHxphWEs", 30.0)]
    assert name_keys("Y--PJHxphWEs_30.500_40.500") == [("--PJHxphWEs", 30.5)]
    assert name_keys("not-a-clip") == []
    candidates = [(0.0, "b/x_0_10000.wav"), (30.0, "c/x_30000_40000.wav"), (None, "a/x.wav")]
    assert pick(candidates, 30.0) == "c/x_30000_40000.wav"
    assert pick(candidates, 50.0) == "a/x.wav"


def test_audioset_bad_layout(audioset, tmp_path):
    dst = str(tmp_path / "prepared")
    (audioset / "eval_segments.csv").unlink()
    message = one_line_error(["audioset", "--src", str(audioset), "--dst", dst])
    assert message.endswith(f"eval_segments.csv not found: looked for {audioset / 'eval_segments.csv'}")
    segments(audioset / "eval_segments.csv", [("0FMdORf5iGs", "30.000", "/m/unknown")])
    assert "label /m/unknown is not in class_labels_indices.csv" in one_line_error(
        ["audioset", "--src", str(audioset), "--dst", dst])


# --- ESC-50 -------------------------------------------------------------------------------------
ESC_CATEGORIES = ("dog", "rooster")


@pytest.fixture
def esc50(tmp_path):
    src = tmp_path / "ESC-50-master"
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    for fold in range(1, 6):
        for target, category in enumerate(ESC_CATEGORIES):
            name = f"{fold}-{1000 + fold}-A-{target}.wav"
            write_wav(src / "audio" / name, rate=44100, seed=fold * 10 + target)
            rows.append(f"{name},{fold},{target},{category},True,{1000 + fold},A")
    (src / "meta").mkdir()
    (src / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    return src


def test_esc50_with_stats(esc50, tmp_path):
    dst = tmp_path / "prepared"
    report = run_twice(["esc50", "--src", str(esc50), "--dst", str(dst), "--stats-items", "4"], dst)
    for fold in range(1, 6):
        assert report["manifests"][f"fold{fold}/train.json"]["items"] == 8
        eval_clips = manifest(dst / f"fold{fold}" / "eval.json")
        assert [Path(e["wav"]).name[0] for e in eval_clips] == [str(fold)] * 2
    # each fold's statistics from its own training clips only, never from its evaluation fold
    assert sorted(report["stats"]) == [f"fold{fold}/stats.json" for fold in range(1, 6)]
    for fold in range(1, 6):
        stats = json.loads((dst / f"fold{fold}" / "stats.json").read_text())
        assert stats["items"] == 4 and stats["target_length"] == 512 and stats["manifest"] == f"fold{fold}/train.json"
        assert math.isfinite(stats["norm_mean"]) and stats["norm_std"] > 0
        assert report["stats"][f"fold{fold}/stats.json"] == stats
    assert not (dst / "stats.json").exists()
    dm = datamodule(dst / "fold3", "train.json", "eval.json", multilabel=False)
    assert dm.label_names == list(ESC_CATEGORIES) and not dm.multilabel
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["target"].tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_esc50_bad_layout(esc50, tmp_path):
    dst = str(tmp_path / "prepared")
    (esc50 / "audio" / "3-1003-A-1.wav").unlink()
    message = one_line_error(["esc50", "--src", str(esc50), "--dst", dst])
    assert f"1 of 10 file(s) listed in meta/esc50.csv are missing under {esc50 / 'audio'} (e.g. 3-1003-A-1.wav)" \
        in message
    (esc50 / "meta" / "esc50.csv").unlink()
    assert one_line_error(["esc50", "--src", str(esc50), "--dst", dst]).endswith(
        f"meta/esc50.csv not found: looked for {esc50 / 'meta' / 'esc50.csv'}")
    assert one_line_error(["esc50", "--src", str(tmp_path / "nowhere"), "--dst", dst]) == \
        f"ssamba.prepare esc50: --src is not a folder: {tmp_path / 'nowhere'}"


def test_an_unwritable_destination_is_one_line(esc50, tmp_path):
    (tmp_path / "a-file").write_text("")
    message = one_line_error(["esc50", "--src", str(esc50), "--dst", str(tmp_path / "a-file" / "prepared")])
    assert message.startswith("ssamba.prepare esc50: Not a directory: ") and "a-file" in message


# --- Speech Commands ----------------------------------------------------------------------------
def speech_commands(src: Path, words) -> Path:
    """One training, one validation and one test clip per word, plus two background noise files."""
    listed = {"validation_list.txt": [], "testing_list.txt": []}
    for number, word in enumerate(words):
        for take, list_name in enumerate((None, *listed)):
            name = f"{number:04x}beef_nohash_{take}.wav"
            write_wav(src / word / name, seed=number * 3 + take)
            if list_name:
                listed[list_name].append(f"{word}/{name}")
    for list_name, lines in listed.items():
        (src / list_name).write_text("\n".join(lines) + "\n")
    write_wav(src / "_background_noise_" / "pink_noise.wav", seconds=2.5)   # 2 pieces, all train
    write_wav(src / "_background_noise_" / "running_tap.wav", seconds=12.3)  # 12: 10 train, 1 valid, 1 test
    (src / "_background_noise_" / "README.md").write_text("noise\n")
    (src / "LICENSE").write_text("CC-BY-4.0\n")
    return src


def test_speechcommands_v2(tmp_path):
    src = speech_commands(tmp_path / "speech_commands_v0.02", V2_WORDS)
    dst = tmp_path / "prepared"
    report = run_twice(["speechcommands", "--src", str(src), "--dst", str(dst), "--no-stats"], dst)
    assert {n: p["items"] for n, p in report["manifests"].items()} == {"train.json": 35, "valid.json": 35,
                                                                       "test.json": 35}
    assert report["manifests"]["train.json"]["classes"] == 35 and not (dst / "_silence_").exists()
    dm = datamodule(dst, "train.json", "valid.json", multilabel=False)
    assert dm.label_names == sorted(V2_WORDS)
    assert len(dm.build_items("val")) == 35


def test_speechcommands_v1_and_superb(tmp_path):
    src = speech_commands(tmp_path / "speech_commands_v0.01", V1_WORDS)
    v1 = prepare(["speechcommands", "--variant", "v1", "--src", str(src), "--dst", str(tmp_path / "v1"),
                  "--no-stats"])
    assert v1["manifests"]["test.json"] == {"items": 30, "hours": pytest.approx(30 * 0.15 / 3600, abs=1e-4),
                                           "classes": 30}
    dst = tmp_path / "superb"
    report = run_twice(["speechcommands", "--variant", "superb12", "--src", str(src), "--dst", str(dst),
                        "--no-stats"], dst)
    assert report["silence"] == {"train": 12, "valid": 1, "test": 1}
    assert {n: p["items"] for n, p in report["manifests"].items()} == {"train.json": 42, "valid.json": 31,
                                                                       "test.json": 31}
    assert len(list((dst / "_silence_").glob("*.wav"))) == 14
    piece = sf.info(dst / "_silence_" / "running_tap_011.wav")
    assert piece.frames == piece.samplerate == 16000
    entries = manifest(dst / "test.json")
    assert {"wav": "_silence_/running_tap_011.wav", "labels": "_silence_"} in entries
    assert sum(e["labels"] == "_unknown_" for e in entries) == 20
    dm = datamodule(dst, "train.json", "test.json", multilabel=False)
    assert dm.label_names == [*SUPERB_WORDS, "_unknown_", "_silence_"]
    dm.setup("fit")
    silence = next(i for i, item in enumerate(dm.datasets["val"].items) if item.id.startswith("_silence_"))
    assert dm.datasets["val"][silence]["target"].argmax().item() == 11


def test_speechcommands_outputs_inside_the_download_and_unreadable_noise(tmp_path):
    src = speech_commands(tmp_path / "speech_commands_v0.01", V1_WORDS)
    (src / "_background_noise_" / "._pink_noise.wav").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS
    (src / "_background_noise_" / "broken.wav").write_bytes(b"RIFF not really")
    v1 = prepare(["speechcommands", "--variant", "v1", "--src", str(src), "--dst", str(src / "sc_v1"), "--no-stats"])
    assert v1["manifests"]["train.json"]["items"] == 30
    for _ in range(2):  # a second run, and a second variant, beside the first one's output
        dst = src / "prepared" / "ks12"
        report = prepare(["speechcommands", "--variant", "superb12", "--src", str(src), "--dst", str(dst),
                          "--no-stats"])
        assert report["silence"] == {"train": 12, "valid": 1, "test": 1}
        assert report["skipped"] == {"unreadable": 1}  # broken.wav; the hidden AppleDouble file is not audio


def test_speechcommands_bad_layout(tmp_path):
    src = speech_commands(tmp_path / "speech_commands_v0.01", V1_WORDS)
    dst = str(tmp_path / "prepared")
    message = one_line_error(["speechcommands", "--src", str(src), "--dst", dst])
    assert "5 word folder(s) of --variant v2 not found" in message and "use --variant v1 or superb12" in message
    (src / "validation_list.txt").unlink()
    assert one_line_error(["speechcommands", "--variant", "v1", "--src", str(src), "--dst", dst]).endswith(
        f"validation_list.txt not found: looked for {src / 'validation_list.txt'}")


# --- VoxCeleb1 ----------------------------------------------------------------------------------
@pytest.fixture
def voxceleb1(tmp_path):
    src = tmp_path / "voxceleb1"
    lines = []
    for speaker in ("id10001", "id10002", "id10003"):
        for n, split in enumerate((1, 1, 2, 3), 1):
            rel = f"{speaker}/1zcIwhmdeo4/{n:05d}.wav"
            write_wav(src / "wav" / rel, seed=n)
            lines.append(f"{split} {rel}")
    (src / "iden_split.txt").write_text("\n".join(lines) + "\n")
    return src


def test_voxceleb1(voxceleb1, tmp_path):
    write_wav(voxceleb1 / "wav" / "id10002" / "1zcIwhmdeo4" / "00001.wav", seconds=0)  # a header, no audio
    dst = tmp_path / "prepared"
    report = run_twice(["voxceleb1", "--src", str(voxceleb1), "--dst", str(dst), "--no-stats"], dst)
    assert {n: p["items"] for n, p in report["manifests"].items()} == {"train.json": 5, "valid.json": 3,
                                                                       "test.json": 3}
    assert report["skipped"] == {"empty": 1} and report["clips"] == 11
    dm = datamodule(dst, "train.json", "test.json", multilabel=False)
    assert dm.label_names == ["id10001", "id10002", "id10003"]
    assert [item.labels for item in dm.build_items("val")] == [(0,), (1,), (2,)]


def test_voxceleb1_bad_layout(voxceleb1, tmp_path):
    dst = str(tmp_path / "prepared")
    (voxceleb1 / "wav" / "id10003" / "1zcIwhmdeo4" / "00004.wav").unlink()
    message = one_line_error(["voxceleb1", "--src", str(voxceleb1), "--dst", dst])
    assert f"1 of 12 file(s) listed in iden_split.txt are missing under {voxceleb1 / 'wav'}" in message
    (voxceleb1 / "iden_split.txt").write_text("4 id10001/1zcIwhmdeo4/00001.wav\n")
    assert "iden_split.txt line 1: expected '<1|2|3> <speaker>/<video>/<n>.wav'" in one_line_error(
        ["voxceleb1", "--src", str(voxceleb1), "--dst", dst])


# --- IEMOCAP ------------------------------------------------------------------------------------
@pytest.fixture
def iemocap(tmp_path):
    src = tmp_path / "IEMOCAP_full_release"
    for session in range(1, 6):
        dialog = f"Ses0{session}F_impro01"
        evaluation = src / f"Session{session}" / "dialog" / "EmoEvaluation"
        turns = [(f"{dialog}_F000", "neu"), (f"{dialog}_M000", "exc"), (f"{dialog}_F001", "fru")]
        text = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"
        for number, (turn, emotion) in enumerate(turns):
            text += f"[{6.29 + number:.4f} - {8.23 + number:.4f}]\t{turn}\t{emotion}\t[2.5000, 2.5000, 2.5000]\n"
            text += "C-E2:\tNeutral;\t()\nA-E3:\tval 3; act 2; dom  2;\t()\n\n"
            write_wav(src / f"Session{session}" / "sentences" / "wav" / dialog / f"{turn}.wav", seed=number)
        evaluation.mkdir(parents=True)
        (evaluation / f"{dialog}.txt").write_text(text)
        (evaluation / "Categorical").mkdir()
        (evaluation / "Categorical" / f"{dialog}_e1_cat.txt").write_text(f"{dialog}_F000 :Sadness; ()\n")
    return src


def test_iemocap(iemocap, tmp_path):
    dst = tmp_path / "prepared"
    report = run_twice(["iemocap", "--src", str(iemocap), "--dst", str(dst), "--no-stats"], dst)
    assert report["excluded_emotions"] == {"fru": 5}
    for session in range(1, 6):
        assert report["manifests"][f"session{session}/train.json"]["items"] == 8
        held_out = manifest(dst / f"session{session}" / "eval.json")
        assert [(Path(e["wav"]).stem, e["labels"]) for e in held_out] == [
            (f"Ses0{session}F_impro01_F000", "neutral"), (f"Ses0{session}F_impro01_M000", "happy")]
    dm = datamodule(dst / "session2", "train.json", "eval.json", multilabel=False)
    assert dm.label_names == ["neutral", "happy", "sad", "angry"]
    assert sorted(item.labels for item in dm.build_items("train")) == [(0,)] * 4 + [(1,)] * 4


def test_iemocap_bad_layout(iemocap, tmp_path):
    dst = str(tmp_path / "prepared")
    os.rename(iemocap / "Session5", iemocap / "session5")
    assert one_line_error(["iemocap", "--src", str(iemocap), "--dst", dst]).endswith(
        f"Session5 folder not found: looked for {iemocap / 'Session5'}")
    os.rename(iemocap / "session5", iemocap / "Session5")
    (iemocap / "Session2" / "sentences" / "wav" / "Ses02F_impro01" / "Ses02F_impro01_M000.wav").unlink()
    message = one_line_error(["iemocap", "--src", str(iemocap), "--dst", dst])
    assert "1 of 2 file(s) listed in Session2/dialog/EmoEvaluation/*.txt are missing" in message


# --- LibriSpeech --------------------------------------------------------------------------------
@pytest.fixture
def librispeech(tmp_path):
    src = tmp_path / "librispeech"
    for subset, speaker, chapter in (("dev-clean", "84", "121123"), ("train-clean-100", "19", "198")):
        folder = src / "LibriSpeech" / subset / speaker / chapter
        lines = []
        for n in range(2):
            utterance = f"{speaker}-{chapter}-{n:04d}"
            write_wav(folder / f"{utterance}.flac", seed=n)
            lines.append(f"{utterance} GO DO YOU HEAR")
        (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return src


def test_librispeech(librispeech, tmp_path):
    dst = tmp_path / "prepared"
    report = run_twice(["librispeech", "--src", str(librispeech), "--dst", str(dst), "--no-stats"], dst)
    assert {n: p["items"] for n, p in report["manifests"].items()} == {"dev-clean.json": 2,
                                                                       "train-clean-100.json": 2}
    assert all(e["labels"] == "" for e in manifest(dst / "train-clean-100.json"))
    dm = datamodule(dst, "train-clean-100.json", "dev-clean.json", label_csv=None)
    assert dm.num_classes == 1 and len(dm.build_items("train")) == 2
    only = prepare(["librispeech", "--src", str(librispeech / "LibriSpeech"), "--dst", str(tmp_path / "dev"),
                    "--subsets", "dev-clean", "--no-stats"])
    assert list(only["manifests"]) == ["dev-clean.json"]


def test_librispeech_bad_layout(librispeech, tmp_path):
    dst = str(tmp_path / "prepared")
    assert "subset(s) test-clean not found" in one_line_error(
        ["librispeech", "--src", str(librispeech), "--dst", dst, "--subsets", "test-clean"])
    (librispeech / "LibriSpeech" / "dev-clean" / "84" / "121123" / "84-121123-0001.flac").unlink()
    assert "1 of 2 file(s) listed in dev-clean/*/*/*.trans.txt are missing" in one_line_error(
        ["librispeech", "--src", str(librispeech), "--dst", dst])
    assert "no <subset>/<speaker>/<chapter>/*.flac under" in one_line_error(
        ["librispeech", "--src", str(tmp_path), "--dst", dst])


def test_prepare_imports_only_the_data_layer():
    """ssamba.prepare sits on ssamba.data: nothing from tasks, models, metrics or above."""
    import ast

    folder = Path(__file__).resolve().parents[1] / "ssamba" / "prepare"
    imported = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
    ours = {name for name in imported if name.split(".")[0] == "ssamba"}
    assert ours and all(name.startswith(("ssamba.data", "ssamba.prepare")) for name in ours), ours
