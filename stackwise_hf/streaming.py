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

import contextlib
import logging
import queue
import threading

import numpy as np
import torch
from datasets.distributed import split_dataset_by_node

from .data import DataArguments, document_separator, load_raw_datasets
from .packing import BlockPacker

logger = logging.getLogger(__name__)

STATE_VERSION = 1


class StreamStateError(ValueError):
    """A saved stream position does not fit this stream (other data, block size or process layout)."""


class TrainStream:
    """The streamed, tokenized, packed and shuffled train split of one process.

    A background thread reads ahead (a few batches) so that reading and tokenizing overlap the training
    step; each batch travels with the position just after it, and `state_dict()` is the position after the
    last batch handed out, so reading ahead never moves the saved position. (A thread rather than
    DataLoader workers: the position stays in this process, with no worker state to gather.)

    Args:
        data_args (`DataArguments`): the corpus (`streaming=True`), `block_size`, `shuffle_buffer_size`.
        tokenizer (`PreTrainedTokenizerBase`): tokenizes the documents; its eos (or sep) ends each one.
        batch_size (`int`): blocks per batch.
        rank / world_size (`int`, *optional*): this process and the number of processes (DDP, FSDP).
        seed (`int`, *optional*): seed of the shuffle buffer (each epoch and process draws from its own).
        prefetch (`int`, *optional*, defaults to 2): batches read ahead; 0 reads in the caller's thread.

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
                 seed: int = 0, prefetch: int = 2):
        if not data_args.streaming:
            raise ValueError("TrainStream reads DataArguments(streaming=True) corpora; got streaming=False.")
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.prefetch = prefetch
        self._reader = _Reader(data_args, tokenizer, batch_size, rank, world_size, seed)
        self._position = self._reader.snapshot()  # after the last batch handed out
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def epoch(self) -> int:
        """The epoch of the next batch handed out."""
        return self._position["epoch"]

    def state_dict(self) -> dict:
        """The stream position after the last batch handed out (tensors are saved as safetensors)."""
        return _materialize(self._position, self._reader.block_size)

    def load_state_dict(self, state: dict) -> None:
        """Continues from a `state_dict()` of a stream over the same corpus, block size and processes.

        Raises:
            StreamStateError: if the state belongs to another process layout or block size.
        """
        self.close()
        self._reader.restore(state)
        self._position = self._reader.snapshot()

    def close(self) -> None:
        """Stops reading ahead; the reader rewinds to the position after the last batch handed out."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)  # unblock a producer waiting on a full queue
        self._thread, self._queue = None, None
        self._stop = threading.Event()
        self._reader.restore(_materialize(self._position, self._reader.block_size))

    def epoch_batches(self, device=None):
        """Yields `{"input_ids": (B, T) long, "sample_id": (B,) long}` batches on `device` until this
        process's epoch ends (its last partial batch is dropped); the next call starts the next epoch.
        Stopping early keeps the position: the next call continues with the next batch."""
        while True:
            kind, payload, position = self._next()
            self._position = position
            if kind == "end":
                return
            yield {key: value.to(device) if device is not None else value for key, value in payload.items()}

    def _next(self):
        if self.prefetch <= 0:
            return self._reader.next_item()
        if self._thread is None:
            self._queue = queue.Queue(maxsize=self.prefetch)
            self._thread = threading.Thread(target=self._produce, name=f"TrainStream-{self.rank}", daemon=True)
            self._thread.start()
        kind, payload, position = self._queue.get()
        if kind == "error":
            self._thread.join()
            self._thread, self._queue = None, None
            raise payload
        return kind, payload, position

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._reader.next_item()
                while not self._stop.is_set():
                    with contextlib.suppress(queue.Full):
                        self._queue.put(item, timeout=0.05)
                        break
        except BaseException as err:  # handed to the consumer, which raises it in the training thread
            self._queue.put(("error", err, None))

    def __del__(self):
        self._stop.set()


