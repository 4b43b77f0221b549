"""How token blocks reach the training loop: rows with their index, in a shuffle that resumes exactly."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class IndexedBlocks(Dataset):
    """Rows of a token-block dataset with their index, so masks can be a function of (sample, stage) and
    the trunk cache can look a block up. A row is a dict with `input_ids`, a tensor/list of ids, or a
    tuple whose first item is the ids."""

    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": torch.as_tensor(row_ids(self.blocks[index])), "sample_id": index}


def row_ids(row):
    if isinstance(row, Mapping):
        return row["input_ids"]
    if isinstance(row, tuple):
        return row[0]
    return row


class EpochSampler(Sampler):
    """A shuffle that is a pure function of (seed, epoch): resuming at any epoch reproduces the order,
    whatever happened to the global RNG in between."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        yield from torch.randperm(self.num_samples, generator=generator).tolist()


def indexed_loader(loader: DataLoader) -> DataLoader:
    """The caller's DataLoader with each batch's sample indices attached: the same dataset, batch sampler
    (so the same batches in the same order) and workers, its rows read through `IndexedBlocks`. Needs a
    map-style dataset with the default collation; anything else is returned as it is (its batches then
    carry no indices, and features that need them, the trunk cache and masked objectives, refuse it)."""
    dataset = getattr(loader, "dataset", None)
    sampler = getattr(loader, "batch_sampler", None)
    if dataset is None or sampler is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        return loader
    if getattr(loader, "collate_fn", None) is not _DEFAULT_COLLATE:
        return loader
    return DataLoader(IndexedBlocks(dataset), batch_sampler=sampler, num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory)


_DEFAULT_COLLATE = DataLoader([0]).collate_fn


def batch_input_ids(batch) -> torch.Tensor:
    """The `input_ids` of a batch: a tensor, a dict with `input_ids`, or a tuple whose first item is it."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping) and "input_ids" in batch:
        return batch["input_ids"]
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"expected batches of input_ids tensors, dicts with `input_ids`, or tuples whose first item is "
                    f"input_ids; got a {type(batch).__name__}.")
