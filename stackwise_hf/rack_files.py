"""The one writer and the one reader of rack and stack directories (layout in `layout.py`).

Every door goes through here: `save_pretrained`, `save_rack` and a push write with `write_rack`,
`save_stack` with `write_stack`; `load_rack` reads with `read_rack`, `load_rack_weights` with
`read_rack_weights`, `load_stack` with `read_stack_into`, and `from_pretrained` checks the files with
`check_rack_files` before transformers loads the weights, then reads the adapters with
`read_saved_adapters`. The parts of the format are written by the modules that know them: weights and
index (`serialization`), adapters (`adapter_files`, in peft's format); quantized stacks' codes and
manifest are written here from what `quantization` computes.
"""

from __future__ import annotations

import logging
import os
import shutil

import torch

from .atomic import replacing
from .checksums import Verifier, hash_files
from .errors import CorruptFileError, MissingFileError, ShapeMismatchError, UnsupportedFormatError
from .growth import reshape_stacks
from .layout import (
    ADAPTER_MANIFEST,
    CONFIG_NAME,
    DIGESTS_KEY,
    INDEX_NAME,
    QUANTIZATION_FORMAT_VERSION,
    QUANTIZATION_MANIFEST,
    REMOTE_CODE_FILES,
    SAFE_NAME,
    codes_file,
    is_rack_file,
    is_stack_dir_file,
    remote_code_auto_map,
)
from .resolver import Resolver, has_file, resolver_for
from .serialization import (
    atomic_save_tensors,
    atomic_write_json,
    check_files,
    check_stack_fits,
    copy_into_stack,
    load_tensors,
    read_index,
    read_json,
    read_stack,
    save_weights,
)
from .stacks import dtype_name, rack_state_dict, stack_of

try:  # optional: not shipped with trust_remote_code (layout.REMOTE_CODE_FILES): adapters need peft, and
    # transformers would demand quantization's backends (torchao, bitsandbytes) of anyone loading the code
    from . import adapter_files, quantization
except ImportError:
    if __package__ == "stackwise_hf":  # installed, peft is a dependency: a real error
        raise
    adapter_files = quantization = None

logger = logging.getLogger(__name__)

# Fields a saved rack must share with the rack it loads into (the stack layout may differ).
ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
    "head_dim", "attention_mode", "tie_word_embeddings",
)


# Writing -------------------------------------------------------------------------------------------


def write_rack(rack, directory, *, max_shard_size: int | str = "5GB", state_dict: dict | None = None,
               complete: bool = True, remote_code: bool = True) -> str:
    """Writes the rack to `directory`: config and generation config, the modeling code unless
    `remote_code=False` (`ship_remote_code`), weights in per-stack shards with their index, and, when
    `complete`, the quantized stacks' codes and manifest and the adapters. `complete=False` is what
    `save_pretrained` writes. Quantized stacks' weights are written dequantized, in their stack dtype.

    An existing directory is replaced in one atomic step (`atomic.replacing`): a kill at any moment
    leaves the old or the new rack complete. Files the writer does not own (`layout.is_rack_file`: a
    tokenizer, a card) are kept."""
    directory = os.fspath(directory)
    with replacing(directory, carry=lambda rel: not is_rack_file(rel)) as tmp:
        _write_config(rack, tmp, remote_code)
        save_weights(
            _state_dict_to_write(rack) if state_dict is None else state_dict, tmp, max_shard_size,
            stack_meta=_stack_meta(rack), total_parameters=rack.num_parameters(),
        )
        if complete:
            _write_quantization(rack, tmp)
            write_adapters(rack, tmp)
        _seal(tmp, is_rack_file)
    logger.info("Saved a %d-stack rack to %s", rack.num_stacks, directory)
    return directory


