"""`ProgressiveTrainer`: grow and train a rack stack by stack, on one CPU, one GPU or many processes.

The algorithm, in `train()`: for each stage of the schedule, enter it (grow the rack, attach adapters,
freeze everything but what the stage trains, build the optimizer and LR schedule over exactly the
trainable parameters, `accelerator.prepare`), run it (a plain PyTorch loop with `accumulate` /
`backward` / clipping), and leave it (evaluate, save, free the stage's objects). `train_rack`
(`compat.py`, the original system's call) runs the same three steps on one stage with the caller's
DataLoader. Accelerate is imported only by the `training` package.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import math
import os
import resource
import time
from collections.abc import Mapping

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from .. import adapters
from ..configuration_stackwise import StackWiseConfig
from ..data import build_datasets, check_tokenizer_fits, document_separator, load_or_train_tokenizer
from ..errors import CheckpointError, NonFiniteError
from ..layout import TRUNK, stack_adapter_name
from ..modeling_stackwise import StackWiseForCausalLM, StackWiseForMaskedLM
from ..packing import DocumentMasking
from .arguments import TrainingArguments
from .batches import EpochSampler, IndexedBlocks, batch_input_ids, indexed_loader
from .checkpoint_format import checkpoint_directory
from .checkpointing import CheckpointContents, CheckpointManager, Restored
from .compat import GuideTrainerMixin
from .experiment import ExperimentConfig
from .flops import StageFlops, stage_flops
from .fsdp import check_fsdp_support, gathered_optimizer_state, keep_loss_in_float32, plain_copy, unshard_rack, uses_fsdp
from .hub_sync import HubSync, hub_checkpoint_location
from .masking import stage_mask_ratios
from .objectives import attention_mode_of, build_objective
from .results import StageSummary, TrainResult
from .schedule import ResolvedStage, StageConfig, resolve_schedule
from .stage import (
    StageModule,
    StageRun,
    check_trunk_quantization,
    count_parameters,
    first_trained_stack,
    grow_for_stage,
    optimizer_groups,
    set_trainable,
    stack_roles,
    trunk_on_host,
)
from .state import TrainerState
from .tracking import PLOT_NAME, RunLog, ThroughputMeter, resolve_trackers
from .trunk_cache import TrunkCache

logger = logging.getLogger(__name__)


class ProgressiveTrainer(GuideTrainerMixin):
    """Trains a rack progressively, stage by stage, with Accelerate.

    Args:
        config: an `ExperimentConfig`, a path to an experiment YAML, or a `StackWiseConfig` loaded with
            `StackWiseConfig.from_yaml` from a file with `training:`/`stages:` sections. The trainer
            works on its own copy: the caller's config is never changed.
        rack (*optional*): the rack to train; built from the model config when omitted.
        train_dataset / eval_dataset (*optional*): datasets of token blocks (rows with `input_ids`);
            built from the `data:` section (bundled Shakespeare by default) when omitted.
        tokenizer (*optional*): saved beside the final rack; trained/loaded from `data:` when omitted.
        accelerator (*optional*): an `Accelerator`; one is built from the training arguments otherwise.

    Example:

    ```python
    >>> from stackwise_hf.training import ExperimentConfig, ProgressiveTrainer
    >>> experiment = ExperimentConfig.from_yaml("configs/default.yaml", overrides=["stages.*.max_steps=2"])
    >>> result = ProgressiveTrainer(experiment).train()  # doctest: +SKIP
    >>> result.final_loss < result.stages[0].first_loss  # doctest: +SKIP
    True
    ```
    """

    def __init__(self, config=None, *, rack=None, train_dataset=None, eval_dataset=None, tokenizer=None,
                 accelerator: Accelerator | None = None):
        self.experiment = copy.deepcopy(_as_experiment(config))
        self.args: TrainingArguments = self.experiment.training
        self.rack = rack
        self.train_dataset, self.eval_dataset, self.tokenizer = train_dataset, eval_dataset, tokenizer
        self.accelerator = accelerator or build_accelerator(self.args)
        check_fsdp_support(self.accelerator, self.experiment.stages)
        keep_loss_in_float32(self.accelerator)
        self.state = TrainerState()
        self.run_log = RunLog(self.accelerator, self.args.output_dir)
        self.meter = ThroughputMeter(self.accelerator.device, self.accelerator.num_processes)
        self.schedule: list[ResolvedStage] = []
        self.trunk_cache: TrunkCache | None = None  # from the first stage with `trunk_mode: cache` on
        self.train_stream = None  # a `streaming.TrainStream` (data.streaming: true); checkpoints keep its position
        self.documents: DocumentMasking | None = None  # document-aware packing (data.document_mask)
        self.checkpoints = CheckpointManager(self.args, self.accelerator)
        self.checkpoint_objects: list = []  # `register_for_checkpointing`
        self.schedule_origin: list[int] | None = None  # the stack layout the schedule starts from
        self.resumed_from: str | None = None
        self._restored: Restored | None = None  # the checkpoint this run continues
        self._pending: Restored | None = None  # a mid-stage checkpoint waiting for its stage to be rebuilt
        self.hub_sync: HubSync | None = None  # pushes while training (`push_to_hub`), main process only

    # The algorithm ----------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Runs every remaining stage of the schedule; returns the run's `TrainResult`."""
        self.setup()
        for stage in self.schedule[self.state.stage:]:
            run = self.enter_stage(stage)
            self.run_stage(run)
            self.exit_stage(run)
        return self.finish()

    def setup(self) -> None:
        """Seeds, data, tokenizer and rack; resolves the schedule so bad stages fail before training."""
        set_seed(self.args.seed)
        self._setup_data()
        if self.rack is None:
            self.rack = self._build_rack()
        self.schedule = resolve_schedule(self.experiment.stages, self.rack.config.stack_sizes, self.args.max_stacks)
        self._check_objectives()
        check_trunk_quantization(self.rack.config, self.schedule)
        self._check_streaming()
        self.documents = self._document_masking()
        self.rack.to(self.accelerator.device)
        if self.accelerator.trackers == [] and resolve_trackers(self.args.report_to):
            self.accelerator.init_trackers(self.args.project_name, config=_flat_config(self.experiment))
        logger.info("Schedule: %s", [(s.name, s.config.grow, s.stack, s.config.train) for s in self.schedule])
        if self.args.push_to_hub and self.accelerator.is_main_process and self.hub_sync is None:
            self.hub_sync = HubSync(self.args.resolved_hub_model_id, self.args.hub_strategy, self.args.output_dir)
        self._resume()

    def enter_stage(self, stage: ResolvedStage, *, dataloader=None, optimizer=None, stop: int | None = None) -> StageRun:
        """Grows and freezes the rack for `stage` and builds its run: objective, stage module, optimizer,
        LR schedule, data, all prepared by Accelerate. `dataloader` / `optimizer`: the caller's instead of
        the trainer's own (`train_rack`); `stop`: use only the rack's first `stop` stacks."""
        set_seed(self.args.seed + stage.index)
        if not self.state.stage_entered:
            grow_for_stage(self.rack, stage)
            self.state.stage_entered = True
            self.state.stage_step = self.state.epoch = self.state.epoch_batches = 0
        config = stage.config
        self._float32_masters(stage)
        trainable = set_trainable(self.rack, stage)
        self.rack.base_model.stacks[stage.stack].gradient_checkpointing = config.gradient_checkpointing
        objective = build_objective(config.objective, **self._objective_kwargs(stage))
        objective.loss_chunk_size = self.args.loss_chunk_size
        if self.args.compile_blocks:
            for block in self.rack.base_model.stacks[stage.stack].blocks:
                block.compile()  # in place: the block stays compiled when later stages freeze it
        stop = self.rack.num_stacks if stop is None else stop
        first = min(first_trained_stack(self.rack, config.trains("embeddings")), stop)
        module = StageModule(self.rack, objective, first, train_embeddings=config.trains("embeddings"), stop=stop)
        loader, train_data, sampler = self._train_loader(stage, dataloader)
        cache = self._sync_trunk_cache(stage, module, objective, train_data) if config.trunk_mode == "cache" else None
        host_trunk = self._place_trunk(stage)
        flops = self._stage_flops(stage, module, cache, train_data)
        if optimizer is None:
            optimizer = torch.optim.AdamW(optimizer_groups(self.rack, config.weight_decay), lr=config.learning_rate,
                                          **_fused_if_cuda(self.accelerator.device))
        # With the trunk on the host, `prepare` must not move the module (and the trunk) to the device.
        module, optimizer, loader = self.accelerator.prepare(
            module, optimizer, loader, device_placement=[not host_trunk, True, True]
        )
        total_steps = self._total_steps(config, _length(loader))
        # Not prepared: Accelerate's scheduler wrapper steps once per process; ours counts optimizer steps.
        scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps,
                                  num_training_steps=total_steps)
        run = StageRun(stage, module, optimizer, scheduler, loader, train_data, sampler, objective, total_steps,
                       trainable, flops=flops)
        self.run_log.record("stage_start", self.state.global_step, stage=stage.index, stage_name=stage.name,
                            stack=stage.stack, stack_sizes=list(self.rack.config.stack_sizes),
                            **count_parameters(self.rack))
        logger.info("Entering %s: stack %d of %s trains %s for %d steps (%d trainable parameters).", stage.name,
                    stage.stack, list(self.rack.config.stack_sizes), config.train, total_steps, sum(
                        p.numel() for p in self.rack.parameters() if p.requires_grad))
        self._continue_from_checkpoint(run)
        return run

    def run_stage(self, run: StageRun) -> None:
        bar = tqdm(total=run.total_steps, initial=self.state.stage_step, desc=run.stage.name,
                   disable=not self.accelerator.is_local_main_process, dynamic_ncols=True)
        window: list[torch.Tensor] = []  # micro-batch losses of the current logging window
        step: list[torch.Tensor] = []  # micro-batch losses of the current optimizer step
        self.meter.begin(self.state)
        while self.state.stage_step < run.total_steps:
            for batch in self._epoch_batches(run):
                loss = self._train_micro_batch(run, batch)
                window.append(loss)
                step.append(loss)
                self.state.epoch_batches += 1
                if not self.accelerator.sync_gradients:
                    continue
                run.step_losses.append(torch.stack(step).mean())
                step.clear()
                self._check_finite(run)
                self.state.stage_step += 1
                self.state.global_step += 1
                bar.update(1)
                self._after_optimizer_step(run, window, bar)
                if self.state.stage_step >= run.total_steps:
                    break
            if self.state.epoch_batches >= _length(run.train_loader):  # the epoch was consumed whole
                self.state.epoch += 1
                self.state.epoch_batches = 0
        bar.close()

    def exit_stage(self, run: StageRun) -> StageSummary:
        """Evaluates (when there is held-out data), merges the stage's adapters when asked, records the
        stage's summary, saves the stage-end checkpoint and frees the stage's objects."""
        metrics = self.evaluate(run)
        if uses_fsdp(self.accelerator):  # plain weights again before merging, saving or growing
            unshard_rack(self.rack, run.module, self.accelerator.device)
        if run.stage.config.merge_adapters:
            self._merge_stage_adapters(run.stage)
        self._store_float16(run.stage)
        summary = StageSummary(
            stage=run.stage.index, name=run.stage.name, stack=run.stage.stack,
            stack_sizes=list(self.rack.config.stack_sizes), steps=run.total_steps,
            first_loss=_first_train_loss(self.run_log.history, run.stage.index),
            final_loss=_last_train_loss(self.run_log.history),
            eval_loss=metrics["loss"] if metrics else None, perplexity=metrics["perplexity"] if metrics else None,
            seconds=time.perf_counter() - run.started, tokens=self.state.tokens_seen, flops=self.state.flops,
            train_seconds=self.state.train_seconds, **_peak_memory(self.accelerator.device),
        )
        self.state.stage_results.append(summary.as_dict())
        self.run_log.record("stage_end", self.state.global_step, **summary.as_dict())
        self.state.stage += 1
        self.state.stage_entered = False
        self.save_checkpoint("stage_end", self.rack, stack_idx=run.stage.stack)
        self.accelerator.free_memory()
        del run
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return summary

    def finish(self) -> TrainResult:
        """Saves the final rack (with adapters) and tokenizer, draws the plot, closes the trackers."""
        final_dir = os.path.join(self.args.output_dir, "final")
        if self.trunk_cache is not None and self.trunk_cache.offloaded:
            # The trunk was kept on the host: hand back a rack on one device rather than split across two.
            logger.info("The frozen trunk was kept on the host; the trained rack is returned on the CPU.")
            self.rack.to("cpu")
            self.trunk_cache.offloaded = []
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.rack.save_rack(final_dir, remote_code=self.args.remote_code)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(final_dir)
            if self.args.plot:
                self.run_log.plot(os.path.join(self.args.output_dir, PLOT_NAME))
            if self.hub_sync is not None:
                self.hub_sync.rack_saved(final_dir)
                self.hub_sync.close()  # waits for the pushes still queued
                self.hub_sync = None
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        stages = [StageSummary.from_dict(s) for s in self.state.stage_results]
        last = stages[-1] if stages else None
        return TrainResult(
            final_loss=last and last.final_loss, eval_loss=last and last.eval_loss,
            perplexity=last and last.perplexity, global_step=self.state.global_step,
            num_processes=self.accelerator.num_processes, output_dir=final_dir, stages=stages,
        )

    # One step --------------------------------------------------------------------------------------

    def _train_micro_batch(self, run: StageRun, batch) -> torch.Tensor:
        input_ids = batch_input_ids(batch)
        sample_ids = batch.get("sample_id") if isinstance(batch, Mapping) else None
        # Masks are drawn anew each epoch, except over a cache, which holds the trunk's output over epoch 0's.
        epoch = 0 if run.stage.config.trunk_mode == "cache" else self.state.epoch
        prepared = run.objective.prepare(input_ids, run.stage.index, sample_ids, epoch=epoch)
        documents = self._document_inputs(input_ids)
        with self.accelerator.accumulate(run.module):
            with self.accelerator.autocast():
                loss, _ = run.module(prepared.input_ids, self._document_labels(prepared.labels, documents),
                                     prepared.weights, trunk_hidden=self._trunk_hidden(run, "train", sample_ids),
                                     **documents)
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients:
                # With no clipping, an infinite max norm only measures (the norm is logged either way).
                norm = self.accelerator.clip_grad_norm_(
                    [p for p in self.rack.parameters() if p.requires_grad], self.args.max_grad_norm or math.inf
                )
                run.grad_norm = float(norm) if norm is not None else None
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        self.state.tokens_seen += input_ids.numel() * self.accelerator.num_processes
        self.state.flops += run.flops.step_flops(input_ids.shape) * self.accelerator.num_processes
        return loss.detach()

    def _after_optimizer_step(self, run: StageRun, window: list[torch.Tensor], bar) -> None:
        lr = run.scheduler.get_last_lr()[0]  # the rate this step used
        run.scheduler.step()
        self.meter.step_end(self.state)
        step = self.state.stage_step
        if step % self.args.logging_steps == 0 or step == run.total_steps:
            loss = self.accelerator.reduce(torch.stack(window).mean(), reduction="mean").item()
            health = {"loss": loss, "lr": lr, "grad_norm": run.grad_norm, **self.meter.rates(self.state)}
            self.run_log.record("train", self.state.global_step, stage=run.stage.index, tokens=self.state.tokens_seen,
                                flops=self.state.flops, seconds=self.state.train_seconds, **health)
            bar.set_postfix(_postfix(health), refresh=False)
            self.meter.start_window(self.state)
        if step % self.args.logging_steps == 0:
            window.clear()
        if self.args.eval_steps and step % self.args.eval_steps == 0 and step != run.total_steps:
            self.evaluate(run)
            self.meter.pause()  # evaluation is not training time
        interval = self.args.save_interval
        if interval and self.state.global_step % interval == 0 and step < run.total_steps:
            self.save_checkpoint("interval", self.rack, run=run, stack_idx=run.stage.stack)

    def _epoch_batches(self, run: StageRun):
        if self.train_stream is not None and run.train_loader is self.train_stream:
            # A stream keeps its own position (checkpointed); it yields up to the end of its current epoch.
            return self.train_stream.epoch_batches(self.accelerator.device)
        loader = run.train_loader
        if self.state.epoch_batches:
            loader = self.accelerator.skip_first_batches(loader, self.state.epoch_batches)
        # Accelerate's loader sets the sampler's epoch from its own pass counter when iterated; a loader
        # rebuilt on resume (or the one skipping a resumed epoch's first batches) must count from our epoch.
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.state.epoch)
        return loader

    def _train_loader(self, stage: ResolvedStage, dataloader) -> tuple[DataLoader, object, EpochSampler | None]:
        """(loader, the dataset behind it, the trainer's sampler): the trainer's own shuffled loader over
        `train_dataset`, or the caller's DataLoader with sample indices attached where it allows."""
        if dataloader is not None:
            loader = indexed_loader(dataloader)
            return loader, loader.dataset.blocks if isinstance(loader.dataset, IndexedBlocks) else None, None
        if self.train_stream is not None:
            # Passed through `prepare` untouched: each process already reads its own shard, and Accelerate's
            # loader reads a batch ahead, which would save a stream position one batch past the trained one.
            return self.train_stream, None, None
        if self.train_dataset is None:
            raise ValueError("no training data: pass `train_dataset`, or call `train()` so the `data:` section builds it.")
        sampler = EpochSampler(len(self.train_dataset), seed=self.args.seed * 1000 + stage.index)
        loader = DataLoader(
            IndexedBlocks(self.train_dataset), batch_size=self.args.per_device_train_batch_size, sampler=sampler,
            drop_last=True, num_workers=self.args.dataloader_num_workers,
        )
        return loader, self.train_dataset, sampler

    # Half precision ------------------------------------------------------------------------------

    def _float32_masters(self, stage: ResolvedStage) -> None:
        """A float16 stack whose weights the stage trains is trained in float32 (master weights, as mixed
        precision training keeps them): AdamW's updates on float16 weights underflow and overflow within a few
        steps. The stack is stored in float16 again when the stage ends (`_store_float16`)."""
        for i, role in enumerate(stack_roles(stage)):
            if role == "trained" and self.rack.config.stack_dtypes[i] == "float16":
                self.rack.cast_stack(i, "float32")
                self.state.float32_master_stacks.append(i)
                logger.info("%s: stack %d is float16; it trains with float32 master weights and is stored in float16 "
                            "at the stage's end.", stage.name, i)

    def _store_float16(self, stage: ResolvedStage) -> None:
        for i in self.state.float32_master_stacks:
            self.rack.cast_stack(i, "float16")
            if not all(torch.isfinite(p).all() for p in self.rack.base_model.stacks[i].parameters()):
                raise NonFiniteError(f"stage {stage.name}: stack {i}'s trained weights do not fit float16 (they overflow "
                                     "to inf); train it in bfloat16 or float32 instead.")
        self.state.float32_master_stacks = []

    def _check_finite(self, run: StageRun) -> None:
        """Stops the stage at the first optimizer step whose loss or gradient norm is not finite, before
        anything is logged or saved from it."""
        loss = run.step_losses[-1]
        problems = [] if torch.isfinite(loss) else [f"loss {loss.item()}"]
        if run.grad_norm is not None and not math.isfinite(run.grad_norm):
            problems.append(f"gradient norm {run.grad_norm}")
        if problems:
            raise NonFiniteError(
                f"stage {run.stage.name}, stack {run.stage.stack}: non-finite {' and '.join(problems)} at step "
                f"{self.state.global_step + 1} (step {self.state.stage_step + 1} of the stage); training stopped and "
                "nothing from this step was saved. Lower the learning rate, clip gradients (`max_grad_norm`), or "
                "train the stack in bfloat16/float32."
            )

    # Evaluation ------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, run: StageRun) -> dict | None:
        """Loss and perplexity on the held-out split, exact across processes (each process takes every
        `num_processes`-th batch; sums are reduced). None when there is no held-out split."""
        if self.eval_dataset is None:
            return None
        module = run.module
        module.eval()
        device = self.accelerator.device
        total, count = torch.zeros((), device=device, dtype=torch.float64), torch.zeros((), device=device)
        batches, counted = self._eval_loader()
        for i, batch in enumerate(batches):
            prepared = run.objective.prepare(batch["input_ids"].to(device), run.stage.index,
                                             batch["sample_id"].to(device), evaluation=True)
            documents = self._document_inputs(batch["input_ids"].to(device))
            with self.accelerator.autocast():
                loss, n = module(prepared.input_ids, self._document_labels(prepared.labels, documents),
                                 prepared.weights, trunk_hidden=self._trunk_hidden(run, "eval", batch["sample_id"]),
                                 **documents)
            if i < counted:
                total += loss.double() * n
                count += n
        module.train()
        total, count = self.accelerator.reduce(total, "sum"), self.accelerator.reduce(count, "sum")
        loss = (total / count.clamp(min=1)).item()
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "positions": int(count.item())}
        if self.state.best_eval_loss is None or loss < self.state.best_eval_loss:
            self.state.best_eval_loss = loss
        # The training budget spent so far: held-out loss against tokens and FLOPs reads off the log.
        self.run_log.record("eval", self.state.global_step, stage=run.stage.index, tokens=self.state.tokens_seen,
                            flops=self.state.flops, **metrics)
        logger.info("eval at step %d (%s): loss %.4f, perplexity %.2f", self.state.global_step, run.stage.name,
                    loss, metrics["perplexity"])
        return metrics

    def _eval_loader(self) -> tuple[DataLoader, int]:
        """This process's eval batches (every `num_processes`-th) and how many of them count. With several
        processes every process must run the same number of forward passes (FSDP gathers shards together;
        DDP's forward broadcasts the module's buffers), so a process with fewer batches repeats the first
        batch, uncounted."""
        blocks = IndexedBlocks(self.eval_dataset)
        size = self.args.per_device_eval_batch_size
        n_batches = math.ceil(len(blocks) / size)
        if self.args.max_eval_batches:
            n_batches = min(n_batches, self.args.max_eval_batches)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        mine = [list(range(b * size, min((b + 1) * size, len(blocks)))) for b in range(rank, n_batches, world)]
        counted = len(mine)
        if world > 1:
            mine += [list(range(min(size, len(blocks))))] * (math.ceil(n_batches / world) - counted)
        return DataLoader(blocks, batch_sampler=mine), counted

    # Trunk cache (`trunk_mode: cache`) -------------------------------------------------------------

    def _sync_trunk_cache(self, stage: ResolvedStage, module: StageModule, objective, train_data):
        """Builds, extends or reuses the frozen trunk's output over the train and eval blocks; returns the
        cache's report (what it ran)."""
        if train_data is None:
            raise ValueError(
                f"stage {stage.name}: `trunk_mode: cache` looks blocks up by index, so it needs a DataLoader over a "
                "map-style dataset with the default collation (or the trainer's own `train_dataset`)."
            )
        if self.trunk_cache is None:
            self.trunk_cache = TrunkCache(self.args.trunk_cache_budget, self.args.trunk_cache_dir,
                                          batch_size=self.args.per_device_eval_batch_size)
        datasets, rows = {"train": train_data}, {}
        if self.eval_dataset is not None:
            datasets["eval"] = self.eval_dataset
            rows["eval"] = len(self.eval_dataset)
            if self.args.max_eval_batches:
                rows["eval"] = min(rows["eval"], self.args.max_eval_batches * self.args.per_device_eval_batch_size)
        # On disk the main process builds; the others then find the finished cache by its fingerprint.
        first = self.accelerator.main_process_first() if self.args.trunk_cache_dir else contextlib.nullcontext()
        started = time.perf_counter()
        with first:
            report = self.trunk_cache.sync(
                module, objective, stage.index, datasets, rows=rows, tokenizer=self.tokenizer,
                device=self.accelerator.device, autocast=self.accelerator.autocast, precision=self.args.mixed_precision,
                documents=self.documents,
            )
        self.state.train_seconds += time.perf_counter() - started  # building the cache is training time
        self.run_log.record("trunk_cache", self.state.global_step, stage=stage.index, **report.as_dict())
        return report

    def _stage_flops(self, stage: ResolvedStage, module: StageModule, cache_report, train_data) -> StageFlops:
        """The stage's FLOP count (`flops.py`); adds a trunk-cache build or extension to the run's total."""
        cached = stage.config.trunk_mode == "cache" and self.trunk_cache.active
        flops = stage_flops(self.rack, module.first_trained, causal=stage.config.objective == "clm",
                            trunk_cached=cached,
                            checkpointed_stacks=[stage.stack] if stage.config.gradient_checkpointing else [])
        if cache_report is not None and cache_report.stacks_run:
            # An in-memory cache is built by every process; one on disk by the main process alone.
            builders = self.accelerator.num_processes if self.trunk_cache.directory is None else 1
            block_size = IndexedBlocks(train_data)[0]["input_ids"].shape[-1]
            self.state.flops += builders * flops.cache_build_flops(cache_report.stacks_run, cache_report.rows["train"],
                                                                   block_size)
        return flops

    def _trunk_hidden(self, run: StageRun, split: str, sample_ids) -> torch.Tensor | None:
        if run.stage.config.trunk_mode != "cache" or not self.trunk_cache.active:
            return None
        return self.trunk_cache.hidden(split, sample_ids, self.accelerator.device)

    def _place_trunk(self, stage: ResolvedStage) -> bool:
        """Puts the frozen trunk where the stage needs it (`stage.trunk_on_host`); True when it stays on
        the host. In cache mode the trunk does not run during the stage, so the device holds only the
        trained stacks, the head and the batch (the cache streams one stack at a time to the device to
        extend). A recompute stage brings an offloaded trunk back."""
        cache = self.trunk_cache
        host = cache is not None and trunk_on_host(stage, torch.device(self.accelerator.device).type,
                                                   self.accelerator.num_processes)
        if host:
            cache.offload_trunk(self.rack, cache.depth, "cpu")
        elif cache is not None and cache.offloaded:
            cache.restore_trunk(self.rack, self.accelerator.device)
        return host

    # Checkpoints -----------------------------------------------------------------------------------

    def register_for_checkpointing(self, *objects) -> None:
        """Saves and restores `objects` (anything with `state_dict` / `load_state_dict`) with every checkpoint,
        in registration order, as `accelerator.register_for_checkpointing` does, but without pickle."""
        for obj in objects:
            if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                raise TypeError(f"{type(obj).__name__} has no `state_dict` / `load_state_dict`; it cannot be checkpointed.")
        self.checkpoint_objects.extend(objects)

    def save_checkpoint(self, kind: str, rack, *, run: StageRun | None = None, optimizer=None, stack_idx: int,
                        epoch=None, loss=None, activation_cache=None) -> str:
        """Writes a checkpoint of the run (every process must call this); returns its manifest's path.
        `kind`: "interval"/"stage_end" (automatic, rotated) or an explicit save's kind (never rotated)."""
        history = self.run_log.history
        self.state.log_history = list(history)
        optimizer = optimizer if optimizer is not None else (run.optimizer if run is not None else None)
        optimizer_state = None
        if run is not None and uses_fsdp(self.accelerator):  # mid-stage under FSDP: gather the shards (fsdp.py)
            rack = plain_copy(rack, run.module)
            optimizer_state = gathered_optimizer_state(optimizer)
        if activation_cache is None and self.trunk_cache is not None and self.trunk_cache.fingerprint is not None \
                and (self.args.save_activation_cache or kind not in ("interval", "stage_end")):
            activation_cache = self.trunk_cache
        if loss is None:
            loss = _last_train_loss(history)
        last_eval = next((r for r in reversed(history) if r["kind"] == "eval"), None)
        eval_loss = last_eval["loss"] if last_eval is not None and last_eval["step"] == self.state.global_step else None
        path = self.checkpoints.save(CheckpointContents(
            kind=kind, rack=rack, state=self.state, stack_idx=stack_idx, optimizer=optimizer,
            scheduler=run.scheduler if run is not None else None, scaler=self.accelerator.scaler,
            optimizer_state=optimizer_state, objects=self.checkpoint_objects, data_position=self.train_stream,
            activation_cache=activation_cache,
            epoch=epoch, loss=loss, eval_loss=eval_loss,
            run_state={"accelerator_step": self.accelerator.step, "seed": self.args.seed,
                       "schedule_origin": self.schedule_origin,
                       "stage_total_steps": run.total_steps if run is not None else None},
        ))
        if self.hub_sync is not None:  # queued; the push runs on its own thread
            self.hub_sync.checkpoint_saved(checkpoint_directory(path), kind, self.state.global_step)
        return path

    def restore_checkpoint(self, path, rack, *, optimizer=None, map_location=None, verify_hashes=None,
                           for_schedule: bool = False) -> Restored:
        """Restores a run from a checkpoint: the rack in place, the trainer state, the run log, RNG states and
        registered objects now; a mid-stage checkpoint's optimizer, scheduler and step counter when its stage
        is rebuilt (`enter_stage`). `for_schedule`: refuse a checkpoint whose layout this schedule never has."""
        accept = self._check_fits_schedule if for_schedule else None
        restored = self.checkpoints.restore(path, rack, optimizer=optimizer, map_location=map_location,
                                            verify_hashes=verify_hashes, objects=self.checkpoint_objects,
                                            scaler=self.accelerator.scaler, accept=accept)
        if self.schedule:  # set up, so the data is there; a restore before `train()` does this in `_resume`
            self.checkpoints.restore_data_position(restored.directory, self.train_stream)
        self.rack = rack
        self.state = restored.state
        self.run_log.replace_history(restored.state.log_history)
        self._restored = restored
        self._pending = restored if restored.mid_stage else None
        self.resumed_from = restored.directory
        return restored

    def _resume(self) -> None:
        """End of `setup`: records the layout the schedule starts from, then resumes when asked to."""
        if self._restored is not None:
            # Restored before `train()` (restore_from_checkpoint): the schedule starts from the saved run's layout.
            origin = self._restored.run_state.get("schedule_origin")
            if origin is not None:
                self.schedule = resolve_schedule(self.experiment.stages, origin, self.args.max_stacks)
                self.schedule_origin = list(origin)
                self._check_fits_schedule(self._restored)
            self.checkpoints.restore_data_position(self._restored.directory, self.train_stream)
            return
        self.schedule_origin = list(self.rack.config.stack_sizes)
        spec = self.args.resume_from_checkpoint
        if not spec:
            return
        directory = self.checkpoints.resolve(hub_checkpoint_location(spec))
        if directory is None:
            logger.warning("resume_from_checkpoint=%r: no valid checkpoint in %s; starting from scratch.",
                           spec, self.checkpoints.root)
            return
        self.restore_checkpoint(directory, self.rack, for_schedule=True)

    def _check_fits_schedule(self, restored: Restored) -> None:
        state, schedule, directory = restored.state, self.schedule, restored.directory
        if state.stage > len(schedule) or (state.stage_entered and state.stage >= len(schedule)):
            raise CheckpointError(f"{directory}: its stage cursor ({state.stage}) is beyond this schedule's "
                                  f"{len(schedule)} stages.")
        if state.stage_entered:
            expected = list(schedule[state.stage].stack_sizes)
        elif state.stage > 0:
            expected = list(schedule[state.stage - 1].stack_sizes)
        else:
            expected = list(self.schedule_origin or [])
        if restored.stack_sizes != expected:
            raise CheckpointError(
                f"{directory}: its rack has stacks {restored.stack_sizes}; at stage {state.stage} "
                f"({'inside' if state.stage_entered else 'before'} it) this schedule expects {expected}. "
                "The checkpoint belongs to another run or schedule."
            )

    def _continue_from_checkpoint(self, run: StageRun) -> None:
        """End of `enter_stage`: a mid-stage checkpoint's optimizer, scheduler, RNG and Accelerate step
        counter go into the rebuilt run."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if run.stage.index != pending.state.stage:
            logger.warning("%s: saved inside stage %d, but stage %d is starting; its optimizer state is not used.",
                           pending.directory, pending.state.stage, run.stage.index)
            return
        self.checkpoints.restore_run(pending, run.optimizer, run.scheduler, self.rack)
        self.accelerator.step = pending.run_state["accelerator_step"]
        if pending.run_state.get("stage_total_steps") not in (None, run.total_steps):
            logger.warning("%s: the stage was %d steps long when saved; it is now %d (the LR schedule follows the new "
                           "length).", pending.directory, pending.run_state["stage_total_steps"], run.total_steps)
        history = list(self.run_log.history)
        if history and history[-1]["kind"] == "stage_start" and history[-1].get("stage") == run.stage.index:
            history.pop()  # the stage started before the checkpoint; this is a resume, not a new start
        history.append({"kind": "resume", "step": self.state.global_step, "stage": run.stage.index,
                        "checkpoint": pending.directory})
        self.run_log.replace_history(history)

    # Setup helpers ---------------------------------------------------------------------------------

    def _setup_data(self) -> None:
        if self.train_dataset is not None and self.eval_dataset is not None:
            if self.tokenizer is not None:  # a given tokenizer still supplies the mask/pad/eos ids
                _fill_special_tokens(self.experiment.model, self.tokenizer)
            return
        data_args = self.experiment.data
        with self.accelerator.main_process_first():
            if self.tokenizer is None:
                self.tokenizer = load_or_train_tokenizer(data_args)
            check_tokenizer_fits(self.tokenizer, self.experiment.model.vocab_size)
            if data_args.streaming:
                self._setup_stream(data_args)
            else:
                self.train_dataset, self.eval_dataset = build_datasets(data_args, self.tokenizer)
        _fill_special_tokens(self.experiment.model, self.tokenizer)

    # Streamed data and document-aware packing (`data.streaming`, `data.document_mask`) ---------------

    def _setup_stream(self, data_args) -> None:
        from ..streaming import TrainStream, eval_blocks  # imports datasets: only where data is loaded

        self.train_stream = TrainStream(
            data_args, self.tokenizer, batch_size=self.args.per_device_train_batch_size,
            rank=self.accelerator.process_index, world_size=self.accelerator.num_processes, seed=self.args.seed,
        )
        if self.eval_dataset is None:
            self.eval_dataset = eval_blocks(data_args, self.tokenizer)

    def _check_streaming(self) -> None:
        """A streamed corpus has no length and is never held whole: refuse what needs either, before training."""
        if self.train_stream is None:
            return
        for stage in self.schedule:
            if stage.config.max_steps is None:
                raise ValueError(f"stage {stage.name}: a streamed corpus (data.streaming: true) has no length known "
                                 f"before it is read, so num_epochs={stage.config.num_epochs} cannot be counted in "
                                 "steps; give the stage max_steps.")
            if stage.config.trunk_mode == "cache":
                raise ValueError(
                    f"stage {stage.name}: trunk_mode 'cache' stores the trunk's output per block of a dataset held "
                    "whole, and a streamed corpus (data.streaming: true) is never held whole; use trunk_mode "
                    "'recompute' (with trunk_dtype or trunk_quantization to shrink the trunk), or data.streaming: "
                    "false."
                )

    def _document_masking(self) -> DocumentMasking | None:
        """Document-aware packing when `data.document_mask` says so (default: on for a causal rack) and a
        document separator is known: the tokenizer's eos (or sep), else the rack's `eos_token_id`."""
        causal = self.rack.config.attention_mode == "causal"
        wanted = self.experiment.data.document_mask
        if wanted is False or (wanted is None and not causal):
            return None
        separator = document_separator(self.tokenizer) if self.tokenizer is not None else self.rack.config.eos_token_id
        if separator is None:
            if wanted:
                raise ValueError("data.document_mask: true needs a document separator: a tokenizer with an eos (or "
                                 "sep) token, or the rack's eos_token_id; neither is set.")
            logger.info("Document-aware packing is off: no tokenizer and no eos_token_id to find document starts.")
            return None
        return DocumentMasking(separator_id=int(separator), causal=causal)

    def _document_inputs(self, input_ids: torch.Tensor) -> dict:
        """`position_ids` and the block-diagonal `attention_mask` of a batch's packed documents, or {}."""
        return self.documents.model_inputs(input_ids) if self.documents is not None else {}

    def _document_labels(self, labels: torch.Tensor, documents: dict) -> torch.Tensor:
        return self.documents.labels(labels, documents) if self.documents is not None else labels

    def _build_rack(self):
        """A rack for the schedule's objectives, on a copy of the model config (masked objectives need
        bidirectional attention)."""
        config = copy.deepcopy(self.experiment.model)
        if any(attention_mode_of(s.objective) == "bidirectional" for s in self.experiment.stages):
            config.attention_mode = "bidirectional"
            return StackWiseForMaskedLM(config)
        return StackWiseForCausalLM(config)

    def _check_objectives(self) -> None:
        mode = self.rack.config.attention_mode
        for stage in self.schedule:
            wanted = attention_mode_of(stage.config.objective)
            if wanted != mode:
                raise ValueError(
                    f"stage {stage.name}: objective {stage.config.objective!r} needs a {wanted} rack; this rack's "
                    f"attention_mode is {mode!r}."
                )
        # A depth schedule that does not fit the rack fails before training.
        stage_mask_ratios(self.schedule, self.experiment.objective)

    def _objective_kwargs(self, stage: ResolvedStage) -> dict:
        if stage.config.objective == "clm":
            return {}
        return {"config": self.experiment.objective, "stage": stage, "num_stages": len(self.schedule),
                "schedule": self.schedule,
                "mask_token_id": self.rack.config.mask_token_id, "vocab_size": self.rack.config.vocab_size}

    def _total_steps(self, config: StageConfig, batches_per_epoch: float) -> int:
        if batches_per_epoch < self.args.gradient_accumulation_steps:
            raise ValueError(
                f"the training data gives {batches_per_epoch} batch(es) of {self.args.per_device_train_batch_size} "
                f"per epoch on each of {self.accelerator.num_processes} process(es): fewer than one optimizer step "
                f"of {self.args.gradient_accumulation_steps} batch(es)."
            )
        if config.max_steps is not None:
            return config.max_steps
        if math.isinf(batches_per_epoch):
            raise ValueError("a DataLoader without a length needs `max_steps` (or `training.steps_per_stage`).")
        return max(1, math.ceil(config.num_epochs * batches_per_epoch / self.args.gradient_accumulation_steps))

    def _merge_stage_adapters(self, stage: ResolvedStage) -> None:
        for name in (stack_adapter_name(stage.stack), TRUNK):
            if name in adapters.adapter_names(self.rack):
                adapters.merge_stack_adapter(self.rack, name)


