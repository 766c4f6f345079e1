"""The layout both released SSAMBA/SSAST ``.pth`` files share, and the helpers each family's reader uses.

Released checkpoints were saved from ``nn.DataParallel`` (every key starts with ``module.``). Our
encoders use the released parameter names, so the encoder map is a prefix change
(``module.v.X`` <-> ``encoder.X``); the pretraining task's parameters change names
(``cpredlayer`` -> ``cpred``, ``gpredlayer`` -> ``gpred``); the pretraining input size is stored
as two scalar tensors. Everything else in a released file (the ImageNet classifier heads ``v.head``
and ``v.head_dist`` of the Vim/DeiT backbones, a finetuned ``mlp_head``) has no counterpart and
is reported as unused. What differs per family (the marker key, the config read off the tensors,
the size table) lives with the family: ``released_config`` in ``ssamba.py`` and ``ssast.py``.
"""
from __future__ import annotations

import logging
import re
from typing import Any

from torch import Tensor

from ..constants import MEL_BINS

log = logging.getLogger(__name__)

DATAPARALLEL_PREFIX = "module."
RELEASED_ENCODER_PREFIX = "v."
OUR_ENCODER_PREFIX = "encoder."

# released (after ``module.``) -> our Lightning ``state_dict``, for the pretraining task's parameters
RELEASED_TO_TASK_PREFIX = {
    "mask_embed": "mask_embed",
    "cpredlayer.": "cpred.",
    "gpredlayer.": "gpred.",
}

# scalar tensors holding the pretraining input size (mel bins, frames)
RELEASED_GRID_KEYS = {"input_fdim": "p_input_fdim", "input_tdim": "p_input_tdim"}


class ConversionError(ValueError):
    """A checkpoint that cannot be read or converted; the message names the offending key or file."""


def released_to_task_key(key: str) -> str | None:
    """Our task key for a released (prefix-free) key, or None if it is not a task parameter."""
    for released, ours in RELEASED_TO_TASK_PREFIX.items():
        if key == released or (released.endswith(".") and key.startswith(released)):
            return ours + key[len(released):]
    return None


def task_to_released_key(key: str) -> str | None:
    """The released (prefix-free) key for one of our task keys, or None if it has no counterpart."""
    for released, ours in RELEASED_TO_TASK_PREFIX.items():
        if key == ours or (ours.endswith(".") and key.startswith(ours)):
            return released + key[len(ours):]
    return None


def require(encoder_state: dict[str, Tensor], key: str, family: str) -> Tensor:
    if key not in encoder_state:
        raise ConversionError(f"released {family} checkpoint has no key {DATAPARALLEL_PREFIX}{key}")
    return encoder_state[key]


def count_indexed(encoder_state: dict[str, Tensor], container: str) -> int:
    """How many ``container.N`` sub-modules the state holds (indices must be 0..N-1)."""
    pattern = re.compile(rf"^{re.escape(container)}\.(\d+)\.")
    indices = {int(m.group(1)) for k in encoder_state if (m := pattern.match(k))}
    if indices != set(range(len(indices))):
        raise ConversionError(f"{container}.N indices are not contiguous: {sorted(indices)}")
    return len(indices)


def patch_fields(family: str, encoder_state: dict[str, Tensor], sizes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Name, width and patch shape of a released encoder; widths not in ``sizes`` (our own small
    models) build on the tiny entry."""
    width = require(encoder_state, "cls_token", family).shape[-1]
    fshape, tshape = require(encoder_state, "patch_embed.proj.weight", family).shape[2:]
    size = next((name for name, size in sizes.items() if size["embed_dim"] == width), "tiny")
    return {"name": f"{family}_{size}", "embed_dim": width, "fshape": fshape, "tshape": tshape}


def complete_grid(family: str, encoder_state: dict[str, Tensor], fields: dict[str, Any], num_prefix_tokens: int,
                  overrides: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with ``overrides`` applied and the input grid filled in: strides default to the
    patch shape, mel bins to the front end's, frames to what the position embedding implies."""
    fields = {**fields, **overrides}
    if "input_tdim" not in fields and not {"fstride", "tstride"} & set(fields):
        log.warning("%s: the file stores no input grid; taking it from the position embedding with stride = patch "
                    "shape (the pretraining layout). A model finetuned with another stride (e.g. 10) needs "
                    "--fstride/--tstride/--input-tdim (ssamba.load(..., fstride=, tstride=, input_tdim=))", family)
    fields.setdefault("fstride", fields["fshape"])
    fields.setdefault("tstride", fields["tshape"])
    fields.setdefault("input_fdim", MEL_BINS)
    if "input_tdim" not in fields:
        patches = require(encoder_state, "pos_embed", family).shape[1] - num_prefix_tokens
        f_dim = (fields["input_fdim"] - fields["fshape"]) // fields["fstride"] + 1
        if patches % f_dim:
            raise ConversionError(
                f"{DATAPARALLEL_PREFIX}v.pos_embed holds {patches} patch positions, not a multiple of the {f_dim} "
                f"frequency patches of a {fields['input_fdim']}-bin input with fstride {fields['fstride']}; "
                "pass the pretraining grid (input_tdim, fstride, tstride)")
        fields["input_tdim"] = (patches // f_dim - 1) * fields["tstride"] + fields["tshape"]
    return fields
