"""What the pretraining and finetuning LightningModules share: the encoder, the configured
optimizer and scheduler with a linear warm-up, and the checkpoint record of docs/architecture.md."""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from ssamba.checkpoints import INPUT_KEYS
from ssamba.constants import KALDI_MEL, MEL_KEYS
from ssamba.errors import ConfigError
from ssamba.models import encoder_record
from ssamba.tasks.cuda_graphs import GraphedPasses

DATA_KEYS = ("target_length", "norm_mean", "norm_std", "label_names", "multilabel")


def data_info(datamodule: Any) -> dict[str, Any]:
    """The datamodule attributes a task needs, as plain values (they go into hparams and checkpoints)."""
    missing = [key for key in DATA_KEYS if not hasattr(datamodule, key)]
    if missing:
        raise TypeError(f"{type(datamodule).__name__} lacks the datamodule attribute(s) {missing} "
                        "(see docs/architecture.md, 'Batches')")
    info = {"target_length": int(datamodule.target_length), "norm_mean": float(datamodule.norm_mean),
            "norm_std": float(datamodule.norm_std), "label_names": [str(n) for n in datamodule.label_names],
            "multilabel": bool(datamodule.multilabel)}
    mel = getattr(datamodule, "mel", None)  # ours always have one; without it, the features are kaldi's
    if mel is not None:
        info.update(mel.record())
    return info


