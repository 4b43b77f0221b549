"""Predicted vs measured peak memory of one training step, stage by stage, on this machine's device.

    PYTHONPATH=. python bench/planner_check.py                  # the built-in small cases, CPU or CUDA
    PYTHONPATH=. python bench/planner_check.py --json out.json  # also write the rows as JSON
    PYTHONPATH=. python bench/planner_check.py --scale 4        # hidden/ffn/tokens x4 (GPU)

Each case builds a rack at a stage's layout, makes what the trainer makes on entering the stage
(`set_trainable`, `StageModule`, AdamW over `optimizer_groups`, the objective with its
`loss_chunk_size`), runs one warm-up step (so AdamW's moments exist, as in every later step) and
measures the next: forward under autocast, backward, clipping, optimizer step, zero_grad. On CUDA
the measurement is `torch.cuda.max_memory_allocated`; on CPU it is `planner.MemoryMeter`, which
counts every tensor's storage (see its docstring for what it cannot see). Cache-mode cases feed
synthetic cached hidden states and never build the trunk on the device. Needs no `datasets`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from stackwise_hf import StackWiseConfig, StackWiseForCausalLM
from stackwise_hf.planner import MemoryMeter, PlanSettings, plan_stage
from stackwise_hf.training.objectives import CausalLMObjective
from stackwise_hf.training.schedule import ResolvedStage, StageConfig
from stackwise_hf.training.stage import StageModule, first_trained_stack, optimizer_groups, set_trainable

MODEL = dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=2,
             max_position_embeddings=1024)

# (name, stack_sizes, stack_dtypes, stage fields, plan settings)
CASES = [
    ("fp32 recompute, full logits", [2, 2], ["float32"] * 2, {"train": ["stack", "head"]},
     dict(mixed_precision="no", loss_chunk_size=None)),
    ("fp32+bf16 autocast, full logits", [2, 2], ["float32"] * 2, {"train": ["stack", "head"]},
     dict(mixed_precision="bf16", loss_chunk_size=None)),
    ("fp32+bf16 autocast, chunked loss", [2, 2], ["float32"] * 2, {"train": ["stack", "head"]},
     dict(mixed_precision="bf16", loss_chunk_size=128)),
    ("bf16 stacks, cache on host", [2, 2], ["bfloat16"] * 2, {"train": ["stack", "head"], "trunk_mode": "cache"},
     dict(mixed_precision="bf16", loss_chunk_size=128, trunk_mode="cache", trunk_placement="host")),
    ("fp32+bf16, checkpointing", [2, 2], ["float32"] * 2,
     {"train": ["stack", "head"], "gradient_checkpointing": True},
     dict(mixed_precision="bf16", loss_chunk_size=None, gradient_checkpointing=True)),
    ("first stage: embeddings+stack+head", [2], ["float32"], {"train": ["stack", "head", "embeddings"]},
     dict(mixed_precision="bf16", loss_chunk_size=None)),
    ("fp32, 3 stacks, small vocab (optimizer)", [1, 2, 2], ["float32"] * 3, {"train": ["stack", "head"]},
     dict(mixed_precision="no", loss_chunk_size=None, micro_batch=1)),
    ("int8 trunk (torchao), recompute", [2, 2, 2], ["bfloat16", "bfloat16", "float32"],
     {"train": ["stack", "head"], "trunk_quantization": "int8"},
     dict(mixed_precision="bf16", loss_chunk_size=128, trunk_precision="int8")),
    ("NF4 trunk (bitsandbytes), recompute", [2, 2, 2], ["bfloat16", "bfloat16", "float32"],
     {"train": ["stack", "head"], "trunk_quantization": "nf4"},
     dict(mixed_precision="bf16", loss_chunk_size=128, trunk_precision="nf4")),
]


def build_stage(config: StackWiseConfig, stage: ResolvedStage, device, skip_trunk: bool = False):
    """The rack at the stage's layout on `device`, trainable as the trainer sets it.

    With `skip_trunk`, the frozen stacks before the trained one stay on `meta` (cache mode: they are
    never run on the device). Weights are drawn on the device (normal, std 0.02) so a large rack builds fast.
    """
    with torch.device("meta"):
        rack = StackWiseForCausalLM(config)
    rack.train()
    set_trainable(rack, stage)
    first = first_trained_stack(rack, stage.config.trains("embeddings"))
    for i, stack in enumerate(rack.model.stacks):
        if skip_trunk and i < first:
            continue
        _materialise(stack, device, config.initializer_range)
    for module in (rack.model.embed_tokens, rack.model.norm, rack.lm_head):
        _materialise(module, device, config.initializer_range)
    rack.model.rotary_emb.inv_freq = rack.model.rotary_emb.compute_inv_freq(config).to(device)
    for stack, dtype in zip(rack.model.stacks, config.stack_dtypes):
        if not skip_trunk or stack.blocks[0].input_layernorm.weight.device.type != "meta":
            stack.to(getattr(torch, dtype))
    if stage.config.trunk_quantization is not None:  # as `grow_for_stage` does on entering the stage
        from stackwise_hf.quantization import SCHEMES, quantize_stacks

        quantize_stacks(rack, [i for i in range(rack.num_stacks) if i != stage.stack],
                        bits=SCHEMES[stage.config.trunk_quantization])
    set_trainable(rack, stage)  # again: materialising makes new Parameters
    rack.model.stacks[stage.stack].gradient_checkpointing = stage.config.gradient_checkpointing
    return rack, first


def _materialise(module: torch.nn.Module, device, std: float) -> None:
    module.to_empty(device=device)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("layernorm.weight") or name in ("weight",) and param.ndim == 1:
                param.fill_(1.0)
            elif param.ndim == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, std)


def measure_stage(config: StackWiseConfig, stage: ResolvedStage, settings: PlanSettings, device, seed: int = 0,
                  trunk_hidden_dtype=None) -> dict:
    """Measures one training step of `stage` (after one warm-up step); returns peak and timing."""
    torch.manual_seed(seed)
    device = torch.device(device)
    cache = settings.trunk_mode == "cache"
    rack, first = build_stage(config, stage, device, skip_trunk=cache)
    objective = CausalLMObjective()
    objective.loss_chunk_size = settings.loss_chunk_size
    module = StageModule(rack, objective, first, train_embeddings=stage.config.trains("embeddings"))
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(optimizer_groups(rack, stage.config.weight_decay), lr=1e-4, **fused)
    b, t = settings.micro_batch, settings.seq_len
    ids = torch.randint(0, config.vocab_size, (b, t), device=device)
    hidden = None
    if cache and first > 0:
        dtype = trunk_hidden_dtype or getattr(torch, config.stack_dtypes[first - 1])
        hidden = torch.randn(b, t, config.hidden_size, device=device, dtype=dtype)
    autocast = settings.mixed_precision in ("bf16", "fp16")
    amp_dtype = torch.bfloat16 if settings.mixed_precision == "bf16" else torch.float16
    trained = [p for p in rack.parameters() if p.requires_grad]

    def step() -> float:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=autocast):
            loss, _ = module(ids, ids, None, trunk_hidden=hidden)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step()
    meter = MemoryMeter(device)
    # CPU: count what exists before the step, as the CUDA allocator does. Trunk stacks left on meta
    # (cache mode) are not there; on CUDA they were never allocated.
    meter.track(*[p for p in rack.parameters()], *[v for s in optimizer.state.values() for v in s.values()
                                                   if isinstance(v, torch.Tensor)], ids,
                *([hidden] if hidden is not None else []), rack.model.rotary_emb.inv_freq)
    start = time.perf_counter()
    with meter:
        loss = step()
    seconds = time.perf_counter() - start
    return {"measured_peak": meter.peak, "seconds": seconds, "loss": loss}


def stage_of(stack_sizes, stage_fields: dict, stack: int | None = None) -> ResolvedStage:
    fields = {"max_steps": 1, **stage_fields}
    config = StageConfig(**fields)
    stack = len(stack_sizes) - 1 if stack is None else stack
    return ResolvedStage(0, "check", config, stack, tuple(stack_sizes))


def run_cases(device, scale: int = 1, micro_batch: int = 4, seq_len: int = 128, only: str | None = None) -> list[dict]:
    rows = []
    for name, sizes, dtypes, stage_fields, plan_fields in CASES:
        if only and only not in name:
            continue
        scheme = stage_fields.get("trunk_quantization")
        if scheme is not None and (reason := _backend_missing(scheme)):
            print(f"{name:<38} skipped: {reason}")
            continue
        if torch.device(device).type == "cuda" and plan_fields.get("mixed_precision") == "no":
            # fp32 attention with GQA runs SDPA's math kernel on CUDA (the (T, T) scores are kept): not modelled.
            print(f"{name:<38} skipped on CUDA: fp32 GQA attention takes the math kernel, which the planner does not model")
            continue
        plan_fields = {"micro_batch": micro_batch, **plan_fields}
        model = dict(MODEL, hidden_size=MODEL["hidden_size"] * scale, intermediate_size=MODEL["intermediate_size"] * scale,
                     stack_sizes=sizes, stack_dtypes=dtypes)
        config = StackWiseConfig(**model)
        stage = stage_of(sizes, stage_fields)
        settings = PlanSettings(seq_len=seq_len * scale,
                                device_type=torch.device(device).type, **plan_fields)
        plan = plan_stage(config, stage, settings)
        measured = measure_stage(config, stage, settings, device)
        error = (plan.peak - measured["measured_peak"]) / measured["measured_peak"]
        rows.append({"case": name, "predicted_peak": plan.peak, "measured_peak": measured["measured_peak"],
                     "error": error, "peak_phase": plan.peak_phase, "phases": plan.phases,
                     "breakdown": plan.device.as_dict(), "seconds": measured["seconds"],
                     "settings": dataclasses.asdict(settings)})
        print(f"{name:<38} predicted {plan.peak / 2**20:9.1f} MiB  measured {measured['measured_peak'] / 2**20:9.1f} MiB"
              f"  error {100 * error:+6.1f}%  (peak in {plan.peak_phase})", flush=True)
    return rows


def _backend_missing(scheme: str) -> str | None:
    from stackwise_hf.quantization import SCHEMES, backend_available, resolve_backend

    try:
        return backend_available(resolve_backend(SCHEMES[scheme]))
    except ImportError as err:
        return str(err)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=int, default=1, help="multiply hidden, ffn and sequence length")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", help="run the cases whose name contains this")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"device {args.device}, torch {torch.__version__}")
    rows = run_cases(args.device, args.scale, args.micro_batch, args.seq_len, args.only)
    worst = max(abs(r["error"]) for r in rows)
    print(f"largest |error|: {100 * worst:.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "torch": torch.__version__, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
