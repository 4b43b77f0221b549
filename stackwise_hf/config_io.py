"""Building typed dataclasses from YAML/JSON mappings whose keys equal the field names."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def dataclass_from_dict(cls: type[T], values: Mapping[str, Any] | None, where: str = "") -> T:
    """`cls(**values)`, with unknown keys and invalid values reported by name.

    Args:
        cls: a dataclass whose `__post_init__` validates its fields.
        values: the mapping read from YAML (None means all defaults).
        where: where the mapping came from (e.g. "configs/default.yaml: stages[2]"), prefixed to errors.
    """
    prefix = f"{where}: " if where else ""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ValueError(f"{prefix}expected a mapping of {cls.__name__} fields, got {type(values).__name__}.")
    allowed = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"{prefix}unknown {cls.__name__} field(s) {unknown}; allowed fields are {allowed}.")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{prefix}{err}") from err


def check_choice(name: str, value: Any, allowed) -> None:
    """Raises ValueError naming the field, the value and the allowed values."""
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}; got {value!r}.")


def check_positive(name: str, value: Any, optional: bool = False, number=int) -> None:
    if value is None and optional:
        return
    kinds = (int, float) if number is float else (int,)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        raise ValueError(f"`{name}` must be a positive {number.__name__}{' or null' if optional else ''}; got {value!r}.")
