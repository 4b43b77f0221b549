"""The trunk activation cache: the frozen trunk's output over the training and eval blocks, computed once.

With `trunk_mode: cache`, a stage trains from stored hidden states instead of running the frozen stacks
`[0, first_trained)` at every step: `StageModule.forward(..., trunk_hidden=...)` takes a batch of rows
of the cache, looked up by the blocks' `sample_id`s.

- What is stored: per split ("train", "eval"), one row `(T, H)` per block, in the dtype the trunk's
  last stack outputs: in host memory (one tensor) or, with `training.trunk_cache_dir`, as safetensors
  shards read memory-mapped.
- Size: `rows x T x H x bytes`, computed and logged before anything is built; a cache beyond
  `training.trunk_cache_budget` is refused with both figures.
- Fingerprint: the rack's attention-relevant config, a hash of the embedding, one hash per trunk stack,
  the objective's `trunk_input_key(stage)` (what the masking does to the trunk's input), a hash of each
  split's token blocks, a hash of the tokenizer's vocabulary, and the autocast precision. A cache whose
  fingerprint differs from the stage's is rebuilt (the reason is logged); `TrunkCache.load` refuses one.
- Extension: when the cache holds the output of stacks `[0, j)` and the stage's trunk is `[0, k)` with
  the same first j stack hashes (append growth: the stack trained in the previous stage is now frozen),
  only stacks `[j, k)` run, over the cached rows. Prepending a stack, a `trunk_dtype` cast, a changed
  mask (depth as time) or changed data changes the fingerprint and the cache is rebuilt.

In cache mode the trunk stacks are not needed during the stage: `offload_trunk` moves them off the
accelerator (the trainer does so on a single process) and `restore_trunk` brings them back.

With several processes, an in-memory cache is built by each process over every block (simple, and
exact whatever the sampler hands a process); an on-disk cache is built by the main process and found by
the others through its manifest.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..errors import CorruptFileError
from .arguments import parse_size

logger = logging.getLogger(__name__)

MANIFEST = "trunk_cache.json"
FORMAT_VERSION = 1
SPLITS = ("train", "eval")


class StaleCacheError(RuntimeError):
    """A stored trunk cache does not match the rack, data, masking or tokenizer it is asked to serve."""


class CorruptCacheError(CorruptFileError):
    """A stored trunk cache's manifest is unreadable or names a file outside its folder."""


