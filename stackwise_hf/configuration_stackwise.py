"""Configuration of a stack-wise rack: a Llama-shaped decoder partitioned into stacks of blocks."""

from __future__ import annotations

import copy
import os
from typing import Any

import yaml
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

# Canonical per-stack dtype names and the aliases users write for them (the original system's
# "precision" names among them: "full", "half").
DTYPE_ALIASES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "full": "float32",
    "float": "float32",
    "torch.float32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "torch.bfloat16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "torch.float16": "float16",
}
STACK_DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_MODES = ("causal", "bidirectional")



def canonical_dtype(value: Any, field_name: str = "dtype") -> str:
    """Maps a dtype or precision name ("full", "half", "bf16", `torch.bfloat16`, ...) to its canonical name.

    Raises:
        ValueError: naming `field_name` and the allowed names when `value` is not a supported dtype.
    """
    key = str(value).lower()
    if key not in DTYPE_ALIASES:
        raise ValueError(
            f"`{field_name}` must be one of {list(STACK_DTYPES)} (or an alias: "
            f"{sorted(set(DTYPE_ALIASES) - set(STACK_DTYPES))}); got {value!r}."
        )
    return DTYPE_ALIASES[key]


class StackWiseConfig(PreTrainedConfig):
    r"""
    The architecture of a rack: a Llama-style decoder (RMSNorm, rotary embeddings, GQA attention,
    SwiGLU MLP) whose blocks are partitioned into stacks that may differ in depth and precision.
    Training knobs and the stage schedule are not part of it: they live in
    [`~stackwise_hf.training.TrainingArguments`] and the schedule dataclasses.

    Args:
        vocab_size (`int`, defaults to 4096): size of the token vocabulary.
        hidden_size (`int`, defaults to 256): width of the residual stream.
        intermediate_size (`int`, defaults to 688): width of the SwiGLU MLP.
        num_attention_heads (`int`, defaults to 8): query heads per attention layer.
        num_key_value_heads (`int`, *optional*): key/value heads (GQA); defaults to `num_attention_heads`.
            Must divide `num_attention_heads`.
        head_dim (`int`, *optional*): width of one head; defaults to `hidden_size // num_attention_heads`.
        rope_theta (`float`, defaults to 10000.0): base of the rotary embedding frequencies.
        rope_parameters (`dict`, *optional*): the RoPE variant, as in `LlamaConfig.rope_parameters`:
            `{"rope_type": "default" | "linear" | "dynamic" | "yarn" | "longrope" | "llama3", ...}` with that
            type's fields (`factor`, ...). The legacy name `rope_scaling` is accepted. `rope_theta` fills
            `rope_parameters["rope_theta"]` when the dict does not set it.
        max_position_embeddings (`int`, defaults to 2048): longest sequence the rack is meant for.
        rms_norm_eps (`float`, defaults to 1e-6): epsilon of every RMSNorm (any positive number).
        initializer_range (`float`, defaults to 0.02): std of the normal init of linear and embedding weights.
        tie_word_embeddings (`bool`, defaults to `False`): share the input embedding with the LM head.
        stack_sizes (`list[int]`, *optional*): number of blocks in each stack, input side first. The rack
            has `sum(stack_sizes)` blocks (`num_hidden_layers`). `[]` is an empty rack (embeddings, final
            norm and head: a valid model to grow stacks on). Defaults to `[num_hidden_layers]` when
            `num_hidden_layers` is given (a Llama-style config is one stack), else to `[2, 2]`.
        stack_dtypes (`list[str]`, *optional*): dtype each stack holds its weights in, one of
            "float32", "bfloat16", "float16" (aliases "full", "half", "bf16", "fp16" accepted).
            Defaults to "float32" for every stack.
        attention_mode (`str`, defaults to `"causal"`): "causal" for the causal LM head, "bidirectional"
            for masked LM and masked-diffusion objectives.
        mask_token_id (`int`, *optional*): id of the mask token for masked objectives.

    Any other keyword is kept as an attribute and saved in `config.json`, as every transformers config
    does; `from_yaml` (and the experiment file's `model:` section) rejects unknown keys instead, since
    there a key that is not a field is a typo.

    Example:

    ```python
    >>> from stackwise_hf import StackWiseConfig
    >>> config = StackWiseConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
    ...                          num_key_value_heads=2, stack_sizes=[2, 1], stack_dtypes=["float32", "bf16"])
    >>> config.num_hidden_layers, config.num_stacks, config.stack_dtypes
    (3, 2, ['float32', 'bfloat16'])
    ```
    """

    model_type = "stackwise"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    stack_sizes: list[int] | None = None
    stack_dtypes: list[str] | None = None
    attention_mode: str = "causal"
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    mask_token_id: int | None = None

    def __post_init__(self, **kwargs):
        declared_layers = kwargs.pop("num_hidden_layers", None)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.stack_sizes is None:
            self.stack_sizes = [declared_layers] if declared_layers is not None else [2, 2]
        if not isinstance(self.stack_sizes, (list, tuple)):
            raise ValueError(f"`stack_sizes` must be a list of positive integers; got {self.stack_sizes!r}.")
        self.stack_sizes = [_as_int("stack_sizes", n) for n in self.stack_sizes]
        if self.stack_dtypes is None:
            self.stack_dtypes = ["float32"] * len(self.stack_sizes)
        self.stack_dtypes = [canonical_dtype(d, "stack_dtypes") for d in self.stack_dtypes]
        if self.rope_parameters is not None:
            # Standardised in place by transformers below: never edit the caller's dict.
            self.rope_parameters = copy.deepcopy(dict(self.rope_parameters))
        # Also standardises `rope_parameters` (from `rope_scaling` too) and keeps unknown keys as attributes.
        super().__post_init__(**kwargs)
        self.rope_theta = self.rope_parameters.get("rope_theta", self.rope_theta)
        self.validate()
        if declared_layers is not None and declared_layers != self.num_hidden_layers:
            raise ValueError(
                f"`num_hidden_layers` ({declared_layers}) disagrees with sum(stack_sizes) = "
                f"{self.num_hidden_layers} for stack_sizes={self.stack_sizes}."
            )

    @classmethod
    def from_fields(cls, values: dict, where: str = "") -> "StackWiseConfig":
        """`cls(**values)` for a mapping written by hand (a YAML `model:` section): unlike the constructor,
        which keeps any extra keyword as an attribute, an unknown key here is a typo and raises ValueError
        naming it and the allowed fields."""
        prefix = f"{where}: " if where else ""
        unknown = sorted(k for k in values if k not in cls._field_names() and k != "num_hidden_layers")
        if unknown:
            raise ValueError(
                f"{prefix}StackWiseConfig got unknown field(s) {unknown}; allowed fields are {sorted(cls._field_names())}."
            )
        try:
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{prefix}{err}") from err

    @classmethod
    def _field_names(cls) -> set[str]:
        """The architecture fields this class declares (what a YAML or config.json should contain)."""
        return set(cls.__annotations__)

    # Derived architecture ------------------------------------------------------------------------

    @property
    def num_hidden_layers(self) -> int:
        """Total number of blocks in the rack (what Llama calls layers)."""
        return sum(self.stack_sizes)

    @num_hidden_layers.setter
    def num_hidden_layers(self, value: int) -> None:
        # transformers' config tests accept NotImplementedError from a setter of a derived property.
        if value != self.num_hidden_layers:
            raise NotImplementedError(
                f"`num_hidden_layers` is sum(stack_sizes) = {self.num_hidden_layers}; set `stack_sizes` to change "
                f"the depth (got num_hidden_layers={value!r})."
            )

    @property
    def num_stacks(self) -> int:
        return len(self.stack_sizes)

    def stack_block_range(self, stack_idx: int) -> range:
        """Global indices of the blocks of stack `stack_idx` (the KV cache's layer indices)."""
        start = sum(self.stack_sizes[:stack_idx])
        return range(start, start + self.stack_sizes[stack_idx])

    # Validation ----------------------------------------------------------------------------------

    def validate(self) -> None:
        """Raises `ValueError` naming the field, the value and what is allowed for any invalid field."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"`num_key_value_heads` ({self.num_key_value_heads}) must divide `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        if self.head_dim % 2:
            raise ValueError(f"`head_dim` must be even for rotary embeddings; got {self.head_dim}.")
        if any(n <= 0 for n in self.stack_sizes):
            raise ValueError(f"`stack_sizes` must be a list of positive integers; got {self.stack_sizes!r}.")
        if len(self.stack_dtypes) != len(self.stack_sizes):
            raise ValueError(
                f"`stack_dtypes` has {len(self.stack_dtypes)} entries but `stack_sizes` has "
                f"{len(self.stack_sizes)}; give one dtype per stack."
            )
        if self.attention_mode not in ATTENTION_MODES:
            raise ValueError(f"`attention_mode` must be one of {list(ATTENTION_MODES)}; got {self.attention_mode!r}.")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"`rope_theta` must be a positive number; got {self.rope_theta!r}.")
        if isinstance(self.rms_norm_eps, bool) or not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ValueError(f"`rms_norm_eps` must be a positive number; got {self.rms_norm_eps!r}.")
        rope_type = self.rope_parameters.get("rope_type")
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(
                f"`rope_parameters.rope_type` must be one of {['default', *ROPE_INIT_FUNCTIONS]}; got {rope_type!r}."
            )
        try:
            self.validate_rope()  # transformers' own checks of each RoPE type's fields
        except (KeyError, ValueError) as err:
            raise ValueError(f"`rope_parameters` {self.rope_parameters!r} is invalid: {err}") from err
        for name in ("pad_token_id", "bos_token_id", "mask_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"`{name}` must be in [0, vocab_size={self.vocab_size}); got {value!r}.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except ValueError as err:
            raise ValueError(f"{pretrained_model_name_or_path}: invalid config.json: {err}") from err

    # YAML ----------------------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides) -> "StackWiseConfig":
        """Loads a config from a YAML file whose keys equal the field names.

        The file is either the model section alone or a whole experiment file with a `model:` section
        beside `training:`, `data:` and `stages:` sections; those other sections are kept on the config
        (`config.experiment_sections`, never written to `config.json`) for
        [`~stackwise_hf.training.ProgressiveTrainer`].
        """
        with open(path, encoding="utf-8") as f:
            document = yaml.safe_load(f) or {}
        if not isinstance(document, dict):
            raise ValueError(f"{path}: expected a mapping of config fields, got {type(document).__name__}.")
        sections = {}
        if "model" in document:
            sections = {k: v for k, v in document.items() if k != "model"}
            document = document["model"] or {}
        config = cls.from_fields({**document, **overrides}, where=f"{path}: invalid model config")
        config.experiment_sections = sections
        config.experiment_path = os.fspath(path)
        return config

    def to_yaml(self, path: str | os.PathLike) -> None:
        """Writes the architecture fields (those that differ from the defaults, plus the stack layout) to YAML."""
        data = self.to_diff_dict()
        for key in ("transformers_version", "model_type", "architectures", "dtype"):
            data.pop(key, None)
        data.update(stack_sizes=list(self.stack_sizes), stack_dtypes=list(self.stack_dtypes))
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump({"model": data}, f, sort_keys=False)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        # Experiment sections belong to the training run, not to the saved architecture.
        output.pop("experiment_sections", None)
        output.pop("experiment_path", None)
        return output


def _as_int(field_name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{field_name}` entries must be integers; got {value!r}.")
    return value
