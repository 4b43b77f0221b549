"""Llama interop: split a `LlamaForCausalLM` into a rack, and export a rack as a plain Llama.

The two architectures are the same function; only module paths differ, so conversion is a name
table (`model.layers.{g}` <-> `model.stacks.{i}.blocks.{j}`) plus a config translation.
"""

from __future__ import annotations

import copy
import logging
import os
import re

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .configuration_stackwise import StackWiseConfig
from .modeling_stackwise import StackWiseForCausalLM
from .stacks import is_adapter_key, rack_state_dict

logger = logging.getLogger(__name__)

_LLAMA_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_RACK_BLOCK = re.compile(r"^model\.stacks\.(\d+)\.blocks\.(\d+)\.(.+)$")
_SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
    "head_dim", "max_position_embeddings", "rms_norm_eps", "initializer_range", "tie_word_embeddings",
    "pad_token_id", "bos_token_id", "eos_token_id",
)


def rack_config_from_llama(llama_config: LlamaConfig, stack_sizes: list[int] | None = None) -> StackWiseConfig:
    """Translates a `LlamaConfig`; raises ValueError for Llama features a rack does not have."""
    rope = dict(getattr(llama_config, "rope_parameters", None) or {})
    unsupported = {
        "hidden_act": (llama_config.hidden_act, "silu"),
        "attention_bias": (llama_config.attention_bias, False),
        "mlp_bias": (llama_config.mlp_bias, False),
    }
    for name, (value, allowed) in unsupported.items():
        if value != allowed:
            raise ValueError(f"Cannot convert a Llama with `{name}={value!r}`; only {allowed!r} is supported.")
    n_layers = llama_config.num_hidden_layers
    stack_sizes = list(stack_sizes) if stack_sizes is not None else [n_layers]
    if sum(stack_sizes) != n_layers:
        raise ValueError(f"`stack_sizes` {stack_sizes} sums to {sum(stack_sizes)}; the Llama has {n_layers} layers.")
    fields = {name: getattr(llama_config, name) for name in _SHARED_FIELDS}
    return StackWiseConfig(
        **fields, rope_theta=rope.get("rope_theta", 10000.0), rope_parameters=rope or None, stack_sizes=stack_sizes
    )


def llama_config_from_rack(config: StackWiseConfig) -> LlamaConfig:
    if config.attention_mode != "causal":
        raise ValueError(f"Only causal racks export to Llama; this rack has attention_mode={config.attention_mode!r}.")
    fields = {name: getattr(config, name) for name in _SHARED_FIELDS}
    return LlamaConfig(
        **fields,
        num_hidden_layers=config.num_hidden_layers,
        rope_parameters=copy.deepcopy(config.rope_parameters),
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )


def from_llama(
    llama: LlamaForCausalLM | str | os.PathLike, stack_sizes: list[int] | None = None, **from_pretrained_kwargs
) -> StackWiseForCausalLM:
    """Splits a Llama checkpoint into a rack of stacks.

    Args:
        llama: a `LlamaForCausalLM`, or a local path / Hub id that `LlamaForCausalLM.from_pretrained` loads.
        stack_sizes: blocks per stack; defaults to one stack holding every layer.

    Example:

    ```python
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from stackwise_hf.llama_interop import from_llama, to_llama
    >>> llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                                      num_hidden_layers=4, num_attention_heads=4))
    >>> rack = from_llama(llama, stack_sizes=[2, 2])
    >>> rack.config.stack_sizes, type(to_llama(rack)).__name__
    ([2, 2], 'LlamaForCausalLM')
    ```
    """
    if not isinstance(llama, LlamaForCausalLM):
        llama = LlamaForCausalLM.from_pretrained(llama, **from_pretrained_kwargs)
    config = rack_config_from_llama(llama.config, stack_sizes)
    layer_to_slot = [(i, j) for i, n in enumerate(config.stack_sizes) for j in range(n)]
    state_dict = {}
    for key, tensor in llama.state_dict().items():
        match = _LLAMA_LAYER.match(key)
        if match:
            stack, block = layer_to_slot[int(match[1])]
            key = f"model.stacks.{stack}.blocks.{block}.{match[2]}"
        state_dict[key] = tensor
    dtype = llama.model.embed_tokens.weight.dtype
    config.stack_dtypes = [str(dtype).removeprefix("torch.")] * config.num_stacks
    rack = StackWiseForCausalLM(config).to(dtype)
    _load_exact(rack, state_dict)
    return rack