def build_accelerator(args: TrainingArguments) -> Accelerator:
    """A fresh `Accelerator` for a run's arguments, whatever an earlier trainer in this process set up.

    Accelerate keeps process-wide singletons (`AcceleratorState`, `PartialState`, `GradientState`) and
    refuses an `Accelerator` whose `mixed_precision` or `cpu` differs from the first one's. Like
    transformers' `TrainingArguments`, which does the same before building its accelerator, this clears
    them first (Accelerate offers no public reset; `_reset_state` is what its own test cases call). An
    initialised process group is kept: `PartialState` attaches to it again. Trainers in one process
    therefore run one after another, not interleaved: the previous trainer's accelerator sees the new state.
    """
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(
        cpu=args.use_cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=resolve_trackers(args.report_to) or None,
        project_dir=args.output_dir,
    )


def _as_experiment(config) -> ExperimentConfig:
    if isinstance(config, ExperimentConfig):
        return config
    if isinstance(config, StackWiseConfig):
        return ExperimentConfig.from_model_config(config)
    if isinstance(config, (str, os.PathLike)):
        return ExperimentConfig.from_yaml(config)
    raise TypeError(f"config must be an ExperimentConfig, a StackWiseConfig or a YAML path; got {type(config).__name__}.")


def _fill_special_tokens(config: StackWiseConfig, tokenizer) -> None:
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "mask_token_id"):
        if getattr(config, name) is None and getattr(tokenizer, name, None) is not None:
            setattr(config, name, getattr(tokenizer, name))


