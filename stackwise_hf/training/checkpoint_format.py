"""The on-disk format of a training checkpoint: what its directory holds, and how it is verified.

A checkpoint is a directory, written under `<name>.tmp` and renamed into place only once complete:

```
<checkpoint_dir>/checkpoint-00000120/
    manifest.json             # written last: size and sha256 of every other file, plus a summary
    trainer_state.json        # TrainerState: stage cursor, steps, data position, eval losses, log history
    run_state.json            # resume bookkeeping: Accelerate's step counter, process count, stage length
    rack/                     # rack.save_rack: config, per-stack safetensors shards, adapters in peft format
    optimizer.json/.safetensors   # optimizer state keyed by parameter NAME (mid-stage checkpoints)
    scheduler.json            # LR scheduler state (mid-stage checkpoints)
    scaler.json               # fp16 GradScaler state, when there is one
    custom/object_<i>.json    # objects registered with `accelerator.register_for_checkpointing`
    rng/process_<k>.json/.safetensors   # python, numpy, torch (and CUDA) RNG states of process k
    activation_cache/         # optionally, the trunk activation cache
```

`verify_checkpoint` checks a directory against its manifest: every listed file exists with the listed
size (and sha256), every file present is listed, the files a resume needs are there, and every file the
rack loader will open (shards named by the rack index, adapter folders named by the adapter manifest)
is one of the listed, verified files.

Security rules:
- nothing in a checkpoint is ever unpickled: state is written as safetensors (tensors) and JSON
  (everything else) through `write_state` / `read_state`, and anything else is refused at save time;
- every path a manifest names is confined to the checkpoint directory (`checked_member`): absolute
  paths, drive letters, backslashes, `..` and links that resolve outside are refused, and a symbolic
  link anywhere inside a checkpoint is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .. import serialization
from ..errors import CheckpointError, CorruptFileError
from .. import layout
from ..layout import ADAPTER_MANIFEST
from .fsdp import shard_like_params

logger = logging.getLogger(__name__)

# The checkpoint directory's names live in `layout` with every other on-disk name.
FORMAT, FORMAT_VERSION, MANIFEST_NAME = layout.CHECKPOINT_FORMAT, layout.CHECKPOINT_FORMAT_VERSION, layout.CHECKPOINT_MANIFEST
TRAINER_STATE_NAME, RUN_STATE_NAME = layout.CHECKPOINT_TRAINER_STATE, layout.CHECKPOINT_RUN_STATE
RACK_DIR, RNG_DIR, DATA_DIR = layout.CHECKPOINT_RACK_DIR, layout.CHECKPOINT_RNG_DIR, layout.CHECKPOINT_DATA_DIR
CUSTOM_DIR, ACTIVATION_CACHE_DIR = layout.CHECKPOINT_CUSTOM_DIR, layout.CHECKPOINT_ACTIVATION_CACHE_DIR
PREFIX, TMP_SUFFIX, CHECKPOINT_NAME = layout.CHECKPOINT_PREFIX, layout.CHECKPOINT_TMP_SUFFIX, layout.CHECKPOINT_DIR_NAME
_REQUIRED = (TRAINER_STATE_NAME, RUN_STATE_NAME, f"{RACK_DIR}/{layout.CONFIG_NAME}", f"{RACK_DIR}/{serialization.INDEX_NAME}")


class CorruptCheckpointError(CheckpointError, CorruptFileError):
    """A checkpoint file is truncated, altered (sha256 mismatch), unlisted, or its manifest is unreadable."""


# State as safetensors + JSON ---------------------------------------------------------------------------
#
# `write_state` stores a nested structure of dicts, lists, tuples, scalars, strings, tensors and numpy
# arrays: tensors go to `<stem>.safetensors` under their path in the structure, the rest to `<stem>.json`
# with small tagged objects for what JSON lacks (tuples, arrays, non-string dict keys). Floats round-trip
# exactly (json writes `repr`). This covers optimizer, scheduler, GradScaler and RNG states.

_TENSOR, _TUPLE, _ARRAY, _PAIRS = "__tensor__", "__tuple__", "__ndarray__", "__pairs__"
_TAGS = {_TENSOR, _TUPLE, _ARRAY, _PAIRS}


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = path or "value"
        tensors[key] = value.detach().to("cpu").contiguous()
        return {_TENSOR: key}
    if isinstance(value, np.ndarray):
        return {_ARRAY: value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value) and not _TAGS & set(value):
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in value.items()}
        bad = [k for k in value if not isinstance(k, (str, int, float, bool)) and k is not None]
        if bad:
            raise TypeError(
                f"cannot store the dict key {bad[0]!r} ({type(bad[0]).__name__}) at `{path}` without pickle."
            )
        return {_PAIRS: [[k, _encode(v, f"{path}/{k}", tensors)] for k, v in value.items()]}
    raise TypeError(
        f"cannot store a {type(value).__name__} at `{path or '/'}` in a checkpoint: only tensors, numpy arrays, "
        "numbers, strings, None and lists/tuples/dicts of them are stored (as safetensors and JSON, never pickle)."
    )


def _decode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, where) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        key = value[_TENSOR]
        if key not in tensors:
            raise CorruptCheckpointError(f"{where}: the JSON names tensor {key!r}, which the safetensors file lacks.")
        return tensors[key]
    if _ARRAY in value:
        return np.array(value[_ARRAY], dtype=np.dtype(value["dtype"]))
    if _TUPLE in value:
        return tuple(_decode(v, tensors, where) for v in value[_TUPLE])
    if _PAIRS in value:
        return {k: _decode(v, tensors, where) for k, v in value[_PAIRS]}
    return {k: _decode(v, tensors, where) for k, v in value.items()}


def write_state(directory: str | os.PathLike, stem: str, state: Any) -> None:
    """Writes `state` as `<stem>.json` (+ `<stem>.safetensors` when it holds tensors) in `directory`."""
    os.makedirs(directory, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, "", tensors)
    if tensors:
        save_file(tensors, os.path.join(directory, f"{stem}.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, f"{stem}.json"), "w", encoding="utf-8") as f:
        json.dump({"tensors_file": f"{stem}.safetensors" if tensors else None, "state": encoded}, f)


def read_state(directory: str | os.PathLike, stem: str, device: str | torch.device = "cpu") -> Any:
    """Reads what `write_state` wrote; tensors are loaded straight onto `device` (safetensors, no pickle)."""
    path = os.path.join(directory, f"{stem}.json")
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
        tensors_file, encoded = document["tensors_file"], document["state"]
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CorruptCheckpointError(f"{path}: not a readable state file ({err!r}).") from err
    tensors = {}
    if tensors_file is not None:
        if tensors_file != f"{stem}.safetensors":
            raise CorruptCheckpointError(f"{path}: names tensor file {tensors_file!r}; expected '{stem}.safetensors'.")
        tensor_path = os.path.join(directory, tensors_file)
        serialization.check_shard(tensor_path)
        try:
            with safe_open(tensor_path, framework="pt", device=str(device)) as f:
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except SafetensorError as err:
            raise CorruptCheckpointError(f"{tensor_path}: cannot read safetensors data ({err}).") from err
    return _decode(encoded, tensors, path)


# Files, hashes, manifest ---------------------------------------------------------------------------------


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _walk_files(root: str) -> list[str]:
    """Relative POSIX paths of every file under `root`; symbolic links are refused. The metadata folder
    `huggingface_hub` writes into a download (`.cache/huggingface/`) is not part of a checkpoint."""
    found = []
    for directory, dirnames, filenames in os.walk(root, followlinks=False):
        if directory == root and ".cache" in dirnames:
            dirnames.remove(".cache")
        for name in dirnames + filenames:
            full = os.path.join(directory, name)
            if os.path.islink(full):
                raise CorruptCheckpointError(
                    f"{full}: a symbolic link inside a checkpoint; checkpoints hold plain files only."
                )
        for name in filenames:
            found.append(Path(os.path.relpath(os.path.join(directory, name), root)).as_posix())
    return sorted(found)


def fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal_checkpoint(tmp: str, summary: dict) -> dict:
    """Hashes every file of a finished checkpoint, flushes them to disk and writes the manifest last."""
    files = {}
    for rel in _walk_files(tmp):
        full = os.path.join(tmp, rel)
        fsync_path(full)
        files[rel] = {"size": os.path.getsize(full), "sha256": _sha256(full)}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "summary": summary, "files": files}
    path = os.path.join(tmp, MANIFEST_NAME)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for directory, _, _ in os.walk(tmp):
        fsync_path(directory, directory=True)
    return manifest


def checked_member(root: str | os.PathLike, rel: Any, where: str) -> str:
    """The absolute path of `rel` inside checkpoint `root`; raises unless it is a plain relative path that
    stays inside `root` (no absolute paths, drive letters, backslashes, `..`, or links out)."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise CorruptCheckpointError(f"{where}: invalid file path {rel!r} in the manifest.")
    parts = rel.split("/")
    if posixpath.isabs(rel) or re.match(r"^[A-Za-z]:", rel) or any(p in ("", ".", "..") for p in parts):
        raise CorruptCheckpointError(
            f"{where}: the manifest names {rel!r}, a path outside the checkpoint directory or not normalised; refused."
        )
    real_root = os.path.realpath(root)
    full = os.path.realpath(os.path.join(real_root, *parts))  # follows any link, so a link out is caught
    if os.path.commonpath([real_root, full]) != real_root:
        raise CorruptCheckpointError(f"{where}: {rel!r} resolves to {full}, outside the checkpoint directory; refused.")
    return full


