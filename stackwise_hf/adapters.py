"""Per-stack LoRA adapters on a rack ("dual LoRA"), done by peft.

Every stack can carry its own named LoRA adapter (`stack_0`, `stack_1`, ...) that targets only that
stack's projections, and a `trunk` adapter can span several (typically frozen) stacks so the trunk
adjusts without retraining its base weights. The rack stays the object users hold: adapters are
injected with peft's integration API (`peft.functional`), which leaves `rack.peft_config` (adapter
name -> `LoraConfig`) on the rack and `LoraLayer`s in place of the targeted `nn.Linear`s.

Saving and loading, in peft's own format plus a manifest, are `adapter_files`'s (`save_adapters`,
`load_adapters`), as part of the rack's files.

What the rack records about an adapter (its stacks, projections, rank and alpha per stack) is read
back from the adapted modules themselves, so it stays true after growth moves stacks around.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import re
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from peft import LoraConfig, PeftConfig
from peft.functional import (
    cast_adapter_dtype,
    delete_adapter,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_adapter,
    set_peft_model_state_dict,
    set_requires_grad,
)
from peft.tuners.lora import LoraLayer

from .errors import ShapeMismatchError
from .layout import (
    ATTENTION_PROJECTIONS,
    MLP_PROJECTIONS,
    PROJECTIONS,
    STACK_ADAPTER,
    TRUNK,
    stack_adapter_name,
)
from .quantization import quantized_stacks
from .stacks import check_stack_indices, is_adapter_key

logger = logging.getLogger(__name__)

TARGET_PRESETS = {"attention": ATTENTION_PROJECTIONS, "mlp": MLP_PROJECTIONS, "all-linear": PROJECTIONS}
STRATEGIES = ("constant", "increasing", "decreasing", "list")
# Initialisations that leave the base weights untouched and need no data (PiSSA, OLoRA, LoftQ, EVA
# and CorDA rewrite base weights or need calibration data, which a frozen trunk must not see).
INIT_LORA_WEIGHTS = (True, False, "gaussian")

# An adapter parameter's name: `...q_proj.lora_A.stack_0.weight` -> `stack_0`.
_ADAPTER_PARAM = re.compile(r"(?:^|\.)lora_[A-Za-z_]+\.([^.]+)(?:\.|$)")
# Warnings peft gives for what this module does on purpose: several adapters on one model (the
# whole point of per-stack adapters), and re-activating adapters after a deletion (activity is set
# again right after, from the state captured before).
_EXPECTED_PEFT_WARNINGS = (
    r"Already found a `peft_config` attribute in the model",
    r"Adapter .* was active which is now deleted",
)


# Rank and alpha schedule ----------------------------------------------------------------------------


@dataclasses.dataclass
class AdapterSettings:
    """How big each stack's LoRA adapter is and which projections it adapts.

    Ranks follow the original system's strategies: "constant" (its "simplified": every stack gets `r`),
    "increasing" and "decreasing" (its "progressive": `r * step**i` and `r // step**i` for stack `i`,
    clamped to `[min_r, max_r]`), and "list" (its "variable": `r_list[i]` for stack `i`). Built from
    a plain dict whose keys equal the field names (the trainer's stage YAML embeds one).

    Args:
        r (`int`, defaults to 8): rank of stack 0 (of every stack for "constant").
        lora_alpha (`float`, defaults to 16): alpha that goes with rank `r`.
        strategy (`str`, defaults to "constant"): one of "constant", "increasing", "decreasing", "list".
        step (`int`, defaults to 2): factor between neighbouring stacks' ranks for "increasing" / "decreasing".
        min_r (`int`, defaults to 1): smallest rank a strategy may give.
        max_r (`int`, *optional*): largest rank a strategy may give.
        r_list (`list[int]`, *optional*): rank of each stack, for "list".
        alpha_list (`list[float]`, *optional*): alpha of each stack, for "list"; defaults to following `scale_alpha`.
        scale_alpha (`bool`, defaults to `True`): scale alpha with the rank so `alpha / r` (the size of the
            update) stays the same on every stack; `False` keeps `lora_alpha` on every stack.
        target (`str` or `list[str]`, defaults to "all-linear"): "attention" (q/k/v/o), "mlp" (gate/up/down),
            "all-linear", or a list of projection names.
        lora_dropout (`float`, defaults to 0.0): dropout on the adapter's input.
        use_rslora (`bool`, defaults to `False`): peft's rank-stabilised scaling `alpha / sqrt(r)`.
        use_dora (`bool`, defaults to `False`): peft's DoRA (weight-decomposed LoRA): the adapted weight's
            direction gets the low-rank update and a learned per-output magnitude rescales it. Saved, loaded
            and merged like LoRA.
        init_lora_weights (`bool` or `str`, defaults to `True`): peft's init: `True` (Kaiming A, zero B, so
            a new adapter changes nothing), "gaussian" (Gaussian A, zero B), or `False` (random B: the
            adapter changes the function from the start; for tests).

    Example:

    ```python
    >>> from stackwise_hf.adapters import AdapterSettings
    >>> settings = AdapterSettings.from_dict({"r": 4, "lora_alpha": 8, "strategy": "increasing", "max_r": 16})
    >>> [settings.rank_for(i) for i in range(4)]
    [(4, 8), (8, 16), (16, 32), (16, 32)]
    ```
    """

    r: int = 8
    lora_alpha: float = 16
    strategy: str = "constant"
    step: int = 2
    min_r: int = 1
    max_r: int | None = None
    r_list: list[int] | None = None
    alpha_list: list[float] | None = None
    scale_alpha: bool = True
    target: str | list[str] = "all-linear"
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True

    def __post_init__(self):
        for name in ("r", "step", "min_r"):
            _check_positive_int(name, getattr(self, name))
        if self.max_r is not None:
            _check_positive_int("max_r", self.max_r)
            if self.max_r < self.min_r:
                raise ValueError(f"`max_r` ({self.max_r}) must be at least `min_r` ({self.min_r}).")
        _check_positive_number("lora_alpha", self.lora_alpha)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"`strategy` must be one of {list(STRATEGIES)}; got {self.strategy!r}.")
        if (self.strategy == "list") != (self.r_list is not None):
            raise ValueError(
                f"`r_list` is given exactly when `strategy` is 'list'; "
                f"got strategy={self.strategy!r}, r_list={self.r_list!r}."
            )
        if self.r_list is not None:
            self.r_list = [_check_positive_int("r_list", r) for r in self.r_list]
        if self.alpha_list is not None:
            if self.r_list is None or len(self.alpha_list) != len(self.r_list):
                raise ValueError(f"`alpha_list` needs one entry per `r_list` entry; got {self.alpha_list!r}.")
            self.alpha_list = [_check_positive_number("alpha_list", a) for a in self.alpha_list]
        _projections(self.target)
        for name in ("scale_alpha", "use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be true or false; got {getattr(self, name)!r}.")
        if not (isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1):
            raise ValueError(f"`lora_dropout` must be in [0, 1); got {self.lora_dropout!r}.")
        if not (isinstance(self.init_lora_weights, bool) or self.init_lora_weights in INIT_LORA_WEIGHTS):
            raise ValueError(
                f"`init_lora_weights` must be one of {list(INIT_LORA_WEIGHTS)}; got {self.init_lora_weights!r}."
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterSettings:
        """Builds settings from a mapping whose keys are field names; unknown keys raise ValueError."""
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ValueError(f"Unknown adapter setting(s) {unknown}; allowed fields are {allowed}.")
        return cls(**data)

    @property
    def projections(self) -> tuple[str, ...]:
        """The projection names `target` stands for, in the rack's module order."""
        return _projections(self.target)

    def rank_for(self, stack_idx: int) -> tuple[int, float]:
        """`(r, lora_alpha)` of stack `stack_idx`'s adapter.

        It depends on the index alone, not on how many stacks the rack has, so a stack's adapter keeps
        its size as the rack grows.
        """
        if self.strategy == "list":
            if stack_idx >= len(self.r_list):
                raise ValueError(
                    f"`r_list` has {len(self.r_list)} entries; stack {stack_idx} needs one: {self.r_list!r}."
                )
            r = self.r_list[stack_idx]
            if self.alpha_list is not None:
                return r, _tidy(self.alpha_list[stack_idx])
        else:
            r = {
                "constant": self.r,
                "increasing": self.r * self.step**stack_idx,
                "decreasing": self.r // self.step**stack_idx,
            }[self.strategy]
            r = max(r, self.min_r) if self.max_r is None else min(max(r, self.min_r), self.max_r)
        alpha = self.lora_alpha * r / self.r if self.scale_alpha else self.lora_alpha
        return r, _tidy(alpha)

    def lora_config(self, stacks: Sequence[int]) -> LoraConfig:
        """A peft `LoraConfig` adapting `stacks` (one stack, or a trunk), with per-stack ranks."""
        ranks = {i: self.rank_for(i) for i in stacks}
        return LoraConfig(
            lora_dropout=self.lora_dropout,
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
            init_lora_weights=self.init_lora_weights,
            **_targeting(ranks, self.projections),
        )


