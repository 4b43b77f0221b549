"""`train_rack`: train one stack of a rack on a DataLoader you hand in (the original system's call).

A schedule (`stages:` and `train()`) is the trainer's own way to grow and train a rack. `train_rack` is
the step-by-step way of the original `ProgressiveTrainer`: the caller grows the rack and passes any
DataLoader of token batches, and `train_rack(rack, loader, target_stacks=k)` trains stack `k - 1` over
the frozen stacks before it, with the head on top of stack `k - 1` (stacks after it are not used).
It runs the same machinery as a stage (freezing, AdamW over exactly the trainable parameters by name,
Accelerate, checkpoints every `save_interval` steps and at the end) and counts as one stage of the
trainer's state, so `restore_from_checkpoint` followed by the same `train_rack` call continues it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping

import torch
from accelerate.utils import set_seed
from transformers import get_scheduler

from .fsdp import unshard_rack, uses_fsdp
from .objectives import CausalLMObjective
from .schedule import ResolvedStage, StageConfig
from .stage import StageModule, count_parameters, first_trained_stack, optimizer_groups, set_trainable

logger = logging.getLogger(__name__)


class PrefixStageModule(StageModule):
    """A `StageModule` over the rack's first `stop` stacks: the head reads the output of stack `stop - 1`."""

    def __init__(self, rack, objective, first_trained: int, stop: int, train_embeddings: bool = False):
        super().__init__(rack, objective, first_trained, train_embeddings)
        self.stop = stop

    def forward(self, input_ids=None, labels=None, weights=None, trunk_hidden=None):
        body = self.rack.base_model
        if self.train_embeddings:
            hidden = body.embed_tokens(input_ids)
        else:
            hidden = self.trunk_forward(input_ids)
        attention = body.attention_inputs(hidden)
        hidden = body.forward_stacks(hidden, self.first_trained, self.stop, **attention)  # (B, T, H)
        hidden = body.norm(hidden.to(body.norm.weight.dtype))
        return self.objective.loss(hidden, self.rack.get_output_embeddings(), labels, weights)


