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
from .atomic import replacing
from .checksums import hash_files, sha256_file
from .errors import CorruptFileError, MissingFileError, ShapeMismatchError, UnsupportedFormatError
from .layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_ENTRY_KEYS,
    ADAPTER_FORMAT_VERSION,
    ADAPTER_MANIFEST,
    ADAPTER_MANIFEST_NAME,
    ADAPTER_WEIGHTS_FILE,
    ADAPTERS_DIR,
    DIGESTS_KEY,
    PEFT_KEY_PREFIX,
    SAFE_NAME,
    is_adapter_file,
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
    activity and trainability, and the merged adapters (`merged: true`, no folder). The adapter set
    replaces an earlier one in one atomic step (`atomic.replacing`): folders no longer live go, other
    files a user put under `adapters/` stay. With no adapters and no merge records, no manifest is written.

    Returns:
        The adapters directory.
    """
    directory = os.path.join(os.fspath(path), ADAPTERS_DIR)
    live = adapter_names(rack)
    entries = [{**r, "folder": None} for r in merged_adapters(rack)]
    if not entries and not live and not os.path.isdir(directory):
        return directory
    active, trainable = set(active_adapters(rack)), set(trainable_adapters(rack))
    with replacing(directory, carry=lambda rel: not is_adapter_file(rel)) as tmp:
        for name in live:
            folder = os.path.join(tmp, name)
            _save_one(rack, name, folder)
            digests = hash_files({f: os.path.join(folder, f) for f in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)})
            entries.append({**describe_adapter(rack, name), "merged": False, "folder": name,
                            "active": name in active, "trainable": name in trainable, DIGESTS_KEY: digests})
        if entries:
            atomic_write_json(os.path.join(tmp, ADAPTER_MANIFEST_NAME),
                              {"format_version": ADAPTER_FORMAT_VERSION, "adapters": entries})
    if not os.listdir(directory):
        os.rmdir(directory)
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
    """The adapter manifest, every field type-checked (errors name the file, entry and field)."""
    manifest = read_json(manifest_file, "adapter manifest")
    try:
        version, entries = manifest["format_version"], manifest["adapters"]
    except (KeyError, TypeError) as err:
        raise CorruptFileError(f"{manifest_file}: not a valid adapter manifest ({err!r}).") from err
    if version != ADAPTER_FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{manifest_file}: format_version {version!r} is not supported (this library reads {ADAPTER_FORMAT_VERSION})."
        )
    if not isinstance(entries, list):
        raise CorruptFileError(f"{manifest_file}: `adapters` must be a list; got {type(entries).__name__}.")
    for entry in entries:
        _check_entry(entry, manifest_file)
    return manifest


def _check_entry(entry, manifest_file: str) -> None:
    if not isinstance(entry, dict) or any(key not in entry for key in ADAPTER_ENTRY_KEYS):
        raise CorruptFileError(f"{manifest_file}: every adapter entry needs keys {list(ADAPTER_ENTRY_KEYS)}; got {entry!r}.")
    name, folder, merged = entry["name"], entry["folder"], entry["merged"]
    if not isinstance(name, str) or not SAFE_NAME.match(name):
        raise CorruptFileError(f"{manifest_file}: adapter name {name!r} is not a plain name ({SAFE_NAME.pattern}).")
    if not isinstance(merged, bool):
        raise CorruptFileError(f"{manifest_file}: adapter {name!r}: `merged` must be true or false; got {merged!r}.")
    if not merged and (not isinstance(folder, str) or not SAFE_NAME.match(folder)):
        raise CorruptFileError(f"{manifest_file}: adapter {name!r}: `folder` {folder!r} is not a plain folder name "
                               f"inside {ADAPTERS_DIR}/ ({SAFE_NAME.pattern}).")
    stacks = entry["stacks"]
    if not isinstance(stacks, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in stacks):
        raise CorruptFileError(f"{manifest_file}: adapter {name!r}: `stacks` must be a list of integers; got {stacks!r}.")
    for flag in ("active", "trainable"):
        if not isinstance(entry.get(flag, False), bool):
            raise CorruptFileError(f"{manifest_file}: adapter {name!r}: `{flag}` must be true or false; got {entry[flag]!r}.")
    digests = entry.get(DIGESTS_KEY)
    if digests is not None and not (isinstance(digests, dict) and all(isinstance(v, str) for v in digests.values())):
        raise CorruptFileError(f"{manifest_file}: adapter {name!r}: `{DIGESTS_KEY}` must map file names to digests.")


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
    config_file, weights_file = _adapter_files(resolve, entry, manifest_file)
    check_adapter_config(config_file)
    try:
        config = PeftConfig.from_pretrained(os.path.dirname(config_file))
    except (TypeError, ValueError, KeyError) as err:
        raise CorruptFileError(f"{config_file}: peft cannot read this adapter config ({type(err).__name__}: {err}).") from err
    if not isinstance(config, LoraConfig):
        raise ValueError(f"{config_file}: adapter {name!r} is a {type(config).__name__}; only LoRA adapters load here.")
    # Saved in inference mode (as peft saves); here activity and trainability come from the manifest.
    config.inference_mode = False
    weights = {k.removeprefix(PEFT_KEY_PREFIX): v for k, v in load_tensors(weights_file).items()}
    return config, weights


def _adapter_files(resolve, entry: dict, manifest_file: str) -> tuple[str, str]:
    """The adapter's two files, present and (when the manifest records digests) unchanged."""
    folder = f"{ADAPTERS_DIR}/{entry['folder']}"
    try:
        paths = {f: resolve(f"{folder}/{f}") for f in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)}
    except FileNotFoundError as err:
        raise MissingFileError(
            f"{manifest_file} lists adapter {entry['name']!r} in folder '{folder}', which is missing or incomplete: {err}"
        ) from err
    expected = entry.get(DIGESTS_KEY)
    if expected is not None:
        for name, path in paths.items():
            found = sha256_file(path)
            if found != expected.get(name):
                raise CorruptFileError(f"{path}: sha256 {found} differs from the {expected.get(name)} recorded in "
                                       f"{manifest_file}: the file is damaged or was replaced.")
    return paths[ADAPTER_CONFIG_FILE], paths[ADAPTER_WEIGHTS_FILE]


