"""Worker for the multi-process tests: trains a tiny rack with the given config on synthetic blocks and
writes, per rank, the process count and a hash of the final weights to <out>/rank<k>.json.

With a third argument `fsdp` the worker runs under `accelerate launch --config_file
configs/accelerate/fsdp.yaml` and Accelerate builds the FSDP2 plugin from that file. Accelerate turns
FSDP on only for accelerator machines (on the CPU its state says MULTI_CPU and ignores the plugin), so
the worker relabels the state as MULTI_GPU first: everything after that - `fsdp2_prepare_model`,
`fully_shard` of each stack over gloo, DTensor gradients and clipping - is the real code path.

With `stream`, the worker trains on the config's `data:` section (a streamed corpus) instead of synthetic
blocks, and also records every training block it saw and the documents of its part of the stream.
"""

import hashlib
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])  # tests/ for tiny.py
from tiny import synthetic_blocks  # noqa: E402

from stackwise_hf.training import ExperimentConfig, ProgressiveTrainer  # noqa: E402


def fsdp_accelerator():
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    PartialState(cpu=True).distributed_type = DistributedType.MULTI_GPU
    return Accelerator()  # the FSDP plugin comes from the launcher's environment (the config file)


def main(config_path: str, out_dir: str, mode: str = "ddp") -> None:
    torch.set_num_threads(1)
    experiment = ExperimentConfig.from_yaml(config_path)
    accelerator = fsdp_accelerator() if mode == "fsdp" else None
    if mode == "stream":
        trainer = ProgressiveTrainer(experiment)
    else:
        trainer = ProgressiveTrainer(experiment, train_dataset=synthetic_blocks(64),
                                     eval_dataset=synthetic_blocks(20, seed=1), accelerator=accelerator)
    seen = []  # the training blocks this process trained on
    micro_batch = trainer._train_micro_batch

    def record_and_train(run, batch):
        seen.extend(batch["input_ids"].tolist())
        return micro_batch(run, batch)

    trainer._train_micro_batch = record_and_train
    sharded = []  # per stage: the stacks `prepare` made FSDP units
    enter = trainer.enter_stage

    def enter_and_record(stage):
        run = enter(stage)
        from torch.distributed.fsdp import FSDPModule

        sharded.append([i for i, s in enumerate(trainer.rack.base_model.stacks) if isinstance(s, FSDPModule)])
        return run

    trainer.enter_stage = enter_and_record
    result = trainer.train()
    digest = hashlib.sha256()
    for name, tensor in sorted(trainer.rack.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    rank = trainer.accelerator.process_index
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "num_processes": trainer.accelerator.num_processes, "sha256": digest.hexdigest(),
                   "distributed_type": str(trainer.accelerator.distributed_type), "sharded_stacks": sharded,
                   "final_loss": result.final_loss, "eval_loss": result.eval_loss,
                   "stage_eval": [s.eval_loss for s in result.stages], "blocks": seen,
                   # The documents of this process's part of the stream (read again, after training).
                   "texts": [row["text"] for row in trainer.train_stream._reader.dataset] if mode == "stream" else []},
                  f)


if __name__ == "__main__":
    main(*sys.argv[1:])
