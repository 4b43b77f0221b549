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

from .errors import CorruptFileError, ShapeMismatchError
from .growth import reshape_stacks
from .layout import (
    ADAPTER_MANIFEST,
    CODES_FILE,
    CONFIG_NAME,
    INDEX_NAME,
    QUANTIZATION_FORMAT_VERSION,
    QUANTIZATION_MANIFEST,
    REMOTE_CODE_FILES,
    codes_file,
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
    `save_pretrained` writes. Quantized stacks' weights are written dequantized, in their stack dtype."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    _write_config(rack, directory, remote_code)
    save_weights(
        _state_dict_to_write(rack) if state_dict is None else state_dict, directory, max_shard_size,
        stack_meta=_stack_meta(rack), total_parameters=rack.num_parameters(),
    )
    if complete:
        _write_quantization(rack, directory)
        write_adapters(rack, directory)
    logger.info("Saved a %d-stack rack to %s", rack.num_stacks, directory)
    return directory


def write_stack(rack, stack_idx: int, directory, max_shard_size: int | str = "5GB") -> str:
    """Writes one stack's weights (sharded safetensors and an index of them) to `directory`."""
    weights = {k: v for k, v in rack_state_dict(rack).items() if stack_of(k) == stack_idx}
    meta = {stack_idx: _stack_meta(rack)[stack_idx] | {"hidden_size": rack.config.hidden_size}}
    save_weights(weights, directory, max_shard_size, stack_meta=meta)
    logger.info("Saved stack %d (%d blocks) to %s", stack_idx, rack.config.stack_sizes[stack_idx], directory)
    return os.fspath(directory)


def _state_dict_to_write(rack) -> dict[str, torch.Tensor]:
    # Quantized stacks are written dequantized; without the quantization module a rack has none.
    return rack_state_dict(rack) if quantization is None else quantization.quantized_state_dict(rack)


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
    """Each quantized stack's exact codes and `quantization.json`; stale ones of an earlier save go."""
    records = _quantized(rack)
    for i in records:
        atomic_save_tensors(quantization.stack_codes(rack, i), os.path.join(directory, codes_file(i)))
    manifest = os.path.join(directory, QUANTIZATION_MANIFEST)
    if records:
        atomic_write_json(manifest, {"format_version": QUANTIZATION_FORMAT_VERSION, "stacks": {
            str(i): {**r, "codes": codes_file(i)} for i, r in sorted(records.items())}})
    elif os.path.isfile(manifest):
        os.remove(manifest)
    keep = {codes_file(i) for i in records}
    for name in os.listdir(directory):
        if CODES_FILE.match(name) and name not in keep:
            os.remove(os.path.join(directory, name))


def write_adapters(rack, directory: str) -> None:
    """Every adapter in peft's format under `directory/adapters/` with the manifest (`adapter_files`)."""
    # Also without live adapters: the manifest then records merges, or a stale one is removed.
    if adapter_files is not None:
        adapter_files.save_adapters(rack, directory)
    elif getattr(rack, "peft_config", None):
        raise RuntimeError(f"{directory}: the rack's adapters cannot be saved here (stackwise_hf with peft is needed).")


# Reading -------------------------------------------------------------------------------------------


def read_rack(rack, path, *, backend: str | None = None, **hub_kwargs) -> None:
    """Restores a rack saved with `write_rack` (a directory or a Hub repo id) in place: weights, stack
    layout and dtypes, quantized stacks (quantized again with the saved backend, or `backend`, and
    given their saved codes), then the adapters, which then wrap the quantized layers.

    Every file is read and checked before the rack changes, so a missing or damaged file raises
    (naming it) with the rack as it was."""
    if _quantized(rack):
        raise ValueError(f"{path}: load into a rack without quantized stacks (this one has "
                         f"{sorted(_quantized(rack))}); their weights cannot be overwritten.")
    resolve = resolver_for(path, **hub_kwargs)
    records = read_quantization_manifest(resolve)
    codes = _read_codes(resolve, records, backend)
    read_rack_weights(rack, resolve, path)
    for i, record in sorted(records.items()):
        quantization.quantize_stacks(rack, [i], bits=record["bits"], backend=backend or record["backend"])
        # Re-quantizing the dequantized weights is close, not exact: put back the saved integers and scales.
        if i in codes:
            quantization.restore_stack_codes(rack, i, codes[i], resolve(record["codes"]))
    if has_file(resolve, ADAPTER_MANIFEST) or getattr(rack, "peft_config", None):
        if adapter_files is None:
            raise RuntimeError(f"{path} has adapters ({ADAPTER_MANIFEST}); loading them needs stackwise_hf with peft.")
        adapter_files.read_adapters(rack, resolve, path, replace=True)


def read_quantization_manifest(resolve: Resolver) -> dict[int, dict]:
    """{stack: {"bits", "backend", "scheme", "codes"}} from `quantization.json` ({} when absent); a
    malformed manifest raises CorruptFileError naming the file and field."""
    if not has_file(resolve, QUANTIZATION_MANIFEST):
        return {}
    file = resolve(QUANTIZATION_MANIFEST)
    if quantization is None:
        raise RuntimeError(f"{file}: the rack has quantized stacks; loading them needs stackwise_hf.")
    manifest = read_json(file, "quantization manifest")
    try:
        records = {int(k): dict(v) for k, v in manifest["stacks"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CorruptFileError(f"{file}: not a quantization manifest ({type(err).__name__}: {err}).") from err
    for i, record in records.items():
        problem = quantization.check_record(record) or (None if isinstance(record.get("codes"), str) else "no `codes` file")
        if problem:
            raise CorruptFileError(f"{file}: stack {i}: {problem}; got {record}.")
    return records


def _read_codes(resolve: Resolver, records: dict[int, dict], backend: str | None) -> dict[int, dict]:
    """The saved codes of each quantized stack whose backend is the one it will be quantized with."""
    codes = {}
    for i, record in records.items():
        quantization.resolve_backend(record["bits"], backend or record["backend"])  # a missing backend fails here
        try:
            file = resolve(record["codes"])
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err} (named by {QUANTIZATION_MANIFEST})") from err
        if (backend or record["backend"]) == record["backend"]:
            codes[i] = load_tensors(file)
    return codes


def _quantized(rack) -> dict[int, dict]:
    return {} if quantization is None else quantization.quantized_stacks(rack)


def read_rack_weights(rack, resolve: Resolver, where) -> None:
    """Loads every weight of a saved rack in place, after checking all of them fit.

    The rack is first reshaped to the saved stack layout (stacks added or removed) when the saved
    config differs from it only there; any other architecture difference raises."""
    saved = type(rack.config).from_json_file(resolve(CONFIG_NAME))
    check_same_architecture(rack.config, saved, where)
    index = read_index(resolve)
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
    if rack.config.stack_sizes != saved.stack_sizes:
        reshape_stacks(rack, saved.stack_sizes)
    _copy_state_dict(rack, tensors)
    rack.config.stack_dtypes = [dtype_name(s.dtype) for s in rack.base_model.stacks]


def read_stack_into(rack, stack_idx: int, resolve: Resolver, where, source_stack: int | None = None) -> int:
    """Loads one saved stack (of a rack or stack directory) into stack `stack_idx`, reading only that
    stack's files; the stack takes on the saved dtype. Returns the source stack's index."""
    index = read_index(resolve)
    if source_stack is None and len(index["metadata"]["stacks"]) > 1:
        source_stack = stack_idx
    source_stack, tensors = read_stack(resolve, source_stack, index)
    stack = rack.base_model.stacks[stack_idx]
    check_stack_fits(stack, tensors, f"stack {source_stack} of {where}")
    copy_into_stack(stack, tensors)
    rack.config.stack_dtypes[stack_idx] = dtype_name(stack.dtype)
    return source_stack


def check_rack_files(resolve: Resolver) -> None:
    """Checks every shard the index names (complete; and, from the Hub, hashed), before transformers loads them."""
    if has_file(resolve, INDEX_NAME):
        check_files(resolve, read_index(resolve)["weight_map"].values())


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
        raise ShapeMismatchError(f"{where}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}.")
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