def write_stack(rack, stack_idx: int, directory, max_shard_size: int | str = "5GB") -> str:
    """Writes one stack's weights (sharded safetensors and an index of them) to `directory`, replacing an
    earlier stack directory there atomically."""
    weights = {k: v for k, v in rack_state_dict(rack).items() if stack_of(k) == stack_idx}
    meta = {stack_idx: _stack_meta(rack)[stack_idx] | {"hidden_size": rack.config.hidden_size}}
    with replacing(directory, carry=lambda rel: not is_stack_dir_file(rel)) as tmp:
        save_weights(weights, tmp, max_shard_size, stack_meta=meta)
        _seal(tmp, is_stack_dir_file)
    logger.info("Saved stack %d (%d blocks) to %s", stack_idx, rack.config.stack_sizes[stack_idx], directory)
    return os.fspath(directory)


def _state_dict_to_write(rack) -> dict[str, torch.Tensor]:
    # Quantized stacks are written dequantized; without the quantization module a rack has none.
    return rack_state_dict(rack) if quantization is None else quantization.quantized_state_dict(rack)


def _seal(directory: str, owned) -> None:
    """Records in the index the sha256 of every other file the writer owns (the index is the root)."""
    index_path = os.path.join(directory, INDEX_NAME)
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
            if owned(rel) and rel != INDEX_NAME:
                files[rel] = os.path.join(root, name)
    index = read_json(index_path, "safetensors index")
    index["metadata"][DIGESTS_KEY] = hash_files(files)
    atomic_write_json(index_path, index)


def _stack_meta(rack) -> dict[int, dict]:
    return {i: {"num_blocks": n, "dtype": d}
            for i, (n, d) in enumerate(zip(rack.config.stack_sizes, rack.config.stack_dtypes))}


def _write_config(rack, directory: str, remote_code: bool) -> None:
    if remote_code:
        ship_remote_code(rack, directory)
    else:
        drop_remote_code(rack, directory)
    rack.config.architectures = [type(rack).__name__]
    rack.config.dtype = dtype_name(rack.base_model.embed_tokens.weight.dtype)
    rack.config.save_pretrained(directory)
    if rack.can_generate():
        rack.generation_config.save_pretrained(directory)


def ship_remote_code(rack, directory: str) -> list[str]:
    """Copies `layout.REMOTE_CODE_FILES` (exactly those) beside the config and sets the config's `auto_map`
    (`layout.remote_code_auto_map`, plus the class a user registered with `register_for_auto_class`), so
    `AutoModelFor...from_pretrained(directory, trust_remote_code=True)` loads the rack where this package
    is not installed. What transformers' `custom_object_save` does, except that the files are a fixed
    list rather than whatever the import lines reach."""
    package = os.path.dirname(os.path.abspath(__file__))
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(os.path.join(package, name), os.path.join(directory, name))
    auto_map = remote_code_auto_map(type(rack).__name__)
    if getattr(rack, "_auto_class", None) is not None:
        auto_map[rack._auto_class] = f"modeling_stackwise.{type(rack).__name__}"
    rack.config.auto_map = auto_map
    return list(REMOTE_CODE_FILES)


def drop_remote_code(rack, directory: str) -> None:
    """The opposite of `ship_remote_code`: no `auto_map` in the config, no shipped module left in
    `directory` from an earlier save."""
    if hasattr(rack.config, "auto_map"):
        del rack.config.auto_map
    for name in REMOTE_CODE_FILES:
        if os.path.isfile(os.path.join(directory, name)):
            os.remove(os.path.join(directory, name))


def _write_quantization(rack, directory: str) -> None:
    """Each quantized stack's exact codes, and `quantization.json` naming them."""
    records = _quantized(rack)
    for i in records:
        atomic_save_tensors(quantization.stack_codes(rack, i), os.path.join(directory, codes_file(i)))
    if records:
        atomic_write_json(os.path.join(directory, QUANTIZATION_MANIFEST), {
            "format_version": QUANTIZATION_FORMAT_VERSION,
            "stacks": {str(i): {**r, "codes": codes_file(i)} for i, r in sorted(records.items())}})


def write_adapters(rack, directory: str) -> None:
    """Every adapter in peft's format under `directory/adapters/` with the manifest (`adapter_files`)."""
    # Also without live adapters: the manifest then records merges, or a stale one is removed.
    if adapter_files is not None:
        adapter_files.save_adapters(rack, directory)
    elif getattr(rack, "peft_config", None):
        raise RuntimeError(f"{directory}: the rack's adapters cannot be saved here (stackwise_hf with peft is needed).")


