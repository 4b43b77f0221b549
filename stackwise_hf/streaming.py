"""Streamed training data: read, tokenize, pack and shuffle a corpus on the fly, and resume it exactly.

`TrainStream` is the train split of a `DataArguments(streaming=True)` corpus for one process:

1. the documents come from `datasets.load_dataset(..., streaming=True)` (`data.load_raw_datasets`), a
   `datasets.IterableDataset` that reads the files (or the Hub) lazily;
2. `datasets.distributed.split_dataset_by_node` gives each process its own part: whole shards (files)
   when their number divides by the number of processes, else every `world_size`-th document; no
   document reaches two processes in an epoch;
3. `IterableDataset.map(batched=True)` tokenizes as the stream is read;
4. `packing.BlockPacker` cuts the token stream into `block_size` blocks (documents end with eos);
5. a shuffle buffer of `shuffle_buffer_size` blocks hands out a random one of them at each draw.

Memory is the buffer plus one batch of documents, whatever the corpus size.

Resuming: `state_dict()` is the stream position (`IterableDataset.state_dict()`, which `datasets`
restores exactly for `map` and `filter` pipelines), the packer's carry, and the shuffle buffer with its
random generator. `datasets`' own `IterableDataset.shuffle` buffer is not used because its content is not
part of its state dict (a resumed `datasets` shuffle buffer is refilled with new data, so a resumed run
would see other blocks); this buffer's content is saved with the position, so a resumed run draws exactly
the blocks the uninterrupted run would have, without reading the corpus from the start. The checkpoint
writes it as safetensors + JSON (`training/checkpointing.py`), never pickle.

Epochs: a process's epoch ends when its part of the stream is exhausted; the buffer is drained, the last
partial batch dropped, and the next epoch reads the stream again with a new shuffle seed. Shard order is
the corpus's own.

`eval_blocks` packs the leading blocks of the validation split (the same on every process).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .data import DataArguments, document_separator, load_raw_datasets
from .packing import BlockPacker

logger = logging.getLogger(__name__)

STATE_VERSION = 1


class StreamStateError(ValueError):
    """A saved stream position does not fit this stream (other data, block size or process layout)."""


class TrainStream:
    """The streamed, tokenized, packed and shuffled train split of one process.

    Args:
        data_args (`DataArguments`): the corpus (`streaming=True`), `block_size`, `shuffle_buffer_size`.
        tokenizer (`PreTrainedTokenizerBase`): tokenizes the documents; its eos (or sep) ends each one.
        batch_size (`int`): blocks per batch.
        rank / world_size (`int`, *optional*): this process and the number of processes (DDP, FSDP).
        seed (`int`, *optional*): seed of the shuffle buffer (each epoch and process draws from its own).

    Example:

    ```python
    >>> from stackwise_hf.data import DataArguments, load_or_train_tokenizer
    >>> from stackwise_hf.streaming import TrainStream
    >>> data_args = DataArguments(streaming=True, block_size=64, max_eval_blocks=4, shuffle_buffer_size=16)
    >>> stream = TrainStream(data_args, load_or_train_tokenizer(data_args), batch_size=4)
    >>> batch = next(stream.epoch_batches())
    >>> batch["input_ids"].shape, batch["sample_id"].shape
    (torch.Size([4, 64]), torch.Size([4]))
    >>> position = stream.state_dict()  # resume here with `load_state_dict(position)`

    ```
    """

    def __init__(self, data_args: DataArguments, tokenizer, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0):
        if not data_args.streaming:
            raise ValueError("TrainStream reads DataArguments(streaming=True) corpora; got streaming=False.")
        self.data_args, self.tokenizer = data_args, tokenizer
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.block_size = data_args.block_size
        self.buffer_size = data_args.shuffle_buffer_size
        self.packer = BlockPacker(self.block_size, document_separator(tokenizer))
        self.blocks_made = 0  # blocks this process has packed, over all epochs: numbers its sample ids
        self._start_epoch(0)

    # Position -----------------------------------------------------------------------------------------

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.epoch_batches_done = 0
        self.exhausted = False
        self.packer.reset()
        self._buffer: list[np.ndarray] = []
        self._buffer_ids: list[int] = []
        self._rng = np.random.default_rng([self.seed, epoch, self.rank])
        self._dataset = self._documents()
        self._iterator = None  # started at the first read, so a loaded state can come first

    def _documents(self):
        """This process's tokenized documents: rows with `input_ids` (empty for blank texts)."""
        from datasets.distributed import split_dataset_by_node  # datasets is optional: imported where data loads

        documents = load_raw_datasets(self.data_args)["train"]
        if self.world_size > 1:
            documents = split_dataset_by_node(documents, rank=self.rank, world_size=self.world_size)
        return documents.map(_tokenize_documents, batched=True,
                             fn_kwargs={"tokenizer": self.tokenizer, "text_column": self.data_args.text_column})

    def state_dict(self) -> dict:
        """The stream position: enough to continue exactly here (tensors are saved as safetensors)."""
        rows = np.stack(self._buffer) if self._buffer else np.zeros((0, self.block_size), dtype=np.int32)
        return {
            "version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size, "block_size": self.block_size,
            "epoch": self.epoch, "epoch_batches": self.epoch_batches_done, "exhausted": self.exhausted,
            "blocks_made": self.blocks_made,
            "dataset": self._dataset.state_dict() if self._iterator is not None else None,
            "carry": torch.from_numpy(self.packer.carry),
            "buffer": torch.from_numpy(rows), "buffer_ids": torch.tensor(self._buffer_ids, dtype=torch.int64),
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continues from a `state_dict()` of a stream over the same corpus, block size and processes.

        Raises:
            StreamStateError: if the state belongs to another process layout or block size.
        """
        expected = {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                    "block_size": self.block_size}
        found = {k: state.get(k) for k in expected}
        if found != expected:
            raise StreamStateError(f"the saved stream position was written for {found}; this stream is {expected}.")
        self._start_epoch(state["epoch"])
        self.epoch_batches_done, self.exhausted = state["epoch_batches"], state["exhausted"]
        self.blocks_made = state["blocks_made"]
        if state["dataset"] is not None:
            self._dataset.load_state_dict(state["dataset"])
            self._iterator = iter(self._dataset)
        self.packer.set_carry(np.asarray(state["carry"]))
        self._buffer = list(np.asarray(state["buffer"], dtype=np.int32))
        self._buffer_ids = [int(i) for i in state["buffer_ids"]]
        self._rng.bit_generator.state = state["rng"]

    # Reading ----------------------------------------------------------------------------------------

    def epoch_batches(self, device=None):
        """Yields `{"input_ids": (B, T) long, "sample_id": (B,) long}` batches on `device` until this
        process's epoch ends (its last partial batch is dropped); the next call starts the next epoch.
        Stopping early keeps the position: the next call continues with the next batch."""
        while True:
            batch = self._next_batch()
            if batch is None:
                if self.epoch_batches_done == 0:
                    raise ValueError(
                        f"process {self.rank} of {self.world_size}: its part of the streamed train split holds "
                        f"fewer than one batch of {self.batch_size} blocks of {self.block_size} tokens; add data, "
                        f"lower the batch size or block_size, or use fewer processes."
                    )
                logger.info("process %d: streamed epoch %d ended after %d batches.", self.rank, self.epoch,
                            self.epoch_batches_done)
                self._start_epoch(self.epoch + 1)
                return
            self.epoch_batches_done += 1
            yield {key: value.to(device) if device is not None else value for key, value in batch.items()}

    def _next_batch(self) -> dict | None:
        blocks, ids = [], []
        while len(blocks) < self.batch_size:
            drawn = self._next_block()
            if drawn is None:
                return None
            blocks.append(drawn[0])
            ids.append(drawn[1])
        return {"input_ids": torch.from_numpy(np.stack(blocks)).long(), "sample_id": torch.tensor(ids)}

    def _next_block(self) -> tuple[np.ndarray, int] | None:
        """Fills the buffer up to its size, then hands out a random block of it (in order without a buffer)."""
        while len(self._buffer) < max(1, self.buffer_size) and not self.exhausted:
            self._read_document()
        if not self._buffer:
            return None
        index = int(self._rng.integers(len(self._buffer))) if self.buffer_size > 1 else 0
        # Swap with the last and pop: O(1), and the order of the rest stays a function of the draws.
        self._buffer[index], self._buffer[-1] = self._buffer[-1], self._buffer[index]
        self._buffer_ids[index], self._buffer_ids[-1] = self._buffer_ids[-1], self._buffer_ids[index]
        return self._buffer.pop(), self._buffer_ids.pop()

    def _read_document(self) -> None:
        if self._iterator is None:
            self._iterator = iter(self._dataset)
        try:
            document = next(self._iterator)
        except StopIteration:
            self.exhausted = True
            return
        if "input_ids" not in document:
            raise ValueError(f"streamed documents have no text column {self.data_args.text_column!r}; their columns "
                             f"are {sorted(document)}. Set DataArguments.text_column to one of them.")
        for block in self.packer.add(document["input_ids"]):
            self._buffer.append(block)
            # Unique over processes and epochs: masked objectives draw their masks from (sample id, stage).
            self._buffer_ids.append(self.blocks_made * self.world_size + self.rank)
            self.blocks_made += 1


def eval_blocks(data_args: DataArguments, tokenizer) -> list[dict]:
    """The first `max_eval_blocks` blocks of the streamed validation split, in order, as
    `{"input_ids": LongTensor (block_size,)}` rows (the same on every process).

    Raises:
        ValueError: if the validation split holds less than one block.
    """
    documents = load_raw_datasets(data_args)["validation"].map(
        _tokenize_documents, batched=True, fn_kwargs={"tokenizer": tokenizer, "text_column": data_args.text_column}
    )
    packer = BlockPacker(data_args.block_size, document_separator(tokenizer))
    blocks: list[dict] = []
    for document in documents:
        for block in packer.add(document["input_ids"]):
            blocks.append({"input_ids": torch.from_numpy(block).long()})
        if len(blocks) >= data_args.max_eval_blocks:
            break
    if not blocks:
        raise ValueError(f"The streamed validation split holds fewer than block_size={data_args.block_size} tokens; "
                         "lower DataArguments.block_size or add data.")
    return blocks[: data_args.max_eval_blocks]


def _tokenize_documents(batch, tokenizer, text_column: str) -> dict:
    """Token ids of each document (none for a blank one), without special tokens; the packer adds the eos.
    One output row per input row, so the other columns can stay."""
    if text_column not in batch:
        return {}
    texts = batch[text_column]
    keep = [i for i, text in enumerate(texts) if text and not text.isspace()]
    # verbose=False: documents longer than the tokenizer's model_max_length are expected (packing cuts them).
    encoded = tokenizer([texts[i] for i in keep], add_special_tokens=False, return_attention_mask=False,
                        verbose=False)["input_ids"] if keep else []
    ids: list[list[int]] = [[] for _ in texts]
    for i, document in zip(keep, encoded):
        ids[i] = document
    return {"input_ids": ids}
