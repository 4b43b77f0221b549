"""Entering a stage: grow the rack, attach adapters, decide what trains, and the module one stage trains.

`StageModule` is what `accelerator.prepare` wraps (DDP, FSDP): the frozen prefix of the rack runs
under `no_grad`, then the trained stacks, the final norm and the objective's loss. Calling the
rack's parts through one module keeps DDP's gradient hooks and FSDP's wrap units in the path.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..serialization import is_adapter_key
from .schedule import ResolvedStage

logger = logging.getLogger(__name__)

TRUNK_ADAPTER = "trunk"


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
    trunk = [i for i in range(rack.num_stacks) if i != stage.stack]
    if config.trunk_dtype is not None or config.trunk_quantization is not None:
        from ..quantization import SCHEMES, quantize_stacks, quantized_stacks

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
    from .. import adapters

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
        from .. import adapters

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

    `forward` returns `(mean loss, number of positions)`.
    """

    def __init__(self, rack, objective, first_trained: int, train_embeddings: bool = False):
        super().__init__()
        self.rack = rack
        self.objective = objective
        self.first_trained = first_trained
        self.train_embeddings = train_embeddings

    def trunk_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The frozen trunk's output (hidden states entering `first_trained`), without grad."""
        body = self.rack.base_model
        with torch.no_grad():
            hidden = body.embed_tokens(input_ids)
            attention = body.attention_inputs(hidden)
            return body.forward_stacks(hidden, 0, self.first_trained, **attention)

    def forward(self, input_ids=None, labels=None, weights=None, trunk_hidden=None):
        body = self.rack.base_model
        if trunk_hidden is not None:
            hidden = trunk_hidden
        elif self.train_embeddings:
            hidden = body.embed_tokens(input_ids)
        else:
            hidden = self.trunk_forward(input_ids)
        attention = body.attention_inputs(hidden)
        hidden = body.forward_stacks(hidden, self.first_trained, **attention)
        hidden = body.norm(hidden.to(body.norm.weight.dtype))
        return self.objective.loss(hidden, self.rack.get_output_embeddings(), labels, weights)


def count_parameters(rack) -> dict:
    trainable = sum(p.numel() for p in rack.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in rack.named_parameters() if not is_adapter_key(n))
    return {"trainable_parameters": trainable, "total_parameters": total}