def checkpoint_directory(path: str | os.PathLike) -> str:
    """The checkpoint directory of `path`, which may name the directory or its manifest file."""
    path = os.path.abspath(os.fspath(path))
    if os.path.basename(path) == MANIFEST_NAME and not os.path.isdir(path):
        return os.path.dirname(path)
    return path


SUPPORTED_VERSIONS = (1,)
# Summary fields the listing sorts and reports by: name -> accepted types (None always allowed).
_SUMMARY_TYPES = {"global_step": int, "stage": int, "stack_idx": int, "time": (int, float), "loss": (int, float),
                  "eval_loss": (int, float), "kind": str, "timestamp": str, "stage_entered": bool}


def _read_manifest(manifest_path: str) -> dict:
    """The manifest, its shape checked: a damaged one raises `CorruptCheckpointError` naming the file and
    what is wrong, never a TypeError or UnicodeDecodeError; an unknown version raises naming it."""
    manifest = _read_json_object(manifest_path)
    missing = [k for k in ("format", "format_version", "files", "summary") if k not in manifest]
    if missing:
        raise CorruptCheckpointError(f"{manifest_path}: missing field(s) {missing}.")
    if manifest["format"] != FORMAT:
        raise CorruptCheckpointError(f"{manifest_path}: format {manifest['format']!r}; expected {FORMAT!r}.")
    version = manifest["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version not in SUPPORTED_VERSIONS:
        raise CheckpointError(f"{manifest_path}: format_version {version!r} found; this library supports "
                              f"{list(SUPPORTED_VERSIONS)}.")
    if not isinstance(manifest["files"], dict):
        raise CorruptCheckpointError(f"{manifest_path}: `files` must be an object; got {type(manifest['files']).__name__}.")
    summary = manifest["summary"]
    if not isinstance(summary, dict):
        raise CorruptCheckpointError(f"{manifest_path}: `summary` must be an object; got {type(summary).__name__}.")
    for key, types in _SUMMARY_TYPES.items():
        value = summary.get(key)
        if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and types is not bool)):
            raise CorruptCheckpointError(f"{manifest_path}: summary.{key} is {value!r}; expected {types}.")
    return manifest


