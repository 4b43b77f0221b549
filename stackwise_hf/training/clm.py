"""The causal LM objective and the pieces every objective shares: the batch it prepares, the token loss.

An objective has two jobs: `prepare(input_ids, stage_index, sample_ids, evaluation, epoch)` returns the model inputs
and labels for one batch (masking, for the masked objectives, is deterministic per sample, stage and
epoch, so a resume redraws the same masks and a cached trunk stays valid), and `loss(hidden, head, labels)` turns the final hidden states into a mean loss
and the number of positions it was taken over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fused_loss import chunked_linear_cross_entropy


@dataclass
class ObjectiveBatch:
    """What the stage module consumes: model inputs, labels (-100 = no loss), optional per-position weights."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor | None = None


class CausalLMObjective:
    """Next-token prediction over packed blocks; labels are the inputs, shifted inside `loss`."""

    name = "clm"
    attention_mode = "causal"
    loss_chunk_size: int | None = None  # set by the trainer from TrainingArguments.loss_chunk_size

    def prepare(self, input_ids: torch.Tensor, stage_index: int, sample_ids: torch.Tensor | None = None,
                evaluation: bool = False, epoch: int = 0) -> ObjectiveBatch:
        return ObjectiveBatch(input_ids=input_ids, labels=input_ids)

    def trunk_input_key(self, stage_index: int) -> str:
        """What the trunk's input depends on besides the data (the trunk cache's fingerprint): nothing."""
        return self.name

    def loss(self, hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, weights=None):
        # hidden: (B, T, H) -> predict token t+1 from position t.
        return token_cross_entropy(hidden[:, :-1], head, labels[:, 1:], weights, self.loss_chunk_size)


def token_cross_entropy(hidden, head, labels, weights=None, chunk_size: int | None = None):
    """Mean cross-entropy over positions whose label is not -100, computed in float32.

    Returns `(loss, n_positions)`; with `weights` (same shape as labels) the mean is weighted. With
    `chunk_size`, the head and the loss run chunk by chunk (`fused_loss.py`) so the full logits never
    exist at once.
    """
    if chunk_size:
        return chunked_linear_cross_entropy(hidden, head.weight, labels, weights, chunk_size)
    logits = head(hidden.to(head.weight.dtype)).float()  # (B, T, V)
    losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    mask = labels.flatten() != -100
    count = mask.sum()
    if weights is not None:
        losses = losses * weights.flatten().to(losses.dtype)
    return losses.sum() / count.clamp(min=1), count