def _projections(target) -> tuple[str, ...]:
    if isinstance(target, str):
        if target not in TARGET_PRESETS:
            raise ValueError(
                f"`target` must be one of {list(TARGET_PRESETS)} or a list of {list(PROJECTIONS)}; got {target!r}."
            )
        return TARGET_PRESETS[target]
    names = list(target)
    unknown = [n for n in names if n not in PROJECTIONS]
    if not names or unknown:
        raise ValueError(f"`target` lists must name some of {list(PROJECTIONS)}; got {target!r}.")
    return tuple(p for p in PROJECTIONS if p in names)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
    return value


def _check_positive_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"`{name}` must be a positive number; got {value!r}.")
    return value


def _tidy(alpha: float) -> float:
    return int(alpha) if float(alpha).is_integer() else float(alpha)


def _stack_pattern(stacks: Iterable[int]) -> str:
    return rf"stacks\.({'|'.join(str(i) for i in sorted(stacks))})\.blocks\.\d+\."


def _targeting(ranks: dict[int, tuple[int, float]], projections: Sequence[str]) -> dict[str, Any]:
    """`LoraConfig` fields that adapt `projections` in the given stacks, with `{stack: (r, alpha)}`.

    `target_modules` is one regex, which peft full-matches against module names; the `(.*\\.)?` head
    lets it match a bare `StackWiseModel` (`stacks.0...`) as well as the heads (`model.stacks.0...`).
    Stacks whose rank or alpha differ from the first stack's get peft `rank_pattern`/`alpha_pattern` entries.
    """
    groups = []
    for parent, names in (("self_attn", ATTENTION_PROJECTIONS), ("mlp", MLP_PROJECTIONS)):
        chosen = [p for p in names if p in projections]
        if chosen:
            groups.append(rf"{parent}\.({'|'.join(chosen)})")
    stacks = sorted(ranks)
    r, alpha = ranks[stacks[0]]
    per_stack = {rf"{_stack_pattern([i])}\w+\.\w+": ranks[i] for i in stacks}
    return {
        "target_modules": rf"(.*\.)?{_stack_pattern(stacks)}({'|'.join(groups)})",
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {k: ra[0] for k, ra in per_stack.items() if ra[0] != r},
        "alpha_pattern": {k: ra[1] for k, ra in per_stack.items() if ra[1] != alpha},
    }