def verify_checkpoint(path: str | os.PathLike, hashes: bool = True) -> dict:
    """Checks a checkpoint against its manifest and returns the manifest.

    Every listed file must exist inside the directory with the listed size (and sha256 when `hashes`),
    every file in the directory must be listed, and the files a resume needs must be there.

    Raises:
        CheckpointError: no such directory, or no manifest (an interrupted save, or a retired checkpoint).
        CorruptCheckpointError: unreadable manifest, unsafe path, missing/truncated/altered/unlisted file.
    """
    directory = checkpoint_directory(path)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such checkpoint directory.")
    manifest_path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(
            f"{directory}: no {MANIFEST_NAME}, so the checkpoint is incomplete (its save was interrupted) or was "
            "retired; it cannot be verified and is not used."
        )
    manifest = _read_manifest(manifest_path)
    files = manifest["files"]
    for rel, entry in sorted(files.items()):
        full = checked_member(directory, rel, manifest_path)
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                and isinstance(entry.get("sha256"), str)):
            raise CorruptCheckpointError(f"{manifest_path}: bad entry for {rel!r}: {entry!r}.")
        if not os.path.isfile(full):
            raise CorruptCheckpointError(f"{directory}: {rel} is listed in {MANIFEST_NAME} but missing.")
        size = os.path.getsize(full)
        if size != entry["size"]:
            raise CorruptCheckpointError(
                f"{directory}: {rel} is {size} bytes on disk; the manifest says {entry['size']} "
                f"(the file or {MANIFEST_NAME} was truncated or overwritten)."
            )
        if hashes and _sha256(full) != entry["sha256"]:
            raise CorruptCheckpointError(
                f"{directory}: {rel} fails its sha256 check ({MANIFEST_NAME} has {entry['sha256'][:12]}...); "
                f"the file or {MANIFEST_NAME} was altered."
            )
    unlisted = sorted(set(_walk_files(directory)) - set(files) - {MANIFEST_NAME})
    if unlisted:
        raise CorruptCheckpointError(f"{directory}: files not listed in {MANIFEST_NAME}: {unlisted[:5]}; refused.")
    missing = [rel for rel in _REQUIRED if rel not in files]
    if missing:
        raise CorruptCheckpointError(f"{directory}: {MANIFEST_NAME} lacks required file(s) {missing}.")
    _check_rack_references(directory, set(files))
    return manifest


