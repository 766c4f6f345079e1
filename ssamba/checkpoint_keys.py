"""The one place that says how released SSAMBA/SSAST ``.pth`` keys map onto ours.

Released checkpoints were saved from ``nn.DataParallel`` (every key starts with ``module.``). Our
encoders use the released parameter names, so the encoder map is a prefix change
(``module.v.X`` <-> ``encoder.X``); the pretraining task's parameters change names
(``cpredlayer`` -> ``cpred``, ``gpredlayer`` -> ``gpred``); the pretraining input size is stored
as two scalar tensors. Everything else in a released file (the ImageNet classifier heads ``v.head``
and ``v.head_dist`` of the Vim/DeiT backbones, a finetuned ``mlp_head``) has no counterpart and
is reported as unused.
"""
from __future__ import annotations

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

# the marker key of each family's encoder, to tell the two released formats apart
FAMILY_MARKERS = {"ssamba": "v.layers.", "ssast": "v.blocks."}


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