def _fused_if_cuda(device) -> dict:
    return {"fused": True} if torch.device(device).type == "cuda" else {}


def _postfix(health: dict) -> dict:
    """The tqdm postfix: short names, few digits."""
    shown = {"loss": f"{health['loss']:.3f}", "lr": f"{health['lr']:.2e}"}
    if health.get("grad_norm") is not None:
        shown["gnorm"] = f"{health['grad_norm']:.2f}"
    if "tokens_per_s" in health:
        shown["tok/s"] = f"{health['tokens_per_s']:,.0f}"
        shown["TFLOP/s"] = f"{health['flops_per_s'] / 1e12:.3g}"
    if "mfu" in health:
        shown["mfu"] = f"{100 * health['mfu']:.1f}%"
    return shown


def _peak_memory(device) -> dict:
    if torch.device(device).type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _length(loader) -> float:
    try:
        return len(loader)
    except TypeError:
        return math.inf


def _first_train_loss(history: list[dict], stage: int):
    return next((r["loss"] for r in history if r["kind"] == "train" and r.get("stage") == stage), None)


def _last_train_loss(history: list[dict]):
    return next((r["loss"] for r in reversed(history) if r["kind"] == "train"), None)


def _flat_config(experiment: ExperimentConfig) -> dict:
    """Scalar hyperparameters for trackers (TensorBoard's hparams take scalars only)."""
    flat = {f"training.{k}": v for k, v in vars(experiment.training).items() if isinstance(v, (int, float, str, bool))}
    flat.update({f"model.{k}": v for k in ("hidden_size", "vocab_size", "num_attention_heads")
                 if (v := getattr(experiment.model, k)) is not None})
    flat["stages"] = len(experiment.stages)
    return flat