def _plain_name(name, where: str) -> str:
    """A file or folder name read from a cache manifest: one plain path component, inside the folder."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise CorruptCacheError(f"{where}: {name!r} is not a plain file name inside the cache folder; refused.")
    return name


@dataclass
class CacheReport:
    """What `TrunkCache.sync` did at a stage: "built", "extended", "reused" or "skipped"."""

    action: str
    depth: int
    rows: dict
    bytes: int
    stacks_run: list
    reason: str = ""

    def as_dict(self) -> dict:
        return {"action": self.action, "depth": self.depth, "rows": dict(self.rows), "bytes": self.bytes,
                "stacks_run": list(self.stacks_run), "reason": self.reason}


class TrunkCache:
    """Hidden states entering the first trained stack, for every train and eval block.

    Args:
        budget (`int` or `str`): largest cache allowed (bytes, or "2GB", "512MiB").
        directory (`str`, *optional*): store safetensors shards here (memory-mapped on read); in host
            memory when None.
        batch_size (`int`): blocks per trunk forward while building or extending.
        shard_bytes (`int`): largest shard file on disk.

    Example:

    ```python
    >>> import torch
    >>> from stackwise_hf import StackWiseConfig, StackWiseForCausalLM
    >>> from stackwise_hf.training.objectives import CausalLMObjective
    >>> from stackwise_hf.training.stage import StageModule
    >>> from stackwise_hf.training.trunk_cache import TrunkCache
    >>> rack = StackWiseForCausalLM(StackWiseConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...                                             num_attention_heads=2, stack_sizes=[1, 1])).requires_grad_(False)
    >>> module = StageModule(rack, CausalLMObjective(), first_trained=1)
    >>> blocks = [{"input_ids": torch.arange(8) + i} for i in range(4)]
    >>> cache = TrunkCache(budget="1MB")
    >>> cache.sync(module, CausalLMObjective(), 0, {"train": blocks, "eval": blocks}).action
    'built'
    >>> cache.hidden("train", torch.tensor([2, 0])).shape
    torch.Size([2, 8, 16])
    ```
    """

    def __init__(self, budget: int | str = "2GB", directory: str | os.PathLike | None = None, batch_size: int = 32,
                 shard_bytes: int = 256 * 2**20):
        self.budget = parse_size(budget, "trunk_cache_budget")
        self.directory = os.fspath(directory) if directory is not None else None
        self.batch_size = batch_size
        self.shard_bytes = shard_bytes
        self.fingerprint: dict | None = None
        self.stores: dict[str, _MemoryStore | _ShardStore] = {}
        self.stack_passes: list[int] = []  # every stack index run over the whole cache, in order
        self.offloaded: list[int] = []
        self.active = False  # False when the stage's trunk is empty (nothing to look up)
        self._feeder = _PinnedFeeder()
        self._layout = _DocumentLayout()
        self._data_hashes: dict[tuple, str] = {}
        if self.directory is not None:
            self._open_directory()

    # Building and extending ------------------------------------------------------------------------

    def sync(self, module, objective, stage_index: int, datasets: dict, rows: dict | None = None, tokenizer=None,
             device=None, autocast=None, precision: str = "no", documents=None) -> CacheReport:
        """Makes the cache hold the output of `module`'s frozen trunk for this stage: reuses, extends or
        builds it. `datasets` maps "train"/"eval" to token-block datasets; `rows` caps how many leading
        blocks of each split are cached (the eval loader reads only the first few batches). `documents`
        (a `packing.DocumentMasking`) keeps packed documents apart in the trunk as in training."""
        depth = module.first_trained
        rack = module.rack
        if self.directory is not None:
            self._open_directory()  # another process (or run) may have written it since
        rows = {split: min(len(data), (rows or {}).get(split, len(data))) for split, data in datasets.items()}
        if depth == 0:
            logger.info("trunk cache: stage %d trains from the embeddings on (first trained stack 0); the frozen "
                        "trunk is empty, nothing to cache.", stage_index)
            self.active = False
            return CacheReport("skipped", 0, rows, 0, [], "the frozen trunk is empty")
        self.active = True
        autocast = autocast or contextlib.nullcontext
        wanted = self._fingerprint(rack, objective, stage_index, depth, datasets, rows, tokenizer, precision)
        # Per block, the trunk's attention follows the block's documents: rebuilt from its tokens, never stored.
        wanted["documents"] = None if documents is None else [documents.separator_id, documents.causal]
        self._layout = _DocumentLayout(documents, datasets)
        size = self._size(rack, depth, datasets, rows)
        logger.info("trunk cache for stage %d: output of stacks [0, %d) over %s blocks: %s (budget %s, %s).",
                    stage_index, depth, rows, _human(size), _human(self.budget), self.directory or "in memory")
        if size > self.budget:
            raise ValueError(
                f"trunk cache for stage {stage_index} needs {_human(size)} ({size} bytes: "
                f"{' + '.join(f'{n} {s} blocks' for s, n in rows.items())} x {self._block_shape(rack, datasets)} x "
                f"{torch.tensor([], dtype=_output_dtype(rack, depth)).element_size()} bytes), more than "
                f"training.trunk_cache_budget={_human(self.budget)} ({self.budget} bytes). Raise "
                f"`trunk_cache_budget`, cache fewer eval blocks, or use `trunk_mode: recompute`."
            )
        if self.fingerprint == wanted:
            return CacheReport("reused", depth, rows, size, [])
        before = len(self.stack_passes)
        prefix = self._extendable(wanted)
        if prefix is not None:
            self._extend(rack, prefix, depth, device, autocast, wanted)
            action, reason = "extended", f"ran stacks [{prefix}, {depth}) over the cached stacks [0, {prefix})"
        else:
            reason = self._mismatch(wanted)
            self._build(module, objective, stage_index, datasets, rows, device, autocast, wanted)
            action = "built"
        logger.info("trunk cache %s for stage %d: %s.", action, stage_index, reason)
        return CacheReport(action, depth, rows, size, self.stack_passes[before:], reason)

    def _extendable(self, wanted: dict) -> int | None:
        have = self.fingerprint
        if have is None or not _same_inputs(have, wanted):
            return None
        j = len(have["stacks"])
        if j < len(wanted["stacks"]) and wanted["stacks"][:j] == have["stacks"]:
            return j
        return None

    def _mismatch(self, wanted: dict) -> str:
        have = self.fingerprint
        if have is None:
            return "no cache yet"
        changed = [k for k in wanted if k != "stacks" and have.get(k) != wanted[k]]
        if changed:
            return f"rebuilt: {', '.join(changed)} changed"
        return "rebuilt: the trunk's stacks changed (weights, order or a prepended stack)"

    @torch.no_grad()
    def _build(self, module, objective, stage_index, datasets, rows, device, autocast, fingerprint) -> None:
        """Stores the embeddings of the (masked) inputs, then runs the trunk's stacks over them."""
        self._drop()
        embed = module.rack.get_input_embeddings()
        device = device or embed.weight.device
        for split, data in datasets.items():
            writer = self._writer(split, rows[split], embed.weight.dtype)
            for start in range(0, rows[split], self.batch_size):
                stop = min(start + self.batch_size, rows[split])
                ids = _block_rows(data, start, stop).to(device)
                prepared = objective.prepare(ids, stage_index, torch.arange(start, stop, device=device),
                                             evaluation=split == "eval")
                writer.write(start, embed(prepared.input_ids))  # (b, T, H)
            self.stores[split] = writer.finish()
        self._run_stacks(module.rack, 0, module.first_trained, device, autocast)
        self._commit(fingerprint)

    @torch.no_grad()
    def _extend(self, rack, start_stack: int, stop_stack: int, device, autocast, fingerprint) -> None:
        self.fingerprint = None
        if self.directory is not None:  # a cut-short extension must not leave a manifest claiming the old cache
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.directory, MANIFEST))
        self._run_stacks(rack, start_stack, stop_stack, device or rack.get_input_embeddings().weight.device,
                         autocast)
        self._commit(fingerprint)

    def _run_stacks(self, rack, start_stack: int, stop_stack: int, device, autocast) -> None:
        """Replaces every cached row by the output of stacks `[start_stack, stop_stack)`, one stack at a
        time over all rows. A stack kept on the host visits the device only for its own pass, so building
        or extending the cache never needs the whole trunk on the device. Each stack's output is stored in
        its dtype, which is what the next stack receives in a forward pass too."""
        body = rack.base_model
        was_training = body.training
        body.eval()
        try:
            for i in range(start_stack, stop_stack):
                stack = body.stacks[i]
                with _on_device(stack, device):
                    for split, store in list(self.stores.items()):
                        reuse = store if isinstance(store, _MemoryStore) else None
                        writer = self._writer(split, store.rows, stack.dtype, reuse=reuse)
                        for start in range(0, store.rows, self.batch_size):
                            stop = min(start + self.batch_size, store.rows)
                            hidden = store.slice(start, stop).to(device)
                            documents = self._layout(split, start, stop, device)
                            with autocast():
                                hidden = stack(hidden, **body.attention_inputs(hidden, **documents))
                            writer.write(start, hidden.to(stack.dtype))
                        store.close()
                        self.stores[split] = writer.finish()
                self.stack_passes.append(i)
        finally:
            body.train(was_training)

    def _writer(self, split: str, rows: int, dtype, reuse=None):
        if self.directory is None:
            return _MemoryWriter(rows, dtype, reuse)
        return _ShardWriter(os.path.join(self.directory, split), rows, dtype, self.shard_bytes)

    def _commit(self, fingerprint: dict) -> None:
        self.fingerprint = fingerprint
        if self.directory is not None:
            manifest = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint,
                        "splits": {s: store.describe() for s, store in self.stores.items()}}
            _write_json(os.path.join(self.directory, MANIFEST), manifest)

    def _drop(self) -> None:
        for store in self.stores.values():
            store.close()
        self.stores = {}
        self.fingerprint = None
        if self.directory is not None:
            # The manifest goes first: a build cut short leaves no cache that claims to be valid.
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.directory, MANIFEST))
            for split in SPLITS:
                shutil.rmtree(os.path.join(self.directory, split), ignore_errors=True)

    # Reading ---------------------------------------------------------------------------------------

    def hidden(self, split: str, sample_ids, device=None) -> torch.Tensor:
        """The cached trunk output of blocks `sample_ids` of `split`: `(B, T, H)` on `device`."""
        if self.fingerprint is None or split not in self.stores:
            raise StaleCacheError(f"the trunk cache holds no {split!r} split; call `sync` at the stage's start.")
        ids = torch.as_tensor(sample_ids).reshape(-1).cpu()
        if device is not None and torch.device(device).type == "cuda":
            return self._feeder(self.stores[split], ids, device)
        out = self.stores[split].gather(ids)
        return out.to(device) if device is not None else out

    @property
    def splits(self) -> list[str]:
        return list(self.stores)

    def split_tensor(self, split: str) -> torch.Tensor:
        """Every cached row of `split`: `(N, T, H)` in host memory."""
        if split not in self.stores:
            raise StaleCacheError(f"the trunk cache holds no {split!r} split; it has {self.splits}.")
        store = self.stores[split]
        return store.slice(0, store.rows)

    @property
    def depth(self) -> int:
        return len(self.fingerprint["stacks"]) if self.fingerprint else 0

    # Saving and loading (checkpoints) --------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> str:
        """Writes the cache (shards and manifest) to `directory`; `TrunkCache.load` reads it back."""
        directory = os.fspath(directory)
        if self.fingerprint is None:
            raise StaleCacheError("the trunk cache is empty; nothing to save.")
        os.makedirs(directory, exist_ok=True)
        splits = {}
        for split, store in self.stores.items():
            writer = _ShardWriter(os.path.join(directory, split), store.rows, store.dtype, self.shard_bytes)
            for start in range(0, store.rows, max(self.batch_size, 256)):
                stop = min(start + max(self.batch_size, 256), store.rows)
                writer.write(start, store.slice(start, stop))
            splits[split] = writer.finish().describe()
        _write_json(os.path.join(directory, MANIFEST),
                    {"format_version": FORMAT_VERSION, "fingerprint": self.fingerprint, "splits": splits})
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, expected: dict | None = None, **kwargs) -> "TrunkCache":
        """Opens a saved cache; with `expected` (a fingerprint), raises `StaleCacheError` naming what differs."""
        cache = cls(directory=directory, **kwargs)
        if cache.fingerprint is None:
            raise StaleCacheError(f"{directory}: no trunk cache manifest ({MANIFEST}).")
        if expected is not None and cache.fingerprint != expected:
            changed = sorted(k for k in set(expected) | set(cache.fingerprint)
                             if expected.get(k) != cache.fingerprint.get(k))
            raise StaleCacheError(f"{directory}: the trunk cache does not match this run: {changed} differ.")
        return cache

    def _open_directory(self) -> None:
        for store in self.stores.values():
            store.close()
        self.stores, self.fingerprint = {}, None
        path = os.path.join(self.directory, MANIFEST)
        if not os.path.isfile(path):
            return
        try:
            with open(path, "rb") as f:
                manifest = json.loads(f.read().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CorruptCacheError(f"{path}: not valid JSON ({err}).") from err
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        if version != FORMAT_VERSION:
            # A cache written by another version is rebuilt, never read: its layout may differ.
            logger.warning("trunk cache: %s has format_version %r; this library supports [%d]; ignoring it.", path,
                           version, FORMAT_VERSION)
            return
        try:
            self.stores = {_plain_name(s, path): _ShardStore(os.path.join(self.directory, s), d, path)
                           for s, d in manifest["splits"].items()}
            self.fingerprint = manifest["fingerprint"]
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise CorruptCacheError(f"{path}: not a valid trunk cache manifest ({err!r}).") from err

    # Fingerprints and sizes ------------------------------------------------------------------------

    def _fingerprint(self, rack, objective, stage_index, depth, datasets, rows, tokenizer, precision) -> dict:
        config = rack.config
        body = rack.base_model
        key = getattr(objective, "trunk_input_key", None)
        if key is None:
            raise ValueError(
                f"objective {type(objective).__name__} does not declare `trunk_input_key(stage_index)`, which "
                "trunk_mode 'cache' needs to know what its inputs depend on; use trunk_mode 'recompute'."
            )
        return {
            "rack": {k: getattr(config, k) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                     "head_dim", "rope_theta", "rms_norm_eps", "attention_mode")},
            "embeddings": tensor_hash(body.embed_tokens.weight),
            "stacks": [module_hash(stack) for stack in body.stacks[:depth]],
            "inputs": key(stage_index),
            "data": {split: self._data_hash(data, rows[split]) for split, data in datasets.items()},
            "tokenizer": tokenizer_hash(tokenizer),
            "precision": precision,
        }

    def _data_hash(self, data, rows: int) -> str:
        # Datasets do not change during a run: hash each (dataset, rows) once.
        memo = (id(data), len(data), rows)
        if memo not in self._data_hashes:
            digest = hashlib.blake2b(digest_size=16)
            for start in range(0, rows, 1024):
                block = _block_rows(data, start, min(start + 1024, rows))
                digest.update(str(tuple(block.shape)).encode())
                digest.update(block.to(torch.int64).numpy().tobytes())
            self._data_hashes[memo] = digest.hexdigest()
        return self._data_hashes[memo]

    def _block_shape(self, rack, datasets) -> str:
        data = next(iter(datasets.values()))
        return f"{_block_rows(data, 0, 1).shape[-1]} tokens x {rack.config.hidden_size} hidden"

    def _size(self, rack, depth, datasets, rows) -> int:
        itemsize = torch.tensor([], dtype=_output_dtype(rack, depth)).element_size()
        total = 0
        for split, data in datasets.items():
            if rows[split]:
                total += rows[split] * _block_rows(data, 0, 1).shape[-1] * rack.config.hidden_size * itemsize
        return total

    # Trunk placement -------------------------------------------------------------------------------

    def offload_trunk(self, rack, depth: int, device="cpu") -> list[int]:
        """Moves stacks `[0, depth)` to `device` (off the accelerator): in cache mode they do not run."""
        for i in range(depth):
            rack.base_model.stacks[i].to(device)
        self.offloaded = list(range(depth))
        return self.offloaded

    def restore_trunk(self, rack, device) -> None:
        """Brings offloaded trunk stacks back to `device`."""
        for i in self.offloaded:
            if i < rack.num_stacks:
                rack.base_model.stacks[i].to(device)
        self.offloaded = []


