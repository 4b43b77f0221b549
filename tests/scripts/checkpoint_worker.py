"""Worker for the crash-and-resume test and `bench/crash_resume.py`: trains a small progressive run with
frequent checkpoints and writes a hash of the final weights to <out>/result.json.

    python tests/scripts/checkpoint_worker.py OUT [--resume] [--save-delay S] [--size tiny|small] [--stream DIR]

`--resume` starts from the newest valid checkpoint in <out>/checkpoints (from scratch when there is none).
`--save-delay` sleeps inside every save, after the files are written and before the manifest, so a kill
lands during a save. `--stream DIR` trains on the text files of DIR (train.txt, validation.txt) streamed
(`data.streaming: true`, a BPE tokenizer trained once and cached under OUT/../cache) instead of in-memory
synthetic blocks. The parent kills this process with SIGKILL at a moment of its choosing.
"""

import argparse
import hashlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])  # tests/ for tiny.py
from tiny import synthetic_blocks  # noqa: E402

from stackwise_hf.training import ExperimentConfig, ProgressiveTrainer  # noqa: E402
from stackwise_hf.training import checkpointing  # noqa: E402

SIZES = {
    "tiny": dict(model=dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                            num_key_value_heads=2, stack_sizes=[1], max_position_embeddings=64),
                 blocks=48, length=16, steps=[8, 9, 7], interval=3),
    "small": dict(model=dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_attention_heads=4,
                             num_key_value_heads=2, stack_sizes=[2], max_position_embeddings=64),
                  blocks=120, length=32, steps=[40, 40, 40], interval=10),
}


def experiment(out: str, size: str, resume: bool, stream: str | None = None) -> ExperimentConfig:
    spec = SIZES[size]
    s0, s1, s2 = spec["steps"]
    model, data = dict(spec["model"]), {}
    if stream is not None:
        model["vocab_size"] = 320
        data = {"dataset": stream, "streaming": True, "block_size": spec["length"], "tokenizer_vocab_size": 300,
                "max_eval_blocks": 16, "shuffle_buffer_size": 8, "cache_dir": os.path.join(out, os.pardir, "cache")}
    return ExperimentConfig.from_dict({
        "model": model,
        "data": data,
        "training": {"output_dir": f"{out}/run", "checkpoint_dir": f"{out}/checkpoints",
                     "save_interval": spec["interval"], "save_total_limit": None, "gradient_accumulation_steps": 2,
                     "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "logging_steps": 2,
                     "eval_steps": 4, "report_to": "none", "plot": False, "seed": 7,
                     "resume_from_checkpoint": "latest" if resume else None},
        "stages": [
            {"max_steps": s0, "train": ["stack", "head", "embeddings"], "learning_rate": 3e-3},
            {"grow": "append", "n_blocks": 1, "max_steps": s1, "learning_rate": 2e-3, "warmup_steps": 2},
            {"grow": "prepend", "n_blocks": 1, "max_steps": s2, "train": ["stack_adapter"], "stack_adapter": {"r": 4},
             "learning_rate": 1e-2},
        ],
    })


def weights_sha256(rack) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(rack.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--save-delay", type=float, default=0.0)
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--stream", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.save_delay:
        seal = checkpointing.seal_checkpoint

        def slow_seal(tmp, summary):
            time.sleep(args.save_delay)
            return seal(tmp, summary)

        checkpointing.seal_checkpoint = slow_seal
    spec = SIZES[args.size]
    vocab = spec["model"]["vocab_size"]
    if args.stream is not None:
        trainer = ProgressiveTrainer(experiment(args.out, args.size, args.resume, args.stream))
    else:
        trainer = ProgressiveTrainer(experiment(args.out, args.size, args.resume),
                                     train_dataset=synthetic_blocks(spec["blocks"], spec["length"], vocab),
                                     eval_dataset=synthetic_blocks(16, spec["length"], vocab, seed=1))
    with open(os.path.join(args.out, "started"), "w") as f:
        f.write(str(time.time()))
    started = time.perf_counter()
    result = trainer.train()
    info = trainer.get_training_info()
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump({"sha256": weights_sha256(trainer.rack), "final_loss": result.final_loss,
                   "global_step": result.global_step, "resumed_from": info["resumed_from"],
                   "seconds": time.perf_counter() - started, "checkpoint_seconds": info["checkpoint_seconds"],
                   "checkpoints_saved": info["checkpoints_saved"]}, f)


if __name__ == "__main__":
    main()
