"""The Checkpointing Guide's API as its examples use it (examples/checkpointing_guide.py walks the same calls):
train_rack, save/load/list/restore progressive checkpoints, growth in bf16, rack and stack files, damage."""

import os

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from stackwise_hf import CheckpointError, StackWiseConfig, StackWiseForCausalLM
from stackwise_hf.training import ProgressiveTrainer

CONFIG = {
    "model": {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 64, "stack_sizes": [1]},
    "training": {"checkpoint_dir": "checkpoints", "save_interval": 5, "steps_per_stage": 10, "learning_rate": 3e-3,
                 "report_to": "none", "plot": False, "logging_steps": 5},
}


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_guides_calls_do_what_it_says(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    config = StackWiseConfig.from_yaml("config.yaml")
    trainer = ProgressiveTrainer(config=config)
    rack = StackWiseForCausalLM(StackWiseConfig.from_yaml("config.yaml"))
    starts, steps = torch.randint(0, 128, (64, 1)), torch.randint(1, 4, (64, 1))
    dataloader = DataLoader((starts + steps * torch.arange(32)) % 128, batch_size=8)

    results = trainer.train_rack(rack, dataloader, target_stacks=1)
    assert results["final_loss"] < results["first_loss"]
    path = trainer.save_progressive_checkpoint(stack_idx=0, rack_builder=rack, epoch=1, loss=results["final_loss"])
    assert os.path.isfile(path)

    data = trainer.load_progressive_checkpoint(path)
    assert (data["stack_idx"], data["epoch"], data["step"]) == (0, 1, 10)
    listed = trainer.list_checkpoints()
    # The manual save, the stage end and step 5, newest first.
    assert [c["step"] for c in listed] == [10, 10, 5] and listed[0]["path"] == path

    fresh = StackWiseForCausalLM(StackWiseConfig.from_yaml("config.yaml"))
    assert ProgressiveTrainer(config=config).restore_from_checkpoint(path, fresh)
    assert _same_weights(fresh, rack)

    rack.append_stack(n_blocks=1, precision="bfloat16")
    more = trainer.train_rack(rack, dataloader, target_stacks=2, max_steps=4)
    assert more["stack"] == 1 and rack.get_rack_info()["stack_info"][1]["precision"] == "bfloat16"

    rack.save_rack("complete_rack")
    other = StackWiseForCausalLM(StackWiseConfig.from_yaml("config.yaml"))
    assert other.load_rack("complete_rack") and other.current_stacks == 2 and _same_weights(other, rack)
    rack.save_stack(stack_idx=1, path="stack_1")
    assert other.load_stack(stack_idx=1, path="stack_1") and other.get_stack_info(1)["n_blocks"] == 1

    # A flipped byte in a shard of the checkpoint is caught by its sha256, and listing skips it.
    shard = os.path.join(os.path.dirname(path), "rack", "model-stack000.safetensors")
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(CheckpointError, match="sha256"):
        trainer.load_progressive_checkpoint(path)
    assert path not in [c["path"] for c in trainer.list_checkpoints(verify_hashes=True)]
