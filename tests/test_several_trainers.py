"""Several `ProgressiveTrainer`s in one process (a notebook), each with its own precision and device settings."""

import torch

from stackwise_hf.training import ProgressiveTrainer
from tiny import synthetic_blocks, tiny_experiment


def _train(tmp_path, name, **training):
    experiment = tiny_experiment(tmp_path / name, [{"max_steps": 2}], **training)
    trainer = ProgressiveTrainer(experiment, train_dataset=synthetic_blocks(32), eval_dataset=synthetic_blocks(8, seed=1))
    result = trainer.train()
    return trainer, result


def test_trainers_with_different_precision_and_device_run_one_after_another(tmp_path):
    runs = [("bf16", dict(mixed_precision="bf16")), ("fp32", dict(mixed_precision="no")),
            ("cpu", dict(mixed_precision="no", use_cpu=True)), ("bf16-again", dict(mixed_precision="bf16"))]
    for name, training in runs:
        trainer, result = _train(tmp_path, name, **training)
        assert trainer.accelerator.mixed_precision == training["mixed_precision"]
        assert trainer.accelerator.device == torch.device("cpu")
        assert result.global_step == 2 and result.final_loss is not None
        # bf16 autocast really was on: the stage's forward ran its matmuls in bf16.
        with trainer.accelerator.autocast():
            product = torch.ones(2, 2) @ torch.ones(2, 2)
        assert product.dtype == (torch.bfloat16 if training["mixed_precision"] == "bf16" else torch.float32)
