"""How a frozen trunk is stored: quantized to 8 or 4 bits, and/or kept off the accelerator.

Quantization (QLoRA-style): the projections of frozen stacks are replaced by quantized layers of a
maintained library, and LoRA adapters (`stackwise_hf.adapters`) train on top of them through peft's
own quantized LoRA layers. Two backends:

- **torchao** (`pip install torchao`; CPU and CUDA): int8 weight-only (`Int8WeightOnlyConfig`, one
  scale per output row). peft wraps such a layer in `TorchaoLoraLinear`. It is the default where it
  imports: it runs on this project's CPU CI and imports in about a second. peft's torchao LoRA takes
  int8 only, so 4-bit needs the other backend.
- **bitsandbytes** (`pip install bitsandbytes`; CUDA, and CPU since 0.45): 8-bit (`Linear8bitLt`,
  LLM.int8 vectorwise, no outlier threshold) and 4-bit NF4 with double quantization (`Linear4bit`, the
  QLoRA format). peft wraps them in its `bnb` LoRA layers. `bits=4` uses it.

`backend="auto"` picks torchao for 8 bits and bitsandbytes for 4 bits. A missing backend raises
`ImportError` naming the install command.

This module computes; the files are `rack_files`'s. On disk a quantized stack is stored twice over:
dequantized, in its stack dtype, in the rack's usual per-stack shards (`quantized_state_dict`; so the
directory stays a standard checkpoint that loads without any backend), and as its exact integers and
scales (`stack_codes`). Loading quantizes the stacks again and then writes the saved codes back
(`restore_stack_codes`): re-quantizing dequantized values is close but not exact (torchao's scales
round), and the saved codes make the reloaded rack compute bit for bit what the saved one did (tested
for torchao int8, bitsandbytes NF4 and int8). The price is disk: a quantized stack takes its stack
dtype's bytes plus its quantized bytes.

Trunk placement: in cache mode the trunk only runs to extend the activation cache. `offload_stacks`
keeps stacks in host memory and `stream_stacks` brings them to the accelerator one at a time.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging

import torch
from torch import nn

from .layout import PROJECTIONS
from .stacks import check_stack_indices, drop_tied, is_adapter_key, strip_adapter_keys

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torchao", "bitsandbytes")
SCHEMES = {"int8": 8, "nf4": 4}
_INSTALL = {"torchao": "pip install torchao  (or: pip install 'stackwise_hf[quantization]')",
            "bitsandbytes": "pip install bitsandbytes  (or: pip install 'stackwise_hf[quantization-bnb]')"}


# Backends --------------------------------------------------------------------------------------------


def backend_available(name: str) -> str | None:
    """None when backend `name` can be used here, else the reason it cannot (with the install command)."""
    if name not in BACKENDS[1:]:
        raise ValueError(f"`backend` must be one of {list(BACKENDS)}; got {name!r}.")
    if importlib.util.find_spec(name) is None:
        return f"{name} is not installed; {_INSTALL[name]}"
    try:
        importlib.import_module(name)
    except Exception as err:  # an installed but broken backend (e.g. built for another torch)
        return f"{name} is installed but fails to import ({type(err).__name__}: {err})"
    return None


def resolve_backend(bits: int, backend: str = "auto") -> str:
    """The backend that quantizes to `bits`; raises ImportError naming the install command if it is missing."""
    if bits not in (4, 8):
        raise ValueError(f"`bits` must be 8 or 4; got {bits!r}.")
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {list(BACKENDS)}; got {backend!r}.")
    if backend == "torchao" and bits == 4:
        raise ValueError("4-bit stacks need backend='bitsandbytes': peft's torchao LoRA layer takes int8 weights only.")
    if backend == "auto":
        if bits == 4:
            backend = "bitsandbytes"
        else:
            backend = "torchao" if backend_available("torchao") is None else "bitsandbytes"
    reason = backend_available(backend)
    if reason is not None:
        raise ImportError(f"quantizing to {bits} bits needs {backend}: {reason}")
    return backend


def _projection_layers(stack: nn.Module):
    """(parent module, attribute name, nn.Linear) for each projection of a stack, under a LoRA wrapper or not."""
    for name, module in stack.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in PROJECTIONS:
            continue
        base = getattr(module, "base_layer", None)
        if base is not None:
            yield module, "base_layer", base
        else:
            parent = stack.get_submodule(name.rsplit(".", 1)[0])
            yield parent, leaf, module


def _quantize_linear(linear: nn.Linear, bits: int, backend: str, compute_dtype: torch.dtype) -> nn.Module:
    device = linear.weight.device
    if backend == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_  # optional backend

        linear.weight.requires_grad_(False)
        quantize_(linear, Int8WeightOnlyConfig())
        return linear
    import bitsandbytes as bnb  # optional backend

    weight = linear.weight.detach()
    if bits == 8:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False,
                                    threshold=0.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.to("cpu", torch.float16 if device.type == "cuda" else weight.dtype),
                                         requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=compute_dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight.to("cpu"), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4")
    # bitsandbytes quantizes when the weight moves to its device. The new layer takes the replaced one's
    # train/eval mode: bitsandbytes' int8 matmul takes another path in training mode.
    return layer.to(device).train(linear.training)


def _dequantize_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    weight = layer.weight
    if type(weight).__module__.startswith("torchao"):
        return weight.dequantize().to(dtype)
    import bitsandbytes as bnb  # optional backend: the weight is one of its types

    if isinstance(weight, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    if isinstance(weight, bnb.nn.Int8Params):
        scb = weight.SCB if weight.SCB is not None else layer.state.SCB
        return (weight.data.float() * scb.float()[:, None] / 127).to(dtype)
    return weight.detach().to(dtype)


def _codes(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The exact quantized representation of a layer (integers and scales), as plain tensors."""
    weight = layer.weight
    if type(weight).__module__.startswith("torchao"):
        return {"qdata": weight.qdata, "scale": weight.scale}
    import bitsandbytes as bnb  # optional backend: the weight is one of its types

    if isinstance(weight, bnb.nn.Params4bit):
        state = weight.quant_state
        codes = {"data": weight.data, "absmax": state.absmax}
        if state.nested:
            codes.update(offset=state.offset, nested_absmax=state.state2.absmax)
        return codes
    return {"data": weight.data, "SCB": weight.SCB if weight.SCB is not None else layer.state.SCB}


