"""Worker for the multi-process test: trains a tiny rack with the given config on synthetic blocks and
writes, per rank, the process count and a hash of the final weights to <out>/rank<k>.json."""

import hashlib
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])  # tests/ for tiny.py
from tiny import synthetic_blocks  # noqa: E402

from stackwise_hf.training import ExperimentConfig, ProgressiveTrainer  # noqa: E402


def main(config_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    experiment = ExperimentConfig.from_yaml(config_path)
    trainer = ProgressiveTrainer(experiment, train_dataset=synthetic_blocks(64), eval_dataset=synthetic_blocks(16, seed=1))
    result = trainer.train()
    digest = hashlib.sha256()
    for name, tensor in sorted(trainer.rack.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    rank = trainer.accelerator.process_index
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "num_processes": trainer.accelerator.num_processes, "sha256": digest.hexdigest(),
                   "final_loss": result["final_loss"], "eval_loss": result["eval_loss"]}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
