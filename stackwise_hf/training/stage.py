"""Entering a stage: grow the rack, attach adapters, decide what trains, and the module one stage trains.

`StageModule` is what `accelerator.prepare` wraps (DDP, FSDP): the frozen prefix of the rack runs
under `no_grad`, then the trained stacks, the final norm and the objective's loss. Calling the
rack's parts through one module keeps DDP's gradient hooks and FSDP's wrap units in the path.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import adapters
from ..layout import TRUNK
from ..quantization import SCHEMES, quantize_stacks, quantized_stacks
from ..serialization import is_adapter_key
from .flops import StageFlops
from .schedule import ResolvedStage

logger = logging.getLogger(__name__)

TRUNK_ADAPTER = TRUNK


@dataclass
class StageRun:
    """The objects of the stage being trained; dropped as a whole when the stage ends.

    `train_data` is the dataset behind `train_loader` (what the trunk cache covers); `sampler` is the
    trainer's `EpochSampler`, None for a caller's DataLoader. `step_losses` holds one loss per optimizer
    step of this run (device tensors, reduced across processes only when read).
    """

    stage: ResolvedStage
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_loader: object
    train_data: object
    sampler: object
    objective: object
    total_steps: int
    trainable: list[str]
    started: float = field(default_factory=time.perf_counter)
    step_losses: list[torch.Tensor] = field(default_factory=list)
    flops: StageFlops | None = None  # what a step computes (`flops.py`)
    grad_norm: float | None = None  # of the last optimizer step, before clipping


def trunk_stacks(stage: ResolvedStage) -> list[int]:
    """The stacks a stage does not train: every stack but the stage's own (its frozen trunk, and for a
    prepend stage the frozen suffix)."""
    return [i for i in range(len(stage.stack_sizes)) if i != stage.stack]


def stack_roles(stage: ResolvedStage) -> list[str]:
    """What each stack of the stage's rack does: "trained" (its base weights train), "adapter" (frozen
    base weights under an adapter that trains) or "frozen". The same rules as `set_trainable`."""
    config = stage.config
    n = len(stage.stack_sizes)
    if "all" in config.train:
        return ["trained"] * n
    trunk_adapter = "trunk_adapter" in config.train and config.trunk_adapter is not None
    roles = []
    for i in range(n):
        if i == stage.stack:
            roles.append("trained" if config.trains("stack") else
                         "adapter" if "stack_adapter" in config.train else "frozen")
        else:
            roles.append("adapter" if trunk_adapter else "frozen")
    return roles


def first_trained_index(stage: ResolvedStage) -> int:
    """The first stack the stage runs with gradients (what `first_trained_stack` finds on the live rack):
    0 when the embeddings train, else the first stack that is not frozen (the rack's length when none is).
    Stacks before it are the frozen trunk: under no_grad, cacheable, and the part that may live on the host."""
    if stage.config.trains("embeddings"):
        return 0
    roles = stack_roles(stage)
    return next((i for i, role in enumerate(roles) if role != "frozen"), len(roles))


def trunk_on_host(stage: ResolvedStage, device_type: str, num_processes: int) -> bool:
    """Whether the frozen trunk is kept on the host during the stage: in cache mode, with a trunk to cache,
    on one process with an accelerator. Several processes keep it on the device (DDP and FSDP expect
    every parameter of the wrapped module there)."""
    return (stage.config.trunk_mode == "cache" and first_trained_index(stage) > 0 and device_type != "cpu"
            and num_processes == 1)


NF4_BLOCK = 64  # bitsandbytes quantizes NF4 weights in blocks of 64 input features


def check_trunk_quantization(config, schedule: list[ResolvedStage]) -> None:
    """Refuses, before training, NF4 stages over a rack whose projections bitsandbytes cannot block: every
    projection's input width must be a whole number of 64-feature blocks (its CPU kernels reshape the block
    scales per row, and fail deep inside evaluation otherwise)."""
    widths = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
              "num_attention_heads * head_dim": config.num_attention_heads * config.head_dim}
    bad = {name: width for name, width in widths.items() if width % NF4_BLOCK}
    for stage in schedule:
        if stage.config.trunk_quantization == "nf4" and bad:
            raise ValueError(
                f"stage {stage.name}: `trunk_quantization: nf4` quantizes in blocks of {NF4_BLOCK} input features "
                f"(bitsandbytes); this rack's {bad} are not multiples of {NF4_BLOCK}. Use `int8`, or a rack whose "
                "widths are."
            )


def grow_for_stage(rack, stage: ResolvedStage) -> None:
    """Applies the stage's growth, adapters and trunk precision to the rack (once, on stage entry)."""
    config = stage.config
    if config.grow == "append":
        rack.append_stack(config.n_blocks, init=config.init, dtype=config.dtype)
    elif config.grow == "prepend":
        rack.prepend_stack(config.n_blocks, init=config.init, dtype=config.dtype)
    if list(rack.config.stack_sizes) != list(stage.stack_sizes):
        raise RuntimeError(
            f"stage {stage.name}: the rack has stacks {rack.config.stack_sizes}, the schedule expected "
            f"{list(stage.stack_sizes)}; was the rack changed outside the trainer?"
        )
    trunk = trunk_stacks(stage)
    if config.trunk_dtype is not None or config.trunk_quantization is not None:
        quantized = quantized_stacks(rack)
        if config.trunk_dtype is not None:
            for i in trunk:
                if i not in quantized:  # a quantized stack keeps its codes; its dtype is the compute dtype
                    rack.cast_stack(i, config.trunk_dtype)
        if config.trunk_quantization is not None:
            quantize_stacks(rack, trunk, bits=SCHEMES[config.trunk_quantization])
    if config.trunk_adapter is not None or config.stack_adapter is not None:
        _attach_adapters(rack, stage, trunk)