def _settings(settings, overrides: dict) -> AdapterSettings:
    if settings is None:
        settings = AdapterSettings()
    elif isinstance(settings, dict):
        settings = AdapterSettings.from_dict(settings)
    elif not isinstance(settings, AdapterSettings):
        raise TypeError(f"`settings` must be an AdapterSettings, a dict or None; got {type(settings).__name__}.")
    if overrides:
        settings = AdapterSettings.from_dict({**dataclasses.asdict(settings), **overrides})
    return settings


# Adding adapters ------------------------------------------------------------------------------------


def add_stack_adapter(rack, stack_idx: int, settings: AdapterSettings | dict | None = None, **overrides) -> str:
    """Adds LoRA adapter `stack_{i}` over stack `i`'s projections and returns its name.

    The new adapter is active and trainable; adapters already there keep their activity and
    trainability, and base weights keep their `requires_grad` (freeze them with `rack.freeze_stacks()`
    or `freeze_base_weights`). Under a bf16 or fp16 stack the adapter weights are float32.

    Args:
        rack: a `StackWisePreTrainedModel`.
        stack_idx (`int`): the stack to adapt (negative counts from the end).
        settings (`AdapterSettings` or `dict`, *optional*): rank/alpha schedule and targets; defaults
            to `AdapterSettings()` (r=8, alpha=16, all linears).
        overrides: fields of `AdapterSettings` to change, e.g. `r=4, target="attention"`.

    Raises:
        IndexError: the rack has no stack `stack_idx`.
        ValueError: the stack already has an adapter, or a setting is invalid.

    Example:

    ```python
    >>> from stackwise_hf import StackWiseConfig, StackWiseForCausalLM
    >>> from stackwise_hf.adapters import activate_adapters, add_stack_adapter, add_trunk_adapter, freeze_base_weights
    >>> rack = StackWiseForCausalLM(StackWiseConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                                             num_attention_heads=4, stack_sizes=[1, 1, 1]))
    >>> add_stack_adapter(rack, 2, r=8, target="all-linear")
    'stack_2'
    >>> add_trunk_adapter(rack, [0, 1], r=2, target="attention")
    'trunk'
    >>> _ = freeze_base_weights(rack)
    >>> activate_adapters(rack, ["stack_2", "trunk"], trainable=["stack_2"])
    >>> sorted({n.split(".")[2] for n, p in rack.named_parameters() if p.requires_grad})
    ['2']
    ```
    """
    (stack_idx,) = check_stack_indices(rack, stack_idx)
    name = stack_adapter_name(stack_idx)
    _check_new_name(rack, name)
    config = _settings(settings, overrides).lora_config([stack_idx])
    _add(rack, name, config)
    logger.info("Added LoRA adapter %s over stack %d (r=%d, alpha=%s)", name, stack_idx, config.r, config.lora_alpha)
    return name