def _restore_codes(layer: nn.Module, codes: dict[str, torch.Tensor], where: str) -> None:
    current = _codes(layer)
    if set(current) != set(codes):
        raise ValueError(f"{where}: saved codes {sorted(codes)} do not match the layer's {sorted(current)}.")
    with torch.no_grad():
        for name, tensor in codes.items():
            if current[name].shape != tensor.shape:
                raise ValueError(f"{where}: `{name}` has shape {tuple(tensor.shape)}; the layer has "
                                 f"{tuple(current[name].shape)}.")
            current[name].copy_(tensor.to(current[name].device, current[name].dtype))


def stack_codes(rack, stack_idx: int) -> dict[str, torch.Tensor]:
    """The exact quantized form of stack `stack_idx`'s projections: `{"<module>.<part>": tensor}`,
    keys within the stack (`blocks.0.mlp.up_proj.qdata`), on the CPU."""
    codes = {}
    for name, module in rack.base_model.stacks[stack_idx].named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTIONS:
            layer = getattr(module, "base_layer", module)
            codes.update({f"{name}.{k}": v.detach().contiguous().cpu() for k, v in _codes(layer).items()})
    return codes


def restore_stack_codes(rack, stack_idx: int, codes: dict[str, torch.Tensor], where: str) -> None:
    """Writes `stack_codes` output back into an already quantized stack; ValueError naming `where`
    and the module when the codes do not fit."""
    for name, module in rack.base_model.stacks[stack_idx].named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTIONS:
            layer = getattr(module, "base_layer", module)
            prefix = f"{name}."
            _restore_codes(layer, {k[len(prefix):]: v for k, v in codes.items() if k.startswith(prefix)},
                           f"{where}: {name}")


def check_record(record) -> str | None:
    """None when `record` describes a quantization this module can redo, else what is wrong with it."""
    if not isinstance(record, dict):
        return f"expected a mapping, got {type(record).__name__}"
    if record.get("bits") not in (4, 8) or isinstance(record.get("bits"), bool):
        return f"`bits` must be 8 or 4, got {record.get('bits')!r}"
    if record.get("backend") not in BACKENDS[1:]:
        return f"`backend` must be one of {list(BACKENDS[1:])}, got {record.get('backend')!r}"
    return None


# Quantizing a rack's stacks ---------------------------------------------------------------------------


def quantized_stacks(rack) -> dict[int, dict]:
    """{stack index: {"bits": 8|4, "backend": ...}} for the rack's quantized stacks."""
    return dict(getattr(rack, "_stackwise_quantization", {}) or {})


