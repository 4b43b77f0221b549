"""The trainer's progress as plain data: saved as JSON in every checkpoint, never pickled."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


@dataclass
class TrainerState:
    """Where a progressive run stands.

    Args:
        stage: index of the current stage in the schedule (the stage cursor).
        stage_entered: the current stage's growth and adapters are already applied to the rack.
        stage_step: optimizer steps done in the current stage.
        global_step: optimizer steps done in the run.
        epoch: epoch within the current stage.
        epoch_batches: micro-batches of the current epoch already consumed (the data position).
        tokens_seen: training tokens consumed by this process times the number of processes.
        flops: training FLOPs of the run so far, every process together (`flops.py` counts them).
        train_seconds: wall time of training so far: steps and trunk-cache builds, not evaluation.
        best_eval_loss: lowest evaluation loss so far.
        float32_master_stacks: float16 stacks the current stage trains in float32 (master weights); cast back
            to float16 when the stage ends.
        stage_results: one summary per finished stage (loss, eval loss, perplexity, time, memory).
        log_history: every record written to `log.jsonl` (for the plot after a resume).
    """

    stage: int = 0
    stage_entered: bool = False
    stage_step: int = 0
    global_step: int = 0
    epoch: int = 0
    epoch_batches: int = 0
    tokens_seen: int = 0
    flops: float = 0.0
    train_seconds: float = 0.0
    best_eval_loss: float | None = None
    float32_master_stacks: list[int] = field(default_factory=list)
    stage_results: list[dict] = field(default_factory=list)
    log_history: list[dict] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TrainerState":
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"trainer state has unknown fields {unknown}; known fields are {sorted(known)}.")
        return cls(**data)
