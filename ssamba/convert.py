"""Released SSAMBA/SSAST ``.pth`` files <-> our Lightning checkpoints: the command line and the writers.

``python -m ssamba.convert IN.pth OUT.ckpt --from ssamba|ssast`` turns a released file into a
checkpoint that finetuning and :func:`ssamba.load` read; ``--to-released`` goes the other way;
``--to-folder`` writes any of them (or our checkpoint) as a model folder (config.json +
model.safetensors, :func:`ssamba.save_pretrained`).
Reading either format is :mod:`ssamba.checkpoints`' job (finetuning accepts a released file
directly); this module writes them.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import torch
from torch import Tensor

from .checkpoints import (FAMILIES, Checkpoint, lightning_to_ours, load_checkpoint, read_tensors,
                          released_to_ours, save_pretrained)
from .constants import AUDIOSET_MEAN, AUDIOSET_STD, MEL_KEYS
from .models import released as keys
from .models.released import ConversionError

log = logging.getLogger(__name__)


def to_lightning_checkpoint(converted: Checkpoint) -> dict[str, Any]:
    """Our checkpoint layout (docs/architecture.md): ``state_dict`` with ``encoder.*`` + ``ssamba``."""
    import lightning

    state = {keys.OUR_ENCODER_PREFIX + k: v for k, v in converted.encoder_state.items()}
    state.update(converted.task_state)
    return {"state_dict": state, "ssamba": converted.record(), "epoch": 0, "global_step": 0,
            "pytorch-lightning_version": lightning.__version__}


# ----------------------------------------------------------------------------------------------
# writing the released layout


def ours_to_released(checkpoint: dict[str, Any]) -> tuple[dict[str, Tensor], list[str]]:
    """Our checkpoint -> ``(released state dict with module. keys, our keys that have no counterpart)``.

    The released loaders assume the pretraining grid is laid out with stride == patch shape and
    store only its input size, so an encoder on another grid (e.g. a stride-10 finetune) is refused, as is one
    on another mel scale than kaldi's (they store none).
    """
    converted = lightning_to_ours(checkpoint)
    if not converted.on_kaldi_scale:
        scale = " ".join(f"{key}={getattr(converted, key):g}" for key in MEL_KEYS)
        raise ConversionError("the released layout stores no mel scale and its readers compute kaldi's: this "
                              f"checkpoint reads {scale} (write a model folder instead: --to-folder)")
    stats = (converted.norm_mean, converted.norm_std)
    if None not in stats and stats != (AUDIOSET_MEAN, AUDIOSET_STD):
        log.warning("the released layout stores no normalisation and ssamba.load gives such a file AudioSet's "
                    "(%g, %g); this model was trained with norm_mean=%g norm_std=%g: pass those when loading it "
                    "(ssamba.load(path, norm_mean=..., norm_std=...)), or write a model folder (--to-folder)",
                    AUDIOSET_MEAN, AUDIOSET_STD, *stats)
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
    parser.add_argument("input", help="released .pth (with --to-released our .ckpt; with --to-folder either)")
    parser.add_argument("output", help="our .ckpt (with --to-released a released-layout .pth, with --to-folder a folder)")
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="family", choices=tuple(FAMILIES), help="family of the released input file")
    direction.add_argument("--to-released", action="store_true", help="write our checkpoint in the released layout")
    direction.add_argument("--to-folder", action="store_true",
                           help="write our checkpoint or a released file as a model folder (config.json + model.safetensors)")
    parser.add_argument("--norm-mean", type=float, default=AUDIOSET_MEAN, help="fbank mean used in pretraining")
    parser.add_argument("--norm-std", type=float, default=AUDIOSET_STD, help="fbank std used in pretraining")
    for name in ("input-fdim", "input-tdim", "fstride", "tstride"):
        parser.add_argument(f"--{name}", type=int, help="pretraining grid, for files that do not store it")
    parser.add_argument("--num-heads", type=int, help="SSAST attention heads, for widths other than the released ones")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    grid = {k: getattr(args, k) for k in ("input_fdim", "input_tdim", "fstride", "tstride", "num_heads")
            if getattr(args, k) is not None}
    if args.to_folder:
        converted = load_checkpoint(args.input, **grid)
        if converted.source_format.endswith("-released"):  # released files carry no statistics of their own
            converted.norm_mean, converted.norm_std = args.norm_mean, args.norm_std
        save_pretrained(converted, args.output)
        unused = converted.unused_keys
        print(f"wrote {converted.encoder_config['name']} ({len(converted.encoder_state)} encoder tensors, "
              f"task tensors: {', '.join(sorted(converted.task_state)) or 'none'}) as a model folder to {args.output}")
    elif args.to_released:
        state, unused = ours_to_released(read_tensors(args.input))
        torch.save(state, args.output)
        print(f"wrote {len(state)} tensors in the released layout to {args.output}")
    else:
        converted = released_to_ours(read_tensors(args.input), args.family, args.norm_mean, args.norm_std,
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
