"""Released SSAMBA/SSAST ``.pth`` files <-> our Lightning checkpoints.

``python -m ssamba.convert IN.pth OUT.ckpt --from ssamba|ssast`` turns a released file into a
checkpoint that finetuning and :func:`ssamba.load` read; ``--to-released`` goes the other way.
:func:`load_encoder_state` reads either format, so finetuning accepts a released file directly.

The encoder configuration is read off the tensors (width, depth, state size, patch shape, ...),
every encoder tensor is shape-checked against a freshly built encoder (a mismatch is an error
naming the key), and keys without a counterpart are reported, never dropped silently.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import checkpoint_keys as keys
from .data.features import AUDIOSET_MEAN, AUDIOSET_STD
from .models import build_encoder, encoder_from_config

log = logging.getLogger(__name__)

FAMILIES = tuple(keys.FAMILY_MARKERS)
_SIZE_BY_WIDTH = {192: "tiny", 384: "small", 768: "base"}
_SSAST_HEADS = {192: 3, 384: 6, 768: 12}


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the offending key or file."""


@dataclass
class Converted:
    """What a checkpoint holds, in our terms, plus what had no counterpart."""

    encoder_config: dict[str, Any]
    encoder_state: dict[str, Tensor]
    task_state: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # norm stats, target_length, task, label names
    unused_keys: list[str] = field(default_factory=list)
    source_format: str = "lightning"


# ----------------------------------------------------------------------------------------------
# reading


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
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


def _strip_dataparallel(state: dict[str, Tensor]) -> dict[str, Tensor]:
    prefix = keys.DATAPARALLEL_PREFIX
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def detect_family(state: dict[str, Tensor]) -> str:
    """``ssamba`` or ``ssast`` from the encoder keys of a released (prefix-stripped) state dict."""
    found = [family for family, marker in keys.FAMILY_MARKERS.items() if any(k.startswith(marker) for k in state)]
    if len(found) != 1:
        markers = ", ".join(f"{m}* ({f})" for f, m in keys.FAMILY_MARKERS.items())
        raise ConversionError(f"cannot tell the model family: expected keys under exactly one of {markers}; "
                              f"found {len(found)} (first keys: {sorted(state)[:5]})")
    return found[0]


def _require(state: dict[str, Tensor], key: str, family: str) -> Tensor:
    if key not in state:
        raise ConversionError(f"released {family} checkpoint has no key {keys.DATAPARALLEL_PREFIX}{key}")
    return state[key]


def _count_indexed(encoder_state: dict[str, Tensor], container: str) -> int:
    pattern = re.compile(rf"^{re.escape(container)}\.(\d+)\.")
    indices = {int(m.group(1)) for k in encoder_state if (m := pattern.match(k))}
    if indices != set(range(len(indices))):
        raise ConversionError(f"{container}.N indices are not contiguous: {sorted(indices)}")
    return len(indices)


def _size_name(family: str, width: int) -> str:
    """Registry name of a released width; other widths (our own small models) build on the tiny entry."""
    return f"{family}_{_SIZE_BY_WIDTH.get(width, 'tiny')}"


def infer_encoder_config(family: str, encoder_state: dict[str, Tensor], grid: dict[str, int],
                         **overrides: Any) -> dict[str, Any]:
    """Encoder config fields read off released tensors; ``overrides`` win (e.g. strides, backend)."""
    width = _require(encoder_state, "cls_token", family).shape[-1]
    fshape, tshape = _require(encoder_state, "patch_embed.proj.weight", family).shape[2:]
    fields: dict[str, Any] = {"name": _size_name(family, width), "embed_dim": width,
                              "fshape": fshape, "tshape": tshape}
    if family == "ssamba":
        mixer = "layers.0.mixer."
        d_inner, d_state = _require(encoder_state, mixer + "A_log", family).shape
        fields.update(depth=_count_indexed(encoder_state, "layers"), d_state=d_state, expand=d_inner // width,
                      d_conv=_require(encoder_state, mixer + "conv1d.weight", family).shape[-1],
                      dt_rank=_require(encoder_state, mixer + "dt_proj.weight", family).shape[1],
                      norm="layernorm" if "layers.0.norm.bias" in encoder_state else "rmsnorm")
    else:
        hidden = _require(encoder_state, "blocks.0.mlp.fc1.weight", family).shape[0]
        if width not in _SSAST_HEADS and "num_heads" not in overrides:
            raise ConversionError(f"{keys.DATAPARALLEL_PREFIX}v.cls_token has width {width}, not one of the released "
                                  f"SSAST widths {sorted(_SSAST_HEADS)}: pass num_heads")
        fields.update(depth=_count_indexed(encoder_state, "blocks"), num_heads=_SSAST_HEADS.get(width),
                      mlp_ratio=hidden / width)
    fields.update(grid)
    fields.update(overrides)
    fields.setdefault("fstride", fields["fshape"])
    fields.setdefault("tstride", fields["tshape"])
    fields.setdefault("input_fdim", 128)
    if "input_tdim" not in fields:
        fields["input_tdim"] = _tdim_from_pos_embed(family, encoder_state, fields)
    return fields