def add_trunk_adapter(
    rack, stack_indices: Iterable[int], settings: AdapterSettings | dict | None = None, **overrides
) -> str:
    """Adds the `trunk` LoRA adapter spanning `stack_indices` (typically the frozen stacks); returns "trunk".

    It shares modules with the stacks' own adapters where they overlap (peft keeps both in one
    `LoraLayer`). Each stack of the trunk gets the rank `settings.rank_for(i)` gives, through peft's
    `rank_pattern`/`alpha_pattern`. Activity, trainability and dtypes as in `add_stack_adapter`.

    Args:
        rack: a `StackWisePreTrainedModel`.
        stack_indices (iterable of `int`): the stacks the trunk adapter covers.
        settings (`AdapterSettings` or `dict`, *optional*): as for `add_stack_adapter`; a trunk adapter
            is usually lighter (smaller `r`, `target="attention"`).
        overrides: fields of `AdapterSettings` to change.
    """
    stacks = sorted(set(check_stack_indices(rack, list(stack_indices))))
    if not stacks:
        raise ValueError("`stack_indices` is empty; name the stacks the trunk adapter covers.")
    _check_new_name(rack, TRUNK)
    _add(rack, TRUNK, _settings(settings, overrides).lora_config(stacks))
    logger.info("Added LoRA adapter %s over stacks %s", TRUNK, stacks)
    return TRUNK


def _check_new_name(rack, name: str) -> None:
    if name in _peft_config(rack):
        raise ValueError(
            f"The rack already has an adapter named {name!r} (adapters: {adapter_names(rack)}); "
            "merge or remove it first."
        )