def _check_rack_references(directory: str, listed: set[str]) -> None:
    """Every file the rack loader will open (shards named by the index, adapter folders named by the
    adapter manifest) must be a listed, verified file of this checkpoint."""
    index_path = os.path.join(directory, RACK_DIR, serialization.INDEX_NAME)
    weight_map = _read_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptCheckpointError(f"{index_path}: `weight_map` must map tensor names to file names.")
    shards = set(weight_map.values())
    wanted = {f"{RACK_DIR}/{name}" for name in shards}
    adapter_manifest = f"{RACK_DIR}/{ADAPTER_MANIFEST}"
    if adapter_manifest in listed:
        manifest_file = os.path.join(directory, adapter_manifest)
        entries = _read_json_object(manifest_file).get("adapters")
        try:
            folders = [e["folder"] for e in entries if not e.get("merged")]
        except (KeyError, TypeError, AttributeError) as err:
            raise CorruptCheckpointError(f"{manifest_file}: `adapters` must be a list of entries with a `folder` "
                                         f"({err!r}).") from err
        for folder in folders:
            checked_member(os.path.join(directory, RACK_DIR, "adapters"), folder, f"{directory}/{adapter_manifest}")
            wanted.add(f"{RACK_DIR}/adapters/{folder}/adapter_config.json")
    outside = sorted(w for w in wanted if posixpath.normpath(w) not in listed)
    if outside:
        raise CorruptCheckpointError(
            f"{directory}: the rack refers to files {MANIFEST_NAME} does not list: {outside[:5]}."
        )


def _read_json_object(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"{path}: not valid JSON ({err}).") from err
    if not isinstance(value, dict):
        raise CorruptCheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}.")
    return value


# Optimizer state keyed by parameter name ------------------------------------------------------------------


def optimizer_param_names(optimizer, rack) -> list[list[str]]:
    """The parameter names of each optimizer group: the group's `names` when the trainer built it,
    otherwise looked up on the rack (so any optimizer over rack parameters can be checkpointed)."""
    by_id = None
    groups = []
    for k, group in enumerate(optimizer.param_groups):
        names = group.get("names")
        if names is None or len(names) != len(group["params"]):
            if by_id is None:
                by_id = {id(p): n for n, p in rack.named_parameters()}
            names = [by_id.get(id(p)) for p in group["params"]]
            if None in names:
                raise ValueError(
                    f"optimizer group {k} holds a parameter of shape {tuple(group['params'][names.index(None)].shape)} "
                    "that is not a parameter of the rack; only optimizers over the rack's parameters are checkpointed."
                )
        groups.append(list(names))
    return groups


