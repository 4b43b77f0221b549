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
FSDP therefore shards a stage's training step (the trained weights, their gradients and optimizer state,
and the frozen trunk's weights while the stage runs); between stages every process holds the whole rack,
as under DDP.

FSDP1 wraps modules in place (the rack's stacks would become `FullyShardedDataParallel` wrappers
that the next stage cannot re-wrap), so it is refused with a pointer to `fsdp_version: 2`.
"""

from __future__ import annotations

import copy
import logging

import torch
from accelerate.utils import DistributedType

logger = logging.getLogger(__name__)

RACK_PREFIX = "rack."  # the rack's attribute name in `StageModule`


def uses_fsdp(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def check_fsdp_support(accelerator, args, stages=()) -> None:
    """Refuses, before training, the FSDP settings this trainer cannot honour."""
    if not uses_fsdp(accelerator):
        return
    if not accelerator.is_fsdp2:
        raise ValueError(
            "FSDP1 wraps the rack's stacks in place and cannot re-wrap them when the next stage grows the rack; "
            "set `fsdp_version: 2` in the accelerate config (configs/accelerate/fsdp.yaml does)."
        )
    if args.save_interval:
        raise ValueError(
            f"`save_interval={args.save_interval}`: mid-stage checkpoints would need the sharded optimizer state, "
            "which this trainer does not gather yet under FSDP; leave `save_interval` unset (a checkpoint is still "
            "written at the end of every stage)."
        )
    quantized = [stage.name or f"stages[{k}]" for k, stage in enumerate(stages) if stage.trunk_quantization]
    if quantized:
        raise ValueError(f"{quantized}: `trunk_quantization` under FSDP is not supported (quantized weights do not "
                         "shard as DTensors here); use one process, DDP, or `trunk_dtype` instead.")


@torch.no_grad()
def unshard_rack(rack, stage_module) -> None:
    """Gives `rack` plain (unsharded) modules, on the host, holding the weights `stage_module` trained
    under FSDP.

    Every process must call it (gathering a shard is a collective). The rack object, its config, its
    adapters' configs, which adapters are active and which parameters require grad are kept; each stack
    keeps its dtype (Accelerate upcasts trained low-precision weights to float32 while sharding).
    """
    from torch.distributed.tensor import DTensor

    from .. import adapters

    full = {}
    for key, value in stage_module.state_dict().items():
        if not key.startswith(RACK_PREFIX):
            continue
        if isinstance(value, DTensor):
            value = value.full_tensor()  # an all-gather: the same keys in the same order on every process
        # One tensor at a time to the host: the device never holds a second full copy of the rack.
        full[key[len(RACK_PREFIX):]] = value.detach().to("cpu", copy=True)
    requires_grad = {name: p.requires_grad for name, p in rack.named_parameters()}
    present = adapters.adapter_names(rack)
    active, trainable = (adapters.active_adapters(rack), adapters.trainable_adapters(rack)) if present else ([], [])

    with torch.device("meta"):
        fresh = type(rack)(copy.deepcopy(rack.config))
    if present:
        adapters.add_adapters_like(fresh, rack)
    expected = fresh.state_dict()
    missing, unexpected = sorted(set(expected) - set(full)), sorted(set(full) - set(expected))
    if missing or unexpected:
        raise RuntimeError(f"unsharding the rack: missing tensors {missing[:5]}, unexpected {unexpected[:5]}.")
    fresh.load_state_dict({k: full[k].to(expected[k].dtype) for k in expected}, assign=True, strict=True)
    if fresh.config.tie_word_embeddings:
        fresh.tie_weights()
    for name, buffer in rack.named_buffers():  # non-persistent buffers (RoPE) are not in the state dict
        if buffer.device.type != "meta":
            owner, _, leaf = name.rpartition(".")
            fresh.get_submodule(owner)._buffers[leaf] = buffer.detach().to("cpu")

    for name, child in list(fresh.named_children()):
        setattr(rack, name, child)
    if present:
        adapters.activate_adapters(rack, active, trainable=trainable)
    for name, param in rack.named_parameters():
        param.requires_grad_(requires_grad.get(name, False))
    logger.info("FSDP: gathered the rack's %d tensors into plain modules for the next stage.", len(full))
