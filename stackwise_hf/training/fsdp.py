"""FSDP: what stage-wise training does differently when Accelerate shards the stage module.

Accelerate's FSDP2 path (`fsdp2_prepare_model`) calls `torch.distributed.fsdp.fully_shard` on every
`StackWiseStack` (the wrap unit of `configs/accelerate/fsdp.yaml`) and on the stage module: the rack's
parameters become `DTensor` shards and its stacks FSDP modules. Two facts of FSDP2 shape this module:

- `fully_shard` applies once per module and has no inverse, while every stage prepares a new stage
  module over a rack that has grown (and whose trained stack is now frozen);
- between stages the rack must be an ordinary model: growth by "copy", merging adapters, casting the
  trunk, checkpoints and the final `save_pretrained` all read or replace whole weights.

So at a stage's end `unshard_rack` gathers the full weights (one tensor at a time, to the host) and puts
fresh, plain modules with those weights under the same rack object, which the next stage shards again.
A mid-stage checkpoint saves a `plain_copy` of the rack and the optimizer state gathered whole (keyed by
parameter name, as always); resuming shards that state like the parameters again.
FSDP therefore shards a stage's training step (the trained weights, their gradients and optimizer state,
and the frozen trunk's weights while the stage runs); between stages every process holds the whole rack,
as under DDP.

FSDP1 wraps modules in place (the rack's stacks would become `FullyShardedDataParallel` wrappers
that the next stage cannot re-wrap), so it is refused with a pointer to `fsdp_version: 2`; so is a
quantized trunk (its weights are not DTensors).
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor, distribute_tensor

from .. import adapters

logger = logging.getLogger(__name__)

RACK_PREFIX = "rack."  # the rack's attribute name in `StageModule`


def uses_fsdp(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def check_fsdp_support(accelerator, stages=()) -> None:
    """Refuses, before training, the FSDP settings this trainer cannot honour."""
    if not uses_fsdp(accelerator):
        return
    if not accelerator.is_fsdp2:
        raise ValueError(
            "FSDP1 wraps the rack's stacks in place and cannot re-wrap them when the next stage grows the rack; "
            "set `fsdp_version: 2` in the accelerate config (configs/accelerate/fsdp.yaml does)."
        )
    quantized = [stage.name or f"stages[{k}]" for k, stage in enumerate(stages) if stage.trunk_quantization]
    if quantized:
        raise ValueError(f"{quantized}: `trunk_quantization` under FSDP is not supported (quantized weights do not "
                         "shard as DTensors here); use one process, DDP, or `trunk_dtype` instead.")


def keep_loss_in_float32(accelerator) -> None:
    """Drops the `output_dtype` Accelerate puts in the FSDP2 mixed-precision policy (bf16/fp16 under
    `mixed_precision`): it casts every FSDP module's output, and the stage module's output is the loss,
    which the objective computes in float32. Stacks already hand on activations in their compute dtype."""
    if not uses_fsdp(accelerator):
        return
    plugin = accelerator.state.fsdp_plugin
    policy = getattr(plugin, "mixed_precision_policy", None)
    if policy is not None and getattr(policy, "output_dtype", None) not in (None, torch.float32):
        plugin.mixed_precision_policy = dataclasses.replace(policy, output_dtype=None)
        logger.info("FSDP: outputs keep their dtype (no cast to %s), so the loss stays float32.", policy.output_dtype)


def _full(value):
    """The whole tensor behind a shard (an all-gather: every process calls it, in the same order)."""
    return value.full_tensor() if isinstance(value, DTensor) else value


@torch.no_grad()
def plain_copy(rack, stage_module):
    """A plain (unsharded) copy of `rack` on the host, with the weights `stage_module` holds under FSDP.

    Every process must call it. The copy has the rack's config, adapters (same peft configs, active and
    trainable ones, merge records), `requires_grad` flags and generation config; each stack keeps its
    dtype (Accelerate upcasts trained low-precision weights to float32 while sharding).
    """
    full = {}
    for key, value in stage_module.state_dict().items():
        if key.startswith(RACK_PREFIX):
            # One tensor at a time to the host: the device never holds a second full copy of the rack.
            full[key[len(RACK_PREFIX):]] = _full(value).detach().to("cpu", copy=True)
    with torch.device("meta"):
        fresh = type(rack)(copy.deepcopy(rack.config))
    present = adapters.adapter_names(rack)
    if present:
        adapters.add_adapters_like(fresh, rack)
    expected = fresh.state_dict()
    missing, unexpected = sorted(set(expected) - set(full)), sorted(set(full) - set(expected))
    if missing or unexpected:
        raise RuntimeError(f"gathering the sharded rack: missing tensors {missing[:5]}, unexpected {unexpected[:5]}.")
    fresh.load_state_dict({k: full[k].to(expected[k].dtype) for k in expected}, assign=True, strict=True)
    if fresh.config.tie_word_embeddings:
        fresh.tie_weights()
    for name, buffer in rack.named_buffers():  # non-persistent buffers (RoPE) are not in the state dict
        if buffer.device.type != "meta":
            owner, _, leaf = name.rpartition(".")
            fresh.get_submodule(owner)._buffers[leaf] = buffer.detach().to("cpu")
    fresh.generation_config = copy.deepcopy(rack.generation_config)
    fresh._merged_adapters = adapters.merged_adapters(rack)
    _copy_training_flags(rack, fresh)
    return fresh


def _copy_training_flags(source, target) -> None:
    if adapters.adapter_names(source):
        adapters.activate_adapters(target, adapters.active_adapters(source),
                                   trainable=adapters.trainable_adapters(source))
    flags = {name: p.requires_grad for name, p in source.named_parameters()}
    for name, param in target.named_parameters():
        param.requires_grad_(flags.get(name, False))


def unshard_rack(rack, stage_module, device) -> None:
    """Gives `rack` itself plain modules on `device` holding the weights `stage_module` trained under
    FSDP: `plain_copy`'s modules (flags and adapters set) move under `rack`. Every process must call it."""
    for name, child in list(plain_copy(rack, stage_module).named_children()):
        setattr(rack, name, child)
    rack.to(device)
    logger.info("FSDP: gathered the rack into plain modules for the next stage.")


# Optimizer state ------------------------------------------------------------------------------------------


def gathered_optimizer_state(optimizer) -> dict:
    """`optimizer.state_dict()` with every sharded state tensor gathered whole, on the host (every process
    must call it); `checkpoint_format.save_optimizer` writes it keyed by parameter name."""
    state_dict = optimizer.state_dict()
    state = {index: {k: _full(v).detach().to("cpu") if torch.is_tensor(v) else v for k, v in values.items()}
             for index, values in state_dict["state"].items()}
    return {"state": state, "param_groups": state_dict["param_groups"]}


def shard_like_params(params: list, state: dict[int, dict]) -> dict[int, dict]:
    """Whole optimizer state tensors (by parameter index) sharded as their `DTensor` parameters are; state
    of plain parameters, and scalars such as `step`, is returned as it is."""
    out = {}
    for index, values in state.items():
        param = params[index]
        if isinstance(param, DTensor):
            values = {k: distribute_tensor(v.to(param.device, param.dtype), param.device_mesh, param.placements)
                      if torch.is_tensor(v) and v.shape == param.shape else v for k, v in values.items()}
        out[index] = values
    return out