# Reading -------------------------------------------------------------------------------------------


def open_rack(path, verify: bool = True, **hub_kwargs) -> tuple[Verifier, dict]:
    """A resolver for the rack or stack directory (or Hub repo) `path` that verifies every file it hands
    out against the sha256 recorded in the index (unless `verify=False`), and the checked index. A
    directory saved without digests (before they were recorded) loads with a warning that it is
    unverified."""
    resolve = resolver_for(path, **hub_kwargs)
    index = read_index(resolve)
    expected = index["metadata"].get(DIGESTS_KEY)
    if verify and expected is None:
        logger.warning("%s was saved without sha256 digests (an older version of stackwise_hf): loading it "
                       "unverified.", path)
    return Verifier(resolve, expected if verify else None, path, INDEX_NAME), index


def read_rack(rack, path, *, backend: str | None = None, verify: bool = True, **hub_kwargs) -> None:
    """Restores a rack saved with `write_rack` (a directory or a Hub repo id) in place: weights, stack
    layout and dtypes, quantized stacks (quantized again with the saved backend, or `backend`, and
    given their saved codes), then the adapters, which then wrap the quantized layers.

    Every file is read and checked (`verify`: against its recorded sha256) before the rack changes, so
    a missing or damaged file raises (naming it) with the rack as it was."""
    if _quantized(rack):
        raise ValueError(f"{path}: load into a rack without quantized stacks (this one has "
                         f"{sorted(_quantized(rack))}); their weights cannot be overwritten.")
    resolve, index = open_rack(path, verify, **hub_kwargs)
    with resolve:
        _check_listed_files(resolve, index, (QUANTIZATION_MANIFEST, ADAPTER_MANIFEST))
        records = read_quantization_manifest(resolve)
        codes = _read_codes(resolve, records, backend)
        tensors, saved = _read_weights(rack, resolve, index, path)
        resolve.check()
    _apply_weights(rack, tensors, saved)
    for i, record in sorted(records.items()):
        quantization.quantize_stacks(rack, [i], bits=record["bits"], backend=backend or record["backend"])
        # Re-quantizing the dequantized weights is close, not exact: put back the saved integers and scales.
        if i in codes:
            quantization.restore_stack_codes(rack, i, codes[i], resolve(record["codes"]))
    if has_file(resolve, ADAPTER_MANIFEST) or getattr(rack, "peft_config", None):
        if adapter_files is None:
            raise RuntimeError(f"{path} has adapters ({ADAPTER_MANIFEST}); loading them needs stackwise_hf with peft.")
        adapter_files.read_adapters(rack, resolve, path, replace=True)


def _check_listed_files(resolve: Verifier, index: dict, names) -> None:
    """A part the index recorded a digest for must be there: its absence is damage, not "no such part"."""
    for name in names:
        if name in (resolve.expected or {}) and not has_file(resolve, name):
            raise CorruptFileError(f"{resolve.where}: {name} is missing, though the index "
                                   f"({INDEX_NAME}) records it; the rack is incomplete.")


def read_quantization_manifest(resolve: Resolver) -> dict[int, dict]:
    """{stack: {"bits", "backend", "scheme", "codes"}} from `quantization.json` ({} when absent); a
    malformed manifest raises CorruptFileError naming the file and field."""
    if not has_file(resolve, QUANTIZATION_MANIFEST):
        return {}
    file = resolve(QUANTIZATION_MANIFEST)
    if quantization is None:
        raise RuntimeError(f"{file}: the rack has quantized stacks; loading them needs stackwise_hf.")
    manifest = read_json(file, "quantization manifest")
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != QUANTIZATION_FORMAT_VERSION:
        raise UnsupportedFormatError(f"{file}: format_version {version!r} is not supported (this library reads "
                                     f"{QUANTIZATION_FORMAT_VERSION}).")
    try:
        stacks = manifest["stacks"]
        records = {int(k): dict(v) for k, v in stacks.items() if k.isdigit() or _not_an_index(k)}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CorruptFileError(f"{file}: not a quantization manifest ({type(err).__name__}: {err}).") from err
    for i, record in records.items():
        codes = record.get("codes")
        problem = quantization.check_record(record) or (
            None if isinstance(codes, str) and SAFE_NAME.match(codes) else f"`codes` {codes!r} is not a file name in the folder")
        if problem:
            raise CorruptFileError(f"{file}: stack {i}: {problem}; got {record}.")
    return records