class _Reader:
    """Reads, tokenizes, packs and shuffles; `next_item()` is ("batch", batch, position) or, at the end of
    an epoch, ("end", None, position) with the next epoch begun. Positions are cheap snapshots (the buffer
    list is copied, not its blocks, which are never changed)."""

    def __init__(self, data_args: DataArguments, tokenizer, batch_size: int, rank: int, world_size: int, seed: int):
        self.data_args, self.tokenizer = data_args, tokenizer
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.block_size = data_args.block_size
        self.buffer_size = data_args.shuffle_buffer_size
        self.packer = BlockPacker(self.block_size, document_separator(tokenizer))
        self.blocks_made = 0  # blocks this process has packed, over all epochs: numbers its sample ids
        self._start_epoch(0)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.epoch_batches = 0
        self.exhausted = False
        self.packer.reset()
        self.buffer: list[np.ndarray] = []
        self.buffer_ids: list[int] = []
        self.rng = np.random.default_rng([self.seed, epoch, self.rank])
        self.dataset = self._documents()
        self.iterator = None  # started at the first read, so a loaded state can come first

    def _documents(self):
        """This process's tokenized documents: rows with `input_ids` (empty for blank texts)."""
        documents = load_raw_datasets(self.data_args)["train"]
        if self.world_size > 1:
            documents = split_dataset_by_node(documents, rank=self.rank, world_size=self.world_size)
        return documents.map(_tokenize_documents, batched=True,
                             fn_kwargs={"tokenizer": self.tokenizer, "text_column": self.data_args.text_column})

    def snapshot(self) -> dict:
        return {
            "version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size, "block_size": self.block_size,
            "epoch": self.epoch, "epoch_batches": self.epoch_batches, "exhausted": self.exhausted,
            "blocks_made": self.blocks_made,
            "dataset": self.dataset.state_dict() if self.iterator is not None else None,
            "carry": self.packer.carry, "buffer": list(self.buffer), "buffer_ids": list(self.buffer_ids),
            "rng": self.rng.bit_generator.state,
        }

    def restore(self, state: dict) -> None:
        expected = {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                    "block_size": self.block_size}
        found = {k: state.get(k) for k in expected}
        if found != expected:
            raise StreamStateError(f"the saved stream position was written for {found}; this stream is {expected}.")
        self._start_epoch(state["epoch"])
        self.epoch_batches, self.exhausted = state["epoch_batches"], state["exhausted"]
        self.blocks_made = state["blocks_made"]
        if state["dataset"] is not None:
            self.dataset.load_state_dict(state["dataset"])
            self.iterator = iter(self.dataset)
        self.packer.set_carry(np.asarray(state["carry"]))
        self.buffer = list(np.asarray(state["buffer"], dtype=np.int32))
        self.buffer_ids = [int(i) for i in state["buffer_ids"]]
        self.rng.bit_generator.state = state["rng"]

    def next_item(self) -> tuple[str, dict | None, dict]:
        blocks, ids = [], []
        while len(blocks) < self.batch_size:
            drawn = self._next_block()
            if drawn is None:
                if self.epoch_batches == 0:
                    raise ValueError(
                        f"process {self.rank} of {self.world_size}: its part of the streamed train split holds "
                        f"fewer than one batch of {self.batch_size} blocks of {self.block_size} tokens; add data, "
                        f"lower the batch size or block_size, or use fewer processes."
                    )
                logger.info("process %d: streamed epoch %d ended after %d batches.", self.rank, self.epoch,
                            self.epoch_batches)
                self._start_epoch(self.epoch + 1)
                return "end", None, self.snapshot()
            blocks.append(drawn[0])
            ids.append(drawn[1])
        self.epoch_batches += 1
        batch = {"input_ids": torch.from_numpy(np.stack(blocks)).long(), "sample_id": torch.tensor(ids)}
        return "batch", batch, self.snapshot()

    def _next_block(self) -> tuple[np.ndarray, int] | None:
        """Fills the buffer up to its size, then hands out a random block of it (in order without a buffer)."""
        while len(self.buffer) < max(1, self.buffer_size) and not self.exhausted:
            self._read_document()
        if not self.buffer:
            return None
        index = int(self.rng.integers(len(self.buffer))) if self.buffer_size > 1 else 0
        # Swap with the last and pop: O(1), and the order of the rest stays a function of the draws.
        self.buffer[index], self.buffer[-1] = self.buffer[-1], self.buffer[index]
        self.buffer_ids[index], self.buffer_ids[-1] = self.buffer_ids[-1], self.buffer_ids[index]
        return self.buffer.pop(), self.buffer_ids.pop()

    def _read_document(self) -> None:
        if self.iterator is None:
            self.iterator = iter(self.dataset)
        try:
            document = next(self.iterator)
        except StopIteration:
            self.exhausted = True
            return
        if "input_ids" not in document:
            raise ValueError(f"streamed documents have no text column {self.data_args.text_column!r}; their columns "
                             f"are {sorted(document)}. Set DataArguments.text_column to one of them.")
        for block in self.packer.add(document["input_ids"]):
            self.buffer.append(block)
            # Unique over processes and epochs: masked objectives draw their masks from (sample id, stage).
            self.buffer_ids.append(self.blocks_made * self.world_size + self.rank)
            self.blocks_made += 1


def _materialize(position: dict, block_size: int) -> dict:
    """A snapshot as a state dict: the buffer as one `(n, block_size)` tensor, ids and carry as tensors."""
    rows = np.stack(position["buffer"]) if position["buffer"] else np.zeros((0, block_size), dtype=np.int32)
    return {**position, "carry": torch.from_numpy(np.array(position["carry"], dtype=np.int32)),
            "buffer": torch.from_numpy(rows), "buffer_ids": torch.tensor(position["buffer_ids"], dtype=torch.int64)}


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
