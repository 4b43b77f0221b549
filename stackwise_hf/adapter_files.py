"""The adapter part of a rack's files: `save_adapters` and `load_adapters`, in peft's own format plus a
manifest. `rack_files` writes and reads a rack's adapters through these two; names are `layout`'s.

Adapters sit next to the rack, one folder per adapter, exactly as
`PeftModel.save_pretrained(<rack>/adapters)` writes non-default adapters, plus a manifest:

```
<rack>/adapters/stackwise_adapters.json       # format_version, one entry per adapter (live or merged)
<rack>/adapters/stack_1/adapter_config.json
<rack>/adapters/stack_1/adapter_model.safetensors
<rack>/adapters/trunk/...
```

so a single adapter also loads with plain peft:
`PeftModel.from_pretrained(rack, rack_dir, subfolder="adapters/stack_1", adapter_name="stack_1")`.

The adapters themselves (adding, activating, merging, renaming) are `stackwise_hf.adapters`'s.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from collections.abc import Iterable

import torch
from peft import LoraConfig, PeftConfig
from peft.functional import get_peft_model_state_dict, inject_adapter_in_model

from .adapters import (
    _as_names,
    _base_requires_grad_kept,
    _expected_peft_warnings,
    _inject,
    _name_order,
    _peft_config,
    activate_adapters,
    active_adapters,
    adapter_names,
    describe_adapter,
    merged_adapters,
    remove_all_adapters,
    trainable_adapters,
)
from .errors import CorruptFileError, ShapeMismatchError
from .layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_ENTRY_KEYS,
    ADAPTER_FORMAT_VERSION,
    ADAPTER_MANIFEST,
    ADAPTER_MANIFEST_NAME,
    ADAPTER_WEIGHTS_FILE,
    ADAPTERS_DIR,
    PEFT_KEY_PREFIX,
)
from .resolver import Resolver, has_file, resolver_for
from .serialization import atomic_save_tensors, atomic_write_json, load_tensors, read_json

logger = logging.getLogger(__name__)


# Saving ---------------------------------------------------------------------------------------------


def save_adapters(rack, path: str | os.PathLike) -> str:
    """Writes every adapter in peft's format under `path/adapters/<name>/`, and the manifest.

    Each folder holds `adapter_config.json` and `adapter_model.safetensors` exactly as
    `PeftModel.save_pretrained(path/adapters)` writes them; the manifest
    `path/adapters/stackwise_adapters.json` lists each adapter's stacks, projections, ranks, alphas,
    activity and trainability, and the merged adapters (`merged: true`, no folder). Folders an earlier
    manifest listed that are no longer live are removed after the new manifest is in place. With no
    adapters and no merge records, nothing is written (and a stale manifest is removed).

    Returns:
        The adapters directory.
    """
    directory = os.path.join(os.fspath(path), ADAPTERS_DIR)
    manifest_file = os.path.join(directory, ADAPTER_MANIFEST_NAME)
    previous = _previous_folders(manifest_file)
    live = adapter_names(rack)
    entries = [{**r, "folder": None} for r in merged_adapters(rack)]
    active, trainable = set(active_adapters(rack)), set(trainable_adapters(rack))
    for name in live:
        _save_one(rack, name, os.path.join(directory, name))
        entries.append({**describe_adapter(rack, name), "merged": False, "folder": name,
                        "active": name in active, "trainable": name in trainable})
    if entries:
        os.makedirs(directory, exist_ok=True)
        atomic_write_json(manifest_file, {"format_version": ADAPTER_FORMAT_VERSION, "adapters": entries})
    elif os.path.isfile(manifest_file):
        os.remove(manifest_file)
    for folder in previous - set(live):
        _remove_adapter_folder(os.path.join(directory, folder))
    if entries:
        logger.info("Saved adapters %s (%d merged) to %s", live, len(entries) - len(live), directory)
    return directory


def _save_one(rack, name: str, folder: str) -> None:
    weights = get_peft_model_state_dict(rack, adapter_name=name, save_embedding_layers=False)
    weights = {PEFT_KEY_PREFIX + k: v.detach().contiguous().cpu() for k, v in weights.items()}
    os.makedirs(folder, exist_ok=True)
    atomic_save_tensors(weights, os.path.join(folder, ADAPTER_WEIGHTS_FILE))
    # As PeftModel.save_pretrained writes it: inference mode on, and the class to rebuild the base from.
    config = copy.deepcopy(rack.peft_config[name])
    config.inference_mode = True
    config.base_model_name_or_path = config.base_model_name_or_path or getattr(rack, "name_or_path", None) or None
    config.save_pretrained(
        folder, auto_mapping_dict={"base_model_class": type(rack).__name__, "parent_library": type(rack).__module__}
    )


def _previous_folders(manifest_file: str) -> set[str]:
    if not os.path.isfile(manifest_file):
        return set()
    manifest = _parse_manifest(manifest_file)
    return {e["folder"] for e in manifest["adapters"] if e.get("folder")}


def _remove_adapter_folder(folder: str) -> None:
    # Only peft's two files: anything else a user put there stays.
    for filename in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
        target = os.path.join(folder, filename)
        if os.path.isfile(target):
            os.remove(target)
    if os.path.isdir(folder) and not os.listdir(folder):
        shutil.rmtree(folder)


# Loading --------------------------------------------------------------------------------------------


def manifest_exists(resolve: Resolver) -> bool:
    """True when the rack directory or repo behind `resolve` has an adapter manifest."""
    return has_file(resolve, ADAPTER_MANIFEST)


def load_adapters(
    rack, path: str | os.PathLike, names: Iterable[str] | None = None, replace: bool = False, **hub_kwargs
) -> list[str]:
    """Loads adapters saved by `save_adapters` (or `rack.save_rack`) into the rack.

    Everything is checked before the rack changes: the manifest, that each adapter's folder and files
    exist, that its stacks exist in this rack, and that every tensor's shape fits the module it
    adapts. Activity and trainability are restored as saved; with `replace=True` the merge records
    are too. A directory without a manifest holds no adapters: `replace=True` then just removes the
    rack's adapters.

    Args:
        rack: the rack to load into (same stack layout and sizes as the saved one).
        path: a rack directory or a Hub repo id.
        names (iterable of `str`, *optional*): which adapters to load; defaults to all live ones.
        replace (`bool`, defaults to `False`): remove the rack's adapters first; otherwise a name the
            rack already has raises.
        hub_kwargs: `revision`, `token`, `cache_dir` for a Hub repo.

    Returns:
        The loaded adapter names.

    Raises:
        FileNotFoundError: no manifest (and not `replace`), or a listed folder or file is missing.
        IndexError: an adapter targets a stack this rack does not have.
        ShapeMismatchError: an adapter's tensors do not fit the rack's modules.
        ValueError: unknown or merged names asked for, a name clash, a foreign adapter type.
    """
    return read_adapters(rack, resolver_for(path, **hub_kwargs), path, names=names, replace=replace)


def read_adapters(rack, resolve: Resolver, where, names: Iterable[str] | None = None, replace: bool = False) -> list[str]:
    """`load_adapters` from the rack directory or repo behind `resolve` (`where` names it in messages)."""
    if not manifest_exists(resolve):
        if replace and names is None:
            remove_all_adapters(rack)
            rack._merged_adapters = []
            return []
        raise FileNotFoundError(
            f"{where}: no adapter manifest ({ADAPTER_MANIFEST}); nothing was saved with `save_adapters`."
        )
    manifest_file = resolve(ADAPTER_MANIFEST)
    manifest = _parse_manifest(manifest_file)
    entries = _select(manifest, names, manifest_file)
    if not replace:
        clash = [e["name"] for e in entries if e["name"] in _peft_config(rack)]
        if clash:
            raise ValueError(f"The rack already has adapter(s) {clash}; pass replace=True or remove them first.")
    prepared = [(e, *_read_adapter(rack, resolve, e, manifest_file)) for e in entries]
    _check_shapes(rack, prepared)
    _apply(rack, prepared, replace)
    if replace:
        rack._merged_adapters = [
            {k: v for k, v in e.items() if k != "folder"} for e in manifest["adapters"] if e["merged"]
        ]
    loaded = [e["name"] for e in entries]
    logger.info("Loaded adapters %s from %s", loaded, where)
    return loaded


def _apply(rack, prepared: list[tuple[dict, LoraConfig, dict]], replace: bool) -> None:
    """Injects checked adapters, restoring their saved activity and trainability."""
    if replace:
        remove_all_adapters(rack)
    active, trainable = active_adapters(rack), trainable_adapters(rack)
    with _base_requires_grad_kept(rack):
        for entry, config, weights in prepared:
            _inject(rack, entry["name"], config, weights)
    active += [e["name"] for e, _, _ in prepared if e.get("active", True)]
    trainable += [e["name"] for e, _, _ in prepared if e.get("active", True) and e.get("trainable", False)]
    if _peft_config(rack):
        activate_adapters(rack, active, trainable=trainable)


def _parse_manifest(manifest_file: str) -> dict:
    manifest = read_json(manifest_file, "adapter manifest")
    try:
        version, entries = manifest["format_version"], manifest["adapters"]
    except (KeyError, TypeError) as err:
        raise CorruptFileError(f"{manifest_file}: not a valid adapter manifest ({err!r}).") from err
    for entry in entries:
        if not isinstance(entry, dict) or any(key not in entry for key in ADAPTER_ENTRY_KEYS):
            raise CorruptFileError(
                f"{manifest_file}: every adapter entry needs keys {list(ADAPTER_ENTRY_KEYS)}; got {entry!r}."
            )
    if version != ADAPTER_FORMAT_VERSION:
        raise ValueError(
            f"{manifest_file}: format_version {version!r} is not supported (this library reads {ADAPTER_FORMAT_VERSION})."
        )
    return manifest


def _select(manifest: dict, names, manifest_file: str) -> list[dict]:
    live = {e["name"]: e for e in manifest["adapters"] if not e["merged"]}
    if names is None:
        return list(live.values())
    names = _as_names(names)
    missing = [n for n in names if n not in live]
    if missing:
        merged = sorted({e["name"] for e in manifest["adapters"] if e["merged"]} & set(missing))
        note = f" ({merged} were merged into the base weights)" if merged else ""
        raise ValueError(
            f"{manifest_file}: no adapter(s) {missing} to load{note}; it lists {sorted(live, key=_name_order)}."
        )
    return [live[n] for n in names]


def _read_adapter(rack, resolve, entry: dict, manifest_file: str) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Reads and checks one adapter's config and tensors (keys as on the rack, without peft's prefix)."""
    name, n = entry["name"], len(rack.base_model.stacks)
    bad = [i for i in entry["stacks"] if not (isinstance(i, int) and 0 <= i < n)]
    if bad:
        raise IndexError(
            f"{manifest_file}: adapter {name!r} targets stack(s) {bad}; the rack has {n} stacks (valid: 0..{n - 1})."
        )
    folder = f"{ADAPTERS_DIR}/{entry['folder']}"
    try:
        config_file, weights_file = resolve(f"{folder}/{ADAPTER_CONFIG_FILE}"), resolve(f"{folder}/{ADAPTER_WEIGHTS_FILE}")
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{manifest_file} lists adapter {name!r} in folder '{folder}', which is missing or incomplete: {err}"
        ) from err
    config = PeftConfig.from_pretrained(os.path.dirname(config_file))
    if not isinstance(config, LoraConfig):
        raise ValueError(f"{config_file}: adapter {name!r} is a {type(config).__name__}; only LoRA adapters load here.")
    # Saved in inference mode (as peft saves); here activity and trainability come from the manifest.
    config.inference_mode = False
    weights = {k.removeprefix(PEFT_KEY_PREFIX): v for k, v in load_tensors(weights_file).items()}
    return config, weights


def _check_shapes(rack, prepared: list[tuple[dict, LoraConfig, dict]]) -> None:
    """Injects each adapter into a weightless copy of the rack and compares the tensors peft expects."""
    with torch.device("meta"):
        skeleton = type(rack)(copy.deepcopy(rack.config))
    for entry, config, weights in prepared:
        name = entry["name"]
        with _expected_peft_warnings():
            inject_adapter_in_model(copy.deepcopy(config), skeleton, adapter_name=name)
        expected = get_peft_model_state_dict(skeleton, adapter_name=name, save_embedding_layers=False)
        missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        if missing or unexpected:
            raise ShapeMismatchError(
                f"adapter {name!r}: missing tensors {missing[:3]}, unexpected tensors {unexpected[:3]} for this rack."
            )
        for key, tensor in expected.items():
            if weights[key].shape != tensor.shape:
                raise ShapeMismatchError(
                    f"adapter {name!r}: tensor `{key}` has shape {tuple(weights[key].shape)}; "
                    f"this rack's module needs {tuple(tensor.shape)}."
                )