def quantize_stacks(rack, indices, bits: int = 8, backend: str = "auto") -> dict[int, dict]:
    """Quantizes the projections of stacks `indices` (frozen: their weights stop requiring grad).

    Norms stay in the stack dtype; matmuls run in it (bf16 stacks: bf16). Stacks already quantized are
    left as they are. LoRA adapters present on the stack stay and keep working; adapters added later
    wrap the quantized layers through peft's quantized LoRA classes.

    Args:
        rack: a `StackWisePreTrainedModel`.
        indices (`int` or list of `int`): stacks to quantize.
        bits (`int`): 8 (int8) or 4 (NF4).
        backend (`str`): "auto", "torchao" or "bitsandbytes" (see the module docstring).

    Returns:
        The rack's quantized stacks after the call (`quantized_stacks`).

    Raises:
        ImportError: the backend is not installed (the message gives the install command).

    Example:

    ```python
    >>> from stackwise_hf import StackWiseConfig, StackWiseForCausalLM
    >>> from stackwise_hf.quantization import quantize_stacks
    >>> rack = StackWiseForCausalLM(StackWiseConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                                             num_attention_heads=4, stack_sizes=[1, 1]))
    >>> quantize_stacks(rack, [0], bits=8)  # doctest: +SKIP
    {0: {'bits': 8, 'backend': 'torchao', 'scheme': 'int8'}}
    ```
    """
    backend = resolve_backend(bits, backend)
    record = quantized_stacks(rack)
    for i in check_stack_indices(rack, indices):
        if i in record:
            continue
        stack = rack.base_model.stacks[i]
        for parent, attr, linear in list(_projection_layers(stack)):
            new = _quantize_linear(linear, bits, backend, stack.dtype)
            if new is not linear:
                setattr(parent, attr, new)
        for name, param in stack.named_parameters():
            if not is_adapter_key(name):
                param.requires_grad_(False)
        record[i] = {"bits": bits, "backend": backend, "scheme": "nf4" if bits == 4 else "int8"}
        logger.info("Quantized stack %d to %s with %s", i, record[i]["scheme"], backend)
    rack._stackwise_quantization = record
    # peft picks its bitsandbytes LoRA layers from these flags (the names transformers' loaders set).
    if any(r["backend"] == "bitsandbytes" and r["bits"] == 8 for r in record.values()):
        rack.is_loaded_in_8bit = True
    if any(r["backend"] == "bitsandbytes" and r["bits"] == 4 for r in record.values()):
        rack.is_loaded_in_4bit = True
    return dict(record)


def quantized_state_dict(rack) -> dict[str, torch.Tensor]:
    """`stacks.rack_state_dict`, with every quantized projection dequantized to its stack dtype."""
    record = quantized_stacks(rack)
    state = strip_adapter_keys(rack.state_dict())
    prefix_of_stacks = rack.base_model.stacks
    base_prefix = "model." if rack is not rack.base_model else ""
    for i in record:
        stack = prefix_of_stacks[i]
        for name, module in stack.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in PROJECTIONS:
                continue
            layer = getattr(module, "base_layer", module)
            key = f"{base_prefix}stacks.{i}.{name}"
            for k in [k for k in state if k == f"{key}.weight" or k.startswith(f"{key}.")]:
                del state[k]
            state[f"{key}.weight"] = _dequantize_weight(layer, stack.dtype).cpu()
    return drop_tied(rack, state)


# Trunk placement ---------------------------------------------------------------------------------------


def offload_stacks(rack, indices, device="cpu") -> list[int]:
    """Moves stacks `indices` to `device` (host memory by default); the rest of the rack stays put.

    In cache mode the frozen trunk does not run during a step, so the accelerator needs only the
    trained stacks, the head and the batch (`planner` accounts for it as `trunk_placement="host"`).
    """
    indices = check_stack_indices(rack, indices)
    for i in indices:
        rack.base_model.stacks[i].to(device)
    return indices


@contextlib.contextmanager
def stream_stacks(rack, indices, device, home="cpu"):
    """Yields each of stacks `indices` in turn after moving it to `device`, and moves it back to `home`
    before the next: at most one offloaded stack is on the accelerator at a time (extending a cache).

    Example:

    ```python
    >>> with stream_stacks(rack, range(4, 8), "cuda") as stacks:  # doctest: +SKIP
    ...     for i, stack in stacks:
    ...         hidden = stack(hidden, **attention)
    ```
    """
    indices = check_stack_indices(rack, list(indices))

    def generate():
        for i in indices:
            stack = rack.base_model.stacks[i]
            stack.to(device)
            try:
                yield i, stack
            finally:
                stack.to(home)

    gen = generate()
    try:
        yield gen
    finally:
        gen.close()
