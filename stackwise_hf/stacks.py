"""How a rack is addressed: stack indices, which stack a parameter belongs to, the base state dict.

Everything here reads a rack; nothing changes it except `renumber_layers`. Growth (`growth.py`),
files (`rack_files.py`), adapters and quantization all address stacks through these functions.
"""

from __future__ import annotations

import torch

from .layout import RACK_GROUP, STACK_KEY


def check_stack_indices(rack, indices) -> list[int]:
    """Normalises `indices` (None = all, an int, or an iterable; negatives count from the end)."""
    n = len(rack.base_model.stacks)
    if indices is None:
        return list(range(n))
    if isinstance(indices, int):
        indices = [indices]
    out = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
            raise IndexError(f"stack index {i!r} does not exist; the rack has {n} stacks (valid: 0..{n - 1}).")
        out.append(i % n)
    return out


def renumber_layers(rack) -> None:
    """Gives every attention layer its global block index (its KV-cache slot) after a growth event."""
    layer_idx = 0
    for stack in rack.base_model.stacks:
        for block in stack.blocks:
            block.self_attn.layer_idx = layer_idx
            layer_idx += 1


def is_adapter_key(name: str) -> bool:
    """True for parameters peft adds (`lora_A`, `lora_B`, `lora_magnitude_vector`, ...)."""
    return ".lora_" in name or name.startswith("lora_")


def strip_adapter_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base weights of a (possibly peft-adapted) state dict, under their un-adapted names."""
    return {k.replace(".base_layer.", "."): v for k, v in state_dict.items() if not is_adapter_key(k)}


def stack_of(key: str) -> int | None:
    """The stack index a rack state-dict key belongs to, or None for embeddings/norm/head."""
    match = STACK_KEY.match(key)
    return int(match["stack"]) if match else None


def key_within_stack(key: str) -> str:
    """`model.stacks.3.blocks.0.mlp.up_proj.weight` -> `blocks.0.mlp.up_proj.weight`."""
    return STACK_KEY.match(key)["rest"]


def drop_tied(rack, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` without the tied copies (the head when it shares the embedding), stored once."""
    if rack.config.tie_word_embeddings:
        for target in getattr(rack, "_tied_weights_keys", None) or {}:
            state_dict.pop(target, None)
    return state_dict


def rack_state_dict(rack) -> dict[str, torch.Tensor]:
    """The rack's base weights, adapters stripped and tied weights stored once."""
    return drop_tied(rack, strip_adapter_keys(rack.state_dict()))


def group_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[int | str, dict[str, torch.Tensor]]:
    """Splits a rack state dict into {"rack": ..., 0: ..., 1: ...} by stack."""
    groups: dict = {}
    for key, tensor in state_dict.items():
        stack = stack_of(key)
        groups.setdefault(RACK_GROUP if stack is None else stack, {})[key] = tensor
    return groups


def adapters_in(stack) -> set[str]:
    """Names of the LoRA adapters with layers inside `stack`."""
    names: set[str] = set()
    for module in stack.modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict):
            names.update(lora_a.keys())
    return names


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bfloat16", as configs record dtypes."""
    return str(dtype).removeprefix("torch.")
