"""Score a finetuned checkpoint: ``python evaluate.py ckpt_path=... data=circor data.root=... [split=test]``;
``ckpt_path=[a.ckpt,b.ckpt]`` scores several as one ensemble (mean class probabilities).

Prints the patient-level scores, writes ``scores.json``, a confusion-matrix figure and the patients'
predictions, and logs scores and figure to the configured loggers (``logger=wandb``). ``quality_gate=gate.json``
applies a signal-quality gate to murmur predictions first (``ssamba.metrics.gate``; fitted by
``bench/circor_results.py gate``); ``scores.json`` then also holds the scores without it. For the
Challenge's label sets the predictions are one ``outputs/<PID>.csv`` per patient in the PhysioNet
Challenge 2022 output format; for any other label set (``data.task=murmur_timing``, earbud classes)
one ``predictions.csv``; for every label set ``recordings.csv``, each recording's own prediction (the
argmax of its mean logits, before the patient rule). Config: ``conf/evaluate.yaml``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, ListConfig, open_dict

from ssamba.checkpoints import INPUT_KEYS
from ssamba.constants import MEL_KEYS
from ssamba.errors import ConfigError
from ssamba.evaluation import (
    build_model,
    check_compatible,
    check_gate_applies,
    check_scorable,
    gate_predictions,
    load_members,
    recording_ids,
    score_split,
)
from ssamba.metrics import is_challenge_label_set
from ssamba.metrics.report import (
    confusion_figure,
    scores_table,
    write_challenge_outputs,
    write_predictions,
    write_recording_predictions,
)
from ssamba.utils.config import config_errors_exit

log = logging.getLogger("evaluate")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name}: CUDA is not available here; use device=cpu or auto")
    return device


def input_settings(checkpoint, data: DictConfig) -> dict:
    """The data settings the checkpoint's input needs (``INPUT_KEYS``), to replace the config's. Kaldi's mel scale
    needs no keys: a datamodule without them (docs/architecture.md, "Batches") computes it and keeps working."""
    kaldi = checkpoint.on_kaldi_scale
    needed = [key for key in INPUT_KEYS if not (key in MEL_KEYS and kaldi and key not in data)]
    settings = {key: getattr(checkpoint, key) for key in needed}
    # a number (the reader checks), never a config node that names a _target_
    return {key: value for key, value in settings.items() if value is not None}


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Score ``cfg.ckpt_path`` (one checkpoint, or a list scored as one ensemble) on ``cfg.split``; returns the
    scores as floats."""
    paths = [str(p) for p in cfg.ckpt_path] if isinstance(cfg.ckpt_path, ListConfig) else [str(cfg.ckpt_path)]
    if not paths:
        raise ValueError("ckpt_path=[]: give a checkpoint, or a list of them for an ensemble")
    members = load_members(paths)
    checkpoint = members[0]
    with open_dict(cfg):  # the model's input: its own frame count, normalisation and mel scale
        cfg.data.update(input_settings(checkpoint, cfg.data))
    datamodule = hydra.utils.instantiate(cfg.data)
    check_scorable(datamodule)
    check_compatible(checkpoint, datamodule.label_names, datamodule.target_length)
    if cfg.split not in datamodule.splits:
        raise ConfigError(f"split={cfg.split!r}: the data has only {', '.join(datamodule.splits)}")
    if cfg.quality_gate:
        check_gate_applies(datamodule)
    rule = cfg.aggregation or getattr(datamodule, "aggregation", "hierarchical")
    model = build_model(members, backend=cfg.backend)
    device = resolve_device(cfg.device)
    metric = score_split(model, datamodule, cfg.split, rule, device, str(cfg.precision))
    predictions = metric.predictions()  # aggregated once, for the scores and the outputs
    gate = None
    if cfg.quality_gate:
        ungated = {name: float(value) for name, value in metric.scores(predictions).items()}
        predictions, gate = gate_predictions(cfg.quality_gate, datamodule, cfg.split, metric, predictions)
        gate["scores_without_gate"] = strict_json(ungated)
        log.info("quality gate %s: %d patients made Unknown", cfg.quality_gate, gate["made_unknown"])
    scores = {name: float(value) for name, value in metric.scores(predictions).items()}

    patient_ids = [metric.patient_id(code) for code in predictions.patient.tolist()]
    figure = confusion_figure(
        predictions.preds, predictions.target, datamodule.label_names, f"{cfg.split}: {len(patient_ids)} patients"
    )
    log_to_loggers(cfg, scores, figure)  # first: a CSV logger expects an empty folder

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_challenge_label_set(datamodule.label_names):
        write_challenge_outputs(predictions, patient_ids, datamodule.label_names, out_dir / "outputs")
    else:
        write_predictions(predictions, patient_ids, datamodule.label_names, out_dir / "predictions.csv")
    write_recording_predictions(predictions, *recording_ids(metric, predictions), datamodule.label_names,
                                out_dir / "recordings.csv")
    figure.savefig(out_dir / "confusion_matrix.png", dpi=100)
    summary = {"ckpt_path": paths[0] if len(paths) == 1 else paths, "split": cfg.split, "aggregation": rule,
               "scores": strict_json(scores), **({"quality_gate": gate} if gate else {})}
    (out_dir / "scores.json").write_text(json.dumps(summary, indent=2) + "\n")

    from rich.console import Console

    model_name = Path(paths[0]).name if len(paths) == 1 else f"ensemble of {len(paths)} checkpoints"
    Console().print(scores_table(scores, f"{cfg.split} ({rule} rule), {model_name}"))
    log.info("patient outputs, recordings.csv, scores.json and confusion_matrix.png in %s", out_dir)
    return scores


def strict_json(scores: dict[str, float]) -> dict[str, float | None]:
    """Scores with NaN (a class without patients) as null, which strict JSON readers accept."""
    return {name: None if math.isnan(value) else value for name, value in scores.items()}


def log_to_loggers(cfg: DictConfig, scores: dict[str, float], figure) -> None:
    """Scores under ``<split>/challenge/...`` and the figure, to every configured logger."""
    from ssamba.utils.figures import log_figure
    from ssamba.utils.instantiate import instantiate_named
    from ssamba.utils.wandb import choose_wandb_mode, finish_wandb, start_wandb

    if any("WandbLogger" in str(entry.get("_target_", "")) for entry in (cfg.get("logger") or {}).values() if entry):
        choose_wandb_mode()
    loggers = start_wandb(instantiate_named(cfg.get("logger"), "logger"))
    if not loggers:
        return
    for logger in loggers:
        logger.log_hyperparams({"ckpt_path": str(cfg.ckpt_path), "split": cfg.split})
        logger.log_metrics({f"{cfg.split}/challenge/{k}": v for k, v in scores.items()}, step=0)
    log_figure(loggers, f"{cfg.split}/confusion_matrix", figure, step=0)
    for logger in loggers:
        logger.finalize("success")
    finish_wandb(0)


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    with config_errors_exit(log):
        scores = evaluate(cfg)
    return scores["weighted_accuracy"] if "weighted_accuracy" in scores else scores["uar"]  # for sweepers


if __name__ == "__main__":
    main()