def verify_adapter_files(resolve: Resolver) -> int:
    """Checks every live adapter's files against the manifest; returns how many adapters were checked."""
    manifest_file = resolve(ADAPTER_MANIFEST)
    manifest = _parse_manifest(manifest_file)
    live = [e for e in manifest["adapters"] if not e["merged"]]
    for entry in live:
        _adapter_files(resolve, entry, manifest_file)
    return len(live)


# Fields of adapter_config.json that change what an adapter computes, and the types they must have.
_CONFIG_FIELDS = {
    "peft_type": str, "r": int, "lora_alpha": (int, float), "target_modules": (str, list),
    "rank_pattern": dict, "alpha_pattern": dict, "lora_dropout": (int, float), "use_rslora": bool,
    "fan_in_fan_out": bool, "bias": str, "use_dora": bool,
}
_REQUIRED_CONFIG_FIELDS = ("peft_type", "r", "lora_alpha", "target_modules")


def check_adapter_config(config_file: str) -> dict:
    """Type-checks the fields of an `adapter_config.json` that decide what the adapter computes;
    CorruptFileError naming the file and field otherwise. Returns the parsed document."""
    data = read_json(config_file, "adapter config")
    if not isinstance(data, dict):
        raise CorruptFileError(f"{config_file}: expected a JSON object, got {type(data).__name__}.")
    for field in _REQUIRED_CONFIG_FIELDS:
        if data.get(field) is None:
            raise CorruptFileError(f"{config_file}: field `{field}` is missing.")
    for field, kind in _CONFIG_FIELDS.items():
        value = data.get(field)
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise CorruptFileError(f"{config_file}: field `{field}` must be {kind}; got {value!r}.")
    if data["peft_type"] != "LORA":
        raise CorruptFileError(f"{config_file}: field `peft_type` is {data['peft_type']!r}; only 'LORA' adapters load here.")
    return data


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
