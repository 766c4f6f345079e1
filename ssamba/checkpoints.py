"""The one reader of the checkpoints we support, and the models rebuilt from what it reads.

:func:`load_checkpoint` reads one of our Lightning checkpoints, a released SSAMBA/SSAST ``.pth``
(tensors only are unpickled) or a model folder (``config.json`` + ``model.safetensors``, written by
:func:`save_pretrained`; nothing is unpickled) into a :class:`Checkpoint`: encoder config and weights, the task's
other weights, input normalisation, mel scale and length, label names and a finetuned head's settings.
``ssamba.load``, finetuning's ``task.pretrained``, ``evaluate.py`` and ``python -m ssamba.embed``
all come through here, so a checkpoint means the same thing to each of them.

Released files are recognised by their keys; the family reads the encoder config off the tensors
(``released_config`` beside each model), every encoder tensor is shape-checked against a freshly
built encoder (a mismatch is an error naming the key), and keys without a counterpart are
reported, never dropped silently.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .constants import AUDIOSET_MEAN, AUDIOSET_STD, FFT_SIZE, KALDI_MEL, MEL_HIGH_HZ, MEL_KEYS, MEL_LOW_HZ
from .models import ClassificationHead, Classifier, encoder_from_config, encoder_record
from .models import ssamba as ssamba_family
from .models import ssast as ssast_family
from .models.registry import RUNTIME_FIELDS
from .models.released import (
    DATAPARALLEL_PREFIX,
    OUR_ENCODER_PREFIX,
    RELEASED_ENCODER_PREFIX,
    RELEASED_GRID_KEYS,
    ConversionError,
    released_to_task_key,
)

log = logging.getLogger(__name__)

FAMILIES = {"ssamba": ssamba_family, "ssast": ssast_family}  # released formats, by family
HEAD_PREFIX = "head."  # the finetuning task's classification head in our state_dict
# numeric fields of the record; a record without the mel scale's (written before it could be set) used kaldi's
NUMBERS = {"norm_mean": float, "norm_std": float, "target_length": int, "mel_low_hz": float, "mel_high_hz": float,
           "fft_size": int}
INPUT_KEYS = ("target_length", "norm_mean", "norm_std", *MEL_KEYS)  # the data settings a model's input depends on


@dataclass
class Checkpoint:
    """What a checkpoint holds, in our terms: ``checkpoint["ssamba"]`` (docs/architecture.md) typed,
    with the weights split into the encoder's and the task's."""

    encoder_config: dict[str, Any]  # rebuilds the encoder with ssamba.models.encoder_from_config
    encoder_state: dict[str, Tensor]
    task_state: dict[str, Tensor] = field(default_factory=dict)  # every other weight, under our names
    norm_mean: float | None = None
    norm_std: float | None = None
    target_length: int | None = None
    mel_low_hz: float = MEL_LOW_HZ
    mel_high_hz: float = MEL_HIGH_HZ
    fft_size: int = FFT_SIZE
    task: str | None = None
    label_names: list[str] = field(default_factory=list)
    head: dict[str, Any] | None = None  # finetuning: num_classes, pooling, multilabel, loss
    unused_keys: list[str] = field(default_factory=list)  # released keys without a counterpart
    source_format: str = "lightning"  # what was read this time: lightning, folder, ssamba-released, ssast-released
    # provenance kept through every later save: the released format converted from and its unused keys
    converted_from: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        """``checkpoint["ssamba"]`` as our checkpoints store it."""
        record = {"encoder": self.encoder_config, "norm_mean": self.norm_mean, "norm_std": self.norm_std,
                  "target_length": self.target_length, "mel_low_hz": self.mel_low_hz,
                  "mel_high_hz": self.mel_high_hz, "fft_size": self.fft_size, "task": self.task,
                  "label_names": self.label_names}
        if self.head is not None:
            record["head"] = self.head
        if self.converted_from is not None:
            record["converted_from"] = self.converted_from
        return record

    @property
    def on_kaldi_scale(self) -> bool:
        """Whether the model reads kaldi's mel scale (that of AST, SSAST and every released checkpoint)."""
        return tuple(getattr(self, key) for key in MEL_KEYS) == KALDI_MEL

    def build_encoder(self, backend: str | None = None) -> nn.Module:
        """The encoder with its weights (train mode, CPU); ``backend`` chooses its kernels."""
        encoder = encoder_from_config(self.encoder_config, backend)
        encoder.load_state_dict(self.encoder_state, strict=True)
        return encoder

    def build_classifier(self, backend: str | None = None) -> Classifier:
        """Encoder + classification head of a finetuning checkpoint, in eval mode on the CPU."""
        if self.head is None:
            raise ConversionError(f"a {self.task or 'non-finetuning'} checkpoint has no classification head; "
                                  "a finetuning checkpoint is needed")
        encoder = self.build_encoder(backend)
        head = ClassificationHead(encoder.embed_dim, self.head["num_classes"], self.head["pooling"],
                                  encoder.num_prefix_tokens)
        head.load_state_dict({k[len(HEAD_PREFIX):]: v for k, v in self.task_state.items() if k.startswith(HEAD_PREFIX)},
                             strict=True)
        return Classifier(encoder, head).eval()