def to_llama(rack: StackWiseForCausalLM, dtype: torch.dtype | str | None = None) -> LlamaForCausalLM:
    """Exports a causal rack as a plain `LlamaForCausalLM` (adapters must be merged first).

    Args:
        rack: the rack.
        dtype: dtype of the exported model; defaults to the widest dtype in the rack (`export_dtype`), so
            a float32 rack with a bf16 stack exports in float32. Parts held in another dtype are cast, and
            a warning names them.
    """
    unmerged = sorted({k for k, _ in rack.named_parameters() if is_adapter_key(k)})
    if unmerged:
        raise ValueError(
            f"The rack has unmerged adapter weights (e.g. {unmerged[0]}); merge them with "
            "`stackwise_hf.adapters.merge_stack_adapter` before exporting to Llama."
        )
    dtype = _as_dtype(dtype) if dtype is not None else export_dtype(rack)
    converted = [f"{part} ({_name(d)})" for part, d in part_dtypes(rack).items() if d != dtype]
    if converted:
        logger.warning("Exporting to Llama in %s converts %s.", _name(dtype), ", ".join(converted))
    slot_to_layer = {}
    layer = 0
    for i, n in enumerate(rack.config.stack_sizes):
        for j in range(n):
            slot_to_layer[(i, j)] = layer
            layer += 1
    state_dict = {}
    for key, tensor in rack_state_dict(rack).items():
        match = _RACK_BLOCK.match(key)
        if match:
            key = f"model.layers.{slot_to_layer[(int(match[1]), int(match[2]))]}.{match[3]}"
        state_dict[key] = tensor.to(dtype)
    llama = LlamaForCausalLM(llama_config_from_rack(rack.config)).to(dtype)
    _load_exact(llama, state_dict)
    llama.generation_config = copy.deepcopy(rack.generation_config)
    return llama.to(rack.device)


def save_llama(rack: StackWiseForCausalLM, save_directory: str | os.PathLike, dtype: torch.dtype | str | None = None,
               tokenizer=None, max_shard_size: int | str = "5GB") -> str:
    """Writes the rack as a plain Llama folder: config, generation config, safetensors, and the tokenizer
    when given. `LlamaForCausalLM.from_pretrained` (or `AutoModelForCausalLM`) loads it without this
    package. `dtype` as in `to_llama`. Returns the directory.

    Example:

    ```python
    >>> from stackwise_hf.llama_interop import save_llama
    >>> save_llama(rack, "llama-export", dtype="bfloat16", tokenizer=tokenizer)  # doctest: +SKIP
    ```
    """
    llama = to_llama(rack, dtype)
    llama.config.dtype = _name(llama.model.embed_tokens.weight.dtype)
    llama.save_pretrained(save_directory, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(save_directory)
    logger.info("Exported a %d-layer Llama (%s) to %s", llama.config.num_hidden_layers, llama.config.dtype,
                save_directory)
    return os.fspath(save_directory)


def part_dtypes(rack: StackWiseForCausalLM) -> dict[str, torch.dtype]:
    """The dtype of each part of the rack: "embeddings", "stack i", "final norm", and an untied "lm_head"."""
    body = rack.base_model
    parts = {"embeddings": body.embed_tokens.weight.dtype}
    parts.update({f"stack {i}": stack.dtype for i, stack in enumerate(body.stacks)})
    parts["final norm"] = body.norm.weight.dtype
    if not rack.config.tie_word_embeddings:
        parts["lm_head"] = rack.get_output_embeddings().weight.dtype
    return parts


def export_dtype(rack: StackWiseForCausalLM) -> torch.dtype:
    """The widest dtype in the rack, which every part converts to without loss: its only dtype, or float32
    for a mix (of float32, bfloat16 and float16, only float32 holds any two of them exactly)."""
    dtypes = set(part_dtypes(rack).values())
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    allowed = ("float32", "bfloat16", "float16")
    if dtype not in allowed:
        raise ValueError(f"dtype {dtype!r} is not supported for a Llama export; allowed dtypes are {list(allowed)}.")
    return getattr(torch, dtype)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _load_exact(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Loads every weight or raises naming the keys that did not map (tied copies are allowed missing)."""
    result = model.load_state_dict(state_dict, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if model.config.tie_word_embeddings else set()
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        raise ValueError(f"Weight names did not map: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}.")
    if tied:
        model.tie_weights()
