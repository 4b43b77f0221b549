"""One-GPU performance suite: stack-wise stages vs HF `LlamaForCausalLM` end to end, in one process.

For racks of 8, 16 and 32 blocks in stacks of 4 (shape of the issue: hidden 2048, ffn 5632, 16/4
heads, vocab 32000, batch 8 x 2048, bf16 autocast, fp32 master weights, AdamW) it measures:

  (a) hf_e2e     HF LlamaForCausalLM, every weight trained.
  (b) recompute  the stackwise_hf trainer's last stage: last stack + final norm + head trained,
                 frozen bf16 trunk run under no_grad every step.
  (c) cache      the same stage fed from the trunk activation cache (trunk off the device).
  (d) lora       a LoRA adapter (r=16, all linears) on the last stack + head trained over the
                 frozen bf16 trunk, the stack's base weights frozen.

For each: peak allocated memory, tokens/s, model TFLOP/s and its fraction of a bf16 matmul ceiling
measured at the start of the same run.

FLOPs per token (the "model FLOPs" convention of the PaLM paper, causal attention not halved):
    6 * N_trained                        weights that receive gradients (forward + two backward matmuls)
  + 2 * N_frozen_forward                 frozen weights whose forward runs (trunk; frozen base under LoRA)
  + 4 * N_frozen_backprop                frozen weights the gradient flows through (LoRA base, prepend suffix)
  + 12 * L_grad * T * d_attn             attention score and value matmuls of layers with gradients
  + 4 * L_fwd * T * d_attn               attention of layers that only run forward
where N counts matmul weights only (the embedding lookup is free, the head is a matmul), T is the
sequence length and d_attn = heads * head_dim. LoRA's own small matmuls count as trained weights.
In cache mode the trunk does not run, so it contributes nothing (its one-off cache build is not timed).

Runs from the repo with `PYTHONPATH=.` on a machine without `datasets`; `--tiny` runs the same code
on a few-MB model for a CPU check. Prints a table and writes JSON:

    PYTHONPATH=. python bench/gpu_suite.py --json bench/results/gpu_suite.json
    PYTHONPATH=. python bench/gpu_suite.py --tiny --device cpu
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from dataclasses import asdict, dataclass

import torch

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=4, vocab_size=32000)
TINY = dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)


@dataclass
class Result:
    variant: str
    depth: int
    peak_gib: float
    tokens_per_s: float
    tflops: float
    ceiling_fraction: float
    step_s: float
    trained_params: int
    note: str = ""


# Measurement helpers --------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: process peak RSS


def matmul_ceiling(device: torch.device, n: int, repeats: int = 20) -> float:
    """bf16 matmul TFLOP/s on an n x n x n product (the hardware ceiling the stages are compared to)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def timed_steps(step, device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def matmul_params(model: torch.nn.Module, predicate) -> int:
    """Parameters of 2-D weights used as matmuls (embedding excluded), selected by name."""
    return sum(p.numel() for n, p in model.named_parameters()
               if p.ndim == 2 and "embed_tokens" not in n and predicate(n, p))


def model_flops_per_token(seq: int, d_attn: int, trained: int, frozen_fwd: int, frozen_bwd: int,
                          layers_grad: int, layers_fwd: int) -> float:
    return (6 * trained + 2 * frozen_fwd + 4 * frozen_bwd
            + 12 * layers_grad * seq * d_attn + 4 * layers_fwd * seq * d_attn)


# Variants --------------------------------------------------------------------------------------------


def run_hf_e2e(args, depth: int, device) -> tuple[float, float, int]:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**args.shape, num_hidden_layers=depth, max_position_embeddings=args.seq,
                                             attn_implementation="sdpa"))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = torch.randint(0, args.shape["vocab_size"], (args.batch, args.seq), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_s = timed_steps(step, device, args.warmup, args.steps)
    trained = matmul_params(model, lambda n, p: True)
    return step_s, model_flops_per_token(args.seq, _d_attn(args), trained, 0, 0, depth, 0), trained


def run_stage(args, depth: int, device, variant: str) -> tuple[float, float, int]:
    """The last stage of a rack of `depth` blocks, through ProgressiveTrainer's own step."""
    from stackwise_hf import StackWiseConfig, StackWiseForCausalLM
    from stackwise_hf.training import ExperimentConfig, ProgressiveTrainer

    n_stacks = depth // args.stack_size
    config = StackWiseConfig(**args.shape, stack_sizes=[args.stack_size] * n_stacks,
                             max_position_embeddings=args.seq)
    with torch.device(device):
        rack = StackWiseForCausalLM(config)
    stage = {"stack": n_stacks - 1, "max_steps": 10**6, "trunk_dtype": "bfloat16", "learning_rate": 1e-4,
             "trunk_mode": "cache" if variant == "cache" else "recompute",
             "train": ["stack_adapter", "head"] if variant == "lora" else ["stack", "head"]}
    if variant == "lora":
        stage["stack_adapter"] = {"r": 16, "lora_alpha": 32, "target": "all-linear"}
    experiment = ExperimentConfig.from_dict({
        "model": config.to_diff_dict() | {"stack_sizes": config.stack_sizes},
        "training": {"per_device_train_batch_size": args.batch, "mixed_precision": "bf16", "report_to": "none",
                     "plot": False, "output_dir": args.output_dir, "max_grad_norm": 1.0,
                     "loss_chunk_size": args.loss_chunk_size, "trunk_cache_budget": "200GB"},
        "stages": [stage],
    })
    blocks = [{"input_ids": torch.randint(0, args.shape["vocab_size"], (args.seq,))}
              for _ in range(args.batch * (args.warmup + args.steps + 1))]
    trainer = ProgressiveTrainer(experiment, rack=rack, train_dataset=blocks, eval_dataset=blocks[: args.batch],
                                 accelerator=_accelerator(device))
    trainer.setup()
    run = trainer.enter_stage(trainer.schedule[0])
    batches = iter(run.train_loader)

    def step():
        trainer._train_micro_batch(run, next(batches))

    reset_peak(device)  # the cache build (cache mode) is a one-off outside the measured steps
    step_s = timed_steps(step, device, args.warmup, args.steps)
    trained = matmul_params(rack, lambda n, p: p.requires_grad)
    frozen_in_trained_stack = matmul_params(
        rack, lambda n, p: not p.requires_grad and f"stacks.{n_stacks - 1}." in n)
    head_frozen = 0 if rack.lm_head.weight.requires_grad else rack.lm_head.weight.numel()
    trunk = 0 if variant == "cache" else matmul_params(
        rack, lambda n, p: any(f"stacks.{i}." in n for i in range(n_stacks - 1)))
    flops = model_flops_per_token(args.seq, _d_attn(args), trained, trunk + frozen_in_trained_stack + head_frozen,
                                  frozen_in_trained_stack, args.stack_size,
                                  0 if variant == "cache" else depth - args.stack_size)
    return step_s, flops, trained


def _accelerator(device):
    from accelerate import Accelerator

    return Accelerator(mixed_precision="bf16", cpu=device.type == "cpu")


def _d_attn(args) -> int:
    return args.shape["num_attention_heads"] * (args.shape["hidden_size"] // args.shape["num_attention_heads"])


# Driver ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--variants", nargs="+", default=["hf_e2e", "recompute", "cache", "lora"])
    parser.add_argument("--stack-size", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--loss-chunk-size", type=int, default=None, help="chunked cross-entropy (positions)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny shape, for checking the script on a CPU")
    parser.add_argument("--json", default="bench/results/gpu_suite.json")
    parser.add_argument("--output-dir", default="/tmp/stackwise-gpu-suite")
    args = parser.parse_args()
    args.shape = TINY if args.tiny else SHAPE
    if args.tiny:
        args.batch, args.seq, args.steps, args.warmup = min(args.batch, 2), min(args.seq, 64), min(args.steps, 2), 1
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    ceiling = matmul_ceiling(device, 512 if args.tiny else 8192)
    print(f"device: {_describe(device)}; bf16 matmul ceiling {ceiling:.1f} TFLOP/s")
    results: list[Result] = []
    for depth in args.depths:
        for variant in args.variants:
            reset_peak(device)
            note = ""
            try:
                runner = run_hf_e2e if variant == "hf_e2e" else (lambda a, d, dev: run_stage(a, d, dev, variant))
                step_s, flops, trained = runner(args, depth, device)
            except torch.OutOfMemoryError:
                results.append(Result(variant, depth, peak_gib(device), 0, 0, 0, 0, 0, "out of memory"))
                print(f"{variant:>10} depth {depth:>3}: out of memory")
                continue
            tokens = args.batch * args.seq
            tflops = flops * tokens / step_s / 1e12
            results.append(Result(variant, depth, peak_gib(device), tokens / step_s, tflops, tflops / ceiling,
                                   step_s, trained, note))
            r = results[-1]
            print(f"{variant:>10} depth {depth:>3}: peak {r.peak_gib:7.2f} GiB  {r.tokens_per_s:>10,.0f} tok/s  "
                  f"{r.tflops:7.1f} TFLOP/s ({100 * r.ceiling_fraction:4.1f}% of ceiling)")
    _print_table(results)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"device": _describe(device), "ceiling_tflops": ceiling, "args": {
            k: v for k, v in vars(args).items() if k != "shape"} | {"shape": args.shape},
            "results": [asdict(r) for r in results]}, f, indent=2)
    print(f"wrote {args.json}")


def _print_table(results: list[Result]) -> None:
    print(f"\n{'variant':>10} {'depth':>5} {'peak GiB':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'ceiling':>8} {'vs hf tok/s':>11}")
    base = {r.depth: r.tokens_per_s for r in results if r.variant == "hf_e2e" and r.tokens_per_s}
    for r in results:
        ratio = f"{r.tokens_per_s / base[r.depth]:.2f}x" if r.depth in base and r.tokens_per_s else "-"
        print(f"{r.variant:>10} {r.depth:>5} {r.peak_gib:>9.2f} {r.tokens_per_s:>10,.0f} {r.tflops:>8.1f} "
              f"{100 * r.ceiling_fraction:>7.1f}% {ratio:>11}")


def _describe(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}"


if __name__ == "__main__":
    main()