def _add(rack, name: str, config: LoraConfig) -> None:
    """Injects adapter `name` and makes it active and trainable, leaving everything else as it was."""
    active, trainable = active_adapters(rack), trainable_adapters(rack)
    with _base_requires_grad_kept(rack):
        _inject(rack, name, config)
    activate_adapters(rack, active + [name], trainable=trainable + [name])


def _inject(rack, name: str, config: LoraConfig, weights: dict[str, torch.Tensor] | None = None) -> None:
    """peft's injection, then float32 adapter weights (peft's autocast policy), then `weights` if given.

    peft's injection also freezes base weights and switches the active adapter; callers restore both.
    """
    with _expected_peft_warnings():
        inject_adapter_in_model(copy.deepcopy(config), rack, adapter_name=name)
    for _, layer in _lora_layers(rack):
        layer.train(layer.get_base_layer().training)  # new wrappers start in train mode (dropout on)
    cast_adapter_dtype(rack, name)
    if weights is not None:
        result = set_peft_model_state_dict(rack, weights, adapter_name=name)
        if result.unexpected_keys:
            raise ShapeMismatchError(
                f"adapter {name!r}: tensors that fit no adapted module: {result.unexpected_keys[:5]}."
            )


def add_adapters_like(rack, reference) -> list[str]:
    """Injects into `rack` (same architecture) every adapter `reference` has, with the same peft configs
    and fresh weights: the structure a state dict of `reference` loads into. Returns the names."""
    names = adapter_names(reference)
    with _base_requires_grad_kept(rack):
        for name in names:
            _inject(rack, name, _peft_config(reference)[name])
    return names


@contextlib.contextmanager
def _base_requires_grad_kept(rack):
    """Restores every base (non-adapter) weight's `requires_grad` on leaving the block."""
    flags = [(p, p.requires_grad) for n, p in rack.named_parameters() if not is_adapter_key(n)]
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


class _expected_peft_warnings(warnings.catch_warnings):
    """Silences, inside the block, the peft warnings listed in `_EXPECTED_PEFT_WARNINGS`."""

    def __enter__(self):
        entered = super().__enter__()
        for message in _EXPECTED_PEFT_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        return entered


# Activity and trainability --------------------------------------------------------------------------


def _peft_config(rack) -> dict[str, PeftConfig]:
    return getattr(rack, "peft_config", None) or {}


def _name_order(name: str):
    match = STACK_ADAPTER.match(name)
    return (0, int(match[1]), "") if match else (1 if name == TRUNK else 2, 0, name)


def adapter_names(rack) -> list[str]:
    """The rack's adapters: `stack_i` in stack order, then `trunk`, then any others by name."""
    return sorted(_peft_config(rack), key=_name_order)


def _lora_layers(rack) -> Iterable[tuple[str, LoraLayer]]:
    return ((n, m) for n, m in rack.named_modules() if isinstance(m, LoraLayer))


def active_adapters(rack) -> list[str]:
    """Adapters that take part in the forward pass."""
    active = {a for _, layer in _lora_layers(rack) for a in layer.active_adapters}
    return [n for n in adapter_names(rack) if n in active]


def _adapter_parameters(rack) -> dict[str, list[torch.nn.Parameter]]:
    params: dict[str, list[torch.nn.Parameter]] = {}
    for key, param in rack.named_parameters():
        match = _ADAPTER_PARAM.search(key)
        if match:
            params.setdefault(match[1], []).append(param)
    return params


def trainable_adapters(rack) -> list[str]:
    """Adapters with at least one parameter that requires grad."""
    params = _adapter_parameters(rack)
    return [n for n in adapter_names(rack) if any(p.requires_grad for p in params.get(n, ()))]