class DirectTrainingMixin:
    """`ProgressiveTrainer.train_rack`."""

    def train_rack(self, rack_builder, dataloader, target_stacks: int | None = None, *, max_steps: int | None = None,
                   learning_rate: float | None = None, train: list[str] | None = None) -> dict:
        """Trains stack `target_stacks - 1` of the rack on `dataloader`, the stacks before it frozen.

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

        Returns:
            A dict with `final_loss` (mean loss of the last logging window), `first_loss`, `losses` (one
            per optimizer step), `steps`, `stack`, `target_stacks`, `global_step`, `seconds`, `checkpoint`.
        """
        rack, args, accelerator = rack_builder, self.args, self.accelerator
        if rack.config.attention_mode != "causal":
            raise ValueError("train_rack trains causal racks (next-token loss); for masked objectives use a stage "
                             "schedule (`stages:` with `objective:`) and `train()`.")
        k = rack.num_stacks if target_stacks is None else target_stacks
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"`target_stacks` must be a positive integer; got {target_stacks!r}.")
        while rack.num_stacks < k:
            rack.append_stack(rack.config.stack_sizes[-1], dtype=rack.config.stack_dtypes[-1])
        stack = k - 1
        state = self.state
        resuming = self.checkpoints.pending is not None and state.stage_entered and state.stage == stack
        if not resuming:
            set_seed(args.seed + stack)
            state.stage, state.stage_entered = stack, True
            state.stage_step = state.epoch = state.epoch_batches = 0
        parts = train or (["stack", "head", "embeddings"] if stack == 0 else ["stack", "head"])
        steps = max_steps or args.steps_per_stage
        config = StageConfig(name=f"stack_{stack}", stack=stack, train=parts, max_steps=steps or 1,
                             learning_rate=learning_rate or args.learning_rate)
        stage = ResolvedStage(stack, config.name, config, stack, tuple(rack.config.stack_sizes))
        self.rack = rack.to(accelerator.device)
        trainable = set_trainable(rack, stage)
        embeddings = config.trains("embeddings")
        objective = CausalLMObjective()
        objective.loss_chunk_size = args.loss_chunk_size
        module = PrefixStageModule(rack, objective, min(first_trained_stack(rack, embeddings), k), k,
                                   train_embeddings=embeddings)
        optimizer = torch.optim.AdamW(optimizer_groups(rack, config.weight_decay), lr=config.learning_rate)
        module, optimizer, loader = accelerator.prepare(module, optimizer, dataloader)
        if steps is None:
            steps = max(1, len(loader) // args.gradient_accumulation_steps)
        scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps,
                                  num_training_steps=steps)
        from .trainer import StageRun

        run = StageRun(stage, module, optimizer, scheduler, loader, None, module.objective, steps, trainable,
                       time.perf_counter())
        if resuming:
            self.checkpoints.restore_run(run)
        else:
            self.checkpoints.pending = None
            self.run_log.record("stage_start", state.global_step, stage=stack, stage_name=config.name, stack=stack,
                                stack_sizes=list(rack.config.stack_sizes), **count_parameters(rack))
        losses = self._direct_loop(run)
        if uses_fsdp(accelerator):  # the caller's rack gets plain weights back (see fsdp.py)
            unshard_rack(rack, run.module, accelerator.device)
        history = self.run_log.history
        first = next((r["loss"] for r in history if r["kind"] == "train" and r.get("stage") == stack), None)
        final = next((r["loss"] for r in reversed(history) if r["kind"] == "train"), None)
        summary = {"stage": stack, "name": config.name, "stack": stack, "stack_sizes": list(rack.config.stack_sizes),
                   "steps": steps, "first_loss": first, "final_loss": final, "eval_loss": None, "perplexity": None,
                   "seconds": time.perf_counter() - run.started}
        state.stage_results.append(summary)
        self.run_log.record("stage_end", state.global_step, **summary)
        state.stage, state.stage_entered = k, False
        checkpoint = self.checkpoints.stage_end(run)
        accelerator.free_memory()
        return {**summary, "losses": losses, "target_stacks": k, "global_step": state.global_step,
                "checkpoint": checkpoint}

    def _direct_loop(self, run) -> list[float]:
        state, accelerator, args = self.state, self.accelerator, self.args
        losses, window, step_losses = [], [], []
        while state.stage_step < run.total_steps:
            batches = (accelerator.skip_first_batches(run.train_loader, state.epoch_batches) if state.epoch_batches
                       else run.train_loader)
            if hasattr(batches, "set_epoch"):  # Accelerate's loaders count epochs themselves; follow ours
                batches.set_epoch(state.epoch)
            for batch in batches:
                input_ids = _input_ids(batch)
                with accelerator.accumulate(run.module):
                    with accelerator.autocast():
                        loss, _ = run.module(input_ids, input_ids)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm:
                        accelerator.clip_grad_norm_([p for p in self.rack.parameters() if p.requires_grad],
                                                    args.max_grad_norm)
                    run.optimizer.step()
                    run.optimizer.zero_grad(set_to_none=True)
                state.epoch_batches += 1
                state.tokens_seen += input_ids.numel() * accelerator.num_processes
                step_losses.append(loss.detach())
                if not accelerator.sync_gradients:
                    continue
                state.stage_step += 1
                state.global_step += 1
                run.scheduler.step()
                step_loss = accelerator.reduce(torch.stack(step_losses).mean(), reduction="mean").item()
                losses.append(step_loss)
                window.append(step_loss)
                step_losses.clear()
                if state.stage_step % args.logging_steps == 0 or state.stage_step == run.total_steps:
                    self.run_log.record("train", state.global_step, stage=run.stage.index,
                                        loss=sum(window) / len(window), lr=run.scheduler.get_last_lr()[0],
                                        tokens=state.tokens_seen)
                    window.clear()
                self.checkpoints.step_end(run)
                if state.stage_step >= run.total_steps:
                    break
            if state.epoch_batches >= _length(run.train_loader):
                state.epoch += 1
                state.epoch_batches = 0
        return losses


def _input_ids(batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping) and "input_ids" in batch:
        return batch["input_ids"]
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"train_rack expects batches of input_ids tensors, dicts with `input_ids`, or tuples whose first "
                    f"item is input_ids; got a {type(batch).__name__}.")


def _length(loader) -> float:
    try:
        return len(loader)
    except TypeError:
        return math.inf