def save_optimizer(optimizer, rack, directory: str | os.PathLike, state_dict: dict | None = None) -> None:
    """Writes `optimizer.json`/`optimizer.safetensors`: per-parameter state under the parameter's name
    (`state_dict`: the optimizer's state dict when given, e.g. gathered from FSDP shards)."""
    state_dict = optimizer.state_dict() if state_dict is None else state_dict
    names = optimizer_param_names(optimizer, rack)
    name_of = {}
    groups = []
    for group, group_names in zip(state_dict["param_groups"], names):
        name_of.update(zip(group["params"], group_names))
        groups.append({**{k: v for k, v in group.items() if k not in ("params", "names")}, "names": group_names})
    state = {name_of[index]: value for index, value in state_dict["state"].items()}
    write_state(directory, "optimizer", {"param_groups": groups, "state": state})


def load_optimizer(optimizer, rack, directory: str | os.PathLike) -> None:
    """Loads what `save_optimizer` wrote into `optimizer`, matching parameters by name.

    Raises CheckpointError naming the parameters that differ when the groups do not cover the same names.
    """
    saved = read_state(directory, "optimizer")
    current = optimizer_param_names(optimizer, rack)
    saved_groups = saved["param_groups"]
    where = os.path.join(os.fspath(directory), "optimizer.json")
    if len(saved_groups) != len(current):
        raise CheckpointError(
            f"{where}: {len(saved_groups)} parameter group(s) saved; the optimizer has {len(current)}."
        )
    for k, (group, names) in enumerate(zip(saved_groups, current)):
        missing, extra = sorted(set(names) - set(group["names"])), sorted(set(group["names"]) - set(names))
        if missing or extra:
            raise CheckpointError(
                f"{where}: group {k} holds state for other parameters than this optimizer: not saved {missing[:3]}, "
                f"saved but not optimized {extra[:3]}."
            )
    flat = {name: i for i, name in enumerate(n for names in current for n in names)}
    param_groups = []
    for group, names, live in zip(saved_groups, current, optimizer.param_groups):
        restored = {k: v for k, v in group.items() if k != "names"}
        if "names" in live:
            restored["names"] = names
        restored["params"] = [flat[n] for n in names]
        param_groups.append(restored)
    unknown = sorted(set(saved["state"]) - set(flat))
    if unknown:
        raise CheckpointError(f"{where}: state for parameters the optimizer does not hold: {unknown[:3]}.")
    # torch casts each state tensor to its parameter's device and dtype (the map_location of the optimizer);
    # under FSDP the whole saved tensors are first sharded as their parameters are.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = shard_like_params(params, {flat[n]: v for n, v in saved["state"].items()})
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def repoint_optimizer(optimizer, rack, names: list[list[str]], where: str) -> None:
    """Points the optimizer's groups at the rack's parameters of the same names (after a restore replaced some)."""
    params = dict(rack.named_parameters())
    missing = sorted(n for group in names for n in group if n not in params)
    if missing:
        raise CheckpointError(f"{where}: the restored rack has no parameters {missing[:3]}, which the optimizer holds.")
    optimizer.state.clear()
    for group, group_names in zip(optimizer.param_groups, names):
        group["params"] = [params[n] for n in group_names]


# RNG ---------------------------------------------------------------------------------------------------------


def capture_rng() -> dict:
    """Python, numpy, torch CPU and (when initialised) CUDA generator states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, where: str) -> None:
    try:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CorruptCheckpointError(f"{where}: cannot restore the random generators ({err!r}).") from err
    if "cuda" in state:
        if torch.cuda.is_available() and len(state["cuda"]) <= torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            logger.warning("%s: CUDA generator states saved for %d device(s) were not restored (this process has %d).",
                           where, len(state["cuda"]), torch.cuda.device_count() if torch.cuda.is_available() else 0)
