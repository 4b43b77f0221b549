"""The stage schedule: how the rack grows and what trains, stage by stage, as data.

A schedule is a list of `StageConfig` (YAML section `stages:`). `resolve_schedule` replays the
growth on the rack's stack layout before any training starts, so a schedule that names a stack
that will not exist, or grows past `max_stacks`, fails at once with the stage's index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..adapters import AdapterSettings
from ..config_io import check_choice, check_positive
from ..configuration_stackwise import canonical_dtype
from ..growth import INIT_MODES
from .objectives import OBJECTIVES

GROW = (None, "append", "prepend")
TRAIN_PARTS = ("stack", "head", "embeddings", "stack_adapter", "trunk_adapter", "all")
TRUNK_MODES = ("recompute", "cache")
TRUNK_QUANTIZATIONS = ("int8", "nf4")


@dataclass
class StageConfig:
    """One stage of progressive training.

    Args:
        name (`str`, *optional*): label for logs and plots; defaults to "stage_<k>".
        grow (`str`, *optional*): "append" (left-to-right: the new stack trains over a frozen trunk),
            "prepend" (right-to-left: the new stack trains under a frozen suffix and head), or null
            (no growth, e.g. the first stage or a final fusion pass).
        n_blocks (`int`, *optional*): blocks of the new stack (required when `grow` is set).
        init (`str`): "random", "copy" or "identity" initialisation of the new stack.
        dtype (`str`, *optional*): dtype of the new stack ("float32", "bf16", "half", ...).
        stack (`int`, *optional*): the stage's stack; defaults to the new stack, or for a stage without
            growth to the most recently added stack (the last stack at the start).
        train (`list[str]`): what trains: "stack" (the stage's stack), "head" (final norm and LM head),
            "embeddings", "stack_adapter" (a LoRA adapter on the stage's stack; its base weights stay
            frozen), "trunk_adapter" (a LoRA adapter over every other stack), "all" (everything: a
            fusion pass). Everything not listed is frozen.
        stack_adapter (`dict`, *optional*): `AdapterSettings` fields of the stage's stack adapter.
        trunk_adapter (`dict`, *optional*): `AdapterSettings` fields of the trunk adapter. An earlier
            trunk adapter is merged into the weights first (a ReLoRA-style cycle).
        merge_adapters (`bool`): fold the stage's adapters into the base weights when the stage ends.
        trunk_dtype (`str`, *optional*): cast the frozen stacks to this dtype when the stage starts.
        trunk_quantization (`str`, *optional*): "int8" or "nf4": quantize the frozen stacks' projections
            when the stage starts (`stackwise_hf.quantization`, QLoRA-style; adapters train on top). A
            quantized stack stays quantized: later stages may not train it, nor merge adapters into it.
        trunk_mode (`str`): "recompute" (frozen trunk forward every step) or "cache" (trunk output
            computed once and reused).
        objective (`str`): "clm", "mlm", "masked_diffusion" or "depth_as_time".
        mask_ratio (`float`, *optional*): this stage's mask ratio for "depth_as_time" (otherwise taken
            from the objective's depth schedule).
        max_steps (`int`, *optional*): optimizer steps of the stage (exclusive with `num_epochs`).
        num_epochs (`float`, *optional*): passes over the training split.
        learning_rate (`float`): peak learning rate.
        lr_scheduler_type (`str`): any `transformers.get_scheduler` name ("cosine", "linear", "constant", ...).
        warmup_steps (`int`): linear warmup steps.
        weight_decay (`float`): AdamW weight decay (matrices only; norms and embeddings excluded).
        gradient_checkpointing (`bool`): recompute the trained stack's activations in the backward pass.
    """

    name: str | None = None
    grow: str | None = None
    n_blocks: int | None = None
    init: str = "random"
    dtype: str | None = None
    stack: int | None = None
    train: list[str] = field(default_factory=lambda: ["stack", "head"])
    stack_adapter: dict[str, Any] | None = None
    trunk_adapter: dict[str, Any] | None = None
    merge_adapters: bool = False
    trunk_dtype: str | None = None
    trunk_quantization: str | None = None
    trunk_mode: str = "recompute"
    objective: str = "clm"
    mask_ratio: float | None = None
    max_steps: int | None = None
    num_epochs: float | None = None
    learning_rate: float = 1e-3
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    gradient_checkpointing: bool = False

    def __post_init__(self):
        check_choice("grow", self.grow, GROW)
        check_choice("init", self.init, INIT_MODES)
        check_choice("trunk_mode", self.trunk_mode, TRUNK_MODES)
        if self.trunk_quantization is not None:
            check_choice("trunk_quantization", self.trunk_quantization, TRUNK_QUANTIZATIONS)
        check_choice("objective", self.objective, OBJECTIVES)
        if isinstance(self.train, str):
            self.train = [self.train]
        for part in self.train:
            check_choice("train", part, TRAIN_PARTS)
        if not self.train:
            raise ValueError(f"`train` must name at least one of {list(TRAIN_PARTS)}.")
        if self.grow is not None:
            check_positive("n_blocks", self.n_blocks)
        elif self.n_blocks is not None:
            raise ValueError(f"`n_blocks` ({self.n_blocks}) is only meaningful with `grow`; got grow=null.")
        if self.dtype is not None:
            self.dtype = canonical_dtype(self.dtype, "dtype")
        if self.trunk_dtype is not None:
            self.trunk_dtype = canonical_dtype(self.trunk_dtype, "trunk_dtype")
        if (self.max_steps is None) == (self.num_epochs is None):
            raise ValueError(
                f"give exactly one of `max_steps` and `num_epochs`; got max_steps={self.max_steps!r}, "
                f"num_epochs={self.num_epochs!r}."
            )
        check_positive("max_steps", self.max_steps, optional=True)
        check_positive("num_epochs", self.num_epochs, optional=True, number=float)
        check_positive("learning_rate", self.learning_rate, number=float)
        if "stack_adapter" in self.train and self.stack_adapter is None:
            self.stack_adapter = {}
        if "trunk_adapter" in self.train and self.trunk_adapter is None:
            self.trunk_adapter = {}
        for field_name in ("stack_adapter", "trunk_adapter"):
            settings = getattr(self, field_name)
            if settings is not None:
                _check_adapter_settings(field_name, settings)
        if self.mask_ratio is not None and not 0 < self.mask_ratio <= 1:
            raise ValueError(f"`mask_ratio` must be in (0, 1]; got {self.mask_ratio!r}.")
        if self.stack is not None and (isinstance(self.stack, bool) or not isinstance(self.stack, int)):
            raise ValueError(f"`stack` must be an integer index; got {self.stack!r}.")

    def trains(self, part: str) -> bool:
        return part in self.train or "all" in self.train


def _check_adapter_settings(field_name: str, settings) -> None:
    """A bad adapter field fails when the schedule is read, not when its stage starts."""
    if not isinstance(settings, dict):
        raise ValueError(f"`{field_name}` must be a mapping of adapter settings; got {settings!r}.")
    try:
        AdapterSettings.from_dict(settings)
    except ValueError as error:
        raise ValueError(f"`{field_name}`: {error}") from error


@dataclass(frozen=True)
class ResolvedStage:
    """A stage with its stack index and the rack layout it runs on, computed before training."""

    index: int
    name: str
    config: StageConfig
    stack: int
    stack_sizes: tuple[int, ...]


def resolve_schedule(stages: list[StageConfig], stack_sizes: list[int], max_stacks: int | None = None) -> list[ResolvedStage]:
    """Replays the schedule's growth on `stack_sizes` and checks every stage against it.

    Raises:
        ValueError: naming the stage when the rack would exceed `max_stacks`, a stage's `stack`
            does not exist at that point, or a stage would train or merge into a quantized stack.
    """
    if not stages:
        raise ValueError("the schedule has no stages.")
    sizes = list(stack_sizes)
    if max_stacks is not None and len(sizes) > max_stacks:
        raise ValueError(f"the initial rack has {len(sizes)} stacks, more than max_stacks={max_stacks}.")
    latest = len(sizes) - 1
    resolved = []
    quantized: set[int] = set()  # stacks a `trunk_quantization` stage quantized
    trunk_adapter = False  # a trunk adapter is on the rack (merged by a new one or by `merge_adapters`)
    for k, stage in enumerate(stages):
        name = stage.name or f"stage_{k}"
        if stage.grow == "append":
            sizes.append(stage.n_blocks)
            latest = len(sizes) - 1
        elif stage.grow == "prepend":
            sizes.insert(0, stage.n_blocks)
            latest = 0
        if max_stacks is not None and len(sizes) > max_stacks:
            raise ValueError(
                f"stages[{k}] ({name}) grows the rack to {len(sizes)} stacks, beyond max_stacks={max_stacks}."
            )
        stack = latest if stage.stack is None else stage.stack
        if not -len(sizes) <= stack < len(sizes):
            raise ValueError(
                f"stages[{k}] ({name}) names stack {stack}, but the rack has {len(sizes)} stacks at that point "
                f"(valid: 0..{len(sizes) - 1})."
            )
        stack %= len(sizes)
        quantized = _check_quantized_trunk(k, name, stage, stack, len(sizes), quantized, trunk_adapter)
        trunk_adapter = (trunk_adapter or stage.trunk_adapter is not None) and not stage.merge_adapters
        resolved.append(ResolvedStage(k, name, stage, stack, tuple(sizes)))
    return resolved


def _check_quantized_trunk(k: int, name: str, stage: StageConfig, stack: int, n_stacks: int, quantized: set[int],
                           trunk_adapter: bool) -> set[int]:
    """The quantized stacks after stage k (indices shift on prepend); raises when the stage would train
    a quantized stack or merge an adapter into one. `trunk_adapter`: a trunk adapter is on the rack."""
    if stage.grow == "prepend":
        quantized = {i + 1 for i in quantized}
    where = f"stages[{k}] ({name})"
    if quantized and "all" in stage.train:
        raise ValueError(f"{where} trains `all`, but stacks {sorted(quantized)} are quantized (trunk_quantization).")
    if stack in quantized and "stack" in stage.train:
        raise ValueError(f"{where} trains stack {stack}, which an earlier stage quantized (trunk_quantization).")
    if stage.trunk_quantization is not None:
        if "all" in stage.train:
            raise ValueError(f"{where}: `trunk_quantization` freezes the trunk; `train: all` would train it.")
        quantized = quantized | {i for i in range(n_stacks) if i != stack}
    live = trunk_adapter or stage.trunk_adapter is not None
    if quantized and ((trunk_adapter and stage.trunk_adapter is not None) or (live and stage.merge_adapters)):
        raise ValueError(f"{where} would merge the trunk adapter into the trunk (a new trunk adapter or "
                         f"`merge_adapters`), and stacks {sorted(quantized)} are quantized; merging into 8/4-bit "
                         "weights is not supported.")
    return quantized