def _tdim_from_pos_embed(family: str, encoder_state: dict[str, Tensor], fields: dict[str, Any]) -> int:
    """Frames implied by the position embedding when the file does not store the input size."""
    prefix = 1 if family == "ssamba" else 2
    patches = _require(encoder_state, "pos_embed", family).shape[1] - prefix
    f_dim = (fields["input_fdim"] - fields["fshape"]) // fields["fstride"] + 1
    if patches % f_dim:
        raise ConversionError(
            f"{keys.DATAPARALLEL_PREFIX}v.pos_embed holds {patches} patch positions, not a multiple of the {f_dim} "
            f"frequency patches of a {fields['input_fdim']}-bin input with fstride {fields['fstride']}; "
            "pass the pretraining grid (input_tdim, fstride, tstride)")
    return (patches // f_dim - 1) * fields["tstride"] + fields["tshape"]


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
                     **config_overrides: Any) -> Converted:
    """Convert a released state dict; ``family`` is checked against the keys (detected if None)."""
    state = _strip_dataparallel(state)
    detected = detect_family(state)
    if family is not None and family != detected:
        raise ConversionError(f"{source}: --from {family} given, but its keys are those of a released {detected} "
                              f"model (keys under {keys.FAMILY_MARKERS[detected]}*)")
    enc_prefix = keys.RELEASED_ENCODER_PREFIX
    encoder_src = {k[len(enc_prefix):]: v for k, v in state.items() if k.startswith(enc_prefix)}
    grid = {ours: int(state[released].item()) for ours, released in keys.RELEASED_GRID_KEYS.items() if released in state}
    config = infer_encoder_config(detected, encoder_src, grid, **config_overrides)
    reference = build_encoder(config["name"], **{k: v for k, v in config.items() if k != "name"})
    what = f"{source} ({detected})"
    encoder_state = _checked_state(reference.state_dict(), encoder_src, keys.DATAPARALLEL_PREFIX + enc_prefix, what)

    task_state, unused = {}, []
    for key, value in state.items():
        if key.startswith(enc_prefix):
            if key[len(enc_prefix):] not in encoder_state:
                unused.append(key)
        elif (ours := keys.released_to_task_key(key)) is not None:
            task_state[ours] = value
        elif key not in keys.RELEASED_GRID_KEYS.values():
            unused.append(key)
    _check_task_state(task_state, reference.embed_dim, config["fshape"] * config["tshape"], what)
    meta = {"norm_mean": norm_mean, "norm_std": norm_std, "target_length": reference.config.input_tdim,
            "task": "pretrain", "label_names": []}
    return Converted(dataclasses.asdict(reference.config), encoder_state, task_state, meta,
                     [keys.DATAPARALLEL_PREFIX + k for k in unused], f"{detected}-released")


def lightning_to_ours(checkpoint: dict[str, Any], source: str = "checkpoint") -> Converted:
    """Split one of our Lightning checkpoints into encoder config/state, task state and metadata."""
    if "ssamba" not in checkpoint or "encoder" not in checkpoint["ssamba"]:
        raise ConversionError(f"{source} has no checkpoint['ssamba']['encoder'] (not an ssamba checkpoint, "
                              "or a released file: convert it with python -m ssamba.convert)")
    meta = dict(checkpoint["ssamba"])
    config = meta.pop("encoder")
    prefix = keys.OUR_ENCODER_PREFIX
    state = checkpoint["state_dict"]
    encoder_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    task_state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    reference = encoder_from_config(config).state_dict()
    encoder_state = _checked_state(reference, encoder_state, prefix, source)
    return Converted(config, encoder_state, task_state, meta, [], "lightning")


