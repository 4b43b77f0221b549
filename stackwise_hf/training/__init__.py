"""Progressive training: the stage schedule, the training arguments and the Accelerate trainer."""

from .arguments import TrainingArguments
from .experiment import ExperimentConfig
from .masking import ObjectiveConfig
from .results import StageSummary, TrainResult
from .schedule import ResolvedStage, StageConfig, resolve_schedule
from .state import TrainerState
from .trainer import ProgressiveTrainer

__all__ = [
    "ExperimentConfig",
    "ObjectiveConfig",
    "ProgressiveTrainer",
    "ResolvedStage",
    "StageConfig",
    "StageSummary",
    "TrainResult",
    "TrainerState",
    "TrainingArguments",
    "resolve_schedule",
]
