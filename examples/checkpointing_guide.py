"""The Checkpointing Guide's calls, in order, with the rack (`StackWiseForCausalLM`) in the role of the
guide's `rack_builder`: train a stack, save/read/list/restore a progressive checkpoint, grow a bf16 stack,
save and load the whole rack and one stack.

    python examples/checkpointing_guide.py [--output-dir DIR]

Everything is written under DIR (default: a temporary directory). tests/test_checkpointing_guide.py
checks what each call returns.
"""

import argparse
import os
import tempfile

import torch
import yaml
from torch.utils.data import DataLoader

from stackwise_hf import StackWiseConfig, StackWiseForCausalLM
from stackwise_hf.training import ProgressiveTrainer

CONFIG = {
    "model": {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 64, "stack_sizes": [1]},
    "training": {"checkpoint_dir": "checkpoints", "save_interval": 5, "steps_per_stage": 10, "learning_rate": 3e-3,
                 "report_to": "none", "plot": False, "logging_steps": 5},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", help="working directory (default: a temporary one)")
    args = parser.parse_args()
    workdir = args.output_dir or tempfile.mkdtemp(prefix="stackwise-guide-")
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)  # the guide's paths ("config.yaml", "./checkpoints") are relative
    with open("config.yaml", "w") as f:
        yaml.safe_dump(CONFIG, f)

    # Quick start: a trainer and a rack from one config file, the first stack trained on a DataLoader.
    config = StackWiseConfig.from_yaml("config.yaml")
    trainer = ProgressiveTrainer(config=config)
    rack = StackWiseForCausalLM(StackWiseConfig.from_yaml("config.yaml"))
    starts, steps = torch.randint(0, 128, (64, 1)), torch.randint(1, 4, (64, 1))
    dataloader = DataLoader((starts + steps * torch.arange(32)) % 128, batch_size=8)  # arithmetic progressions
    results = trainer.train_rack(rack, dataloader, target_stacks=1)
    print(f"stack 0: loss {results['first_loss']:.3f} -> {results['final_loss']:.3f}")

    # Progressive checkpoints: save, read back, list, restore into a fresh rack.
    path = trainer.save_progressive_checkpoint(stack_idx=0, rack_builder=rack, epoch=1, loss=results["final_loss"])
    data = trainer.load_progressive_checkpoint(path)
    print(f"checkpoint {path}: stack {data['stack_idx']}, epoch {data['epoch']}, loss {data['loss']:.3f}, "
          f"saved {data['timestamp']}")
    for checkpoint in trainer.list_checkpoints():
        print(f"  step {checkpoint['step']:>3}  stack {checkpoint['stack_idx']}  {checkpoint['path']}")
    fresh = StackWiseForCausalLM(StackWiseConfig.from_yaml("config.yaml"))
    ProgressiveTrainer(config=config).restore_from_checkpoint(path, fresh)

    # Grow: a second stack in bfloat16, trained over the frozen first one.
    rack.append_stack(n_blocks=1, precision="bfloat16")
    more = trainer.train_rack(rack, dataloader, target_stacks=2, max_steps=4)
    print(f"stack 1 ({rack.get_stack_info(1)['precision']}): final loss {more['final_loss']:.3f}")

    # Rack- and stack-level files.
    rack.save_rack("complete_rack")
    other = StackWiseForCausalLM(StackWiseConfig.from_yaml("config.yaml"))
    other.load_rack("complete_rack")
    rack.save_stack(stack_idx=1, path="stack_1")
    other.load_stack(stack_idx=1, path="stack_1")
    print(f"loaded a rack of {other.current_stacks} stacks; training info: {trainer.get_training_info()}")


if __name__ == "__main__":
    main()
