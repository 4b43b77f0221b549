"""The rack's side of the original system's API (its `ProgressiveRackBuilder` names); see
`training/compat.py`, which lists the whole older surface in one place.

`GuideRackMixin` is mixed into every rack through `RackMixin`. It holds only translations: the guide's
`current_stacks`, and its precision names ("full", "half", "bfloat16") reported beside the dtype.
"""

from __future__ import annotations

# The guide's precision name of each stack dtype (`append_stack(..., precision="half")` is read by
# `configuration_stackwise.canonical_dtype`, which accepts these names as aliases).
GUIDE_PRECISIONS = {"float32": "full", "float16": "half", "bfloat16": "bfloat16"}


def guide_precision(dtype: str) -> str:
    """"full", "half" or "bfloat16" for a canonical stack dtype."""
    return GUIDE_PRECISIONS[dtype]


def dtype_or_precision(dtype, precision):
    """The one of `dtype=` (native) and `precision=` (the guide's) that was given."""
    if dtype is not None and precision is not None and dtype != precision:
        raise ValueError(f"Pass `dtype` or `precision`, not both (got dtype={dtype!r}, precision={precision!r}).")
    return dtype if dtype is not None else precision


class GuideRackMixin:
    @property
    def current_stacks(self) -> int:
        """Number of stacks in the rack (the original `rack_builder.current_stacks`; natively `num_stacks`)."""
        return self.num_stacks
