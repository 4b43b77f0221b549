"""The guide's Quick Start as written: an empty rack, a "full" stack, then a "half" (float16) stack, each trained
with `train_rack`. A float16 stack trains through float32 master weights; a non-finite step stops the stage."""

import math

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from stackwise_hf.errors import NonFiniteError
from tiny import synthetic_blocks

CONFIG = {
    "model": {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 64, "stack_sizes": []},
    "training": {"checkpoint_dir": "./checkpoints", "save_interval": 100, "steps_per_stage": 50,
                 "learning_rate": 3e-3, "report_to": "none", "plot": False, "logging_steps": 10},
}


@pytest.fixture
def guide_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    return tmp_path


def test_the_quick_start_runs_as_written_from_an_empty_rack_with_a_half_stack(guide_dir):
    dataloader = DataLoader(synthetic_blocks(48), batch_size=8)

    from stackwise_hf import StackWiseConfig
    from stackwise_hf import StackWiseForCausalLM as ProgressiveRackBuilder
    from stackwise_hf.training import ProgressiveTrainer

    # Load configuration
    config = StackWiseConfig.from_yaml("config.yaml")

    # Create trainer and rack builder
    trainer = ProgressiveTrainer(config=config)
    rack_builder = ProgressiveRackBuilder(config=config)

    # Add and train first stack
    stack1 = rack_builder.append_stack(n_blocks=2, precision="full")
    results1 = trainer.train_rack(rack_builder, dataloader, target_stacks=1)

    # Save progressive checkpoint
    checkpoint_path = trainer.save_progressive_checkpoint(
        stack_idx=0,
        rack_builder=rack_builder,
        epoch=1,
        loss=results1.get('final_loss', 0.5)
    )

    # Continue training...
    stack2 = rack_builder.append_stack(n_blocks=2, precision="half")
    results2 = trainer.train_rack(rack_builder, dataloader, target_stacks=2)

    assert (stack1, stack2) == (0, 1) and rack_builder.config.stack_sizes == [2, 2] and config.stack_sizes == []
    assert [s["precision"] for s in rack_builder.get_rack_info()["stack_info"]] == ["full", "half"]
    assert rack_builder.model.stacks[1].blocks[0].mlp.up_proj.weight.dtype == torch.float16  # stored in half
    for results in (results1, results2):
        losses = results["losses"]
        assert len(losses) == 50 and all(math.isfinite(x) for x in losses)
        assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.3  # falling
    assert all(torch.isfinite(p).all() for p in rack_builder.parameters())
    assert trainer.load_progressive_checkpoint(checkpoint_path)["stack_idx"] == 0
    end = trainer.load_progressive_checkpoint(results2["checkpoint"])
    assert end["config"]["stack_dtypes"] == ["float32", "float16"]


def test_a_non_finite_step_stops_the_stage_naming_step_and_stack_and_saves_nothing(guide_dir):
    from stackwise_hf import StackWiseConfig, StackWiseForCausalLM
    from stackwise_hf.training import ProgressiveTrainer

    config = StackWiseConfig.from_yaml("config.yaml")
    trainer = ProgressiveTrainer(config=config)
    trainer.args.max_grad_norm = None
    trainer.save_interval = 1
    rack = StackWiseForCausalLM(config)
    rack.append_stack(n_blocks=1, precision="half")
    with pytest.raises(NonFiniteError, match=r"stage stack_0, stack 0: non-finite .* at step \d+ \(step \d+ of the "
                                             r"stage\); training stopped"):
        trainer.train_rack(rack, DataLoader(synthetic_blocks(48), batch_size=8), target_stacks=1, learning_rate=1e20)
    for checkpoint in trainer.list_checkpoints():  # every checkpoint written before the bad step is finite
        saved = trainer.load_progressive_checkpoint(checkpoint["path"])
        assert saved["loss"] is None or math.isfinite(saved["loss"])
