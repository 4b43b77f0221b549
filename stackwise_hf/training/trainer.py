"""`ProgressiveTrainer`: grow and train a rack stack by stack, on one CPU, one GPU or many processes.

The algorithm, in `train()`: for each stage of the schedule, enter it (grow the rack, attach adapters,
freeze everything but what the stage trains, build the optimizer and LR schedule over exactly the
trainable parameters, `accelerator.prepare`), run it (a plain PyTorch loop with `accumulate` /
`backward` / clipping), and leave it (evaluate, save, free the stage's objects). Accelerate is
imported only by the `training` package.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..configuration_stackwise import StackWiseConfig
from ..modeling_stackwise import StackWiseForCausalLM, StackWiseForMaskedLM
from .arguments import TrainingArguments
from .checkpointing import CheckpointingMixin
from .direct import DirectTrainingMixin
from .experiment import ExperimentConfig
from .fsdp import check_fsdp_support, keep_loss_in_float32, unshard_rack, uses_fsdp
from .objectives import build_objective
from .schedule import ResolvedStage, StageConfig, resolve_schedule
from .stage import StageModule, count_parameters, first_trained_stack, grow_for_stage, optimizer_groups, set_trainable
from .state import TrainerState
from .tracking import PLOT_NAME, RunLog, resolve_trackers

logger = logging.getLogger(__name__)


@dataclass
class StageRun:
    """The objects of the stage being trained; dropped as a whole when the stage ends."""

    stage: ResolvedStage
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_loader: DataLoader
    sampler: "EpochSampler"
    objective: object
    total_steps: int
    trainable: list[str]
    started: float


class ProgressiveTrainer(CheckpointingMixin, DirectTrainingMixin):
    """Trains a rack progressively, stage by stage, with Accelerate.

    Args:
        config: an `ExperimentConfig`, a path to an experiment YAML, or a `StackWiseConfig` loaded with
            `StackWiseConfig.from_yaml` from a file with `training:`/`stages:` sections.
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
    >>> result["final_loss"] < result["stages"][0]["first_loss"]  # doctest: +SKIP
    True
    ```
    """

    def __init__(self, config=None, *, rack=None, train_dataset=None, eval_dataset=None, tokenizer=None,
                 accelerator: Accelerator | None = None):
        self.experiment = _as_experiment(config)
        self.args: TrainingArguments = self.experiment.training
        self.rack = rack
        self.train_dataset, self.eval_dataset, self.tokenizer = train_dataset, eval_dataset, tokenizer
        self.accelerator = accelerator or build_accelerator(self.args)
        check_fsdp_support(self.accelerator, self.experiment.stages)
        keep_loss_in_float32(self.accelerator)
        self.state = TrainerState()
        self.run_log = RunLog(self.accelerator, self.args.output_dir)
        self.schedule: list[ResolvedStage] = []
        self.trunk_cache = None  # a `TrunkCache`, from the first stage with `trunk_mode: cache` on

    # The algorithm ----------------------------------------------------------------------------------

    def train(self) -> dict:
        """Runs every remaining stage of the schedule; returns the run's summary (`final_loss`,
        `eval_loss`, `perplexity`, per-stage `stages`, `output_dir`)."""
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
        self.rack.to(self.accelerator.device)
        if self.accelerator.trackers == [] and resolve_trackers(self.args.report_to):
            self.accelerator.init_trackers(self.args.project_name, config=_flat_config(self.experiment))
        logger.info("Schedule: %s", [(s.name, s.config.grow, s.stack, s.config.train) for s in self.schedule])
        self.checkpoints.after_setup()  # resumes when `resume_from_checkpoint` is set

    def enter_stage(self, stage: ResolvedStage) -> StageRun:
        set_seed(self.args.seed + stage.index)
        if not self.state.stage_entered:
            grow_for_stage(self.rack, stage)
            self.state.stage_entered = True
            self.state.stage_step = self.state.epoch = self.state.epoch_batches = 0
        config = stage.config
        trainable = set_trainable(self.rack, stage)
        self.rack.base_model.stacks[stage.stack].gradient_checkpointing = config.gradient_checkpointing
        objective = build_objective(config.objective, **self._objective_kwargs(stage))
        objective.loss_chunk_size = self.args.loss_chunk_size
        if self.args.compile_blocks:
            for block in self.rack.base_model.stacks[stage.stack].blocks:
                block.compile()  # in place: the block stays compiled when later stages freeze it
        module = StageModule(self.rack, objective, first_trained_stack(self.rack, config.trains("embeddings")),
                             train_embeddings=config.trains("embeddings"))
        if config.trunk_mode == "cache":
            self._sync_trunk_cache(stage, module, objective)
        host_trunk = self._place_trunk(stage)
        optimizer = torch.optim.AdamW(optimizer_groups(self.rack, config.weight_decay), lr=config.learning_rate,
                                      **_fused_if_cuda(self.accelerator.device))
        sampler = EpochSampler(len(self.train_dataset), seed=self.args.seed * 1000 + stage.index)
        loader = DataLoader(
            IndexedBlocks(self.train_dataset), batch_size=self.args.per_device_train_batch_size, sampler=sampler,
            drop_last=True, num_workers=self.args.dataloader_num_workers,
        )
        # With the trunk on the host, `prepare` must not move the module (and the trunk) to the device.
        module, optimizer, loader = self.accelerator.prepare(
            module, optimizer, loader, device_placement=[not host_trunk, True, True]
        )
        total_steps = self._total_steps(config, len(loader))
        # Not prepared: Accelerate's scheduler wrapper steps once per process; ours counts optimizer steps.
        scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps,
                                  num_training_steps=total_steps)
        run = StageRun(stage, module, optimizer, scheduler, loader, sampler, objective, total_steps, trainable,
                       time.perf_counter())
        self.run_log.record("stage_start", self.state.global_step, stage=stage.index, stage_name=stage.name,
                            stack=stage.stack, stack_sizes=list(self.rack.config.stack_sizes),
                            **count_parameters(self.rack))
        logger.info("Entering %s: stack %d of %s trains %s for %d steps (%d trainable parameters).", stage.name,
                    stage.stack, list(self.rack.config.stack_sizes), config.train, total_steps, sum(
                        p.numel() for p in self.rack.parameters() if p.requires_grad))
        self.checkpoints.restore_run(run)  # a mid-stage checkpoint's optimizer, scheduler, RNG
        return run

    def run_stage(self, run: StageRun) -> None:
        bar = tqdm(total=run.total_steps, initial=self.state.stage_step, desc=run.stage.name,
                   disable=not self.accelerator.is_local_main_process, dynamic_ncols=True)
        window: list[torch.Tensor] = []
        while self.state.stage_step < run.total_steps:
            for batch in self._epoch_batches(run):
                window.append(self._train_micro_batch(run, batch))
                self.state.epoch_batches += 1
                if not self.accelerator.sync_gradients:
                    continue
                self.state.stage_step += 1
                self.state.global_step += 1
                bar.update(1)
                self._after_optimizer_step(run, window)
                if self.state.stage_step >= run.total_steps:
                    break
            if self.state.epoch_batches >= len(run.train_loader):  # the epoch was consumed whole
                self.state.epoch += 1
                self.state.epoch_batches = 0
        bar.close()

    def exit_stage(self, run: StageRun) -> None:
        metrics = self.evaluate(run)
        if uses_fsdp(self.accelerator):  # plain weights again before merging, saving or growing
            unshard_rack(self.rack, run.module, self.accelerator.device)
        if run.stage.config.merge_adapters:
            self._merge_stage_adapters(run.stage)
        summary = {
            "stage": run.stage.index, "name": run.stage.name, "stack": run.stage.stack,
            "stack_sizes": list(self.rack.config.stack_sizes), "steps": run.total_steps,
            "first_loss": _first_train_loss(self.run_log.history, run.stage.index),
            "final_loss": _last_train_loss(self.run_log.history),
            "eval_loss": metrics["loss"], "perplexity": metrics["perplexity"],
            "seconds": time.perf_counter() - run.started, **_peak_memory(self.accelerator.device),
        }
        self.state.stage_results.append(summary)
        self.run_log.record("stage_end", self.state.global_step, **summary)
        self.state.stage += 1
        self.state.stage_entered = False
        self.checkpoints.stage_end(run)
        self.accelerator.free_memory()
        del run
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def finish(self) -> dict:
        """Saves the final rack (with adapters) and tokenizer, draws the plot, closes the trackers."""
        final_dir = os.path.join(self.args.output_dir, "final")
        if self.trunk_cache is not None and self.trunk_cache.offloaded:
            # The trunk was kept on the host: hand back a rack on one device rather than split across two.
            logger.info("The frozen trunk was kept on the host; the trained rack is returned on the CPU.")
            self.rack.to("cpu")
            self.trunk_cache.offloaded = []
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.rack.save_rack(final_dir)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(final_dir)
            if self.args.plot:
                self.run_log.plot(os.path.join(self.args.output_dir, PLOT_NAME))
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        last = self.state.stage_results[-1] if self.state.stage_results else {}
        return {
            "final_loss": last.get("final_loss"), "eval_loss": last.get("eval_loss"),
            "perplexity": last.get("perplexity"), "global_step": self.state.global_step,
            "num_processes": self.accelerator.num_processes, "stages": list(self.state.stage_results),
            "output_dir": final_dir,
        }

    # One step --------------------------------------------------------------------------------------

    def _train_micro_batch(self, run: StageRun, batch: dict) -> torch.Tensor:
        prepared = run.objective.prepare(batch["input_ids"], run.stage.index, batch["sample_id"])
        with self.accelerator.accumulate(run.module):
            with self.accelerator.autocast():
                loss, _ = run.module(prepared.input_ids, prepared.labels, prepared.weights,
                                     trunk_hidden=self._trunk_hidden(run, "train", batch["sample_id"]))
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients and self.args.max_grad_norm:
                self.accelerator.clip_grad_norm_(
                    [p for p in self.rack.parameters() if p.requires_grad], self.args.max_grad_norm
                )
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        self.state.tokens_seen += batch["input_ids"].numel() * self.accelerator.num_processes
        return loss.detach()

    def _after_optimizer_step(self, run: StageRun, window: list[torch.Tensor]) -> None:
        run.scheduler.step()
        step = self.state.stage_step
        if step % self.args.logging_steps == 0 or step == run.total_steps:
            loss = self.accelerator.reduce(torch.stack(window).mean(), reduction="mean").item()
            self.run_log.record("train", self.state.global_step, stage=run.stage.index, loss=loss,
                                lr=run.scheduler.get_last_lr()[0], tokens=self.state.tokens_seen)
        if step % self.args.logging_steps == 0:
            window.clear()
        if self.args.eval_steps and step % self.args.eval_steps == 0 and step != run.total_steps:
            self.evaluate(run)
        self.checkpoints.step_end(run)

    def _epoch_batches(self, run: StageRun):
        loader = run.train_loader
        if self.state.epoch_batches:
            loader = self.accelerator.skip_first_batches(loader, self.state.epoch_batches)
        # Accelerate's loader sets the sampler's epoch from its own pass counter when iterated; a loader
        # rebuilt on resume (or the one skipping a resumed epoch's first batches) must count from our epoch.
        loader.set_epoch(self.state.epoch)
        return loader

    # Evaluation ------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, run: StageRun) -> dict:
        """Loss and perplexity on the held-out split, exact across processes (each process takes every
        `num_processes`-th batch; sums are reduced)."""
        module = run.module
        module.eval()
        device = self.accelerator.device
        total, count = torch.zeros((), device=device, dtype=torch.float64), torch.zeros((), device=device)
        batches, counted = self._eval_loader()
        for i, batch in enumerate(batches):
            prepared = run.objective.prepare(batch["input_ids"].to(device), run.stage.index,
                                             batch["sample_id"].to(device), evaluation=True)
            with self.accelerator.autocast():
                loss, n = module(prepared.input_ids, prepared.labels, prepared.weights,
                                 trunk_hidden=self._trunk_hidden(run, "eval", batch["sample_id"]))
            if i < counted:
                total += loss.double() * n
                count += n
        module.train()
        total, count = self.accelerator.reduce(total, "sum"), self.accelerator.reduce(count, "sum")
        loss = (total / count.clamp(min=1)).item()
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "positions": int(count.item())}
        if self.state.best_eval_loss is None or loss < self.state.best_eval_loss:
            self.state.best_eval_loss = loss
        self.run_log.record("eval", self.state.global_step, stage=run.stage.index, **metrics)
        logger.info("eval at step %d (%s): loss %.4f, perplexity %.2f", self.state.global_step, run.stage.name,
                    loss, metrics["perplexity"])
        return metrics

    def _eval_loader(self) -> tuple[DataLoader, int]:
        """This process's eval batches (every `num_processes`-th) and how many of them count. Under FSDP
        every process must run the same number of forward passes (they gather shards together), so a
        process with fewer batches repeats the first batch, uncounted."""
        blocks = IndexedBlocks(self.eval_dataset)
        size = self.args.per_device_eval_batch_size
        n_batches = math.ceil(len(blocks) / size)
        if self.args.max_eval_batches:
            n_batches = min(n_batches, self.args.max_eval_batches)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        mine = [list(range(b * size, min((b + 1) * size, len(blocks)))) for b in range(rank, n_batches, world)]
        counted = len(mine)
        if uses_fsdp(self.accelerator):
            mine += [list(range(min(size, len(blocks))))] * (math.ceil(n_batches / world) - counted)
        return DataLoader(blocks, batch_sampler=mine), counted

    # Trunk cache (`trunk_mode: cache`) -------------------------------------------------------------

    def _sync_trunk_cache(self, stage: ResolvedStage, module: StageModule, objective) -> None:
        """Builds, extends or reuses the frozen trunk's output over the train and eval blocks."""
        from .trunk_cache import TrunkCache

        if self.trunk_cache is None:
            self.trunk_cache = TrunkCache(self.args.trunk_cache_budget, self.args.trunk_cache_dir,
                                          batch_size=self.args.per_device_eval_batch_size)
        eval_rows = len(self.eval_dataset)
        if self.args.max_eval_batches:
            eval_rows = min(eval_rows, self.args.max_eval_batches * self.args.per_device_eval_batch_size)
        # On disk the main process builds; the others then find the finished cache by its fingerprint.
        first = self.accelerator.main_process_first() if self.args.trunk_cache_dir else contextlib.nullcontext()
        with first:
            report = self.trunk_cache.sync(
                module, objective, stage.index, {"train": self.train_dataset, "eval": self.eval_dataset},
                rows={"eval": eval_rows}, tokenizer=self.tokenizer, device=self.accelerator.device,
                autocast=self.accelerator.autocast, precision=self.args.mixed_precision,
            )
        self.run_log.record("trunk_cache", self.state.global_step, stage=stage.index, **report.as_dict())

    def _trunk_hidden(self, run: StageRun, split: str, sample_ids) -> torch.Tensor | None:
        if run.stage.config.trunk_mode != "cache" or not self.trunk_cache.active:
            return None
        return self.trunk_cache.hidden(split, sample_ids, self.accelerator.device)

    def _place_trunk(self, stage: ResolvedStage) -> bool:
        """Puts the frozen trunk where the stage needs it; True when it stays on the host.

        In cache mode the trunk does not run during the stage, so on one process with an accelerator it
        lives on the host and the device holds only the trained stacks, the head and the batch (the
        cache itself streams one stack at a time to the device to extend). Several processes keep it on
        the device: DDP and FSDP expect every parameter of the wrapped module there. A recompute stage
        brings an offloaded trunk back.
        """
        cache = self.trunk_cache
        host = (stage.config.trunk_mode == "cache" and cache is not None and cache.active
                and torch.device(self.accelerator.device).type != "cpu" and self.accelerator.num_processes == 1)
        if host:
            cache.offload_trunk(self.rack, cache.depth, "cpu")
        elif cache is not None and cache.offloaded:
            cache.restore_trunk(self.rack, self.accelerator.device)
        return host

    # Setup helpers ---------------------------------------------------------------------------------

    def _setup_data(self) -> None:
        if self.train_dataset is not None and self.eval_dataset is not None:
            if self.tokenizer is not None:  # a given tokenizer still supplies the mask/pad/eos ids
                _fill_special_tokens(self.experiment.model, self.tokenizer)
            return
        from ..data import build_datasets, check_tokenizer_fits, load_or_train_tokenizer

        data_args = self.experiment.data
        with self.accelerator.main_process_first():
            if self.tokenizer is None:
                self.tokenizer = load_or_train_tokenizer(data_args)
            check_tokenizer_fits(self.tokenizer, self.experiment.model.vocab_size)
            self.train_dataset, self.eval_dataset = build_datasets(data_args, self.tokenizer)
        _fill_special_tokens(self.experiment.model, self.tokenizer)

    def _build_rack(self):
        config = self.experiment.model
        masked = any(s.objective != "clm" for s in self.experiment.stages)
        if masked:
            config.attention_mode = "bidirectional"
            return StackWiseForMaskedLM(config)
        return StackWiseForCausalLM(config)

    def _check_objectives(self) -> None:
        mode = self.rack.config.attention_mode
        for stage in self.schedule:
            wanted = "causal" if stage.config.objective == "clm" else "bidirectional"
            if wanted != mode:
                raise ValueError(
                    f"stage {stage.name}: objective {stage.config.objective!r} needs a {wanted} rack; this rack's "
                    f"attention_mode is {mode!r}."
                )
        if any(stage.config.objective != "clm" for stage in self.schedule):
            from .masking import ObjectiveConfig, stage_mask_ratios

            # A bad `objective:` field or a depth schedule that does not fit the rack fails before training.
            stage_mask_ratios(self.schedule, ObjectiveConfig.from_dict(self.experiment.objective, "objective"))

    def _objective_kwargs(self, stage: ResolvedStage) -> dict:
        if stage.config.objective == "clm":
            return {}
        return {"config": self.experiment.objective, "stage": stage, "num_stages": len(self.schedule),
                "schedule": self.schedule,
                "mask_token_id": self.rack.config.mask_token_id, "vocab_size": self.rack.config.vocab_size}

    def _total_steps(self, config: StageConfig, batches_per_epoch: int) -> int:
        if batches_per_epoch < self.args.gradient_accumulation_steps:
            raise ValueError(
                f"the training split has {len(self.train_dataset)} blocks: fewer than one optimizer step of "
                f"{self.args.gradient_accumulation_steps} batch(es) of {self.args.per_device_train_batch_size} "
                f"on each of {self.accelerator.num_processes} process(es)."
            )
        if config.max_steps is not None:
            return config.max_steps
        return max(1, math.ceil(config.num_epochs * batches_per_epoch / self.args.gradient_accumulation_steps))

    def _merge_stage_adapters(self, stage: ResolvedStage) -> None:
        from .. import adapters

        for name in (f"stack_{stage.stack}", "trunk"):
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


class IndexedBlocks(Dataset):
    """Rows of a token-block dataset with their index, so masks can be a function of (sample, stage)."""

    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict:
        row = self.blocks[index]
        input_ids = row["input_ids"] if isinstance(row, dict) else row
        return {"input_ids": torch.as_tensor(input_ids), "sample_id": index}


class EpochSampler(Sampler):
    """A shuffle that is a pure function of (seed, epoch): resuming at any epoch reproduces the order,
    whatever happened to the global RNG in between."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        yield from torch.randperm(self.num_samples, generator=generator).tolist()


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


def _peak_memory(device) -> dict:
    if torch.device(device).type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


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