def activate_adapters(rack, names: str | Iterable[str], trainable: str | Iterable[str] | None = None) -> None:
    """Makes `names` the active adapters (all others inactive) and `trainable` the trainable ones.

    Several adapters can be active at once (a stack's own adapter and the trunk's); their updates add
    up. Inactive adapters and active ones not in `trainable` get `requires_grad=False`. Base weights
    are not touched.

    Args:
        rack: a rack with adapters.
        names (`str` or iterable of `str`): adapters to activate; empty to run the base rack alone.
        trainable (`str` or iterable of `str`, *optional*): which of `names` train; defaults to all of them.

    Raises:
        ValueError: naming the unknown adapters and the rack's adapters, or trainable ones not in `names`.
    """
    names = _as_names(names)
    trainable = list(names) if trainable is None else _as_names(trainable)
    unknown = [n for n in names if n not in _peft_config(rack)]
    if unknown:
        raise ValueError(f"Unknown adapter(s) {unknown}; the rack has {adapter_names(rack)}.")
    stray = [n for n in trainable if n not in names]
    if stray:
        raise ValueError(f"`trainable` adapters {stray} are not among the activated adapters {names}.")
    # peft activates `names` with grads on and turns grads off on every other adapter. A layer adds its
    # active adapters' updates in list order: one canonical order makes reloaded racks bit-identical.
    set_adapter(rack, sorted(names, key=_name_order))
    frozen = [n for n in names if n not in trainable]
    if frozen:
        set_requires_grad(rack, frozen, requires_grad=False)


def _as_names(names) -> list[str]:
    return [names] if isinstance(names, str) else list(dict.fromkeys(names))


def freeze_base_weights(rack) -> int:
    """Sets `requires_grad=False` on every non-adapter weight (stacks, embeddings, norm, head).

    Returns the number of parameters frozen.
    """
    count = 0
    for name, param in rack.named_parameters():
        if not is_adapter_key(name):
            param.requires_grad_(False)
            count += param.numel()
    return count


# Reporting ------------------------------------------------------------------------------------------


def adapter_report(rack) -> list[dict]:
    """Parameter counts per stack, then one row for the embeddings, final norm and head.

    Each row: `part` (label), `stack` (index or None), `base`, `adapter`, `total` (= base + adapter),
    `trainable` parameter counts, and `adapters` (names present in that part).
    """
    rows = []
    for i, stack in enumerate(rack.base_model.stacks):
        rows.append(_count(f"stack {i}", i, stack.named_parameters()))
    in_stacks = {id(p) for stack in rack.base_model.stacks for p in stack.parameters()}
    rest = ((n, p) for n, p in rack.named_parameters() if id(p) not in in_stacks)
    rows.append(_count("embeddings/norm/head", None, rest))
    return rows


def _count(part: str, stack: int | None, named_params) -> dict:
    row = {"part": part, "stack": stack, "base": 0, "adapter": 0, "total": 0, "trainable": 0, "adapters": set()}
    for name, param in named_params:
        match = _ADAPTER_PARAM.search(name)
        row["adapter" if match else "base"] += param.numel()
        row["total"] += param.numel()
        row["trainable"] += param.numel() if param.requires_grad else 0
        if match:
            row["adapters"].add(match[1])
    row["adapters"] = sorted(row["adapters"], key=_name_order)
    return row


def format_adapter_report(rows: list[dict]) -> str:
    """`adapter_report` rows as an aligned text table with a totals line."""
    header = ("part", "base", "adapter", "trainable", "trainable %", "adapters")
    totals = {k: sum(r[k] for r in rows) for k in ("base", "adapter", "total", "trainable")}
    lines = [header]
    for row in rows + [{"part": "total", **totals, "adapters": []}]:
        share = 100 * row["trainable"] / row["total"] if row["total"] else 0.0
        lines.append((row["part"], f"{row['base']:,}", f"{row['adapter']:,}", f"{row['trainable']:,}", f"{share:.2f}",
                      ",".join(row["adapters"]) or "-"))
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if c in (0, 5) else cell.rjust(w) for c, (cell, w) in
                               enumerate(zip(line, widths))).rstrip() for line in lines)


# What an adapter covers, read from the modules ------------------------------------------------------


