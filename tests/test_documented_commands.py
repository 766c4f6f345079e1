"""Every command line shown in README.md and docs/ runs as written (on CPU, in its quickest form).

The test collects each ``python train.py ...``, ``python evaluate.py ...`` and ``python -m ssamba...``
line from the fenced code blocks and inline code of the docs and runs it as a subprocess from the
repository root, so a renamed key, group or option breaks a test instead of a reader's first try.

"Quickest form": placeholders (``...``, ``<run>``, ``/data/circor``, ``IN.pth``, ``AUDIO_DIR``) become
fixtures built here (the CirCor mini tree of tests/data, generated audio, checkpoints of a 2-layer
model), and a few keys that change size but not meaning are appended: one batch of each loop
(``trainer.fast_dev_run=true``), 2 layers of width 32, batch 2, no loader workers, the CSV logger.
Lines that cannot run on a CPU-only machine are listed in NOT_RUN with the reason; a documented
line that is neither runnable nor listed fails, and so does a listed line the docs no longer show.
The commands run side by side, one per core (about 220 s of CPU time in all).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CIRCOR_MINI = ROOT / "tests" / "data" / "circor-mini"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
ENTRY = re.compile(r"(?:^|\s)python (?:train\.py|evaluate\.py|-m ssamba\b)")

NOT_RUN = {
    "python train.py trainer=ddp trainer.devices=4 model=base":
        "4 CUDA devices (trainer=ddp is GPU-only)",
    "python train.py experiment=pretrain_asli data.sources.audioset.root=... data.sources.librispeech.root=...":
        "the recipe sets trainer=gpu (bf16 on a CUDA device)",
    "python train.py experiment=pretrain_asli data.sources.audioset.root=/data/audioset "
    "data.sources.librispeech.root=/data/LibriSpeech":
        "the recipe sets trainer=gpu (bf16 on a CUDA device)",
    "python train.py 'experiment=[finetune_esc50,finetune_frame]' data.root=... "
    "task.pretrained=outputs/pretrain_asli_frame_tiny/runs/<time>/checkpoints/last.ckpt":
        "finetune_esc50 sets trainer=gpu (bf16 on a CUDA device)",
    "python train.py trainer=ddp trainer.devices=4 experiment=pretrain_asli ...":
        "4 CUDA devices (trainer=ddp is GPU-only)",
    "srun python train.py trainer=ddp trainer.devices=8 trainer.num_nodes=2 experiment=pretrain_asli "
    "hydra.run.dir=outputs/pretrain_asli/runs/slurm-$SLURM_JOB_ID ...":
        "a SLURM allocation of 2 nodes with 8 GPUs each",
    "srun python train.py experiment=... hydra.run.dir=outputs/pretrain/slurm-${SLURM_JOB_ID} ckpt_path=last":
        "a SLURM job (the run folder is named by $SLURM_JOB_ID)",
    "python evaluate.py ckpt_path=<timing run>/checkpoints/last.ckpt data=circor data.root=/data/circor "
    "data.task=murmur_timing split=test":
        "a checkpoint finetuned on data.task=murmur_timing (tests/test_evaluate.py runs this on a fixture)",
    "WANDB_MODE=online python train.py ...":
        "network access and a W&B key stored by `wandb login`",
    "python train.py -m hydra/launcher=slurm mask=250,300,400 trainer=ddp trainer.devices=4":
        "a SLURM cluster with 4 GPUs per job",
    "python train.py -m hydra/launcher=slurm hydra.launcher.partition=gpu hydra.launcher.account=myproj "
    "mask=250,300,400 trainer=ddp trainer.devices=4 experiment=pretrain_asli ...":
        "a SLURM cluster with 4 GPUs per job",
    "python train.py experiment=finetune_esc50 data.root=/data/prepared/esc50/fold1 task.pretrained=...":
        "finetune_esc50 sets trainer=gpu (bf16 on a CUDA device)",
    **{line: "the recipe sets trainer=gpu (bf16 on a CUDA device); tests/test_downstream.py runs every "
             "downstream recipe on CPU on prepared fixtures" for line in (
        "python train.py experiment=finetune_as20k data.root=/data/prepared/audioset task.pretrained=...",
        "python train.py experiment=finetune_speechcommands_v2 data.root=/data/prepared/sc_v2 task.pretrained=...",
        "python train.py experiment=probe_ks12 data.root=/data/prepared/ks12 task.pretrained=...",
        "python train.py experiment=probe_iemocap data.root=/data/prepared/iemocap/session1 task.pretrained=...")},
    **{line: "the dataset's raw download" for line in (
        "python -m ssamba.prepare <dataset> --src <download> --dst <folder>",
        "python -m ssamba.prepare audioset --src /data/audioset --dst /data/prepared/audioset",
        "python -m ssamba.prepare esc50 --src /data/ESC-50-master --dst /data/prepared/esc50",
        "python -m ssamba.prepare iemocap --src /data/IEMOCAP_full_release --dst /data/prepared/iemocap",
        "python -m ssamba.prepare librispeech --src /data/LibriSpeech --dst /data/prepared/librispeech",
        "python -m ssamba.prepare speechcommands --src /data/speech_commands_v0.02 --dst /data/prepared/sc_v2",
        "python -m ssamba.prepare speechcommands --variant superb12 --src /data/speech_commands_v0.01 "
        "--dst /data/prepared/ks12",
        "python -m ssamba.prepare speechcommands --variant v1 --src /data/speech_commands_v0.01 "
        "--dst /data/prepared/sc_v1",
        "python -m ssamba.prepare voxceleb1 --src /data/voxceleb1 --dst /data/prepared/voxceleb1")},
}

# What the docs' placeholders stand for: path prefixes of the data and the sizes of tool options.
DATA_PATHS = {"/data/circor/split.csv": "split_csv", "/data/circor": "circor", "/data/earbud": "earbud",
              "/data/audioset": "audioset", "/data/prepared/audioset": "audioset", "/data/as_shards": "shards"}
SMALLER = {"--workers": "1", "--items": "8"}
FIXTURE_DATA = ("circor", "earbud", "audioset")  # datasets read from a data.root the fixtures build
DATA_CHOICE = {"data=<name>": ["data=circor"], "data=...": ["data=synthetic", "data.target_length=128"]}
QUICK = {
    "train.py": ["trainer.fast_dev_run=true", "logger=csv", "++model.depth=2", "++model.embed_dim=32",
                 "data.batch_size=2", "data.num_workers=0", "callbacks.model_summary=null"],
    "evaluate.py": ["data.num_workers=0"],
}
# Overrides of the checkpoint that stands for "the pretraining run" (what train.py composes on a
# CPU-only machine with QUICK["train.py"]), so that resuming from it runs the same config.
PRETRAIN = ["experiment=quickstart_cpu", "++model.depth=2", "++model.embed_dim=32", "data.batch_size=2",
            "data.num_workers=0", "logger=csv", "callbacks.model_summary=null", "trainer.max_epochs=1",
            "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
            "test=false"]


def _code_spans(text: str) -> tuple[list[str], list[str]]:
    """(lines of fenced blocks with continuations joined, inline code spans outside them)."""
    block_lines, prose, in_block, pending = [], [], False, ""
    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_block, pending = not in_block, ""
            prose.append("")
            continue
        if not in_block:
            prose.append(line)
            continue
        prose.append("")
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1].strip() + " "
            continue
        block_lines.append(pending + line.strip())
        pending = ""
    inline = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", "\n".join(prose))]
    return block_lines, inline


def documented_commands() -> dict[str, str]:
    """Each documented command line -> where it first appears."""
    found: dict[str, str] = {}
    for path in DOCS:
        block_lines, inline = _code_spans(path.read_text())
        for line in block_lines:
            line = re.sub(r"\s+#.*$", "", line).strip()  # a trailing comment
            if not line.startswith("#") and ENTRY.search(line):
                found.setdefault(" ".join(line.split()), str(path.relative_to(ROOT)))
        for span in inline:
            if ENTRY.match(span):
                found.setdefault(span, str(path.relative_to(ROOT)))
    return found


COMMANDS = documented_commands()
# Sweeps run several jobs (and ddp_sim two processes per job) in one command.
SLOW = ("python train.py -m mask=250,300,400 task.optimizer.lr=1e-4,5e-4",
        "python train.py -m trainer=ddp_sim experiment=quickstart_cpu mask.count=20,30")
RUNNABLE = [pytest.param(line, id=line if len(line) < 90 else line[:87] + "...",
                         marks=[pytest.mark.slow] if line in SLOW else [])
            for line in sorted(COMMANDS) if line not in NOT_RUN]


def test_listed_lines_are_still_documented():
    gone = sorted(set(NOT_RUN) - set(COMMANDS))
    assert not gone, f"NOT_RUN lists lines the docs no longer show (remove them): {gone}"


def test_the_docs_show_commands():
    assert len(COMMANDS) > 20 and "python train.py model=tiny task=pretrain" in COMMANDS


# fixtures: what the placeholders stand for

def _write_wav(path: Path, seconds: float, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.random.default_rng(seed).uniform(-0.5, 0.5, int(seconds * 16000)), 16000)


def _load_train_module():
    spec = importlib.util.spec_from_file_location("train_entry", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _released_files(folder: Path) -> dict[str, Path]:
    """Released-layout ``.pth`` files of both families (released width, 2 layers) and one of our own."""
    from ssamba.convert import ours_to_released
    from ssamba.models import build_encoder
    from ssamba.tasks import MaskedPatchPretraining

    data = {"target_length": 48, "norm_mean": -4.0, "norm_std": 4.0, "label_names": ["a"], "multilabel": False}
    files = {}
    for family in ("ssamba", "ssast"):
        torch.manual_seed(0)
        encoder = build_encoder(f"{family}_tiny", depth=2, input_tdim=48)
        task = MaskedPatchPretraining(encoder, functools.partial(torch.optim.AdamW, lr=1e-3),
                                      mask={"count": 8, "val_count": 8}, data=data)
        checkpoint = {"state_dict": task.state_dict()}
        task.on_save_checkpoint(checkpoint)
        torch.save(checkpoint, folder / f"ours_{family}.ckpt")
        torch.save(ours_to_released(checkpoint)[0], folder / f"released_{family}.pth")
        files[family], files[f"ours_{family}"] = folder / f"released_{family}.pth", folder / f"ours_{family}.ckpt"
    return files


def _finetuned_circor(path: Path) -> Path:
    """A murmur classifier checkpoint as train.py writes it (2 layers; weights untrained)."""
    from ssamba.data import CirCorDataModule
    from ssamba.models import build_encoder
    from ssamba.tasks import Finetuning, data_info

    torch.manual_seed(0)
    datamodule = CirCorDataModule(root=str(CIRCOR_MINI), target_length=128, num_workers=0)
    encoder = build_encoder("tiny", depth=2, embed_dim=32, input_tdim=128, backend="torch")
    task = Finetuning(optimizer=functools.partial(torch.optim.Adam, lr=1e-3), encoder=encoder, fstride=16,
                      tstride=16, data=data_info(datamodule))
    torch.save({"state_dict": task.state_dict(), "ssamba": task.checkpoint_record()}, path)
    return path


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("documented")
    paths = {"circor": CIRCOR_MINI, "outputs": folder / "outputs"}
    paths["outputs"].mkdir()

    patients = sorted(p.stem for p in (CIRCOR_MINI / "training_data").glob("*.txt"))
    splits = ["train"] * (len(patients) - 2) + ["val", "test"]
    paths["split_csv"] = folder / "split.csv"
    paths["split_csv"].write_text("patient_id,split\n" + "".join(f"{p},{s}\n" for p, s in zip(patients, splits)))

    audioset = paths["audioset"] = folder / "audioset"
    entries = [{"wav": f"clip{i}.wav", "labels": "/m/a" if i % 2 else "/m/b"} for i in range(4)]
    for i in range(4):
        _write_wav(audioset / f"clip{i}.wav", 1.0, i)
    (audioset / "class_labels_indices.csv").write_text("index,mid,display_name\n0,/m/a,Alpha\n1,/m/b,Beta\n")
    (audioset / "train.json").write_text(json.dumps({"data": entries}))
    (audioset / "unbalanced_train.json").write_text(json.dumps({"data": entries}))  # as ssamba.prepare names it
    (audioset / "eval.json").write_text(json.dumps({"data": entries[:2]}))

    earbud = paths["earbud"] = folder / "earbud"
    for variant in ("filt", "lp", "wav"):
        for i in range(6):
            _write_wav(earbud / variant / ("train" if i < 4 else "eval") / f"r{i}.wav", 1.0, i)
    (earbud / "class_labels_indices.csv").write_text("index,mid,display_name\n0,normal,Normal\n1,abnormal,Abnormal\n")
    (earbud / "labels.csv").write_text("filename,labels\n" + "".join(
        f"r{i}.wav,{'abnormal' if i % 2 else 'normal'}\n" for i in range(6)))

    from ssamba.data.streaming import main as write_shards

    paths["shards"] = folder / "as_shards"
    for split in ("train", "val"):
        write_shards(["data=audioset", f"data.root={audioset}", f"--split={split}", "--workers=1",
                      f"--out={paths['shards'] / split}"])

    paths["audio_dir"] = folder / "audio"
    for i in range(2):
        _write_wav(paths["audio_dir"] / f"sound{i}.wav", 1.5, i)

    run = paths["pretrain_run"] = folder / "pretrain_run"
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*PRETRAIN, f"paths.output_dir={run}"])
    _load_train_module().train(cfg)
    paths["pretrain_ckpt"] = run / "checkpoints" / "last.ckpt"
    paths["finetuned_ckpt"] = _finetuned_circor(folder / "murmur.ckpt")
    paths.update(_released_files(folder))
    return paths


# from a documented line to the commands that run it

def _dataset(args: list[str]) -> str:
    """Which dataset a line reads: its data= choice, or the one its recipe sets."""
    for arg in args:
        if arg.startswith("data="):
            return arg.split("=", 1)[1]
        if arg.startswith("experiment="):
            recipe = arg.split("=", 1)[1]
            for name in ("circor", "earbud"):
                if recipe.startswith(name):
                    return name
    return "synthetic"


def _is_placeholder(value: str) -> bool:
    return "..." in value or "<" in value or value.startswith(("/data/", "outputs/"))


def _value(key: str, value: str, entry: str, dataset: str, paths: dict[str, Path]) -> str:
    if key == "data.root" and dataset in FIXTURE_DATA:
        return str(paths[dataset])
    if key in ("task.pretrained", "ckpt"):
        return str(paths["ssamba"] if value.endswith(".pth") else paths["pretrain_ckpt"])
    if key == "ckpt_path":
        return str(paths["finetuned_ckpt"] if entry == "evaluate.py" else paths["pretrain_ckpt"])
    if key == "hydra.run.dir":
        return str(paths["pretrain_run"])
    for prefix, name in DATA_PATHS.items():
        if value.startswith(prefix):
            return str(paths[name]) + value[len(prefix):]
    raise ValueError(f"no fixture for the placeholder {key}={value}")


def _alternatives(line: str) -> list[str]:
    """``--from ssamba|ssast`` -> one line per choice."""
    match = re.search(r"(?<=\s)(\w+(?:\|\w+)+)(?=\s|$)", line)
    if not match:
        return [line]
    return [alt for choice in match[1].split("|") for alt in _alternatives(line.replace(match[1], choice, 1))]


def concrete(line: str, paths: dict[str, Path], out: Path) -> list[list[str]]:
    """The argument lists (after ``python``) that run ``line`` in its quickest form."""
    runs = []
    line = re.sub(r"<[^>]*>", lambda m: m[0].replace(" ", "_"), line.replace("<same overrides>", ""))
    for variant in _alternatives(line):
        tokens = shlex.split(variant)
        if tokens[0] != "python":
            raise ValueError("a documented command that does not start with python")
        tokens = tokens[1:]
        entry = tokens[1] if tokens[0] == "-m" else tokens[0]
        head, rest = tokens[: 2 if tokens[0] == "-m" else 1], tokens[2 if tokens[0] == "-m" else 1:]
        if not rest and tokens[0] == "-m":  # a tool named in prose: it exists and explains itself
            runs.append([*head, "--help"])
            continue
        # optional arguments ([layer=-1]) are passed, except a CUDA device and "[overrides]"
        optional = [t.startswith("[") and t.endswith("]") for t in rest]
        rest = [t[1:-1] if o else t for t, o in zip(rest, optional) if not (o and ("cuda" in t or "=" not in t))]
        # "data=..." (your dataset) becomes short generated clips
        rest = [t for r in rest if r != "..." for t in DATA_CHOICE.get(r, [r])]
        dataset, args, positional = _dataset(rest), [], 0
        for i, token in enumerate(rest):
            if token.startswith("-") or "=" not in token:
                previous = rest[i - 1] if i else ""
                if previous in SMALLER:
                    token = SMALLER[previous]
                elif previous == "--out":
                    token = str(out / token.strip("/").replace("/", "_"))
                elif not token.startswith("-") and not previous.startswith("--"):
                    token = _positional(entry, token, positional, rest, paths, out)
                    positional += 1
                args.append(token)
                continue
            key, value = token.split("=", 1)
            args.append(f"{key}={_value(key, value, entry, dataset, paths)}" if _is_placeholder(value)
                        or value.endswith((".ckpt", ".pth")) else token)
        if dataset in FIXTURE_DATA and not any(a.startswith("data.root=") for a in args):
            args.append(f"data.root={paths[dataset]}")  # the "..." after data=<name>
        runs.append([*head, *args, *QUICK.get(entry, [])])
    return runs


def _positional(entry: str, token: str, index: int, rest: list[str], paths: dict[str, Path], out: Path) -> str:
    """Input and output files of the tools: ``IN.pth OUT.ckpt``, ``AUDIO_DIR OUT.npz``."""
    if entry == "ssamba.embed":
        return str(paths["audio_dir"]) if index == 0 else str(out / token)
    if entry == "ssamba.convert":
        if index == 1:
            return str(out / token)
        family = rest[rest.index("--from") + 1] if "--from" in rest else "ssamba"
        return str(paths[f"ours_{family}"] if "--to-released" in rest else paths[family])
    raise ValueError(f"no fixture for the argument {token!r} of {entry}")


def _run(args: tuple[str, ...], outputs: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SSAMBA_OUTPUTS": str(outputs), "WANDB_MODE": "offline"}
    env.setdefault("OMP_NUM_THREADS", "1")  # the commands run side by side, one per core
    env.pop("WANDB_API_KEY", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def results(fixtures, request) -> dict[tuple[str, ...], subprocess.CompletedProcess]:
    """Every distinct command of the selected lines, run once, as many at a time as there are cores
    (lines that differ only in their placeholders share a command)."""
    lines = {item.callspec.params["line"] for item in request.session.items
             if getattr(item, "originalname", "") == "test_documented_command_runs"}
    commands = set()
    for line in lines:
        try:
            commands.update(tuple(args) for args in concrete(line, fixtures, fixtures["outputs"]))
        except ValueError:
            continue  # no runnable form: that line's test reports why
    commands = sorted(commands)
    outputs = [fixtures["outputs"] / f"run{i}" for i in range(len(commands))]  # no two runs share a folder
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(zip(commands, pool.map(_run, commands, outputs)))


@pytest.mark.parametrize("line", RUNNABLE)
def test_documented_command_runs(line, fixtures, results):
    try:
        runs = concrete(line, fixtures, fixtures["outputs"])
    except ValueError as error:
        pytest.fail(f"documented in {COMMANDS[line]}: {line}\n{error}: give it a fixture, or list it in NOT_RUN "
                    "with the reason it cannot run on CPU")
    for args in runs:
        result = results[tuple(args)]
        assert result.returncode == 0, (
            f"documented in {COMMANDS[line]}: {line}\nran: python {shlex.join(args)}\n"
            f"(a line that cannot run on CPU goes into NOT_RUN with its reason)\n{result.stderr[-3000:]}")
