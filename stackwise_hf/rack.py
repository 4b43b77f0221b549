"""The rack's public API beside `forward`: growth, freezing, introspection, per-stack save/load.

`RackMixin` is mixed into `StackWisePreTrainedModel`, so every rack class (`StackWiseModel`,
`StackWiseForCausalLM`, `StackWiseForMaskedLM`) carries it. The methods are thin: the work is in
`growth.py` (surgery) and `serialization.py` (files). The names follow the original system's
`ProgressiveRackBuilder` (`append_stack`, `save_stack`, `get_rack_info`, ...), whose role the rack
model plays here.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch
from transformers.dynamic_module_utils import custom_object_save
from transformers.utils import is_peft_available

from . import growth, serialization
from .errors import ShapeMismatchError
from .rack_compat import GuideRackMixin, dtype_or_precision, guide_precision

logger = logging.getLogger(__name__)


class RackMixin(GuideRackMixin):
    # Shape -------------------------------------------------------------------------------------------

    @property
    def num_stacks(self) -> int:
        return len(self.base_model.stacks)

    def head_parameters(self) -> list[torch.nn.Parameter]:
        """The final norm and, for task heads, the LM head (the embedding too when tied)."""
        params = list(self.base_model.norm.parameters())
        if self is not self.base_model:
            params += list(self.get_output_embeddings().parameters())
        return params

    # Growth and freezing ------------------------------------------------------------------------------

    def append_stack(self, n_blocks: int, init: str = "random", dtype=None, precision=None) -> int:
        """Adds a stack at the output end of the rack and returns its index.

        Args:
            n_blocks (`int`): blocks in the new stack.
            init (`str`, defaults to "random"): "random", "copy" (of the last stack's blocks) or
                "identity" (output projections zeroed: the rack computes the same function).
            dtype / precision: the new stack's dtype ("float32", "bfloat16", "float16", or the
                precision names "full", "half", "bf16"); defaults to the neighbouring stack's.
        """
        return growth.grow(self, n_blocks, "append", init, dtype_or_precision(dtype, precision))

    def prepend_stack(self, n_blocks: int, init: str = "random", dtype=None, precision=None) -> int:
        """Adds a stack at the input end of the rack (right-to-left building); returns 0.

        Existing stacks shift up by one index, and so do the stack adapters named after them.
        """
        return growth.grow(self, n_blocks, "prepend", init, dtype_or_precision(dtype, precision))

    def freeze_stacks(self, indices=None) -> list[int]:
        """Sets `requires_grad=False` on every weight of the given stacks (default: all)."""
        return growth.set_stacks_trainable(self, indices, False)

    def unfreeze_stacks(self, indices=None) -> list[int]:
        """Sets `requires_grad=True` on the base weights of the given stacks (default: all)."""
        return growth.set_stacks_trainable(self, indices, True)

    def cast_stack(self, stack_idx: int, dtype) -> None:
        """Casts one stack's base weights to `dtype` and records it in the config."""
        growth.cast_stack(self, stack_idx, dtype)

    # Introspection ------------------------------------------------------------------------------------

    def get_stack_info(self, stack_idx: int) -> dict:
        """Index, block count, parameter counts, dtype (and the guide's "precision" name: full/half/bfloat16),
        trainability and adapters of a stack."""
        (stack_idx,) = growth.check_stack_indices(self, stack_idx)
        stack = self.base_model.stacks[stack_idx]
        base = [(n, p) for n, p in stack.named_parameters() if not serialization.is_adapter_key(n)]
        adapter = [p for n, p in stack.named_parameters() if serialization.is_adapter_key(n)]
        dtype = self.config.stack_dtypes[stack_idx]
        return {
            "stack_idx": stack_idx,
            "n_blocks": len(stack.blocks),
            "block_range": list(self.config.stack_block_range(stack_idx)),
            "parameters": sum(p.numel() for _, p in base),
            "adapter_parameters": sum(p.numel() for p in adapter),
            "trainable_parameters": sum(p.numel() for p in stack.parameters() if p.requires_grad),
            "dtype": dtype,
            "precision": guide_precision(dtype),
            "trainable": any(p.requires_grad for _, p in base),
            "adapters": sorted(_adapters_in(stack)),
            "gradient_checkpointing": bool(stack.gradient_checkpointing),
        }

    def get_rack_info(self) -> dict:
        """A summary of the rack: one `get_stack_info` entry per stack under `stack_info`, plus totals."""
        stack_info = [self.get_stack_info(i) for i in range(self.num_stacks)]
        return {
            "architecture": type(self).__name__,
            "num_stacks": self.num_stacks,
            "current_stacks": self.num_stacks,
            "stack_sizes": list(self.config.stack_sizes),
            "total_blocks": self.config.num_hidden_layers,
            "total_parameters": sum(p.numel() for p in serialization.rack_state_dict(self).values()),
            "trainable_parameters": sum(p.numel() for p in self.parameters() if p.requires_grad),
            "hidden_size": self.config.hidden_size,
            "vocab_size": self.config.vocab_size,
            "attention_mode": self.config.attention_mode,
            "adapters": sorted(getattr(self, "peft_config", {}) or {}),
            "stack_info": stack_info,
        }

    # Saving -------------------------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        push_to_hub: bool = False,
        max_shard_size: int | str = "5GB",
        **kwargs,
    ) -> None:
        """Writes config, generation config and per-stack sharded safetensors with a standard index.

        Same contract as `PreTrainedModel.save_pretrained`, which this replaces only to keep every
        shard within one stack (transformers shards by size alone). Adapters are not written here:
        `save_rack` writes the rack with its adapters.
        """
        if os.path.isfile(save_directory):
            raise NotADirectoryError(f"{save_directory}: expected a directory to save the rack in, found a file.")
        if not is_main_process:
            return None
        if push_to_hub:
            # As transformers does: save here, then push (the push writes the full rack: adapters, card).
            repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
            self.save_pretrained(save_directory, state_dict=state_dict, max_shard_size=max_shard_size)
            self.push_to_hub(repo_id, max_shard_size=max_shard_size, **kwargs)
            return None
        os.makedirs(save_directory, exist_ok=True)
        if getattr(self, "_auto_class", None) is not None:
            custom_object_save(self, save_directory, config=self.config)
        self.config.architectures = [type(self).__name__]
        self.config.dtype = str(self.base_model.embed_tokens.weight.dtype).removeprefix("torch.")
        self.config.save_pretrained(save_directory)
        if self.can_generate():
            self.generation_config.save_pretrained(save_directory)
        if state_dict is None:
            quantization = _quantization_module()  # quantized stacks are written dequantized, in their dtype
            state_dict = serialization.rack_state_dict(self) if quantization is None else quantization.quantized_state_dict(self)
        weights = state_dict
        serialization.save_weights(
            weights, save_directory, max_shard_size, stack_meta=self._stack_meta(), total_parameters=self.num_parameters()
        )
        logger.info("Saved a %d-stack rack to %s", self.num_stacks, save_directory)
        return None

    def _stack_meta(self) -> dict[int, dict]:
        return {
            i: {"num_blocks": n, "dtype": d}
            for i, (n, d) in enumerate(zip(self.config.stack_sizes, self.config.stack_dtypes))
        }

    def save_stack(self, stack_idx: int, path: str | os.PathLike, max_shard_size: int | str = "5GB") -> str:
        """Writes one stack's weights (sharded safetensors and an index of them) to directory `path`.

        Returns the directory. `load_stack` reads it back into any rack whose stack has the same shape.
        """
        (stack_idx,) = growth.check_stack_indices(self, stack_idx)
        weights = {k: v for k, v in serialization.rack_state_dict(self).items() if serialization.stack_of(k) == stack_idx}
        meta = {stack_idx: self._stack_meta()[stack_idx] | {"hidden_size": self.config.hidden_size}}
        serialization.save_weights(weights, path, max_shard_size, stack_meta=meta)
        logger.info("Saved stack %d (%d blocks) to %s", stack_idx, len(self.base_model.stacks[stack_idx].blocks), path)
        return os.fspath(path)

    # Loading ------------------------------------------------------------------------------------------

    def load_stack(self, stack_idx: int, path: str | os.PathLike, source_stack: int | None = None, **hub_kwargs) -> bool:
        """Loads one stack's weights into stack `stack_idx`, reading only that stack's files.

        Args:
            stack_idx (`int`): the rack's stack to overwrite.
            path: a stack directory (`save_stack`), a rack directory (`save_pretrained`), or a Hub repo id.
            source_stack (`int`, *optional*): which stack of a rack directory to read; defaults to
                `stack_idx` for a rack, to the only stack for a stack directory.
            hub_kwargs: `revision`, `token`, `cache_dir` for a Hub repo.

        The stack takes on the saved dtype. Nothing is changed unless every tensor is present and
        fits; errors name the file or tensor at fault. Returns True.
        """
        (stack_idx,) = growth.check_stack_indices(self, stack_idx)
        resolve = serialization.resolver_for(path, **hub_kwargs)
        index = serialization.read_index(resolve)
        if source_stack is None and len(index["metadata"]["stacks"]) > 1:
            source_stack = stack_idx
        source_stack, tensors = serialization.read_stack(resolve, source_stack, index)
        stack = self.base_model.stacks[stack_idx]
        serialization.check_stack_fits(stack, tensors, f"stack {source_stack} of {path}")
        serialization.copy_into_stack(stack, tensors)
        self.config.stack_dtypes[stack_idx] = str(stack.dtype).removeprefix("torch.")
        logger.info("Loaded stack %d of %s into stack %d", source_stack, path, stack_idx)
        return True

    def load_rack_weights(self, path: str | os.PathLike, **hub_kwargs) -> bool:
        """Loads every weight of a saved rack in place, after checking all of them fit.

        The rack is first reshaped to the saved stack layout (stacks added or removed) when the
        saved config differs from it only there; any other architecture difference raises.
        """
        resolve = serialization.resolver_for(path, **hub_kwargs)
        saved = type(self.config).from_json_file(resolve("config.json"))
        _check_same_architecture(self.config, saved, path)
        index = serialization.read_index(resolve)
        serialization.check_files(resolve, index["weight_map"].values())
        by_file: dict[str, list[str]] = {}
        for key, filename in index["weight_map"].items():
            by_file.setdefault(filename, []).append(key)
        tensors = {}
        for filename, keys in by_file.items():
            tensors.update(serialization.load_tensors(resolve(filename), keys))
        # Check against a weightless rack of the saved layout, so a misfit raises before any change.
        with torch.device("meta"):
            skeleton = type(self)(saved)
        _check_state_dict_fits(serialization.rack_state_dict(skeleton), tensors, path)
        if self.config.stack_sizes != saved.stack_sizes:
            _reshape_stacks(self, saved.stack_sizes)
        _copy_state_dict(self, tensors)
        self.config.stack_dtypes = [str(s.dtype).removeprefix("torch.") for s in self.base_model.stacks]
        return True

    def save_rack(self, path: str | os.PathLike, max_shard_size: int | str = "5GB") -> str:
        """Saves the complete rack: weights (`save_pretrained` layout) plus every adapter in peft format
        under `adapters/<name>/` with a manifest. A rack with quantized stacks also writes their exact
        codes and `quantization.json` (`quantization.save_quantized_rack`). Returns the directory."""
        quantization = _quantization_module()
        if quantization is not None:
            if quantization.quantized_stacks(self):
                return quantization.save_quantized_rack(self, path, max_shard_size=max_shard_size)
            stale = os.path.join(path, quantization.MANIFEST_NAME)
            if os.path.isfile(stale):  # the directory held a quantized rack before: this one is not
                os.remove(stale)
        self.save_pretrained(path, max_shard_size=max_shard_size)
        # Also without live adapters: the manifest then records merges, or a stale one is removed.
        adapters = _adapters_module()
        if adapters is not None:
            adapters.save_adapters(self, path)
        elif getattr(self, "peft_config", None):
            logger.warning("%s: the rack's adapters were not saved (stackwise_hf.adapters cannot be imported here).", path)
        return os.fspath(path)

    def load_rack(self, path: str | os.PathLike, **hub_kwargs) -> bool:
        """Restores a rack saved with `save_rack` in place: weights, stack layout, dtypes and adapters,
        and its quantized stacks (`quantization.json`), quantized again to the saved codes."""
        quantization = _quantization_module()
        if quantization is not None:
            if quantization.quantized_stacks(self):
                raise ValueError(f"{path}: load into a rack without quantized stacks (this one has "
                                 f"{sorted(quantization.quantized_stacks(self))}); their weights cannot be overwritten.")
            if quantization.read_quantization_manifest(path, **hub_kwargs):
                quantization.load_quantized_rack(self, path, **hub_kwargs)
                return True
        self.load_rack_weights(path, **hub_kwargs)
        resolve = serialization.resolver_for(path, **hub_kwargs)
        adapters = _adapters_module()
        if adapters is not None and (adapters.manifest_exists(resolve) or getattr(self, "peft_config", None)):
            adapters.load_adapters(self, path, replace=True, **hub_kwargs)
        return True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained` for a rack directory or Hub repo id, plus three things:
        every shard is checked first (complete, and for a repo also hashed against the id the Hub stored
        it under), so a damaged rack fails with the file's name before any loading; each stack is put
        back in its saved dtype; and the rack's adapters are loaded when it has an adapter manifest."""
        from .hub import ADAPTER_MANIFEST, has_file, pretrained_source

        resolve, adapter_path, hub_kwargs = pretrained_source(pretrained_model_name_or_path, kwargs)
        if resolve is not None and has_file(resolve, serialization.INDEX_NAME):
            serialization.check_files(resolve, serialization.read_index(resolve)["weight_map"].values())
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if kwargs.get("dtype") in (None, "auto"):
            for i, dtype in enumerate(model.config.stack_dtypes):
                if model.base_model.stacks[i].dtype != getattr(torch, dtype):
                    growth.cast_stack(model, i, dtype)
        if resolve is not None and has_file(resolve, ADAPTER_MANIFEST):
            adapters = _adapters_module()
            if adapters is None:
                logger.warning(
                    "%s has adapters (%s), which need stackwise_hf and peft to load; loaded without them. Plain peft "
                    "loads one: PeftModel.from_pretrained(model, path, subfolder='adapters/<name>').",
                    pretrained_model_name_or_path, ADAPTER_MANIFEST,
                )
            else:
                adapters.load_adapters(model, adapter_path, replace=True, **hub_kwargs)
        return model

    # The Hub ------------------------------------------------------------------------------------------

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str = "5GB",
        tags: list[str] | None = None,
        tokenizer=None,
        training_run=None,
        loss_plot: str | os.PathLike | None = None,
    ):
        """Pushes the whole rack to a Hub repo in one commit: config, per-stack shards and index, adapters
        in peft's layout, the tokenizer when given, the modeling code when the classes are registered
        for auto classes, and a model card with a table of stacks. Remote shard and adapter files the new
        save no longer has are deleted in the same commit.

        Args:
            repo_id, commit_message, commit_description, private, token, revision, create_pr,
            max_shard_size, tags: as in transformers' `PushToHubMixin.push_to_hub`.
            tokenizer (*optional*): saved beside the rack.
            training_run (*optional*): the training output directory (`log.jsonl`, `loss.png`) or its log
                records: fills tokens trained and eval loss per stack in the card, and shows the plot.
            loss_plot (*optional*): a PNG for the card; defaults to the run's `loss.png`.

        Returns:
            huggingface_hub's `CommitInfo` (`commit_url`, `oid`, `pr_url`).

        Example:

        ```python
        >>> rack.push_to_hub("me/tiny-rack", tokenizer=tokenizer, training_run="outputs/default")  # doctest: +SKIP
        >>> StackWiseForCausalLM.from_pretrained("me/tiny-rack")  # doctest: +SKIP
        ```
        """
        from .hub import push_rack_to_hub

        return push_rack_to_hub(
            self, repo_id, max_shard_size=max_shard_size, tokenizer=tokenizer, commit_message=commit_message,
            commit_description=commit_description, private=private, token=token, revision=revision,
            create_pr=create_pr, tags=tags, training_run=training_run, loss_plot=loss_plot,
        )

    def push_stack_to_hub(
        self,
        stack_idx: int,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str = "5GB",
        training_run=None,
    ):
        """Pushes stack `stack_idx` into a rack repo in one commit: its shards, the index (that stack's
        entries replaced), the config when the stack is new or its dtype changed, and its card row.
        The stack replaces the remote stack of that index (same block count) or, when the remote rack
        has exactly `stack_idx` stacks, is appended to it. Pull it with `load_stack(i, repo_id)`.

        Returns:
            huggingface_hub's `CommitInfo`.
        """
        from .hub import push_stack_to_hub

        return push_stack_to_hub(
            self, stack_idx, repo_id, commit_message=commit_message, commit_description=commit_description,
            token=token, revision=revision, create_pr=create_pr, max_shard_size=max_shard_size,
            training_run=training_run,
        )


def _adapters_module():
    """`stackwise_hf.adapters`, or None where it cannot be imported: without peft, or in the copy of
    this code that `trust_remote_code=True` loads from a Hub repo (shipped without it, since it needs
    peft). Imported as `from . import adapters`, which transformers' code copier does not follow."""
    if not is_peft_available() or importlib.util.find_spec(f"{__package__}.adapters") is None:
        return None
    from . import adapters

    return adapters


def _quantization_module():
    """`stackwise_hf.quantization`, or None in the `trust_remote_code` copy of this code (shipped without
    it: a rack loaded that way has no quantized stacks). Imported as `_adapters_module` explains."""
    if importlib.util.find_spec(f"{__package__}.quantization") is None:
        return None
    from . import quantization

    return quantization


def _adapters_in(stack) -> set[str]:
    names: set[str] = set()
    for module in stack.modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict):
            names.update(lora_a.keys())
    return names


_ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
    "head_dim", "attention_mode", "tie_word_embeddings",
)


def _check_same_architecture(config, saved, path) -> None:
    for name in _ARCHITECTURE_FIELDS:
        if getattr(config, name) != getattr(saved, name):
            raise ShapeMismatchError(
                f"{path}/config.json: `{name}` is {getattr(saved, name)!r}; this rack has {getattr(config, name)!r}."
            )


def _reshape_stacks(rack, stack_sizes: list[int]) -> None:
    """Rebuilds the rack's stack list to `stack_sizes` (fresh stacks; weights are loaded next)."""
    body = rack.base_model
    stack_cls = type(body.stacks[0])
    device = body.embed_tokens.weight.device
    adapters = _adapters_module()
    if adapters is not None and getattr(rack, "peft_config", None):
        adapters.remove_all_adapters(rack)
    body.stacks = torch.nn.ModuleList(stack_cls(rack.config, n).to(device) for n in stack_sizes)
    rack.config.stack_sizes = list(stack_sizes)
    rack.config.stack_dtypes = ["float32"] * len(stack_sizes)
    growth.renumber_layers(rack)


def _check_state_dict_fits(current: dict, saved: dict, path) -> None:
    missing, unexpected = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    if missing or unexpected:
        raise ShapeMismatchError(f"{path}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}.")
    for key, tensor in current.items():
        if saved[key].shape != tensor.shape:
            raise ShapeMismatchError(
                f"{path}: tensor `{key}` has shape {tuple(saved[key].shape)}; the rack expects {tuple(tensor.shape)}."
            )


def _copy_state_dict(rack, tensors: dict) -> None:
    params = {k.replace(".base_layer.", "."): p for k, p in rack.named_parameters(remove_duplicate=False)}
    with torch.no_grad():
        for key, tensor in tensors.items():
            # Tied weights are one Parameter under two names: setting it once sets both.
            params[key].data = tensor.to(device=params[key].device, copy=True)