def describe_adapter(rack, name: str) -> dict:
    """What adapter `name` adapts, read from the rack's modules.

    Returns `{"name", "stacks": [i, ...], "target": [projection names], "r": [per stack], "lora_alpha": [per stack]}`.
    """
    if name not in _peft_config(rack):
        raise ValueError(f"Unknown adapter {name!r}; the rack has {adapter_names(rack)}.")
    ranks: dict[int, tuple[int, float]] = {}
    projections: set[str] = set()
    for i, stack in enumerate(rack.base_model.stacks):
        for module_name, module in stack.named_modules():
            if isinstance(module, LoraLayer) and name in module.lora_A:
                ranks.setdefault(i, (module.r[name], _tidy(module.lora_alpha[name])))
                projections.add(module_name.rsplit(".", 1)[-1])
    stacks = sorted(ranks)
    return {
        "name": name,
        "stacks": stacks,
        "target": [p for p in PROJECTIONS if p in projections],
        "r": [ranks[i][0] for i in stacks],
        "lora_alpha": [ranks[i][1] for i in stacks],
    }


def _retargeted(config: LoraConfig, described: dict) -> LoraConfig:
    """`config` aimed at where the adapter's modules are now (after stacks moved)."""
    config = copy.deepcopy(config)
    ranks = dict(zip(described["stacks"], zip(described["r"], described["lora_alpha"])))
    for key, value in _targeting(ranks, described["target"]).items():
        setattr(config, key, value)
    return config


# Merging and removing -------------------------------------------------------------------------------


def merge_stack_adapter(rack, name: str) -> dict:
    """Folds adapter `name` into the base weights it adapts, then removes the adapter.

    The merged weights keep each stack's dtype (a bf16 stack stays bf16: the sum is formed in float32
    and rounded once). Works for `trunk` too, across all its stacks. Other adapters keep
    their activity and trainability; base weights keep `requires_grad`. The merge is recorded, and
    `save_adapters` lists it in the manifest as merged. Typical uses: a ReLoRA-style cycle (merge,
    add a fresh `stack_i`, train again) and exporting with `to_llama` after LoRA training.

    Args:
        rack: a rack with adapter `name`.
        name (`str`): the adapter to merge, e.g. "stack_1" or "trunk".

    Returns:
        The merge record: `describe_adapter`'s dict with `merged=True`.
    """
    record = {**describe_adapter(rack, name), "merged": True}
    if quantized := sorted(set(record["stacks"]) & set(quantized_stacks(rack))):
        raise ValueError(f"adapter {name!r} covers quantized stack(s) {quantized}: merging into 8/4-bit weights is "
                         "not supported; keep the adapter (it is saved with the rack) or merge before quantizing.")
    with torch.no_grad():
        for _, layer in _lora_layers(rack):
            if name in layer.lora_A:
                base = layer.get_base_layer()
                dtype = base.weight.dtype
                # peft adds the update in the base dtype (rounding the update, then the sum); adding in
                # float32 rounds once. safe_merge checks the sum for NaN/inf before it replaces the weight.
                base.weight.data = base.weight.data.float()
                layer.merge(safe_merge=True, adapter_names=[name])
                base.weight.data = base.weight.data.to(dtype)
                # The update is part of the base weights now: peft must never subtract it again.
                layer.merged_adapters.remove(name)
    _remove(rack, [name])
    rack._merged_adapters = merged_adapters(rack) + [record]
    logger.info("Merged adapter %s into stack(s) %s", name, record["stacks"])
    return record


def merged_adapters(rack) -> list[dict]:
    """Records of the adapters merged into this rack's base weights, oldest first."""
    return [dict(r) for r in getattr(rack, "_merged_adapters", [])]


def remove_adapter(rack, name: str) -> None:
    """Deletes adapter `name` without merging it (its update is lost)."""
    if name not in _peft_config(rack):
        raise ValueError(f"Unknown adapter {name!r}; the rack has {adapter_names(rack)}.")
    _remove(rack, [name])


def remove_all_adapters(rack) -> None:
    """Deletes every adapter without merging; the rack's modules are plain `nn.Linear`s again."""
    _remove(rack, adapter_names(rack))


