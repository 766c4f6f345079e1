"""LightningModules for masked patch pretraining, finetuning and probing, and what they share."""
from ssamba.tasks.averaging import EpochRangeAveraging
from ssamba.tasks.base import EncoderTask, data_info
from ssamba.tasks.factory import build_task
from ssamba.tasks.finetune import Finetuning, load_pretrained_encoder
from ssamba.tasks.masking import cluster_mask, make_mask, random_mask
from ssamba.tasks.pretrain import MaskedPatchPretraining, masked_patch_nce
from ssamba.tasks.probe import Probing
from ssamba.tasks.schedules import stepped_multistep_lr

TASKS = (MaskedPatchPretraining.task_name, Finetuning.task_name, Probing.task_name)  # the values of task.name

__all__ = ["TASKS", "EncoderTask", "EpochRangeAveraging", "Finetuning", "MaskedPatchPretraining", "Probing",
           "build_task", "cluster_mask", "data_info", "load_pretrained_encoder", "make_mask", "masked_patch_nce",
           "random_mask", "stepped_multistep_lr"]
