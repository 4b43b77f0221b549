"""One real training step of a stage of the 70B-shaped rack, with the planner's prediction beside the measured peak.

    PYTHONPATH=. python bench/gpu_70b_step.py --json $OUT/gpu_70b_step.json       # on the lent H200
    PYTHONPATH=. python bench/gpu_70b_step.py --tiny                              # a check of the script on CPU

The stage is the last of `configs/llama-70b-stackwise.yaml` (80 blocks; the new stack of 4 blocks and
the head train over 76 frozen blocks in cache mode): the trunk lives on the host, so it is not built
at all here; the cached hidden states the trunk would have produced are synthetic (random, bf16).
The device holds what the planner says it holds in that mode: embeddings, the trained stack (fp32
master weights), the head, gradients, AdamW moments, activations and the batch. Two steps run (the
first allocates AdamW's moments); the second is measured with `torch.cuda.max_memory_allocated`.
Needs no `datasets`; on an H200 it takes about a minute, most of it drawing 3.7e9 random weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from bench.planner_check import measure_stage
from stackwise_hf.planner import GiB, plan_experiment, settings_for_stage
from stackwise_hf.training import ExperimentConfig
from stackwise_hf.training.schedule import resolve_schedule

CONFIG = "configs/llama-70b-stackwise.yaml"
# --tiny: the same schedule at a shape a CPU steps through in seconds.
TINY = ["model.hidden_size=128", "model.intermediate_size=448", "model.num_attention_heads=8",
        "model.num_key_value_heads=2", "model.vocab_size=512", "data.block_size=64", "training.loss_chunk_size=32"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--stage", type=int, default=-1, help="stage index (default: the last)")
    parser.add_argument("--micro-batch", type=int, help="override per_device_train_batch_size")
    parser.add_argument("--tiny", action="store_true", help="a tiny shape, to check the script on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    experiment = ExperimentConfig.from_yaml(args.config, overrides=TINY if args.tiny else [])
    if args.micro_batch:
        experiment.training.per_device_train_batch_size = args.micro_batch
    device = torch.device(args.device)
    schedule = resolve_schedule(experiment.stages, experiment.model.stack_sizes)
    stage = schedule[args.stage]
    plan = plan_experiment(experiment, gpu_memory="141GB", device_type=device.type).stages[stage.index]
    settings = settings_for_stage(experiment, stage, device.type)
    config = experiment.model
    # The rack at the stage's layout, with the dtypes the schedule gives it: the trunk cast to bf16.
    config.stack_sizes = list(stage.stack_sizes)
    config.stack_dtypes = ["bfloat16"] * len(stage.stack_sizes)
    config.stack_dtypes[stage.stack] = stage.config.dtype or "float32"
    print(f"{args.config}: stage {stage.name}, stacks {sum(stage.stack_sizes)} blocks, training stack {stage.stack} "
          f"({stage.stack_sizes[stage.stack]} blocks), micro-batch {settings.micro_batch} x {settings.seq_len}, "
          f"{settings.label}, device {device}", flush=True)
    print(f"predicted peak {plan.peak / GiB:.2f} GiB in phase {plan.peak_phase}: "
          + ", ".join(f"{k} {v / GiB:.2f}" for k, v in plan.device.as_dict().items()), flush=True)
    start = time.perf_counter()
    measured = measure_stage(config, stage, settings, device, trunk_hidden_dtype=torch.bfloat16)
    seconds = time.perf_counter() - start
    tokens = settings.micro_batch * settings.seq_len
    error = (plan.peak - measured["measured_peak"]) / measured["measured_peak"]
    result = {
        "config": args.config, "tiny": args.tiny, "stage": stage.name, "blocks": sum(stage.stack_sizes),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "settings": dataclasses.asdict(settings), "predicted_peak_bytes": plan.peak,
        "measured_peak_bytes": measured["measured_peak"], "error": error, "predicted": plan.device.as_dict(),
        "phases": plan.phases, "loss": measured["loss"], "step_seconds": measured["seconds"],
        "tokens_per_second": tokens / measured["seconds"], "wall_seconds": seconds,
        "trained_parameters": plan.trained_parameters, "frozen_parameters_on_host": plan.frozen_parameters,
    }
    print(f"measured peak {measured['measured_peak'] / GiB:.2f} GiB; predicted {plan.peak / GiB:.2f} GiB "
          f"({100 * error:+.1f}%); loss {measured['loss']:.3f}; step {measured['seconds']:.2f} s "
          f"({result['tokens_per_second']:.0f} tokens/s); {seconds:.0f} s in all", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
