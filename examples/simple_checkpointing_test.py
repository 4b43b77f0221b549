"""Basic checkpointing checks you can run: save, read, list, restore, damaged files, rack and stack files.

    python examples/simple_checkpointing_test.py [--output-dir DIR]

Prints one line per check and exits with status 1 if any fails. It follows the Checkpointing Guide's
calls, with the rack (`StackWiseForCausalLM`) in the role of the guide's `rack_builder`.
"""

import argparse
import os
import sys
import tempfile

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
failures = []


def check(condition: bool, what: str) -> None:
    print(f"[{'ok' if condition else 'FAIL'}] {what}")
    if not condition:
        failures.append(what)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", help="working directory (default: a temporary one)")
    args = parser.parse_args()
    workdir = args.output_dir or tempfile.mkdtemp(prefix="stackwise-checkpoints-")
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)
    with open("config.yaml", "w") as f:
        yaml.safe_dump(CONFIG, f)

    config = StackWiseConfig.from_yaml("config.yaml")
    trainer = ProgressiveTrainer(config=config)
    rack = StackWiseForCausalLM(StackWiseConfig.from_yaml("config.yaml"))
    # Token sequences with structure to learn: arithmetic progressions modulo the vocabulary.
    starts, steps = torch.randint(0, 128, (64, 1)), torch.randint(1, 4, (64, 1))
    dataloader = DataLoader((starts + steps * torch.arange(32)) % 128, batch_size=8)

    results = trainer.train_rack(rack, dataloader, target_stacks=1)
    check(results["final_loss"] < results["first_loss"], f"train_rack lowers the loss ({results['first_loss']:.3f} -> "
                                                          f"{results['final_loss']:.3f})")
    path = trainer.save_progressive_checkpoint(stack_idx=0, rack_builder=rack, epoch=1, loss=results["final_loss"])
    check(os.path.isfile(path), f"save_progressive_checkpoint wrote {path}")

    data = trainer.load_progressive_checkpoint(path)
    check((data["stack_idx"], data["epoch"], data["step"]) == (0, 1, 10),
          "load_progressive_checkpoint reads stack, epoch, step")
    listed = trainer.list_checkpoints()
    check([c["step"] for c in listed] == [10, 10, 5] and listed[0]["path"] == path,
          "list_checkpoints: the manual save, the stage end and step 5, newest first")

    fresh = StackWiseForCausalLM(StackWiseConfig.from_yaml("config.yaml"))
    check(ProgressiveTrainer(config=config).restore_from_checkpoint(path, fresh) and same_weights(fresh, rack),
          "restore_from_checkpoint gives back the same weights")

    rack.append_stack(n_blocks=1, precision="bfloat16")
    more = trainer.train_rack(rack, dataloader, target_stacks=2, max_steps=4)
    check(more["stack"] == 1 and rack.get_rack_info()["stack_info"][1]["precision"] == "bfloat16",
          "a second, bfloat16 stack trains over the frozen first one")

    rack.save_rack("complete_rack")
    other = StackWiseForCausalLM(StackWiseConfig.from_yaml("config.yaml"))
    check(other.load_rack("complete_rack") and other.current_stacks == 2 and same_weights(other, rack),
          "save_rack / load_rack round-trip the grown rack")
    rack.save_stack(stack_idx=1, path="stack_1")
    check(other.load_stack(stack_idx=1, path="stack_1") and other.get_stack_info(1)["n_blocks"] == 1,
          "save_stack / load_stack")

    shard = os.path.join(os.path.dirname(path), "rack", "model-stack000.safetensors")
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    try:
        trainer.load_progressive_checkpoint(path)
        check(False, "a flipped byte is detected")
    except CheckpointError as err:
        check("sha256" in str(err), f"a flipped byte is detected: {err}")
    check(path not in [c["path"] for c in trainer.list_checkpoints(verify_hashes=True)],
          "list_checkpoints(verify_hashes=True) skips the damaged checkpoint")

    print(f"{len(failures)} check(s) failed." if failures else "All checks passed.")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
