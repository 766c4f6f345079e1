"""Heads on top of encoder tokens ``[B, num_prefix_tokens + num_patches, D]``, and the classifier they make.

They live with the encoders (not with the training tasks) so that inference can rebuild a
finetuned model from a checkpoint without the LightningModules."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POOLINGS = ("mean", "cls")


class ClassificationHead(nn.Module):
    """Pool the tokens -> LayerNorm -> Linear.

    ``mean``: the mean of the patch tokens, every prefix token excluded (the released
    ``finetuningavgtok``). ``cls``: the mean of the prefix tokens, which is the cls token for SSAMBA
    and ``(cls + dist) / 2`` for SSAST, as the released ``finetuningcls`` pools its two tokens.
    """

    def __init__(self, embed_dim: int, num_classes: int, pooling: str = "mean", num_prefix_tokens: int = 1):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"task.pooling={pooling!r} is not one of {', '.join(POOLINGS)}")
        if pooling == "cls" and num_prefix_tokens < 1:
            raise ValueError("task.pooling='cls' needs an encoder with a cls token")
        self.pooling = pooling
        self.num_prefix_tokens = num_prefix_tokens
        self.norm = nn.LayerNorm(embed_dim)
        self.fc = nn.Linear(embed_dim, num_classes)

    def pool(self, tokens: Tensor) -> Tensor:
        if self.pooling == "cls":
            return tokens[:, :self.num_prefix_tokens].mean(dim=1)
        return tokens[:, self.num_prefix_tokens:].mean(dim=1)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.fc(self.norm(self.pool(tokens)))


class Classifier(nn.Module):
    """Encoder + classification head of a finetuning checkpoint: ``fbank [B, T, mel_bins] -> logits [B, C]``."""

    def __init__(self, encoder: nn.Module, head: ClassificationHead):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, fbank: Tensor) -> Tensor:
        return self.head(self.encoder.forward_features(fbank))


class ClassifierEnsemble(nn.Module):
    """Several classifiers of the same classes as one: the mean of their class probabilities (softmax, or
    sigmoid for multi-label heads), returned as logits of that mean, so that patient rules, scores and
    outputs treat the ensemble as one classifier (e.g. a cross-validation's fold models on new patients)."""

    def __init__(self, members: list[nn.Module], multilabel: bool = False):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one classifier")
        self.members = nn.ModuleList(members)
        self.multilabel = multilabel

    def forward(self, fbank: Tensor) -> Tensor:
        logits = torch.stack([member(fbank).float() for member in self.members])
        if self.multilabel:
            return torch.logit(logits.sigmoid().mean(0), eps=1e-7)
        return logits.softmax(-1).mean(0).clamp_min(1e-12).log()


class LayerProbeHead(nn.Module):
    """SUPERB-style head on a frozen encoder's layer outputs ``[L, B, P + N, D]`` -> logits ``[B, C]``.

    A learnable softmax-weighted sum over the ``L`` layers, then the mean over the patch tokens
    (prefix tokens excluded), then ``Linear(D, projector_dim) -> Linear(projector_dim, C)`` (s3prl's
    utterance-level model; its projector runs per frame before the mean, which is the same for a
    linear map), or one ``Linear(D, C)`` with ``projector_dim=None``. Each layer's output is
    layer-normalised (no affine) before the sum: the residual stream grows with depth, and
    unnormalised the deepest layers would dominate whatever the weights say.
    """

    def __init__(self, num_layers: int, embed_dim: int, num_classes: int, num_prefix_tokens: int = 1,
                 projector_dim: int | None = 256):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"a layer probe needs at least one layer output, got {num_layers}")
        if projector_dim is not None and projector_dim < 1:
            raise ValueError(f"task.projector_dim={projector_dim}: must be >= 1 (or null: one linear layer)")
        self.num_prefix_tokens = num_prefix_tokens
        self.layer_weights = nn.Parameter(torch.zeros(num_layers))  # equal weights at the start
        self.projector = nn.Identity() if projector_dim is None else nn.Linear(embed_dim, projector_dim)
        self.fc = nn.Linear(embed_dim if projector_dim is None else projector_dim, num_classes)

    def mix(self, states: Tensor) -> Tensor:
        """The softmax-weighted sum of the layer-normalised layer outputs, ``[B, P + N, D]``."""
        if states.shape[0] != self.layer_weights.numel():
            raise ValueError(f"the head weighs {self.layer_weights.numel()} layers, got {states.shape[0]} outputs")
        normed = F.layer_norm(states.float(), states.shape[-1:])
        return torch.einsum("l,lbnd->bnd", self.layer_weights.softmax(0), normed)

    def forward(self, states: Tensor) -> Tensor:
        pooled = self.mix(states)[:, self.num_prefix_tokens:].mean(dim=1)
        return self.fc(self.projector(pooled))


def prediction_head(embed_dim: int, out_dim: int) -> nn.Sequential:
    """Two-layer MLP of the masked patch heads (``cpred`` / ``gpred``): Linear -> ReLU -> Linear."""
    return nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.ReLU(), nn.Linear(embed_dim, out_dim))