# ----------------------------------------------------------------------------------------------
# reading files


def read_tensors(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load`` restricted to tensors and plain containers (no pickled code is executed)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {os.fspath(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler raises several types; all mean "not loadable safely"
        raise ConversionError(f"cannot read {os.fspath(path)!r} as a weights-only checkpoint: {error}") from error


def is_released(checkpoint: dict[str, Any]) -> bool:
    """A released file is a bare state dict; ours is a Lightning checkpoint with ``state_dict``."""
    return "state_dict" not in checkpoint and all(isinstance(v, Tensor) for v in checkpoint.values())


def load_checkpoint(path: str | os.PathLike, family: str | None = None, **config_overrides: Any) -> Checkpoint:
    """Our checkpoint, a released ``.pth`` or a model folder (or ``hf://<repo id>``) as a :class:`Checkpoint`.

    ``family`` only double-checks a released file's keys; ``config_overrides`` change encoder
    settings that do not touch the weights (for released files also the grid they lack).
    """
    if str(path).startswith(HUB_SCHEME):
        path = download_folder(str(path)[len(HUB_SCHEME):])
    if os.path.isdir(path):
        return read_folder(path, **config_overrides)
    checkpoint = read_tensors(path)
    source = os.path.basename(os.fspath(path))
    if not is_released(checkpoint):
        return lightning_to_ours(checkpoint, source, **config_overrides)
    converted = released_to_ours(checkpoint, family, source=source, **config_overrides)
    for key in converted.unused_keys:
        log.warning("%s: key %s has no counterpart in our model and is not used", source, key)
    return converted


# ----------------------------------------------------------------------------------------------
# our layout


def lightning_to_ours(checkpoint: dict[str, Any], source: str = "checkpoint", **config_overrides: Any) -> Checkpoint:
    """Split one of our Lightning checkpoints into encoder config/state, task state and its record."""
    if "ssamba" not in checkpoint or "encoder" not in checkpoint["ssamba"]:
        raise ConversionError(f"{source} has no checkpoint['ssamba']['encoder'] (not an ssamba checkpoint, "
                              "or a released file: convert it with python -m ssamba.convert)")
    meta = checkpoint["ssamba"]
    numbers = {key: _number(meta, key, kind) for key, kind in NUMBERS.items()}
    numbers = {key: value for key, value in numbers.items() if value is not None or key not in MEL_KEYS}
    config = {k: v for k, v in {**meta["encoder"], **config_overrides}.items() if k not in RUNTIME_FIELDS}
    if "name" not in config:
        raise ConversionError(f"{source}: checkpoint['ssamba']['encoder'] names no model (no 'name' key)")
    state = checkpoint["state_dict"]
    encoder_state = {k[len(OUR_ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(OUR_ENCODER_PREFIX)}
    task_state = {k: v for k, v in state.items() if not k.startswith(OUR_ENCODER_PREFIX)}
    if not encoder_state and "probe" in meta:  # task=probe stores its head and a pointer, not the encoder
        raise ConversionError(f"{source} is a probe checkpoint: it holds the probe head only; its encoder is "
                              f"task.pretrained={meta['probe'].get('pretrained')} (read that file for the encoder)")
    reference = encoder_from_config(config).state_dict()
    encoder_state = _checked_state(reference, encoder_state, OUR_ENCODER_PREFIX, source)
    return Checkpoint(config, encoder_state, task_state, **numbers, task=meta.get("task"),
                      label_names=list(meta.get("label_names") or []), head=meta.get("head"),
                      converted_from=_provenance(meta, source))


def _provenance(meta: dict[str, Any], source: str) -> dict[str, Any] | None:
    """``converted_from`` of a record, checked: ``{"format": str, "unused_keys": [str, ...]}`` or absent."""
    value = meta.get("converted_from")
    if value is None:
        return None
    unused = value.get("unused_keys", []) if isinstance(value, dict) else None
    if (not isinstance(value, dict) or not isinstance(value.get("format"), str) or not isinstance(unused, list)
            or not all(isinstance(key, str) for key in unused)):
        raise ConversionError(f"{source}: checkpoint['ssamba']['converted_from']={value!r}: expected "
                              "{'format': <name>, 'unused_keys': [<key>, ...]}")
    return {"format": value["format"], "unused_keys": list(unused)}


def _number(meta: dict[str, Any], key: str, kind: type) -> int | float | None:
    """A number of the record, checked: evaluation copies these into the data config, where a
    mapping could name a ``_target_`` to instantiate."""
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        expected = "an integer" if kind is int else "a number"
        raise ConversionError(f"checkpoint['ssamba'][{key!r}]={value!r}: expected {expected}")
    return kind(value)


def _checked_state(reference: dict[str, Tensor], source: dict[str, Tensor], source_prefix: str,
                   what: str) -> dict[str, Tensor]:
    """``source`` restricted to ``reference``'s keys, requiring every key with the same shape."""
    out = {}
    for key, expected in reference.items():
        name = source_prefix + key
        if key not in source:
            raise ConversionError(f"{what}: missing key {name} (shape {tuple(expected.shape)} expected)")
        if source[key].shape != expected.shape:
            raise ConversionError(f"{what}: key {name} has shape {tuple(source[key].shape)}, "
                                  f"the encoder expects {tuple(expected.shape)}")
        out[key] = source[key]
    return out


# ----------------------------------------------------------------------------------------------
# the released layout


def _strip_dataparallel(state: dict[str, Tensor]) -> dict[str, Tensor]:
    if state and all(k.startswith(DATAPARALLEL_PREFIX) for k in state):
        return {k[len(DATAPARALLEL_PREFIX):]: v for k, v in state.items()}
    return dict(state)


def detect_family(state: dict[str, Tensor]) -> str:
    """``ssamba`` or ``ssast`` from the encoder keys of a released (prefix-stripped) state dict."""
    found = [name for name, family in FAMILIES.items() if any(k.startswith(family.RELEASED_MARKER) for k in state)]
    if len(found) != 1:
        markers = ", ".join(f"{family.RELEASED_MARKER}* ({name})" for name, family in FAMILIES.items())
        raise ConversionError(f"cannot tell the model family: expected keys under exactly one of {markers}; "
                              f"found {len(found)} (first keys: {sorted(state)[:5]})")
    return found[0]


def _check_task_state(task_state: dict[str, Tensor], width: int, patch_values: int, what: str) -> None:
    """The pretraining heads are Linear(D, D) -> ReLU -> Linear(D, fshape * tshape)."""
    expected = {"mask_embed": (1, 1, width)}
    for head in ("cpred", "gpred"):
        expected.update({f"{head}.0.weight": (width, width), f"{head}.0.bias": (width,),
                         f"{head}.2.weight": (patch_values, width), f"{head}.2.bias": (patch_values,)})
    for key, tensor in task_state.items():
        if key in expected and tuple(tensor.shape) != expected[key]:
            raise ConversionError(f"{what}: key {key} has shape {tuple(tensor.shape)}, expected {expected[key]}")


def released_to_ours(state: dict[str, Tensor], family: str | None = None, norm_mean: float = AUDIOSET_MEAN,
                     norm_std: float = AUDIOSET_STD, source: str = "released checkpoint",
                     **config_overrides: Any) -> Checkpoint:
    """Convert a released state dict; ``family`` is checked against the keys (detected if None).
    Released files carry no normalisation statistics: the AudioSet ones of their pretraining by default."""
    state = _strip_dataparallel(state)
    detected = detect_family(state)
    if family is not None and family != detected:
        raise ConversionError(f"{source}: --from {family} given, but its keys are those of a released {detected} "
                              f"model (keys under {FAMILIES[detected].RELEASED_MARKER}*)")
    enc_prefix = RELEASED_ENCODER_PREFIX
    encoder_src = {k[len(enc_prefix):]: v for k, v in state.items() if k.startswith(enc_prefix)}
    grid = {ours: int(state[released].item()) for ours, released in RELEASED_GRID_KEYS.items() if released in state}
    overrides = {k: v for k, v in {**grid, **config_overrides}.items() if k not in RUNTIME_FIELDS}
    reference = encoder_from_config(FAMILIES[detected].released_config(encoder_src, **overrides))
    what = f"{source} ({detected})"
    encoder_state = _checked_state(reference.state_dict(), encoder_src, DATAPARALLEL_PREFIX + enc_prefix, what)

    task_state, unused = {}, []
    for key, value in state.items():
        if key.startswith(enc_prefix):
            if key[len(enc_prefix):] not in encoder_state:
                unused.append(key)
        elif (ours := released_to_task_key(key)) is not None:
            task_state[ours] = value
        elif key not in RELEASED_GRID_KEYS.values():
            unused.append(key)
    config = reference.config
    _check_task_state(task_state, reference.embed_dim, config.fshape * config.tshape, what)
    unused = [DATAPARALLEL_PREFIX + k for k in unused]
    return Checkpoint(encoder_record(reference), encoder_state, task_state, norm_mean, norm_std, config.input_tdim,
                      task="pretrain", unused_keys=unused, source_format=f"{detected}-released",
                      converted_from={"format": f"{detected}-released", "unused_keys": unused})


# ----------------------------------------------------------------------------------------------
# the model folder: config.json + model.safetensors

# format_version 2 added the mel scale; a folder on kaldi's scale is still written as 1, which older readers read
# right, and one on another scale as 2, which they refuse instead of computing kaldi's features for it
FOLDER_FORMAT = {"format": "ssamba-model", "format_version": 2}
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
HUB_SCHEME = "hf://"


def save_pretrained(checkpoint: Checkpoint, directory: str | os.PathLike) -> Path:
    """Write ``checkpoint`` as a model folder: ``config.json`` (family, encoder config, input
    normalisation, length and mel scale, task, label names, head) and ``model.safetensors`` (encoder weights
    under ``encoder.``, the task's other weights, e.g. a classification head, under their own names)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    family = str(checkpoint.encoder_config["name"]).split("_", 1)[0]
    version = FOLDER_FORMAT["format_version"] if not checkpoint.on_kaldi_scale else 1
    config = {**FOLDER_FORMAT, "format_version": version, "family": family, **checkpoint.record()}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    tensors = {OUR_ENCODER_PREFIX + k: v for k, v in checkpoint.encoder_state.items()}
    tensors.update(checkpoint.task_state)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(directory / WEIGHTS_FILE),
              metadata={"format": FOLDER_FORMAT["format"]})
    return directory


def read_folder(directory: str | os.PathLike, **config_overrides: Any) -> Checkpoint:
    """A model folder written by :func:`save_pretrained` (JSON and safetensors: no code is run)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (directory / name).is_file()]
    if missing:
        raise ConversionError(f"{directory}: not a model folder, missing {' and '.join(missing)}")
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(f"{directory / CONFIG_FILE}: not JSON ({error})") from None
    if config.get("format") != FOLDER_FORMAT["format"]:
        raise ConversionError(f"{directory / CONFIG_FILE}: format {config.get('format')!r}, "
                              f"expected {FOLDER_FORMAT['format']!r}")
    if config.get("format_version", 0) > FOLDER_FORMAT["format_version"]:
        raise ConversionError(f"{directory / CONFIG_FILE}: format_version {config['format_version']} is newer than "
                              f"this ssamba reads ({FOLDER_FORMAT['format_version']}); upgrade ssamba")
    record = {k: v for k, v in config.items() if k not in (*FOLDER_FORMAT, "family")}
    loaded = lightning_to_ours({"state_dict": load_file(str(directory / WEIGHTS_FILE)), "ssamba": record},
                               source=str(directory), **config_overrides)
    loaded.source_format = "folder"
    return loaded


def download_folder(repo_id: str) -> str:
    """The local copy of a model folder on the Hugging Face Hub (needs huggingface_hub and the network)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConversionError(f"{HUB_SCHEME}{repo_id}: loading from the Hub needs the huggingface_hub package "
                              "(pip install huggingface_hub); or download the folder and pass its path") from None
    try:
        return snapshot_download(repo_id, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE])
    except Exception as error:  # offline, unknown repo, no access: one line, whichever it is
        raise ConversionError(f"{HUB_SCHEME}{repo_id}: could not download ({type(error).__name__}: {error})") from None
