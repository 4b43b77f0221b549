"""The weights of a rack on disk: per-stack safetensors shards and their index, and the file primitives
(atomic writes, checked reads) every part of the format uses.

A rack directory is a standard transformers checkpoint (`config.json`, `model.safetensors.index.json`,
shards) that `AutoModelForCausalLM.from_pretrained` reads, with one rule on top: a shard never mixes
two stacks (file names in `layout.py`), so one stack is read (or pulled from the Hub) without touching
the others. The index's metadata lists each stack's files, block count and dtype. A stack directory
(`save_stack`) holds one stack's shards and an index of them. `rack_files.py` puts the parts of a rack
together; this module knows tensors and files, not racks.

Sharding within a group is `huggingface_hub.split_torch_state_dict_into_shards`; what is written by
hand is only the grouping, which neither transformers nor huggingface_hub offers.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterable

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CorruptFileError, ShapeMismatchError, UnsafePathError, UnsupportedFormatError
from .layout import DIGESTS_KEY, FORMAT_VERSION, INDEX_NAME, RACK_GROUP, SAFE_NAME, SHARD_FILE, shard_pattern
from .resolver import Resolver
from .stacks import group_state_dict, is_adapter_key, key_within_stack, stack_of, strip_adapter_keys

logger = logging.getLogger(__name__)


# Files ---------------------------------------------------------------------------------------------


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    """Writes a safetensors file under a temporary name and renames it into place."""
    tmp = path + ".tmp"
    # One metadata key only: safetensors writes metadata in hash-map order, so with two keys equal shards
    # could differ byte-wise, and the Hub would take an unchanged stack for a new one and upload it again.
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


def atomic_write_json(path: str, data, sort_keys: bool = False) -> None:
    """Writes `data` as indented JSON under a temporary name and renames it into place."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json_text(data, sort_keys))
    os.replace(tmp, path)


def json_text(data, sort_keys: bool = False) -> str:
    """The one JSON spelling of the format's documents (indented, newline-terminated)."""
    return json.dumps(data, indent=2, sort_keys=sort_keys) + "\n"


def read_json(path: str, what: str):
    """The JSON document in `path`; CorruptFileError naming the file when it is not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path}: not a valid {what} ({err}).") from err


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
        split = split_torch_state_dict_into_shards(tensors, filename_pattern=shard_pattern(group),
                                                   max_shard_size=max_shard_size)
        for filename, names in split.filename_to_tensors.items():
            shard = {name: tensors[name].detach().contiguous().cpu() for name in names}
            atomic_save_tensors(shard, os.path.join(directory, filename))
            weight_map.update(dict.fromkeys(names, filename))
        total_size += split.metadata["total_size"]
        if group != RACK_GROUP:
            stacks[str(group)] = {"files": sorted(split.filename_to_tensors), **(stack_meta or {}).get(group, {})}
    index = {
        "metadata": {"total_size": total_size, "stackwise_format": FORMAT_VERSION, "stacks": stacks},
        "weight_map": dict(sorted(weight_map.items())),
    }
    if total_parameters is not None:
        index["metadata"]["total_parameters"] = total_parameters
    atomic_write_json(os.path.join(directory, INDEX_NAME), index)
    _remove_stale_shards(directory, set(weight_map.values()))
    return index


def _sort_key(group):
    return (-1, 0) if group == RACK_GROUP else (0, group)


def _remove_stale_shards(directory, keep: set[str]) -> None:
    for name in os.listdir(directory):
        if SHARD_FILE.match(name) and name not in keep:
            os.remove(os.path.join(directory, name))


# Reading -------------------------------------------------------------------------------------------


def read_index(resolve: Resolver) -> dict:
    """Reads and checks `model.safetensors.index.json`: its format version, that every weight-map entry
    names a plain shard file in the folder, and that stacks are numbered by integers. The metadata's
    `stacks` map is filled in from the weight map for indexes written by other tools."""
    path = resolve(INDEX_NAME)
    index = read_json(path, "safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CorruptFileError(f"{path}: not a valid safetensors index (no `weight_map` object).")
    metadata = index.setdefault("metadata", {})
    if not isinstance(metadata, dict):
        raise CorruptFileError(f"{path}: `metadata` must be an object; got {type(metadata).__name__}.")
    version = metadata.get("stackwise_format", FORMAT_VERSION)  # absent: an index written by another tool
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise UnsupportedFormatError(f"{path}: stackwise_format {version!r} is not supported (this library reads "
                                     f"{FORMAT_VERSION}).")
    for key, filename in weight_map.items():
        if not isinstance(filename, str) or not SAFE_NAME.match(filename) or not filename.endswith(".safetensors"):
            raise UnsafePathError(f"{path}: weight_map[{key!r}] = {filename!r} is not a shard file name in the "
                                  f"folder ({SAFE_NAME.pattern}, ending in .safetensors).")
    if "stacks" not in metadata:
        metadata["stacks"] = _stacks_from_weight_map(weight_map)
    _check_index_metadata(metadata, path)
    return index


def _stacks_from_weight_map(weight_map: dict) -> dict[str, dict]:
    stacks: dict[str, dict] = {}
    for key, filename in weight_map.items():
        stack = stack_of(key)
        if stack is not None:
            files = stacks.setdefault(str(stack), {"files": []})["files"]
            if filename not in files:
                files.append(filename)
    return stacks


def _check_index_metadata(metadata: dict, path: str) -> None:
    stacks = metadata["stacks"]
    if not isinstance(stacks, dict):
        raise CorruptFileError(f"{path}: metadata `stacks` must be an object; got {type(stacks).__name__}.")
    for key, meta in stacks.items():
        if not (isinstance(key, str) and key.isdigit() and key.isascii()):
            raise CorruptFileError(f"{path}: metadata `stacks` key {key!r} is not a stack index (an integer).")
        files = meta.get("files") if isinstance(meta, dict) else None
        if not isinstance(files, list) or not all(isinstance(f, str) and SAFE_NAME.match(f) for f in files):
            raise CorruptFileError(f"{path}: metadata `stacks[{key!r}].files` must list shard file names; got {meta!r}.")
    digests = metadata.get(DIGESTS_KEY)
    if digests is not None and not (isinstance(digests, dict) and all(isinstance(v, str) for v in digests.values())):
        raise CorruptFileError(f"{path}: metadata `{DIGESTS_KEY}` must map file names to sha256 digests.")


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
        data_end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError, IndexError) as err:
        raise CorruptFileError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err}).") from err
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
                raise CorruptFileError(f"{path}: {INDEX_NAME} names tensors this shard lacks: {missing[:5]}.")
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
            tensors[key_within_stack(key)] = tensor
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
