"""Progressive training: the stage schedule, the training arguments and the Accelerate trainer."""

from .arguments import TrainingArguments
from .experiment import ExperimentConfig
from .schedule import ResolvedStage, StageConfig, resolve_schedule
from .state import TrainerState
from .trainer import ProgressiveTrainer

__all__ = [
    "ExperimentConfig",
    "ProgressiveTrainer",
    "ResolvedStage",
    "StageConfig",
    "TrainerState",
    "TrainingArguments",
    "resolve_schedule",
]
