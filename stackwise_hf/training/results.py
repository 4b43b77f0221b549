"""What training hands back: typed summaries of a stage and of a run.

`TrainerState.stage_results` keeps each `StageSummary` as a plain dict (it is saved as JSON in every
checkpoint); `StageSummary.from_dict` reads it back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StageSummary:
    """One finished stage.

    Args:
        stage / name / stack: the stage's index, label and the stack it trained.
        stack_sizes: the rack's stack layout at the end of the stage.
        steps: optimizer steps of the stage.
        first_loss / final_loss: training loss of the stage's first and last logging window.
        eval_loss / perplexity: on the held-out split at the stage's end (None without one).
        seconds: wall-clock time of the stage.
        tokens / flops / train_seconds: the run's training tokens, training FLOPs (`flops.py`) and training
            wall time (evaluation excluded) at the stage's end.
        peak_memory_gib: peak CUDA memory allocated, GiB (on a GPU).
        peak_rss_gib: peak resident memory of the process, GiB (on the CPU).
    """

    stage: int
    name: str
    stack: int
    stack_sizes: list[int]
    steps: int
    first_loss: float | None
    final_loss: float | None
    eval_loss: float | None
    perplexity: float | None
    seconds: float
    tokens: int = 0
    flops: float = 0.0
    train_seconds: float = 0.0
    peak_memory_gib: float | None = None
    peak_rss_gib: float | None = None

    def as_dict(self) -> dict:
        """The summary as saved in `TrainerState.stage_results` (the peak that was not measured left out)."""
        values = dataclasses.asdict(self)
        for key in ("peak_memory_gib", "peak_rss_gib"):
            if values[key] is None:
                del values[key]
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "StageSummary":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass(frozen=True)
class TrainResult:
    """A finished `ProgressiveTrainer.train()`.

    Args:
        final_loss / eval_loss / perplexity: of the last stage (None when no stage ran).
        global_step: optimizer steps of the whole run.
        num_processes: processes that trained.
        stages: one `StageSummary` per stage, in order.
        output_dir: where the final rack (and tokenizer) were saved.
    """

    final_loss: float | None
    eval_loss: float | None
    perplexity: float | None
    global_step: int
    num_processes: int
    output_dir: str
    stages: list[StageSummary] = field(default_factory=list)