@contextlib.contextmanager
def _on_device(module: torch.nn.Module, device):
    """Runs the body with `module` on `device`, moving it there and back if it lives elsewhere."""
    device = torch.device(device)
    home = next(module.parameters()).device
    if home.type == device.type and (device.index is None or home.index == device.index):
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        module.to(home)


class _DocumentLayout:
    """The document-aware attention inputs (`packing.DocumentMasking.model_inputs`) of cached rows, from the
    blocks' tokens; `{}` without document masking."""

    def __init__(self, documents=None, datasets: dict | None = None):
        self.documents, self.datasets = documents, datasets or {}

    def __call__(self, split: str, start: int, stop: int, device) -> dict:
        if self.documents is None:
            return {}
        return self.documents.model_inputs(_block_rows(self.datasets[split], start, stop).to(device))


def _same_inputs(have: dict, wanted: dict) -> bool:
    return all(have.get(k) == wanted[k] for k in wanted if k != "stacks")


def _output_dtype(rack, depth: int) -> torch.dtype:
    body = rack.base_model
    return body.stacks[depth - 1].dtype if depth > 0 else body.embed_tokens.weight.dtype


def tensor_hash(tensor: torch.Tensor) -> str:
    """A hash of a tensor's dtype, shape and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    _update(digest, "", tensor)
    return digest.hexdigest()


def module_hash(module: torch.nn.Module) -> str:
    """A hash of every parameter and persistent buffer of `module` (adapters included), by name."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict(keep_vars=True).items()):
        _update(digest, name, tensor)
    return digest.hexdigest()


