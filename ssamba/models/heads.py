"""Heads on top of encoder tokens ``[B, num_prefix_tokens + num_patches, D]``, and the classifier they make.

They live with the encoders (not with the training tasks) so that inference can rebuild a
finetuned model from a checkpoint without the LightningModules."""
from __future__ import annotations

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


def prediction_head(embed_dim: int, out_dim: int) -> nn.Sequential:
    """Two-layer MLP of the masked patch heads (``cpred`` / ``gpred``): Linear -> ReLU -> Linear."""
    return nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.ReLU(), nn.Linear(embed_dim, out_dim))
