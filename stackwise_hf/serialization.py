"""Per-stack sharded safetensors: the on-disk layout of a rack and of a single stack.

A rack directory is a standard transformers checkpoint (`config.json`, `model.safetensors.index.json`,
shards) that `AutoModelForCausalLM.from_pretrained` reads, with one rule on top: a shard never mixes
two stacks. The embeddings, final norm and head live in `model-rack[-0000k-of-0000n].safetensors`
and stack `i` in `model-stack{i:03d}[-0000k-of-0000n].safetensors`, so one stack is read (or pulled
from the Hub) without touching the others. The index's metadata lists each stack's files, block
count and dtype. A stack directory (`save_stack`) holds one stack's shards and an index of them.

Sharding within a group is `huggingface_hub.split_torch_state_dict_into_shards`; what is written by
hand is only the grouping, which neither transformers nor huggingface_hub offers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from collections.abc import Callable, Iterable

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CorruptFileError, ShapeMismatchError

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
RACK_GROUP = "rack"
_STACK_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)stacks\.(?P<stack>\d+)\.(?P<rest>.+)$")
_SHARD_FILE = re.compile(r"^model(?:-(?:rack|stack\d{3}))?(?:-\d{5}-of-\d{5})?\.safetensors$")

# A resolver maps a file name inside a rack directory (or Hub repo) to a local path.
Resolver = Callable[[str], str]


# Keys ----------------------------------------------------------------------------------------------


def is_adapter_key(name: str) -> bool:
    """True for parameters peft adds (`lora_A`, `lora_B`, `lora_magnitude_vector`, ...)."""
    return ".lora_" in name or name.startswith("lora_")


def strip_adapter_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base weights of a (possibly peft-adapted) state dict, under their un-adapted names."""
    return {k.replace(".base_layer.", "."): v for k, v in state_dict.items() if not is_adapter_key(k)}


def stack_of(key: str) -> int | None:
    """The stack index a rack state-dict key belongs to, or None for embeddings/norm/head."""
    match = _STACK_KEY.match(key)
    return int(match["stack"]) if match else None


def rack_state_dict(rack) -> dict[str, torch.Tensor]:
    """The rack's base weights, adapters stripped and tied weights stored once."""
    state_dict = strip_adapter_keys(rack.state_dict())
    if rack.config.tie_word_embeddings:
        for target in getattr(rack, "_tied_weights_keys", None) or {}:
            state_dict.pop(target, None)
    return state_dict


def group_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Splits a rack state dict into {"rack": ..., 0: ..., 1: ...} by stack."""
    groups: dict = {}
    for key, tensor in state_dict.items():
        stack = stack_of(key)
        groups.setdefault(RACK_GROUP if stack is None else stack, {})[key] = tensor
    return groups


def _group_label(group) -> str:
    return RACK_GROUP if group == RACK_GROUP else f"stack{group:03d}"


# Writing -------------------------------------------------------------------------------------------


def save_weights(
    state_dict: dict[str, torch.Tensor],
    directory: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    stack_meta: dict[int, dict] | None = None,
    total_parameters: int | None = None,
) -> dict:
    """Writes `state_dict` as per-group shards plus `model.safetensors.index.json`; returns the index.

    Files are written under a temporary name and renamed into place; shard files of an earlier save
    that the new index no longer names are removed only after the new index is in place.
    """
    os.makedirs(directory, exist_ok=True)
    weight_map: dict[str, str] = {}
    stacks: dict[str, dict] = {}
    total_size = 0
    for group, tensors in sorted(group_state_dict(state_dict).items(), key=lambda kv: _sort_key(kv[0])):
        split = split_torch_state_dict_into_shards(
            tensors, filename_pattern=f"model-{_group_label(group)}{{suffix}}.safetensors", max_shard_size=max_shard_size
        )
        for filename, names in split.filename_to_tensors.items():
            shard = {name: tensors[name].detach().contiguous().cpu() for name in names}
            _atomic_save(shard, os.path.join(directory, filename), group)
            weight_map.update(dict.fromkeys(names, filename))
        total_size += split.metadata["total_size"]
        if group != RACK_GROUP:
            stacks[str(group)] = {"files": sorted(split.filename_to_tensors), **(stack_meta or {}).get(group, {})}
    index = {
        "metadata": {"total_size": total_size, "stackwise_format": 1, "stacks": stacks},
        "weight_map": dict(sorted(weight_map.items())),
    }
    if total_parameters is not None:
        index["metadata"]["total_parameters"] = total_parameters
    _atomic_write_text(os.path.join(directory, INDEX_NAME), json.dumps(index, indent=2) + "\n")
    _remove_stale_shards(directory, set(weight_map.values()))
    return index


def _sort_key(group):
    return (-1, 0) if group == RACK_GROUP else (0, group)


def _atomic_save(tensors: dict[str, torch.Tensor], path: str, group) -> None:
    tmp = path + ".tmp"
    # One metadata key only: safetensors writes metadata in hash-map order, so with two keys equal shards
    # could differ byte-wise, and the Hub would take an unchanged stack for a new one and upload it again.
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _remove_stale_shards(directory, keep: set[str]) -> None:
    for name in os.listdir(directory):
        if _SHARD_FILE.match(name) and name not in keep:
            os.remove(os.path.join(directory, name))


# Reading -------------------------------------------------------------------------------------------


def local_resolver(directory: str | os.PathLike) -> Resolver:
    """A resolver for a local directory; raises FileNotFoundError naming the missing file."""

    def resolve(filename: str) -> str:
        path = os.path.join(directory, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: file not found (named by {os.path.join(directory, INDEX_NAME)}).")
        return path

    return resolve


def resolver_for(path: str | os.PathLike, **hub_kwargs) -> Resolver:
    """A resolver for a local rack/stack directory, or for a Hub repo id (`revision`, `token`, ...)."""
    path = os.fspath(path)
    hub_kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    if os.path.isdir(path):
        if hub_kwargs:
            raise ValueError(f"{path} is a local directory; Hub arguments {sorted(hub_kwargs)} do not apply.")
        return local_resolver(path)
    if os.path.exists(path):
        raise NotADirectoryError(f"{path}: expected a rack or stack directory, found a file.")
    if os.path.isabs(path) or path.startswith(".") or path.count("/") != 1:
        raise FileNotFoundError(f"{path}: no such directory (and not a Hub repo id of the form 'namespace/name').")
    from .hub import hub_resolver

    return hub_resolver(path, **hub_kwargs)


def read_index(resolve: Resolver) -> dict:
    """Reads and checks `model.safetensors.index.json`; the metadata's `stacks` map is filled in
    from the weight map for indexes written by other tools."""
    path = resolve(INDEX_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CorruptFileError(f"{path}: not a valid safetensors index ({err}).") from err
    metadata = index.setdefault("metadata", {})
    if "stacks" not in metadata:
        stacks: dict[str, dict] = {}
        for key, filename in weight_map.items():
            stack = stack_of(key)
            if stack is not None:
                files = stacks.setdefault(str(stack), {"files": []})["files"]
                if filename not in files:
                    files.append(filename)
        metadata["stacks"] = stacks
    return index


def check_shard(path: str) -> dict:
    """Verifies a safetensors file's header and that the file is as long as the header says.

    Returns the parsed header. Raises CorruptFileError naming the file otherwise.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError(f"header length {header_len} exceeds the file size {size}")
            header = json.loads(f.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path}: not a readable safetensors file ({err}).") from err
    data_end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    expected = 8 + header_len + data_end
    if size != expected:
        raise CorruptFileError(
            f"{path}: truncated or padded safetensors file: {size} bytes on disk, header says {expected}."
        )
    return header