def _not_an_index(key) -> bool:
    raise ValueError(f"stack key {key!r} is not an integer")


def _read_codes(resolve: Resolver, records: dict[int, dict], backend: str | None) -> dict[int, dict]:
    """The saved codes of each quantized stack whose backend is the one it will be quantized with."""
    codes = {}
    for i, record in records.items():
        quantization.resolve_backend(record["bits"], backend or record["backend"])  # a missing backend fails here
        try:
            file = resolve(record["codes"])
        except FileNotFoundError as err:
            raise MissingFileError(f"{err} (named by {QUANTIZATION_MANIFEST})") from err
        if (backend or record["backend"]) == record["backend"]:
            codes[i] = load_tensors(file)
    return codes


def _quantized(rack) -> dict[int, dict]:
    return {} if quantization is None else quantization.quantized_stacks(rack)


def read_rack_weights(rack, path, verify: bool = True, **hub_kwargs) -> None:
    """Loads every weight of a saved rack in place, after checking all of them fit.

    The rack is first reshaped to the saved stack layout (stacks added or removed) when the saved
    config differs from it only there; any other architecture difference raises."""
    resolve, index = open_rack(path, verify, **hub_kwargs)
    with resolve:
        tensors, saved = _read_weights(rack, resolve, index, path)
        resolve.check()
    _apply_weights(rack, tensors, saved)


def _read_weights(rack, resolve: Resolver, index: dict, where) -> tuple[dict, object]:
    """Every tensor of a saved rack, and its config, checked to fit `rack` (reshaped to the saved layout)."""
    saved = read_saved_config(type(rack.config), resolve)
    check_same_architecture(rack.config, saved, where)
    check_files(resolve, index["weight_map"].values())
    by_file: dict[str, list[str]] = {}
    for key, filename in index["weight_map"].items():
        by_file.setdefault(filename, []).append(key)
    tensors = {}
    for filename, keys in by_file.items():
        tensors.update(load_tensors(resolve(filename), keys))
    # Check against a weightless rack of the saved layout, so a misfit raises before any change.
    with torch.device("meta"):
        skeleton = type(rack)(saved)
    _check_state_dict_fits(rack_state_dict(skeleton), tensors, where)
    return tensors, saved


def read_saved_config(config_class, resolve: Resolver):
    """The saved `config.json`, refused (naming the file) when it is not JSON or not a rack's config."""
    path = resolve(CONFIG_NAME)
    data = read_json(path, "config")
    found = data.get("model_type") if isinstance(data, dict) else None
    if found != config_class.model_type:
        raise UnsupportedFormatError(f"{path}: model_type {found!r}; this library reads {config_class.model_type!r}.")
    try:
        return config_class.from_dict(data)
    except (TypeError, ValueError) as err:
        raise CorruptFileError(f"{path}: not a valid {config_class.__name__} ({err}).") from err


def _apply_weights(rack, tensors: dict, saved) -> None:
    if rack.config.stack_sizes != saved.stack_sizes:
        reshape_stacks(rack, saved.stack_sizes)
    _copy_state_dict(rack, tensors)
    rack.config.stack_dtypes = [dtype_name(s.dtype) for s in rack.base_model.stacks]