class EncoderTask(L.LightningModule):
    """Base class: ``self.encoder`` plus optimisation; subclasses add heads and the steps.

    ``optimizer`` and ``scheduler`` are partials from the config (``_partial_: true``) that get the
    parameter groups / the optimizer. The warm-up multiplies every group's learning rate by
    ``min(1, (step + 1) / warmup_steps)`` around each optimizer step only, so schedulers
    (MultiStepLR, ReduceLROnPlateau, ...) always see and change the un-warmed rate.
    """

    task_name = "task"

    def __init__(self, encoder: nn.Module, optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Callable[..., Any] | None = None, scheduler_config: dict | None = None,
                 warmup_steps: int = 0, data: dict | None = None):
        super().__init__()
        if warmup_steps < 0:
            raise ConfigError(f"task.warmup_steps={warmup_steps} must be >= 0")
        self.encoder = encoder
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_config = dict(scheduler_config or {})
        self.warmup_steps = warmup_steps
        self.data = dict(data or {})
        self.cuda_graphs: bool | str = False
        self.graphed_passes: GraphedPasses | None = None

    def use_cuda_graphs(self, setting: bool | str, passes: int) -> None:
        """Replay the encoder's ``passes`` training passes per step as CUDA graphs (``task.cuda_graphs``):
        ``true``, ``false`` or ``auto``, which follows the encoder's ``prefers_cuda_graphs`` (encoders
        whose steps wait on the host's kernel launches, docs/performance.md) and is dropped on a CPU."""
        if setting not in (True, False, "auto"):
            raise ConfigError(f"task.cuda_graphs={setting!r} is not one of true, false, auto")
        self.cuda_graphs = setting
        wanted = setting is True or (setting == "auto" and getattr(self.encoder, "prefers_cuda_graphs", False))
        self.release_cuda_graphs()
        self.graphed_passes = GraphedPasses(self.encoder, passes) if wanted else None

    def release_cuda_graphs(self) -> None:
        """Free captured encoder graphs and their memory pools (captured again on the next training step)."""
        if self.graphed_passes is not None:
            self.graphed_passes.release()

    def encode(self, x: Tensor, *masking: Tensor, index: int = 0) -> Tensor:
        """The encoder's ``forward_features(x, *masking)``, replayed from the CUDA graph of pass ``index``
        of the step where there is one (training on a GPU; otherwise eager)."""
        if self.graphed_passes is not None:
            return self.graphed_passes.encode(index, x, *masking)
        return self.encoder.forward_features(x, *masking)

    def on_fit_start(self) -> None:
        """Give every DDP rank its own random stream; check the CUDA-graph setting against the device.

        All ranks are seeded alike so that they build identical initial weights; left that way they
        would also draw identical masks, drop-path and augmentation every step. A resumed run
        restores each rank's saved stream afterwards (``RandomStateCheckpoint.on_train_start``).
        """
        if self.trainer.world_size > 1:
            torch.manual_seed(torch.initial_seed() + self.global_rank)
        if self.graphed_passes is not None and self.device.type != "cuda":
            if self.cuda_graphs != "auto":
                raise ConfigError(f"task.cuda_graphs=true needs a CUDA device, but the model is on "
                                  f"{self.device.type}; use trainer=gpu or task.cuda_graphs=false")
            self.graphed_passes = None
        if self.graphed_passes is not None and self.trainer.accumulate_grad_batches > 1:
            # a replayed backward hands the parameters its static gradient buffers: where a parameter has no
            # gradient yet it keeps the buffer itself, which the next micro-batch's replay overwrites, so only
            # the last micro-batch's gradient (twice) would reach the optimizer
            if self.cuda_graphs != "auto":
                raise ConfigError("task.cuda_graphs=true cannot accumulate gradients (trainer.accumulate_grad_batches="
                                  f"{self.trainer.accumulate_grad_batches}): use task.cuda_graphs=false or auto")
            self.graphed_passes = None

    def teardown(self, stage: str) -> None:
        """The end of ``fit`` (or validate/test): the graph pools would otherwise outlive the run, and
        a task or trainer kept afterwards (a notebook's) would hold a step's activations' worth of memory."""
        self.release_cuda_graphs()

    # --- optimisation -----------------------------------------------------------------------
    def parameter_groups(self) -> list[dict]:
        """Optimizer parameter groups; subclasses split them (e.g. a head learning-rate multiplier)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def base_lr(self) -> float:
        keywords = self.optimizer_factory.keywords if isinstance(self.optimizer_factory, functools.partial) else {}
        if "lr" not in keywords:
            raise ConfigError("task.optimizer.lr must be set (the head multiplier and warm-up scale it)")
        return float(keywords["lr"])

    def configure_optimizers(self):
        try:
            optimizer = self.optimizer_factory(self.parameter_groups())
        except ValueError as error:  # torch's optimizers check their arguments (lr, betas, weight_decay) here
            raise ConfigError(f"task.optimizer: {error}") from error
        if self.scheduler_factory is None:
            return optimizer
        scheduler = {"scheduler": self.scheduler_factory(optimizer), **self.scheduler_config}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def warmup_factor(self) -> float:
        if self.global_step >= self.warmup_steps:
            return 1.0
        return (self.global_step + 1) / self.warmup_steps

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        factor = self.warmup_factor()
        if factor == 1.0:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        groups = optimizer.param_groups
        scheduled = [group["lr"] for group in groups]
        for group in groups:
            group["lr"] *= factor
        try:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        finally:
            for group, lr in zip(groups, scheduled):
                group["lr"] = lr

    def log_training(self, values: dict[str, Tensor], batch_size: int) -> None:
        """``<name>_step``, this rank's value (and the progress bar's), and ``<name>_epoch``, the epoch's mean
        over every rank. Reducing every step's value over DDP ranks would make each step wait for all ranks
        and for the device (Lightning's reduction starts with a barrier)."""
        self.log_dict({f"{name}_step": value for name, value in values.items()}, on_step=True, on_epoch=False,
                      prog_bar=True)
        self.log_dict({f"{name}_epoch": value for name, value in values.items()}, on_step=False, on_epoch=True,
                      sync_dist=True, batch_size=batch_size)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.log_lr()

    def log_lr(self) -> None:
        """Log the learning rate the coming optimizer step uses (warm-up included), per group."""
        if not self.trainer.optimizers:
            return
        factor = self.warmup_factor()
        for index, group in enumerate(self.trainer.optimizers[0].param_groups):
            name = "lr" if index == 0 else f"lr_{group.get('name', index)}"
            # a host tensor: a number would be copied to the GPU, and the copy waits for the queued work
            self.log(name, torch.tensor(group["lr"] * factor), on_step=True, on_epoch=False, prog_bar=index == 0)

    # --- checkpoint record --------------------------------------------------------------------
    def checkpoint_record(self) -> dict[str, Any]:
        """What a finetune or ``ssamba.load`` needs to rebuild the encoder without the training config."""
        return {"encoder": encoder_record(self.encoder), "norm_mean": self.data.get("norm_mean"),
                "norm_std": self.data.get("norm_std"), "target_length": self.data.get("target_length"),
                **{key: self.data[key] for key in MEL_KEYS if key in self.data},
                "task": self.task_name, "label_names": self.data.get("label_names")}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ssamba"] = self.checkpoint_record()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming (``ckpt_path=``) with other input settings would train one model on two kinds of features,
        and record only the second: refused, naming the settings."""
        record, data = checkpoint.get("ssamba", {}), self.data or {}
        saved = {**dict(zip(MEL_KEYS, KALDI_MEL)), **record}  # a record without the mel keys: kaldi's scale
        differ = [key for key in INPUT_KEYS if data.get(key) is not None and saved.get(key) is not None
                  and data[key] != saved[key]]
        if differ:
            raise ConfigError("this checkpoint was trained with " + " ".join(f"data.{k}={saved[k]}" for k in differ)
                              + "; this run gives " + " ".join(f"data.{k}={data[k]}" for k in differ)
                              + ": resume with the checkpoint's settings, or start a new run from it "
                              "(task.pretrained=<checkpoint>)")