def _attach_adapters(rack, stage: ResolvedStage, trunk: list[int]) -> None:
    config = stage.config
    existing = adapters.adapter_names(rack)
    if config.trunk_adapter is not None and trunk:
        if TRUNK_ADAPTER in existing:
            # The previous stage's trunk adapter becomes part of the weights (a ReLoRA-style cycle).
            adapters.merge_stack_adapter(rack, TRUNK_ADAPTER)
        adapters.add_trunk_adapter(rack, trunk, adapters.AdapterSettings.from_dict(config.trunk_adapter))
    name = f"stack_{stage.stack}"
    if config.stack_adapter is not None and name not in adapters.adapter_names(rack):
        adapters.add_stack_adapter(rack, stage.stack, adapters.AdapterSettings.from_dict(config.stack_adapter))


def set_trainable(rack, stage: ResolvedStage) -> list[str]:
    """Freezes everything, then unfreezes what the stage trains. Returns the trainable parameter names."""
    config = stage.config
    rack.requires_grad_(False)
    if config.trains("stack"):
        rack.unfreeze_stacks([stage.stack])
    if config.trains("head"):
        for param in rack.head_parameters():
            param.requires_grad_(True)
    if config.trains("embeddings"):
        rack.get_input_embeddings().weight.requires_grad_(True)
    if "all" in config.train:
        rack.unfreeze_stacks()
    active = []
    if config.trains("stack_adapter"):
        active.append(f"stack_{stage.stack}")
    if config.trains("trunk_adapter") and config.trunk_adapter is not None:
        active.append(TRUNK_ADAPTER)
    if active or getattr(rack, "peft_config", None):
        present = adapters.adapter_names(rack)
        # Adapters of earlier stages stay in the forward pass (frozen); this stage's ones train.
        adapters.activate_adapters(rack, present, trainable=[a for a in active if a in present])
    names = [n for n, p in rack.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError(f"stage {stage.name}: `train: {config.train}` leaves nothing trainable.")
    return names


def first_trained_stack(rack, train_embeddings: bool) -> int:
    """Index of the first stack that needs gradients: every stack before it is the frozen trunk that
    runs under no_grad (the rack's length when only the head trains; 0 when the embeddings train)."""
    if train_embeddings:
        return 0
    for i, stack in enumerate(rack.base_model.stacks):
        if any(p.requires_grad for p in stack.parameters()):
            return i
    return rack.num_stacks


def optimizer_groups(rack, weight_decay: float) -> list[dict]:
    """AdamW parameter groups over exactly the trainable parameters; matrices decay, norms and
    embeddings do not. Each group carries the parameter names (`names`) for name-keyed state."""
    decay, no_decay = ([], []), ([], [])
    embedding = rack.get_input_embeddings().weight
    for name, param in rack.named_parameters():
        if not param.requires_grad:
            continue
        target = decay if param.ndim >= 2 and param is not embedding and weight_decay > 0 else no_decay
        target[0].append(name)
        target[1].append(param)
    groups = []
    for (names, params), wd in ((decay, weight_decay), (no_decay, 0.0)):
        if params:
            groups.append({"params": params, "names": names, "weight_decay": wd})
    return groups


class StageModule(nn.Module):
    """One stage's forward: frozen prefix under no_grad, trained stacks, final norm, objective loss.

    Args:
        rack: the rack (`StackWiseForCausalLM` or `StackWiseForMaskedLM`).
        objective: an objective from `objectives.py` (provides `loss`).
        first_trained (`int`): stacks `[0, first_trained)` are the frozen trunk.
        train_embeddings (`bool`): the input embedding trains, so the whole rack runs with grad.
        stop (`int`, *optional*): run stacks `[0, stop)` only, the head on top of stack `stop - 1`
            (`train_rack(..., target_stacks=stop)`); default every stack.

    `forward` returns `(mean loss, number of positions)`.
    """

    def __init__(self, rack, objective, first_trained: int, train_embeddings: bool = False, stop: int | None = None):
        super().__init__()
        self.rack = rack
        self.objective = objective
        self.first_trained = first_trained
        self.train_embeddings = train_embeddings
        self.stop = stop

    def trunk_forward(self, input_ids: torch.Tensor, attention_mask=None, position_ids=None) -> torch.Tensor:
        """The frozen trunk's output (hidden states entering `first_trained`), without grad."""
        body = self.rack.base_model
        with torch.no_grad():
            hidden = body.embed_tokens(input_ids)
            attention = body.attention_inputs(hidden, attention_mask, position_ids)
            return body.forward_stacks(hidden, 0, self.first_trained, **attention)

    def forward(self, input_ids=None, labels=None, weights=None, trunk_hidden=None, attention_mask=None,
                position_ids=None):
        # attention_mask / position_ids: packed documents kept apart (`stackwise_hf.packing`), or None.
        body = self.rack.base_model
        if trunk_hidden is not None:
            hidden = trunk_hidden
        elif self.train_embeddings:
            hidden = body.embed_tokens(input_ids)
        else:
            hidden = self.trunk_forward(input_ids, attention_mask, position_ids)
        attention = body.attention_inputs(hidden, attention_mask, position_ids)
        hidden = body.forward_stacks(hidden, self.first_trained, self.stop, **attention)  # (B, T, H)
        hidden = body.norm(hidden.to(body.norm.weight.dtype))
        return self.objective.loss(hidden, self.rack.get_output_embeddings(), labels, weights)


def count_parameters(rack) -> dict:
    trainable = sum(p.numel() for p in rack.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in rack.named_parameters() if not is_adapter_key(n))
    return {"trainable_parameters": trainable, "total_parameters": total}
