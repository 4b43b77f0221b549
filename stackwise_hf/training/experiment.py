"""An experiment file: the rack's architecture, the data, the training arguments and the stage schedule.

```yaml
model:    {StackWiseConfig fields}
data:     {DataArguments fields}
training: {TrainingArguments fields}
objective: {ObjectiveConfig fields}      # masking settings for the masked objectives
stages:   [{StageConfig fields}, ...]
```
Keys equal dataclass field names; unknown keys are errors that name the section and the key.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
import yaml

from ..config_io import dataclass_from_dict
from ..configuration_stackwise import StackWiseConfig
from ..data import DataArguments
from .arguments import TrainingArguments
from .masking import ObjectiveConfig
from .schedule import StageConfig

SECTIONS = ("model", "data", "training", "objective", "stages")


@dataclass
class ExperimentConfig:
    """A whole experiment, every section typed and validated when it is read (unknown keys are refused
    naming the section, the key and the allowed keys). The trainer works on a copy, never on this."""

    model: StackWiseConfig
    data: DataArguments = field(default_factory=DataArguments)
    training: TrainingArguments = field(default_factory=TrainingArguments)
    stages: list[StageConfig] = field(default_factory=list)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    source: str | None = None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: list[str] | None = None) -> "ExperimentConfig":
        """Loads an experiment file; `overrides` are "section.field=value" strings (value parsed as YAML)."""
        with open(path, encoding="utf-8") as f:
            try:
                document = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise ValueError(f"{path}: not valid YAML ({' '.join(str(err).split())}).") from err
        return cls.from_dict(apply_overrides(document, overrides or []), source=os.fspath(path))

    @classmethod
    def from_dict(cls, document: dict, source: str | None = None) -> "ExperimentConfig":
        where = source or "experiment"
        if not isinstance(document, dict):
            raise ValueError(f"{where}: expected a mapping with sections {list(SECTIONS)}.")
        unknown = sorted(set(document) - set(SECTIONS))
        if unknown:
            raise ValueError(f"{where}: unknown section(s) {unknown}; allowed sections are {list(SECTIONS)}.")
        model = _model_config(document.get("model"), where)
        stages = document.get("stages") or []
        if not isinstance(stages, list):
            raise ValueError(f"{where}: `stages` must be a list of stage mappings.")
        return cls(
            model=model,
            data=dataclass_from_dict(DataArguments, document.get("data"), f"{where}: data"),
            training=dataclass_from_dict(TrainingArguments, document.get("training"), f"{where}: training"),
            stages=[dataclass_from_dict(StageConfig, s, f"{where}: stages[{k}]") for k, s in enumerate(stages)],
            objective=dataclass_from_dict(ObjectiveConfig, document.get("objective"), f"{where}: objective"),
            source=source,
        )

    @classmethod
    def from_model_config(cls, config: StackWiseConfig) -> "ExperimentConfig":
        """The experiment a `StackWiseConfig.from_yaml` file described (its non-model sections)."""
        sections = copy.deepcopy(getattr(config, "experiment_sections", {}) or {})
        experiment = cls.from_dict({**sections, "model": {}}, source=getattr(config, "experiment_path", None))
        experiment.model = config
        return experiment


def _model_config(values, where: str) -> StackWiseConfig:
    """The `model:` section as a `StackWiseConfig` (`from_fields`: unknown keys refused); an error names the
    field at fault (`model.stack_sizes = 2: ...`)."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"{where}: model: expected a mapping of StackWiseConfig fields, got {type(values).__name__}.")
    try:
        return StackWiseConfig.from_fields(values, where=f"{where}: model")
    except ValueError as err:
        # The config validates fields together; the culprit is the field without which the rest is accepted.
        culprit = next((key for key in values if _accepted({k: v for k, v in values.items() if k != key})), None)
        if culprit is None:
            raise
        message = str(err).removeprefix(f"{where}: model: ")
        raise ValueError(f"{where}: model.{culprit} = {values[culprit]!r}: {message}") from err


def _accepted(values: dict) -> bool:
    try:
        StackWiseConfig.from_fields(values)
    except ValueError:
        return False
    return True


def apply_overrides(document: dict, overrides: list[str]) -> dict:
    """Applies "section.field=value" overrides (value parsed as YAML) to a parsed experiment document.

    A list index or `*` (every element) selects stages: "stages.2.max_steps=50", "stages.*.max_steps=5".
    """
    document = copy.deepcopy(document)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value.")
        dotted, raw = item.split("=", 1)
        _set_path(document, dotted.split("."), yaml.safe_load(raw), item)
    return document


def _set_path(node, keys: list[str], value, item: str) -> None:
    key, rest = keys[0], keys[1:]
    if isinstance(node, list):
        targets = range(len(node)) if key == "*" else [_list_index(key, node, item)]
        for i in targets:
            if rest:
                _set_path(node[i], rest, value, item)
            else:
                node[i] = value
    elif rest:
        _set_path(node.setdefault(key, {}), rest, value, item)
    else:
        node[key] = value


def _list_index(key: str, node: list, item: str) -> int:
    if not key.lstrip("-").isdigit() or not -len(node) <= int(key) < len(node):
        raise ValueError(f"override {item!r}: {key!r} is not an index of a list of {len(node)} items.")
    return int(key)