def _remove(rack, names: list[str]) -> None:
    """Deletes adapters with peft, then unwraps layers left without adapters; others keep their state."""
    active = [n for n in active_adapters(rack) if n not in names]
    trainable = [n for n in trainable_adapters(rack) if n not in names]
    with _base_requires_grad_kept(rack), _expected_peft_warnings():
        for name in names:
            delete_adapter(rack, name, prefix="lora_")
            del rack.peft_config[name]
        _unwrap_empty_layers(rack)
    if _peft_config(rack):
        activate_adapters(rack, active, trainable=trainable)
    elif hasattr(rack, "peft_config"):
        # No adapters left: the rack is a plain model again (peft and rack.py test for this attribute).
        del rack.peft_config


def _unwrap_empty_layers(rack) -> None:
    empty = [(n, m) for n, m in _lora_layers(rack) if not m.lora_A and not m.lora_embedding_A]
    for module_name, layer in empty:
        parent, _, child = module_name.rpartition(".")
        setattr(rack.get_submodule(parent), child, layer.get_base_layer())


# Growth at the input end ----------------------------------------------------------------------------


def shift_adapter_stacks(rack, offset: int = 1) -> dict[str, str]:
    """Renames stack adapters after stacks moved by `offset` indices (a stack was prepended).

    The modules have already moved (stack `k` is now at `k + offset`); adapter `stack_k` becomes
    `stack_{k+offset}` with its targets re-aimed, the trunk adapter's targets follow its stacks, and
    merge records shift too. Weights stay bit-identical; activity and trainability are kept.

    Returns:
        `{old_name: new_name}` for the renamed adapters.
    """
    if isinstance(offset, bool) or not isinstance(offset, int) or offset == 0:
        raise ValueError(f"`offset` must be a non-zero integer; got {offset!r}.")
    renames = {n: _shifted_name(n, offset) for n in adapter_names(rack) if STACK_ADAPTER.match(n)}
    active = [renames.get(n, n) for n in active_adapters(rack)]
    trainable = [renames.get(n, n) for n in trainable_adapters(rack)]
    # Work away from the direction of travel so a new name is always free when it is taken.
    order = sorted(renames, key=lambda n: int(STACK_ADAPTER.match(n)[1]), reverse=offset > 0)
    with _base_requires_grad_kept(rack):
        for old in order:
            _rename(rack, old, renames[old])
        for name in adapter_names(rack):
            if name not in renames.values():
                rack.peft_config[name] = _retargeted(rack.peft_config[name], describe_adapter(rack, name))
    if _peft_config(rack):
        activate_adapters(rack, active, trainable=trainable)
    rack._merged_adapters = [
        {**r, "name": _shifted_name(r["name"], offset), "stacks": [i + offset for i in r["stacks"]]}
        for r in merged_adapters(rack)
    ]
    if renames:
        logger.info("Renamed adapters after a stack was prepended: %s", renames)
    return renames


def _shifted_name(name: str, offset: int) -> str:
    match = STACK_ADAPTER.match(name)
    return stack_adapter_name(int(match[1]) + offset) if match else name


def _rename(rack, old: str, new: str) -> None:
    """peft has no rename: copy the adapter's weights, delete it, inject it under the new name, reload."""
    described = describe_adapter(rack, old)
    if described["stacks"] != [int(STACK_ADAPTER.match(new)[1])]:
        raise ValueError(
            f"adapter {old!r} sits in stack(s) {described['stacks']}, not where {new!r} belongs: "
            "shift_adapter_stacks runs after the stacks have moved."
        )
    weights = get_peft_model_state_dict(rack, adapter_name=old, save_embedding_layers=False)
    weights = {k: v.detach().clone() for k, v in weights.items()}
    config = _retargeted(rack.peft_config[old], described)
    with _expected_peft_warnings():
        delete_adapter(rack, old, prefix="lora_")
    del rack.peft_config[old]
    _inject(rack, new, config, weights)
