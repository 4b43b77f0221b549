"""Rack surgery: grow a rack by a stack (append or prepend), freeze and unfreeze stacks, cast a stack,
reshape the stack list to a saved layout.

Every function keeps `rack.config` in step with the modules, so that `save_pretrained` /
`from_pretrained` round-trip a grown rack.
"""

from __future__ import annotations

import logging

import torch

from .configuration_stackwise import canonical_dtype
from .stacks import check_stack_indices, is_adapter_key, renumber_layers, strip_adapter_keys

try:  # optional: needs peft, and is not shipped with trust_remote_code (layout.REMOTE_CODE_FILES)
    from . import adapters
except ImportError:
    if __package__ == "stackwise_hf":  # installed, peft is a dependency: a real error
        raise
    adapters = None

logger = logging.getLogger(__name__)

INIT_MODES = ("random", "copy", "identity")
POSITIONS = ("append", "prepend")


def grow(rack, n_blocks: int, position: str = "append", init: str = "random", dtype=None) -> int:
    """Adds a stack of `n_blocks` blocks at the output end ("append") or the input end ("prepend").

    Args:
        rack: a `StackWisePreTrainedModel`.
        n_blocks: blocks in the new stack.
        position: "append" (the seed's left-to-right building) or "prepend" (right-to-left).
        init: "random" (the rack's `_init_weights`), "copy" (the neighbouring stack's blocks, as in
            depthwise stacking: the last blocks of the last stack for "append", the first blocks of the
            first stack for "prepend", cycled when the new stack is deeper), or "identity" (random, with
            every `o_proj` and `down_proj` zeroed so each block adds nothing to the residual stream and
            the rack computes the same function right after growth).
        dtype: the new stack's dtype or precision name ("float32", "bf16", "half", ...); defaults to
            the neighbouring stack's dtype.

    Returns:
        The index of the new stack.
    """
    if position not in POSITIONS:
        raise ValueError(f"`position` must be one of {list(POSITIONS)}; got {position!r}.")
    if init not in INIT_MODES:
        raise ValueError(f"`init` must be one of {list(INIT_MODES)}; got {init!r}.")
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks <= 0:
        raise ValueError(f"`n_blocks` must be a positive integer; got {n_blocks!r}.")
    body = rack.base_model
    neighbour_idx = len(body.stacks) - 1 if position == "append" else 0
    neighbour = body.stacks[neighbour_idx] if len(body.stacks) else None  # None: an empty rack
    if neighbour is None and init == "copy":
        raise ValueError("`init='copy'` copies a neighbouring stack, and this rack has no stacks; use 'random' or 'identity'.")
    if dtype is None:
        dtype = rack.config.stack_dtypes[neighbour_idx] if neighbour is not None else body.embed_tokens.weight.dtype
    dtype_name = canonical_dtype(dtype, "dtype")

    new_stack = type(body).stack_class(rack.config, n_blocks)
    if init == "copy":
        _copy_blocks(new_stack, neighbour, from_end=position == "append")
    else:
        new_stack.apply(rack._init_weights)
        if init == "identity":
            with torch.no_grad():
                for block in new_stack.blocks:
                    block.self_attn.o_proj.weight.zero_()
                    block.mlp.down_proj.weight.zero_()
    device = body.embed_tokens.weight.device
    new_stack.to(device=device, dtype=getattr(torch, dtype_name))

    index = len(body.stacks) if position == "append" else 0
    body.stacks.insert(index, new_stack)
    rack.config.stack_sizes.insert(index, n_blocks)
    rack.config.stack_dtypes.insert(index, dtype_name)
    renumber_layers(rack)
    if position == "prepend" and (getattr(rack, "peft_config", None) or getattr(rack, "_merged_adapters", None)):
        # Live adapters and merge records both name stacks by index.
        adapters.shift_adapter_stacks(rack, offset=1)
    logger.info(
        "%s stack %d: %d blocks, init=%s, dtype=%s; the rack now has %d stacks (%d blocks).",
        "Appended" if position == "append" else "Prepended", index, n_blocks, init, dtype_name,
        len(body.stacks), rack.config.num_hidden_layers,
    )
    return index


def _copy_blocks(new_stack, neighbour, from_end: bool) -> None:
    sources = list(neighbour.blocks)
    n_new, n_src = len(new_stack.blocks), len(sources)
    for j, block in enumerate(new_stack.blocks):
        # Appending copies the blocks nearest the output, prepending those nearest the input.
        src = sources[(n_src - n_new + j) % n_src] if from_end else sources[j % n_src]
        block.load_state_dict(_base_state_dict(src))


def _base_state_dict(module) -> dict[str, torch.Tensor]:
    """A module's own weights without adapter tensors, under the names of an un-adapted module."""
    return {k: v.detach().clone() for k, v in strip_adapter_keys(module.state_dict()).items()}


def set_stacks_trainable(rack, indices, trainable: bool) -> list[int]:
    """Sets `requires_grad` on the base weights of the given stacks.

    Freezing also freezes any adapter weights inside those stacks; unfreezing leaves adapter weights
    alone (which adapters train is decided in `stackwise_hf.adapters`).
    """
    indices = check_stack_indices(rack, indices)
    for i in indices:
        for name, param in rack.base_model.stacks[i].named_parameters():
            if not trainable or not is_adapter_key(name):
                param.requires_grad_(trainable)
    return indices


def cast_stack(rack, stack_idx: int, dtype) -> None:
    """Casts stack `stack_idx`'s base weights to `dtype` (adapter weights keep their own dtype)."""
    (stack_idx,) = check_stack_indices(rack, stack_idx)
    name = canonical_dtype(dtype, "dtype")
    target = getattr(torch, name)
    with torch.no_grad():
        for param_name, param in rack.base_model.stacks[stack_idx].named_parameters():
            if not is_adapter_key(param_name):
                param.data = param.data.to(target)
    rack.config.stack_dtypes[stack_idx] = name


def reshape_stacks(rack, stack_sizes: list[int]) -> None:
    """Rebuilds the rack's stack list to `stack_sizes`: fresh float32 stacks, adapters removed (a
    reader loads the saved weights, dtypes and adapters next)."""
    body = rack.base_model
    stack_cls = type(body).stack_class  # the rack may be empty
    device = body.embed_tokens.weight.device
    if getattr(rack, "peft_config", None):
        adapters.remove_all_adapters(rack)
    body.stacks = torch.nn.ModuleList(stack_cls(rack.config, n).to(device) for n in stack_sizes)
    rack.config.stack_sizes = list(stack_sizes)
    rack.config.stack_dtypes = ["float32"] * len(stack_sizes)
    renumber_layers(rack)