def load_tensors(path: str, keys: Iterable[str] | None = None, device: str | torch.device = "cpu") -> dict:
    """Loads `keys` (default: all) from one shard after `check_shard`; errors name the file."""
    check_shard(path)
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            wanted = list(f.keys()) if keys is None else list(keys)
            missing = sorted(set(wanted) - set(f.keys()))
            if missing:
                raise CorruptFileError(f"{path}: the index names tensors this shard lacks: {missing[:5]}.")
            return {key: f.get_tensor(key) for key in wanted}
    except SafetensorError as err:
        raise CorruptFileError(f"{path}: cannot read safetensors data ({err}).") from err


def check_files(resolve: Resolver, filenames: Iterable[str]) -> None:
    """Checks every named shard exists and is complete, before anything is loaded."""
    for filename in sorted(set(filenames)):
        check_shard(resolve(filename))


# Loading one stack ---------------------------------------------------------------------------------


def read_stack(resolve: Resolver, source_stack: int | None, index: dict | None = None) -> tuple[int, dict]:
    """Reads one stack's tensors from a rack or stack directory.

    Returns `(source_stack, {key_within_stack: tensor})`, keys like `blocks.0.mlp.up_proj.weight`.
    With `source_stack=None` the directory must hold exactly one stack.
    """
    index = index or read_index(resolve)
    stacks = index["metadata"]["stacks"]
    available = sorted(int(s) for s in stacks)
    if source_stack is None:
        if len(available) != 1:
            raise ValueError(
                f"{resolve(INDEX_NAME)} holds stacks {available}; name the one to load with `source_stack=`."
            )
        source_stack = available[0]
    if str(source_stack) not in stacks:
        raise ShapeMismatchError(f"{resolve(INDEX_NAME)}: no stack {source_stack} in the index (it has {available}).")
    by_file: dict[str, list[str]] = {}
    for key, filename in index["weight_map"].items():
        if stack_of(key) == source_stack:
            by_file.setdefault(filename, []).append(key)
    tensors = {}
    for filename, keys in sorted(by_file.items()):
        for key, tensor in load_tensors(resolve(filename), keys).items():
            tensors[_STACK_KEY.match(key)["rest"]] = tensor
    return source_stack, tensors


def check_stack_fits(stack, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raises ShapeMismatchError unless `tensors` has exactly the stack's base weights and shapes."""
    expected = {k: v.shape for k, v in strip_adapter_keys(stack.state_dict()).items()}
    saved_blocks = 1 + max((int(k.split(".")[1]) for k in tensors if k.startswith("blocks.")), default=-1)
    if saved_blocks != len(stack.blocks):
        raise ShapeMismatchError(f"{where} has {saved_blocks} blocks; the rack's stack has {len(stack.blocks)}.")
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ShapeMismatchError(f"{where}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}.")
    for key, shape in expected.items():
        if tensors[key].shape != shape:
            raise ShapeMismatchError(
                f"{where}: tensor `{key}` has shape {tuple(tensors[key].shape)}; the rack expects {tuple(shape)}."
            )


def copy_into_stack(stack, tensors: dict[str, torch.Tensor]) -> None:
    """Copies checked tensors into a stack's base weights, taking on the saved dtype."""
    params = {k.replace(".base_layer.", "."): p for k, p in stack.named_parameters() if not is_adapter_key(k)}
    with torch.no_grad():
        for key, param in params.items():
            param.data = tensors[key].to(device=param.device, copy=True)
