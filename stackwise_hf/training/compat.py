"""The original system's API (the Checkpointing Guide's), on top of the native one. Deprecate it here.

Everything an older script calls that the native API names differently is listed below; each entry
is a thin translation onto a native call. Nothing else in the package depends on these names, so the
whole surface can be deprecated (or deleted) from this module and `rack_compat.py`.

Trainer side (`GuideTrainerMixin`, mixed into `ProgressiveTrainer`):

| guide call | native call |
|---|---|
| `train_rack(rack_builder, dataloader, target_stacks=k)` -> dict | one stage through `enter_stage` / `run_stage` / `exit_stage` |
| `save_progressive_checkpoint(stack_idx, rack_builder, optimizer, epoch, loss)` -> path | `save_checkpoint("progressive", ...)` |
| `save_rack_checkpoint(rack_builder, optimizer)` -> path | `save_checkpoint("rack", ...)` |
| `load_progressive_checkpoint(path)` -> dict | `checkpoints.read(path)` |
| `restore_from_checkpoint(path, rack_builder)` -> True | `restore_checkpoint(path, rack)` -> `Restored` |
| `list_checkpoints()` -> list of dicts | `checkpoints.list()` |
| `get_training_info()` -> dict | `state`, `checkpoints` |
| `trainer.checkpoint_dir = ...`, `trainer.save_interval = ...` | `TrainingArguments.checkpoint_dir` / `.save_interval` |
| `TrainingArguments.steps_per_stage`, `.learning_rate` | a stage's `max_steps` / `learning_rate` |
| `ProgressiveTrainer(config=StackWiseConfig.from_yaml(path))` | `ProgressiveTrainer(ExperimentConfig.from_yaml(path))` |

`StackWiseConfig.from_yaml` keeps the file's other sections on the config (`experiment_sections`, never
written to `config.json`) so the guide's `ProgressiveTrainer(config=config)` finds its `training:`;
`ExperimentConfig.from_model_config` reads them back.

Rack side (`rack_compat.GuideRackMixin`, mixed into every rack; the rack plays `ProgressiveRackBuilder`):
`current_stacks` (`num_stacks`), `append_stack(..., precision="full"|"half"|"bfloat16")` (`dtype=`),
`get_stack_info(i)["precision"]` (the guide's precision name beside `dtype`), `get_rack_info()["current_stacks"]`,
and `load_rack` / `load_stack` / `load_rack_weights` returning True (the native API raises on failure).

Conventions of the guide kept here: methods that "return success" return True and raise on every
failure; dict results keep the guide's keys, with duplicates (`step` beside `global_step`, `precision`
beside `dtype`) where the guide reads one and the native API the other; explicit saves are never
deleted by rotation.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config_io import check_positive
from .schedule import ResolvedStage, StageConfig

GUIDE_SAVE_KINDS = ("progressive", "rack")


class GuideTrainerMixin:
    """The Checkpointing Guide's methods of `ProgressiveTrainer`.

    `rack_builder` arguments take the rack (a `StackWiseForCausalLM` or `StackWiseForMaskedLM`), which
    plays the role of the original `ProgressiveRackBuilder`. Methods that return `success` return True;
    every failure raises (`CheckpointError` and its subclass `CorruptCheckpointError` for bad checkpoints).
    In a multi-process run every process must call the saving and restoring methods.

    Example:

    ```python
    >>> trainer = ProgressiveTrainer(config=StackWiseConfig.from_yaml("config.yaml"))  # doctest: +SKIP
    >>> results = trainer.train_rack(rack, dataloader, target_stacks=1)  # doctest: +SKIP
    >>> path = trainer.save_progressive_checkpoint(stack_idx=0, rack_builder=rack, epoch=1, loss=2.5)  # doctest: +SKIP
    >>> [c["step"] for c in trainer.list_checkpoints()]  # newest first  # doctest: +SKIP
    >>> trainer.restore_from_checkpoint(path, rack)  # doctest: +SKIP
    True
    ```
    """

    # Training ----------------------------------------------------------------------------------------

    def train_rack(self, rack_builder, dataloader, target_stacks: int | None = None, *, max_steps: int | None = None,
                   learning_rate: float | None = None, train: list[str] | None = None, optimizer=None,
                   trunk_mode: str = "recompute") -> dict:
        """Trains stack `target_stacks - 1` of the rack on `dataloader`, the stacks before it frozen, the
        head on top of it (stacks after it are not used). One stage of the trainer's own loop: freezing,
        AdamW over exactly the trainable parameters (fused on CUDA), `compile_blocks`, evaluation when the
        trainer has an `eval_dataset`, the trunk cache with `trunk_mode="cache"`, checkpoints every
        `save_interval` steps and at the end. It counts as stage `target_stacks - 1` of the trainer's state,
        so `restore_from_checkpoint` followed by the same call continues it.

        Args:
            rack_builder: the rack (a causal `StackWiseForCausalLM`). When it has fewer than `target_stacks`
                stacks, stacks like its last one are appended first.
            dataloader: a DataLoader of `input_ids` tensors `(B, T)`, of dicts with `input_ids`, or of
                tuples whose first item is `input_ids`. For an exact resume its order must be a function
                of the epoch (a seeded sampler with `set_epoch`, or no shuffling).
            target_stacks (`int`, *optional*): how many stacks of the rack to use; default all of them.
            max_steps (`int`, *optional*): optimizer steps; default `training.steps_per_stage`, else one
                pass over `dataloader`.
            learning_rate (`float`, *optional*): default `training.learning_rate`.
            train (`list[str]`, *optional*): what trains (`StageConfig.train` names); default the stack and
                the head, plus the embeddings for the first stack.
            optimizer (*optional*): the caller's optimizer over the rack's trainable parameters; default AdamW.
            trunk_mode (`str`): "recompute" or "cache" (`StageConfig.trunk_mode`).

        Returns:
            A dict with the stage's summary (`final_loss`, `first_loss`, `eval_loss`, `perplexity`, `steps`,
            `stack`, `stack_sizes`, `seconds`, ...) plus `losses` (one per optimizer step of this call),
            `target_stacks`, `global_step` and `checkpoint` (the stage-end checkpoint's manifest path).
        """
        rack = rack_builder
        if rack.config.attention_mode != "causal":
            raise ValueError("train_rack trains causal racks (next-token loss); for masked objectives use a stage "
                             "schedule (`stages:` with `objective:`) and `train()`.")
        k = rack.num_stacks if target_stacks is None else target_stacks
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"`target_stacks` must be a positive integer; got {target_stacks!r}.")
        while rack.num_stacks < k:
            rack.append_stack(rack.config.stack_sizes[-1], dtype=rack.config.stack_dtypes[-1])
        stack, state = k - 1, self.state
        pending = self._pending
        if not (pending is not None and state.stage_entered and state.stage == stack):  # not resuming this stack
            state.stage, state.stage_entered = stack, False
        steps = max_steps or self.args.steps_per_stage
        config = StageConfig(
            name=f"stack_{stack}", stack=stack, train=train or (["stack", "head", "embeddings"] if stack == 0 else
                                                               ["stack", "head"]),
            max_steps=steps, num_epochs=None if steps else 1.0, trunk_mode=trunk_mode,
            learning_rate=learning_rate or self.args.learning_rate,
        )
        self.rack = rack.to(self.accelerator.device)
        run = self.enter_stage(ResolvedStage(stack, config.name, config, stack, tuple(rack.config.stack_sizes)),
                               dataloader=dataloader, optimizer=optimizer, stop=k)
        self.run_stage(run)
        losses = self.accelerator.reduce(torch.stack(run.step_losses), "mean").tolist() if run.step_losses else []
        summary = self.exit_stage(run)
        return {**summary.as_dict(), "losses": losses, "target_stacks": k, "global_step": state.global_step,
                "checkpoint": self.checkpoints.last_saved}

    # Checkpoint settings ----------------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        """Where checkpoints go (`training.checkpoint_dir`; default `<output_dir>/checkpoints`); settable."""
        return Path(self.args.resolved_checkpoint_dir)

    @checkpoint_dir.setter
    def checkpoint_dir(self, value: str | os.PathLike) -> None:
        self.args.checkpoint_dir = os.fspath(value)  # the trainer's own copy of the arguments

    @property
    def save_interval(self) -> int | None:
        """Optimizer steps between automatic checkpoints (`training.save_interval`); None: stage ends only."""
        return self.args.save_interval

    @save_interval.setter
    def save_interval(self, value: int | None) -> None:
        check_positive("save_interval", value, optional=True)
        self.args.save_interval = value

    # Saving and restoring ------------------------------------------------------------------------------

    def save_progressive_checkpoint(self, stack_idx: int, rack_builder, optimizer=None, epoch=None, loss=None, *,
                                    activation_cache=None) -> str:
        """Saves a checkpoint of the training run: the rack with its adapters, the trainer state, RNG states,
        the live trunk cache if there is one, and, when given, `optimizer` (keyed by parameter name).
        Explicit saves are kept until the user removes them (rotation never deletes them).

        Args:
            stack_idx (`int`): the stack being trained (recorded in the listing).
            rack_builder: the rack.
            optimizer (*optional*): an optimizer over the rack's parameters.
            epoch / loss (*optional*): recorded in the listing; default the trainer's epoch and last loss.
            activation_cache (*optional*): a mapping of names to tensors, or a `TrunkCache`.

        Returns:
            The path of the checkpoint's `manifest.json` (what `list_checkpoints` reports as `path`).
        """
        n = rack_builder.num_stacks
        if isinstance(stack_idx, bool) or not isinstance(stack_idx, int) or not 0 <= stack_idx < n:
            raise IndexError(f"stack_idx {stack_idx!r} is not a stack of this rack (valid: 0..{n - 1}).")
        return self.save_checkpoint("progressive", rack_builder, optimizer=optimizer, stack_idx=stack_idx,
                                    epoch=epoch, loss=loss, activation_cache=activation_cache)

    def save_rack_checkpoint(self, rack_builder, optimizer=None) -> str:
        """Saves a checkpoint of the whole rack (and `optimizer`, when given); returns its manifest path."""
        return self.save_checkpoint("rack", rack_builder, optimizer=optimizer, stack_idx=rack_builder.num_stacks - 1)

    def load_progressive_checkpoint(self, path: str | os.PathLike, *, verify_hashes: bool | None = None) -> dict:
        """Verifies a checkpoint and returns its data: `timestamp`, `stack_idx`, `epoch`, `step`, `loss`,
        `eval_loss`, `stage`, `config` (the rack's), `trainer_state`, `files`, and `activation_cache` (a
        mapping of names to tensors, each read when first used) when one was saved. `path` is a
        directory, its manifest, or "latest"."""
        return self.checkpoints.read(path, verify_hashes)

    def restore_from_checkpoint(self, checkpoint_path: str | os.PathLike, rack_builder, *, optimizer=None,
                                map_location: str | torch.device | None = None,
                                verify_hashes: bool | None = None) -> bool:
        """Restores a run: the rack in place (stack layout, weights, dtypes, adapters), the trainer state
        (stage cursor, steps, data position) and RNG states; the optimizer, LR scheduler, scaler and
        registered objects of a mid-stage checkpoint go into the stage's run when training continues
        (`train()` or `train_rack`). With `optimizer`, its state is restored at once, matched by name.

        Args:
            checkpoint_path: a checkpoint directory, its `manifest.json`, or "latest".
            rack_builder: the rack to restore into (its stack layout may differ; the architecture may not).
            map_location (*optional*): device to put the restored rack on (default: where it is).
            verify_hashes (*optional*): check sha256 of every file (default `training.verify_checkpoint_hashes`).

        Returns:
            True. Failures raise `CheckpointError` naming the checkpoint, file and problem.
        """
        self.restore_checkpoint(checkpoint_path, rack_builder, optimizer=optimizer, map_location=map_location,
                                verify_hashes=verify_hashes, for_schedule=bool(self.schedule))
        return True

    def list_checkpoints(self, *, include_invalid: bool = False, verify_hashes: bool = False) -> list[dict]:
        """Checkpoints in `checkpoint_dir`, newest first: `path` (the manifest), `directory`, `stack_idx`,
        `epoch`, `step`, `loss`, `eval_loss`, `timestamp`, `stage`, `kind`. Incomplete or damaged ones are
        skipped with a warning that says why (or listed with `valid: False` and `error`)."""
        return self.checkpoints.list(include_invalid=include_invalid, verify_hashes=verify_hashes)

    def get_training_info(self) -> dict:
        """Where the run stands, its checkpointing settings, and its checkpoints."""
        state, manager = self.state, self.checkpoints
        entries = manager.list()
        rack = self.rack
        return {
            "global_step": state.global_step, "stage": state.stage, "stage_entered": state.stage_entered,
            "stage_step": state.stage_step, "epoch": state.epoch, "epoch_batches": state.epoch_batches,
            "tokens_seen": state.tokens_seen, "best_eval_loss": state.best_eval_loss,
            "num_stages": len(self.schedule), "stage_results": list(state.stage_results),
            "current_stacks": rack.num_stacks if rack is not None else None,
            "stack_sizes": list(rack.config.stack_sizes) if rack is not None else None,
            "checkpoint_dir": os.fspath(self.checkpoint_dir), "save_interval": self.save_interval,
            "save_total_limit": self.args.save_total_limit, "num_checkpoints": len(entries),
            "latest_checkpoint": entries[0]["path"] if entries else None, "resumed_from": self.resumed_from,
            "checkpoints_saved": manager.saves, "checkpoint_seconds": manager.save_seconds,
            "num_processes": self.accelerator.num_processes,
        }
