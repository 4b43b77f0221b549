"""The rack's public API beside `forward`: growth, freezing, introspection, per-stack save/load.

`RackMixin` is mixed into `StackWisePreTrainedModel`, so every rack class (`StackWiseModel`,
`StackWiseForCausalLM`, `StackWiseForMaskedLM`) carries it. The methods are thin doors: the work is in
`growth.py` (surgery), `rack_files.py` (the one writer and reader of rack files), `resolver.py`
(where files come from) and `hub.py` (pushing). The names follow the original system's
`ProgressiveRackBuilder` (`append_stack`, `save_stack`, `get_rack_info`, ...), whose role the rack
model plays here.
"""

from __future__ import annotations

import logging
import os

import torch

from .configuration_stackwise import canonical_dtype
from .growth import cast_stack, grow, set_stacks_trainable
from .hub import PushOptions, push_rack_to_hub
from .hub import push_stack_to_hub as push_one_stack
from .rack_files import (
    check_rack_files,
    read_rack,
    read_rack_weights,
    read_saved_adapters,
    read_stack_into,
    write_rack,
    write_stack,
)
from .resolver import pretrained_source
from .rack_compat import GuideRackMixin, dtype_or_precision, guide_precision
from .stacks import adapters_in, check_stack_indices, is_adapter_key, rack_state_dict

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
        return grow(self, n_blocks, "append", init, dtype_or_precision(dtype, precision))

    def prepend_stack(self, n_blocks: int, init: str = "random", dtype=None, precision=None) -> int:
        """Adds a stack at the input end of the rack (right-to-left building); returns 0.

        Existing stacks shift up by one index, and so do the stack adapters named after them.
        """
        return grow(self, n_blocks, "prepend", init, dtype_or_precision(dtype, precision))

    def freeze_stacks(self, indices=None) -> list[int]:
        """Sets `requires_grad=False` on every weight of the given stacks (default: all)."""
        return set_stacks_trainable(self, indices, False)

    def unfreeze_stacks(self, indices=None) -> list[int]:
        """Sets `requires_grad=True` on the base weights of the given stacks (default: all)."""
        return set_stacks_trainable(self, indices, True)

    def cast_stack(self, stack_idx: int, dtype) -> None:
        """Casts one stack's base weights to `dtype` and records it in the config."""
        cast_stack(self, stack_idx, dtype)

    # Introspection ------------------------------------------------------------------------------------

    def get_stack_info(self, stack_idx: int) -> dict:
        """Index, block count, parameter counts, dtype (and the guide's "precision" name: full/half/bfloat16),
        trainability and adapters of a stack."""
        (stack_idx,) = check_stack_indices(self, stack_idx)
        stack = self.base_model.stacks[stack_idx]
        base = [(n, p) for n, p in stack.named_parameters() if not is_adapter_key(n)]
        adapter = [p for n, p in stack.named_parameters() if is_adapter_key(n)]
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
            "adapters": sorted(adapters_in(stack)),
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
            "total_parameters": sum(p.numel() for p in rack_state_dict(self).values()),
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
        remote_code: bool = True,
        **kwargs,
    ) -> None:
        """Writes config, generation config, per-stack sharded safetensors with a standard index, and the
        modeling code (`layout.REMOTE_CODE_FILES`, with an `auto_map`), so that
        `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads it without this package;
        `remote_code=False` leaves the code out.

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
            self.save_pretrained(save_directory, state_dict=state_dict, max_shard_size=max_shard_size,
                                 remote_code=remote_code)
            self.push_to_hub(repo_id, max_shard_size=max_shard_size, remote_code=remote_code, **kwargs)
            return None
        write_rack(self, save_directory, max_shard_size=max_shard_size, state_dict=state_dict, complete=False,
                   remote_code=remote_code)
        return None

    def save_stack(self, stack_idx: int, path: str | os.PathLike, max_shard_size: int | str = "5GB") -> str:
        """Writes one stack's weights (sharded safetensors and an index of them) to directory `path`.

        Returns the directory. `load_stack` reads it back into any rack whose stack has the same shape.
        """
        (stack_idx,) = check_stack_indices(self, stack_idx)
        return write_stack(self, stack_idx, path, max_shard_size)

    # Loading ------------------------------------------------------------------------------------------

    def load_stack(self, stack_idx: int, path: str | os.PathLike, source_stack: int | None = None, *,
                   verify: bool = True, **hub_kwargs) -> bool:
        """Loads one stack's weights into stack `stack_idx`, reading only that stack's files.

        Args:
            stack_idx (`int`): the rack's stack to overwrite.
            path: a stack directory (`save_stack`), a rack directory (`save_pretrained`), or a Hub repo id.
            source_stack (`int`, *optional*): which stack of a rack directory to read; defaults to
                `stack_idx` for a rack, to the only stack for a stack directory.
            verify (`bool`, defaults to `True`): compare each file read with the sha256 recorded at save time.
            hub_kwargs: `revision`, `token`, `cache_dir` for a Hub repo.

        The stack takes on the saved dtype. Nothing is changed unless every tensor is present and
        fits; errors name the file or tensor at fault. Returns True.
        """
        (stack_idx,) = check_stack_indices(self, stack_idx)
        source_stack = read_stack_into(self, stack_idx, path, source_stack, verify, **hub_kwargs)
        logger.info("Loaded stack %d of %s into stack %d", source_stack, path, stack_idx)
        return True

    def load_rack_weights(self, path: str | os.PathLike, *, verify: bool = True, **hub_kwargs) -> bool:
        """Loads every weight of a saved rack in place, after checking all of them fit.

        The rack is first reshaped to the saved stack layout (stacks added or removed) when the
        saved config differs from it only there; any other architecture difference raises.
        """
        read_rack_weights(self, path, verify, **hub_kwargs)
        return True

    def save_rack(self, path: str | os.PathLike, max_shard_size: int | str = "5GB", remote_code: bool = True) -> str:
        """Saves the complete rack: weights and modeling code (`save_pretrained` layout) plus every adapter in
        peft format under `adapters/<name>/` with a manifest, and for quantized stacks their exact codes
        and `quantization.json`. Returns the directory."""
        return write_rack(self, path, max_shard_size=max_shard_size, remote_code=remote_code)

    def load_rack(self, path: str | os.PathLike, *, verify: bool = True, **hub_kwargs) -> bool:
        """Restores a rack saved with `save_rack` in place: weights, stack layout, dtypes and adapters,
        and its quantized stacks (`quantization.json`), quantized again to the saved codes. With
        `verify` (the default) every file is compared with the sha256 recorded at save time first."""
        read_rack(self, path, verify=verify, **hub_kwargs)
        return True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained` for a rack directory or Hub repo id (or None with `config=` and
        `state_dict=`), plus three things: every shard is checked first (complete, and for a repo also hashed
        against the id the Hub stored it under), so a damaged rack fails with the file's name before any
        loading; each stack's dtype is set; and the rack's adapters are loaded when it has an adapter manifest.

        Stack dtypes: by default (`dtype=None` or `"auto"`) each stack comes back in its saved dtype
        (`config.stack_dtypes`). `dtype=torch.float32` (any one dtype) puts every stack in it, as it does the
        embeddings and head. Per stack: pass `stack_dtypes=["float32", "bfloat16", ...]` (one per stack; a
        config override, so it wins over `dtype` for the stacks), or call `rack.cast_stack(i, dtype)` after.
        Returns the rack, or `(rack, loading_info)` with `output_loading_info=True`, as transformers does.
        `verify=True` also compares every shard with the sha256 recorded at save time.
        """
        verify = kwargs.pop("verify", False)
        resolve = adapter_path = None
        if pretrained_model_name_or_path is not None:
            resolve, adapter_path, _ = pretrained_source(pretrained_model_name_or_path, kwargs)
        if resolve is not None:
            check_rack_files(resolve, verify, pretrained_model_name_or_path)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if kwargs.get("output_loading_info") else loaded
        for i, dtype in enumerate(_stack_dtypes_asked(kwargs, model.num_stacks) or model.config.stack_dtypes):
            if model.base_model.stacks[i].dtype != getattr(torch, dtype):
                cast_stack(model, i, dtype)
        if resolve is not None:
            read_saved_adapters(model, resolve, adapter_path)
        return loaded

    # The Hub ------------------------------------------------------------------------------------------

    def push_to_hub(
        self,
        repo_id: str,
        options: PushOptions | None = None,
        *,
        max_shard_size: int | str = "5GB",
        tags: list[str] | None = None,
        tokenizer=None,
        training_run=None,
        loss_plot: str | os.PathLike | None = None,
        remote_code: bool = True,
        **option_fields,
    ):
        """Pushes the whole rack to a Hub repo in one commit: config, per-stack shards and index, adapters
        in peft's layout, the tokenizer when given, the modeling code (unless `remote_code=False`: then
        `trust_remote_code=True` cannot load it where this package is not installed), and a model card
        with a table of stacks. Remote shard and adapter files the new
        save no longer has are deleted in the same commit.

        Args:
            repo_id, max_shard_size, tags: as in transformers' `PushToHubMixin.push_to_hub`.
            options (`PushOptions`, *optional*): commit settings; its fields are also taken as
                keywords (`commit_message`, `commit_description`, `private`, `token`, `revision`,
                `create_pr`, as in transformers' `push_to_hub`) and override `options`.
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
        return push_rack_to_hub(self, repo_id, options, max_shard_size=max_shard_size, tokenizer=tokenizer,
                                tags=tags, training_run=training_run, loss_plot=loss_plot, remote_code=remote_code,
                                **option_fields)

    def push_stack_to_hub(self, stack_idx: int, repo_id: str, options: PushOptions | None = None, *,
                          max_shard_size: int | str = "5GB", training_run=None, **option_fields):
        """Pushes stack `stack_idx` into a rack repo in one commit: its shards, the index (that stack's
        entries replaced), the config when the stack is new or its dtype changed, and its card row.
        The stack replaces the remote stack of that index (same block count) or, when the remote rack
        has exactly `stack_idx` stacks, is appended to it. Pull it with `load_stack(i, repo_id)`.
        `options` / `option_fields`: commit settings, as for `push_to_hub`.

        Returns:
            huggingface_hub's `CommitInfo`.
        """
        return push_one_stack(self, stack_idx, repo_id, options, max_shard_size=max_shard_size,
                                     training_run=training_run, **option_fields)


def _stack_dtypes_asked(kwargs: dict, num_stacks: int) -> list[str]:
    """The stack dtypes `from_pretrained(**kwargs)` asks for: an explicit `stack_dtypes=` list (already the
    loaded config's), else one `dtype=` for every stack; [] (keep the saved dtypes) for no dtype, "auto" or a
    per-module dict."""
    if kwargs.get("stack_dtypes") is not None:
        return []
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if dtype is None or isinstance(dtype, dict) or dtype == "auto":
        return []
    return [canonical_dtype(dtype, "dtype")] * num_stacks
