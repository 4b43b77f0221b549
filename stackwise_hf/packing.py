"""Packing token streams into fixed-length blocks, and keeping each packed document to itself.

A block packs several documents end to end, each followed by a separator token (the tokenizer's eos).
Document-aware packing keeps the documents apart inside the block, as if each ran alone:

- position ids restart at 0 at every document start (and at the block start, where a document cut by the
  previous block continues);
- attention is block-diagonal: a token attends only to tokens of its own document (and, causally, only
  to earlier ones);
- for next-token prediction, the first token of a document is not a target of the previous document's
  last token.

All three follow from the block's tokens and the separator id alone, so masks never need storing: the
trainer derives them from each batch (`DocumentMasking.model_inputs`) and hands `position_ids` and a
boolean `(B, 1, T, T)` mask to the model, which passes the mask to SDPA. `BlockPacker` cuts a stream of
tokenized documents into blocks with a carry that is part of a resumable state.

Example:

```python
>>> import torch
>>> from stackwise_hf.packing import DocumentMasking
>>> masking = DocumentMasking(separator_id=0, causal=True)
>>> inputs = masking.model_inputs(torch.tensor([[5, 6, 0, 7, 8, 0]]))
>>> inputs["position_ids"].tolist()
[[0, 1, 2, 0, 1, 2]]
>>> inputs["attention_mask"][0, 0, 4].tolist()  # token 8 sees 7 and itself, not the first document
[False, False, False, True, True, False]

```
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch


def document_position_ids(input_ids: torch.Tensor, separator_id: int) -> torch.Tensor:
    """Position of each token inside its document: 0 at the block start and right after each separator.

    Args:
        input_ids (`torch.LongTensor` of shape `(B, T)`): packed blocks.
        separator_id (`int`): the token that ends each document.

    Returns:
        `torch.LongTensor` of shape `(B, T)`.
    """
    batch, length = input_ids.shape
    index = torch.arange(length, device=input_ids.device).expand(batch, length)
    # A document starts at 0 and after every separator (the separator closes the document before it).
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 1:] = input_ids[:, :-1] == separator_id
    starts[:, 0] = True
    # The index of the latest start at or before each token: a running max over start indices.
    latest_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - latest_start


def document_attention_mask(position_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """The block-diagonal boolean mask (True = attend) of packed documents, from their position ids.

    Args:
        position_ids (`torch.LongTensor` of shape `(B, T)`): from `document_position_ids`.
        causal (`bool`): also forbid attending to later tokens.

    Returns:
        `torch.BoolTensor` of shape `(B, 1, T, T)`.
    """
    segment = (position_ids == 0).cumsum(dim=1)  # (B, T): which document of the block a token is in
    mask = segment[:, :, None] == segment[:, None, :]  # (B, T, T)
    if causal:
        length = position_ids.shape[1]
        mask = mask & torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return mask[:, None]


@dataclass(frozen=True)
class DocumentMasking:
    """Derives the model inputs that keep packed documents apart (see the module docstring).

    Args:
        separator_id (`int`): the token that ends each document (the tokenizer's eos).
        causal (`bool`): causal attention (next-token prediction) or bidirectional (masked objectives).
    """

    separator_id: int
    causal: bool

    def model_inputs(self, input_ids: torch.Tensor) -> dict:
        """`{"position_ids", "attention_mask"}` for a batch of blocks; `{}` when no block holds more than one
        document start, so the model keeps its mask-free attention (SDPA's `is_causal` fast path)."""
        position_ids = document_position_ids(input_ids, self.separator_id)
        if not bool((position_ids[:, 1:] == 0).any()):
            return {}
        return {"position_ids": position_ids, "attention_mask": document_attention_mask(position_ids, self.causal)}

    def labels(self, labels: torch.Tensor, inputs: dict) -> torch.Tensor:
        """Causal LM labels without the targets that cross a document start (-100 there)."""
        if not self.causal or not inputs:
            return labels
        return labels.masked_fill(inputs["position_ids"] == 0, -100)


class BlockPacker:
    """Concatenates tokenized documents, each followed by the separator, and cuts `block_size` blocks.

    The tokens left over after the last full block (the carry) wait for the next document; `carry` and
    `set_carry` expose them for a resumable state.

    Args:
        block_size (`int`): tokens per block.
        separator_id (`int`): appended after every document.
    """

    def __init__(self, block_size: int, separator_id: int):
        self.block_size = block_size
        self.separator_id = separator_id
        self._carry = np.zeros(0, dtype=np.int32)

    def add(self, document: Iterable[int]) -> list[np.ndarray]:
        """Appends one document (its ids, without the separator) and returns the blocks it completes."""
        ids = np.fromiter(document, dtype=np.int32)
        if ids.size == 0:
            return []
        stream = np.concatenate([self._carry, ids, np.array([self.separator_id], dtype=np.int32)])
        n_blocks = stream.size // self.block_size
        self._carry = stream[n_blocks * self.block_size:].copy()
        return list(stream[: n_blocks * self.block_size].reshape(n_blocks, self.block_size))

    @property
    def carry(self) -> np.ndarray:
        return self._carry.copy()

    def set_carry(self, carry) -> None:
        carry = np.asarray(carry, dtype=np.int32).reshape(-1)
        if carry.size >= self.block_size:
            raise ValueError(f"a packing carry holds fewer than block_size={self.block_size} tokens; got {carry.size}.")
        self._carry = carry.copy()

    def reset(self) -> None:
        """Drops the carry (an epoch's last partial block)."""
        self._carry = np.zeros(0, dtype=np.int32)
