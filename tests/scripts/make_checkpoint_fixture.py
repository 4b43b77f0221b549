"""Writes `tests/fixtures/checkpoint_v1/`: a mid-stage checkpoint of a tiny 2-stage run, saved by the
code of its day, so `tests/test_checkpoint_fixture.py` proves later code still resumes it exactly.

    python tests/scripts/make_checkpoint_fixture.py

Run it only to add a fixture for a new on-disk format; never to refresh this one (that would hide a
format change). The run: stage 0 trains a 1-block stack with embeddings and head for 3 steps; stage 1
appends a block and trains it for 4 steps; a checkpoint every 5 optimizer steps lands 2 steps into
stage 1. Only that checkpoint is kept.
"""

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])  # tests/ for tiny.py
from tiny import synthetic_blocks  # noqa: E402

from stackwise_hf.training import ExperimentConfig, ProgressiveTrainer  # noqa: E402

TARGET = Path(__file__).resolve().parent.parent / "fixtures" / "checkpoint_v1"


def experiment(out: str, resume: str | None = None) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "model": {"vocab_size": 48, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                  "num_key_value_heads": 1, "stack_sizes": [1], "max_position_embeddings": 32},
        "training": {"output_dir": f"{out}/run", "checkpoint_dir": f"{out}/checkpoints", "save_interval": 5,
                     "save_total_limit": None, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
                     "logging_steps": 1, "report_to": "none", "plot": False, "seed": 3,
                     "resume_from_checkpoint": resume},
        "stages": [
            {"max_steps": 3, "train": ["stack", "head", "embeddings"], "learning_rate": 3e-3},
            {"grow": "append", "n_blocks": 1, "max_steps": 4, "learning_rate": 2e-3, "warmup_steps": 1},
        ],
    })


def datasets() -> dict:
    return {"train_dataset": synthetic_blocks(16, 8, vocab=48), "eval_dataset": synthetic_blocks(4, 8, vocab=48, seed=1)}


def main() -> None:
    with tempfile.TemporaryDirectory() as out:
        trainer = ProgressiveTrainer(experiment(out), **datasets())
        trainer.train()
        mid = next(c for c in trainer.list_checkpoints() if c["kind"] == "interval")
        shutil.rmtree(TARGET, ignore_errors=True)
        shutil.copytree(mid["directory"], TARGET)
    print(f"wrote {TARGET} (step {mid['step']}, stage {mid['stage']})")


if __name__ == "__main__":
    main()