def read_stack_into(rack, stack_idx: int, path, source_stack: int | None = None, verify: bool = True,
                    **hub_kwargs) -> int:
    """Loads one saved stack (of a rack or stack directory, or a Hub repo) into stack `stack_idx`, reading
    (and verifying) only that stack's files; the stack takes on the saved dtype. Returns the source
    stack's index."""
    resolve, index = open_rack(path, verify, **hub_kwargs)
    if source_stack is None and len(index["metadata"]["stacks"]) > 1:
        source_stack = stack_idx
    with resolve:
        source_stack, tensors = read_stack(resolve, source_stack, index)
        resolve.check()
    stack = rack.base_model.stacks[stack_idx]
    check_stack_fits(stack, tensors, f"stack {source_stack} of {path}")
    copy_into_stack(stack, tensors)
    rack.config.stack_dtypes[stack_idx] = dtype_name(stack.dtype)
    return source_stack


def check_rack_files(resolve: Resolver, verify: bool = False, where=None) -> None:
    """Checks every shard the index names (complete; from the Hub, hashed against the Hub's ids; with
    `verify`, against the recorded sha256), before transformers loads them."""
    if not has_file(resolve, INDEX_NAME):
        return
    index = read_index(resolve)
    with Verifier(resolve, index["metadata"].get(DIGESTS_KEY) if verify else None, where) as verifier:
        check_files(verifier, index["weight_map"].values())
        verifier.check()


def verify_rack(path, **hub_kwargs) -> dict:
    """Checks a whole rack or stack directory (or Hub repo): every file the index records a digest for
    is present and hashes to it, every shard is complete, and adapters match their manifest's digests.

    Returns `{"files": checked, "verified": with a recorded digest, "unverified": no digests recorded}`;
    raises CorruptFileError (or FileNotFoundError) naming the first bad file."""
    resolve, index = open_rack(path, True, **hub_kwargs)
    with resolve:
        listed = sorted(set(index["weight_map"].values()) | set(resolve.expected or {}))
        _check_listed_files(resolve, index, listed)
        check_files(resolve, index["weight_map"].values())
        verified = resolve.check()
    if adapter_files is not None and has_file(resolve, ADAPTER_MANIFEST):
        adapter_files.verify_adapter_files(resolve)
    return {"files": len(listed), "verified": verified, "unverified": resolve.expected is None}


def read_saved_adapters(rack, resolve: Resolver, where) -> None:
    """After `from_pretrained`: loads the rack's adapters when it has an adapter manifest."""
    if not has_file(resolve, ADAPTER_MANIFEST):
        return
    if adapter_files is None:
        logger.warning(
            "%s has adapters (%s), which need stackwise_hf and peft to load; loaded without them. Plain peft "
            "loads one: PeftModel.from_pretrained(model, path, subfolder='adapters/<name>').", where, ADAPTER_MANIFEST,
        )
        return
    adapter_files.read_adapters(rack, resolve, where, replace=True)


def check_same_architecture(config, saved, where) -> None:
    """ShapeMismatchError naming the field when `saved` differs from `config` beyond the stack layout."""
    for name in ARCHITECTURE_FIELDS:
        if getattr(config, name) != getattr(saved, name):
            raise ShapeMismatchError(
                f"{where}/{CONFIG_NAME}: `{name}` is {getattr(saved, name)!r}; this rack has {getattr(config, name)!r}."
            )


def _check_state_dict_fits(current: dict, saved: dict, where) -> None:
    missing, unexpected = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    if missing or unexpected:
        raise ShapeMismatchError(f"{where}: {INDEX_NAME} lists no tensors {missing[:5]} and unexpected tensors "
                                 f"{unexpected[:5]} for its {CONFIG_NAME}.")
    for key, tensor in current.items():
        if saved[key].shape != tensor.shape:
            raise ShapeMismatchError(
                f"{where}: tensor `{key}` has shape {tuple(saved[key].shape)}; the rack expects {tuple(tensor.shape)}."
            )


def _copy_state_dict(rack, tensors: dict) -> None:
    params = {k.replace(".base_layer.", "."): p for k, p in rack.named_parameters(remove_duplicate=False)}
    with torch.no_grad():
        for key, tensor in tensors.items():
            # Tied weights are one Parameter under two names: setting it once sets both.
            params[key].data = tensor.to(device=params[key].device, copy=True)
