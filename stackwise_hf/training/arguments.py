"""Run-level training arguments: batch sizes, precision, clipping, intervals, output, seed.

What happens in each stage (growth, what trains, objective, steps, learning rate) is in
`schedule.py`; the architecture is the `StackWiseConfig`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..config_io import check_choice, check_positive

MIXED_PRECISION = ("no", "bf16", "fp16")
HUB_STRATEGIES = ("every_save", "stage_end", "end")
TRACKERS = ("auto", "none", "all", "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive")


@dataclass
class TrainingArguments:
    """Arguments of a progressive training run (YAML section `training:`; keys equal field names).

    Args:
        output_dir (`str`): where the final rack, tokenizer, logs (`log.jsonl`), plot (`loss.png`) and,
            by default, checkpoints go.
        seed (`int`): seeds torch/numpy/random before the rack is built and before each stage.
        per_device_train_batch_size (`int`): sequences per process per micro-batch.
        per_device_eval_batch_size (`int`): sequences per process per evaluation batch.
        gradient_accumulation_steps (`int`): micro-batches per optimizer step.
        mixed_precision (`str`): "no", "bf16" or "fp16" autocast, through Accelerate.
        use_cpu (`bool`): train on the CPU even where an accelerator is available (Accelerate's `cpu=True`).
        max_grad_norm (`float`, *optional*): gradient clipping norm; null disables clipping.
        logging_steps (`int`): optimizer steps between training-loss log lines.
        eval_steps (`int`, *optional*): optimizer steps between evaluations inside a stage; every stage
            is also evaluated at its end.
        max_eval_batches (`int`, *optional*): cap on evaluation batches (all of the held-out split if null).
        checkpoint_dir (`str`, *optional*): checkpoint directory; defaults to `<output_dir>/checkpoints`.
        save_interval (`int`, *optional*): optimizer steps between automatic checkpoints; checkpoints are
            also written at the end of every stage. Null: only at stage ends.
        save_total_limit (`int`, *optional*): checkpoints kept; the newest valid one and the best by
            eval loss are never rotated out. Null keeps all.
        save_activation_cache (`bool`): include the trunk activation cache in checkpoints.
        resume_from_checkpoint (`str`, *optional*): a checkpoint directory, "latest" (the newest valid one
            in `checkpoint_dir`), or a Hub location "namespace/name[@revision][/folder]"; a repo this trainer
            pushed to (`push_to_hub`) resumes from its `last-checkpoint/` folder.
        verify_checkpoint_hashes (`bool`): check sha256 of every checkpoint file on load.
        steps_per_stage (`int`, *optional*): optimizer steps of each `ProgressiveTrainer.train_rack` call;
            null: one pass over the DataLoader it is given. (Stages of a schedule set their own length.)
        learning_rate (`float`): peak learning rate of `train_rack` (stages of a schedule set their own).
        max_stacks (`int`, *optional*): refuse schedules that grow the rack beyond this many stacks.
        report_to (`str` or `list[str]`): Accelerate trackers; "auto" uses TensorBoard when installed.
        dataloader_num_workers (`int`): DataLoader worker processes.
        trunk_cache_dir (`str`, *optional*): where "cache" trunk mode stores activations on disk;
            null keeps them in host memory.
        trunk_cache_budget (`str`): largest activation cache allowed, e.g. "2GB".
        loss_chunk_size (`int`, *optional*): positions per chunk of the fused head + cross-entropy, so
            the (positions x vocabulary) logits never exist in full; null computes them at once.
        compile_blocks (`bool`): `torch.compile` each block of the trained stacks.
        plot (`bool`): draw `loss.png` (train and eval loss per step, stage boundaries marked).
        project_name (`str`): tracker project name.
        remote_code (`bool`): save the final rack with its modeling code, so `trust_remote_code=True` loads
            it where stackwise_hf is not installed (`lm_eval --model hf`, a colleague's notebook).
        push_to_hub (`bool`): push to the Hub repo `hub_model_id` while training, from a background thread
            (`training/hub_sync.py`): checkpoints per `hub_strategy`, and the final rack at the end. A failed
            push logs a warning; training goes on and the next save pushes again.
        hub_model_id (`str`, *optional*): "namespace/name" (or "name" under the token's user); defaults to
            the last component of `output_dir`.
        hub_strategy (`str`): "every_save" (every checkpoint to `last-checkpoint/`), "stage_end" (stage-end
            checkpoints only) or "end" (only the final rack).

    Example:

    ```python
    >>> from stackwise_hf.training import TrainingArguments
    >>> args = TrainingArguments(output_dir="runs/demo", mixed_precision="bf16", save_interval=50)
    >>> args.resolved_checkpoint_dir
    'runs/demo/checkpoints'
    ```
    """

    output_dir: str = "outputs/stackwise"
    seed: int = 42
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    use_cpu: bool = False
    max_grad_norm: float | None = 1.0
    logging_steps: int = 10
    eval_steps: int | None = None
    max_eval_batches: int | None = None
    checkpoint_dir: str | None = None
    save_interval: int | None = None
    save_total_limit: int | None = 3
    save_activation_cache: bool = False
    resume_from_checkpoint: str | None = None
    verify_checkpoint_hashes: bool = True
    steps_per_stage: int | None = None
    learning_rate: float = 1e-3
    max_stacks: int | None = None
    report_to: str | list[str] = "auto"
    dataloader_num_workers: int = 0
    trunk_cache_dir: str | None = None
    trunk_cache_budget: str = "2GB"
    loss_chunk_size: int | None = 4096
    compile_blocks: bool = False
    plot: bool = True
    project_name: str = "stackwise"
    remote_code: bool = True
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_strategy: str = "every_save"

    def __post_init__(self):
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        check_choice("hub_strategy", self.hub_strategy, HUB_STRATEGIES)
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps"):
            check_positive(name, getattr(self, name))
        for name in ("eval_steps", "max_eval_batches", "save_interval", "save_total_limit", "max_stacks",
                     "loss_chunk_size"):
            check_positive(name, getattr(self, name), optional=True)
        check_positive("max_grad_norm", self.max_grad_norm, optional=True, number=float)
        check_positive("steps_per_stage", self.steps_per_stage, optional=True)
        check_positive("learning_rate", self.learning_rate, number=float)
        if isinstance(self.dataloader_num_workers, bool) or not isinstance(self.dataloader_num_workers, int) \
                or self.dataloader_num_workers < 0:
            raise ValueError(f"`dataloader_num_workers` must be a non-negative integer; got {self.dataloader_num_workers!r}.")
        reports = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        for tracker in reports:
            check_choice("report_to", tracker, TRACKERS)
        parse_size(self.trunk_cache_budget, "trunk_cache_budget")

    @property
    def resolved_hub_model_id(self) -> str:
        return self.hub_model_id or os.path.basename(os.path.normpath(self.output_dir))

    @property
    def resolved_checkpoint_dir(self) -> str:
        return self.checkpoint_dir or f"{self.output_dir.rstrip('/')}/checkpoints"


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}


def parse_size(value, field_name: str = "size") -> int:
    """Parses "2GB", "512MiB" or an integer byte count."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    text = str(value).strip().upper().replace(" ", "")
    number = text.rstrip("KMGTIB")
    unit = text[len(number):] or "B"
    try:
        return int(float(number) * _UNITS[unit])
    except (ValueError, KeyError):
        raise ValueError(f"`{field_name}` must be a size like '2GB' or '512MiB'; got {value!r}.") from None