def load_encoder_state(path: str | os.PathLike, family: str | None = None,
                       **config_overrides: Any) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any]]:
    """``(encoder_config, encoder_state, extras)`` from our checkpoint or a released ``.pth``.

    ``encoder_config`` rebuilds the encoder with ``ssamba.models.encoder_from_config``;
    ``encoder_state`` loads into it strictly. ``extras`` holds ``norm_mean``, ``norm_std``,
    ``target_length``, ``task``, ``label_names``, ``task_state`` (non-encoder weights, under our
    names), ``unused_keys`` and ``source_format``. ``config_overrides`` apply to released files only.
    """
    checkpoint = read_checkpoint(path)
    source = os.path.basename(os.fspath(path))
    if is_released(checkpoint):
        converted = released_to_ours(checkpoint, family, source=source, **config_overrides)
        for key in converted.unused_keys:
            log.warning("%s: key %s has no counterpart in our model and is not used", source, key)
    else:
        converted = lightning_to_ours(checkpoint, source)
    extras = {**converted.meta, "task_state": converted.task_state, "unused_keys": converted.unused_keys,
              "source_format": converted.source_format}
    return converted.encoder_config, converted.encoder_state, extras


def to_lightning_checkpoint(converted: Converted) -> dict[str, Any]:
    """Our checkpoint layout (docs/architecture.md): ``state_dict`` with ``encoder.*`` + ``ssamba``."""
    import lightning

    state = {keys.OUR_ENCODER_PREFIX + k: v for k, v in converted.encoder_state.items()}
    state.update(converted.task_state)
    ssamba_meta = {"encoder": converted.encoder_config, **converted.meta,
                   "converted_from": {"format": converted.source_format, "unused_keys": converted.unused_keys}}
    return {"state_dict": state, "ssamba": ssamba_meta, "epoch": 0, "global_step": 0,
            "pytorch-lightning_version": lightning.__version__}


# ----------------------------------------------------------------------------------------------
# writing the released layout


def ours_to_released(checkpoint: dict[str, Any]) -> tuple[dict[str, Tensor], list[str]]:
    """Our checkpoint -> ``(released state dict with module. keys, our keys that have no counterpart)``.

    The released loaders assume the pretraining grid is laid out with stride == patch shape and
    store only its input size, so an encoder on another grid (e.g. a stride-10 finetune) is refused.
    """
    converted = lightning_to_ours(checkpoint)
    config = converted.encoder_config
    if (config["fstride"], config["tstride"]) != (config["fshape"], config["tshape"]):
        raise ConversionError(f"the released layout stores no stride: encoder stride ({config['fstride']}, "
                              f"{config['tstride']}) must equal its patch shape ({config['fshape']}, {config['tshape']})")
    dp, enc = keys.DATAPARALLEL_PREFIX, keys.RELEASED_ENCODER_PREFIX
    state = {dp + enc + k: v for k, v in converted.encoder_state.items()}
    unused = []
    for key, value in converted.task_state.items():
        released = keys.task_to_released_key(key)
        if released is None:
            unused.append(key)
        else:
            state[dp + released] = value
    for ours, released in keys.RELEASED_GRID_KEYS.items():
        state[dp + released] = torch.tensor(config[ours])
    return state, unused


# ----------------------------------------------------------------------------------------------
# command line


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ssamba.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="released .pth (or, with --to-released, our .ckpt)")
    parser.add_argument("output", help="our .ckpt (or, with --to-released, a released-layout .pth)")
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="family", choices=FAMILIES, help="family of the released input file")
    direction.add_argument("--to-released", action="store_true", help="write our checkpoint in the released layout")
    parser.add_argument("--norm-mean", type=float, default=AUDIOSET_MEAN, help="fbank mean used in pretraining")
    parser.add_argument("--norm-std", type=float, default=AUDIOSET_STD, help="fbank std used in pretraining")
    for name in ("input-fdim", "input-tdim", "fstride", "tstride"):
        parser.add_argument(f"--{name}", type=int, help="pretraining grid, for files that do not store it")
    parser.add_argument("--num-heads", type=int, help="SSAST attention heads, for widths other than the released ones")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.to_released:
        state, unused = ours_to_released(read_checkpoint(args.input))
        torch.save(state, args.output)
        print(f"wrote {len(state)} tensors in the released layout to {args.output}")
    else:
        grid = {k: getattr(args, k) for k in ("input_fdim", "input_tdim", "fstride", "tstride", "num_heads")
                if getattr(args, k) is not None}
        converted = released_to_ours(read_checkpoint(args.input), args.family, args.norm_mean, args.norm_std,
                                     source=os.path.basename(args.input), **grid)
        torch.save(to_lightning_checkpoint(converted), args.output)
        unused = converted.unused_keys
        config = converted.encoder_config
        print(f"wrote {config['name']} ({len(converted.encoder_state)} encoder tensors, grid "
              f"{config['input_fdim']}x{config['input_tdim']}, patch {config['fshape']}x{config['tshape']}; "
              f"task tensors: {', '.join(sorted(converted.task_state)) or 'none'}) to {args.output}")
    if unused:
        print(f"{len(unused)} key(s) without a counterpart, not converted:", file=sys.stderr)
        for key in unused:
            print(f"  {key}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