def _update(digest, name: str, tensor: torch.Tensor) -> None:
    t = tensor.detach()
    digest.update(f"{name}|{type(t).__name__}|{t.dtype}|{tuple(t.shape)}|".encode())
    if is_traceable_wrapper_subclass(t):  # a quantized weight (torchao): hash the tensors it is made of
        inner, _ = t.__tensor_flatten__()
        for attr in inner:
            _update(digest, f"{name}.{attr}", getattr(t, attr))
        return
    digest.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def tokenizer_hash(tokenizer) -> str | None:
    """A hash of a tokenizer's class, vocabulary and special tokens (None without a tokenizer)."""
    if tokenizer is None:
        return None
    digest = hashlib.blake2b(digest_size=16)
    digest.update(type(tokenizer).__name__.encode())
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    digest.update(json.dumps(sorted(vocab.items())).encode())
    special = getattr(tokenizer, "all_special_ids", [])
    digest.update(json.dumps(list(special)).encode())
    return digest.hexdigest()


def _block_rows(data, start: int, stop: int) -> torch.Tensor:
    """Rows `[start, stop)` of a token-block dataset (HF `Dataset` or a list of rows) as a `(b, T)` tensor."""
    if hasattr(data, "select") and hasattr(data, "column_names"):  # datasets.Dataset: one slice read
        column = data[start:stop]["input_ids"]
        if isinstance(column, torch.Tensor):
            return column
        return torch.stack([torch.as_tensor(r) for r in column])
    rows = [data[i] for i in range(start, stop)]
    return torch.stack([torch.as_tensor(r["input_ids"] if isinstance(r, dict) else r) for r in rows])


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _write_json(path: str, value: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    staging = f"{path}.tmp-{os.getpid()}"
    with open(staging, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
    os.replace(staging, path)


# Storage ---------------------------------------------------------------------------------------------


class _MemoryStore:
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor  # (N, T, H) in host memory

    rows = property(lambda self: self.tensor.shape[0])
    dtype = property(lambda self: self.tensor.dtype)

    def slice(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor[start:stop]

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tensor.index_select(0, ids)

    def describe(self) -> dict:
        return {"rows": self.rows}

    def close(self) -> None:
        pass


class _PinnedFeeder:
    """Copies batches of cached rows to a CUDA device asynchronously.

    Rows are gathered into one of two pinned host buffers and copied with `non_blocking=True`: the host
    goes on launching the step while the copy runs, and the copy is queued on the compute stream before
    the kernels that read it. A CUDA event per buffer keeps a buffer from being refilled before its
    previous copy has finished.
    """

    def __init__(self):
        self.buffers: list[torch.Tensor | None] = [None, None]
        self.events: list = [None, None]
        self.turn = 0

    def __call__(self, store, ids: torch.Tensor, device) -> torch.Tensor:
        i, self.turn = self.turn, self.turn ^ 1
        if self.events[i] is not None:
            self.events[i].synchronize()
        rows = store.gather(ids)  # (B, T, H) on the host
        buffer = self.buffers[i]
        if buffer is None or buffer.shape != rows.shape or buffer.dtype != rows.dtype:
            buffer = self.buffers[i] = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
        buffer.copy_(rows)
        out = buffer.to(device, non_blocking=True)
        self.events[i] = torch.cuda.Event()
        self.events[i].record()
        return out


class _MemoryWriter:
    def __init__(self, rows: int, dtype, reuse: _MemoryStore | None = None):
        # Extension writes each chunk back over the rows it was computed from (chunks are independent).
        if reuse is not None and reuse.dtype == dtype:
            self.tensor = reuse.tensor
        else:
            self.tensor = None
        self.rows, self.dtype = rows, dtype

    def write(self, start: int, hidden: torch.Tensor) -> None:
        if self.tensor is None:
            self.tensor = torch.empty((self.rows, *hidden.shape[1:]), dtype=self.dtype)
        self.tensor[start:start + hidden.shape[0]] = hidden.to("cpu")

    def finish(self) -> _MemoryStore:
        return _MemoryStore(self.tensor)


class _ShardStore:
    """Rows of one split in safetensors shards (tensor "hidden", rows [start, stop) per file)."""

    def __init__(self, directory: str, description: dict, where: str = ""):
        self.directory = directory
        self.shards = description["shards"]  # [{"file", "start", "stop"}]
        for shard in self.shards:
            _plain_name(shard["file"], where or directory)
        self.rows = description["rows"]
        self.dtype = getattr(torch, description["dtype"])
        self._starts = [s["start"] for s in self.shards]
        self._handles: dict[str, object] = {}

    def _handle(self, filename: str):
        if filename not in self._handles:
            self._handles[filename] = safe_open(os.path.join(self.directory, filename), framework="pt")
        return self._handles[filename]

    def slice(self, start: int, stop: int) -> torch.Tensor:
        parts = []
        while start < stop:
            shard = self.shards[bisect.bisect_right(self._starts, start) - 1]
            end = min(stop, shard["stop"])
            parts.append(self._handle(shard["file"]).get_slice("hidden")[start - shard["start"]:end - shard["start"]])
            start = end
        return torch.cat(parts)

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.slice(i, i + 1) for i in ids.tolist()])

    def describe(self) -> dict:
        return {"rows": self.rows, "dtype": str(self.dtype).removeprefix("torch."), "shards": self.shards}

    def close(self) -> None:
        self._handles.clear()


class _ShardWriter:
    """Streams rows into shards of at most `shard_bytes`, in a staging folder swapped in by `finish`."""

    def __init__(self, directory: str, rows: int, dtype, shard_bytes: int):
        self.directory, self.rows, self.dtype, self.shard_bytes = directory, rows, dtype, shard_bytes
        self.staging = f"{directory}.staging-{os.getpid()}"
        shutil.rmtree(self.staging, ignore_errors=True)
        os.makedirs(self.staging)
        self.pending: list[torch.Tensor] = []
        self.pending_start = 0
        self.shards: list[dict] = []

    def write(self, start: int, hidden: torch.Tensor) -> None:
        self.pending.append(hidden.to("cpu", self.dtype).contiguous())
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        pending = sum(t.shape[0] for t in self.pending)
        if not pending:
            return
        row_bytes = self.pending[0][0].numel() * self.pending[0].element_size()
        per_file = max(1, self.shard_bytes // row_bytes)
        if pending < per_file and not final:
            return
        rows = torch.cat(self.pending)
        ready = pending if final else pending // per_file * per_file  # whole shards; the rest waits
        for offset in range(0, ready, per_file):
            chunk = rows[offset:min(offset + per_file, ready)].contiguous()
            start = self.pending_start + offset
            name = f"hidden-{len(self.shards):05d}.safetensors"
            save_file({"hidden": chunk}, os.path.join(self.staging, name), metadata={"start": str(start)})
            self.shards.append({"file": name, "start": start, "stop": start + chunk.shape[0]})
        self.pending_start += ready
        self.pending = [rows[ready:]] if ready < pending else []

    def finish(self) -> _ShardStore:
        self._flush(final=True)
        shutil.rmtree(self.directory, ignore_errors=True)
        os.replace(self.staging, self.directory)
        description = {"rows": self.rows, "dtype": str(self.dtype).removeprefix("torch."), "shards": self.shards}
        return _ShardStore(self.directory, description)
