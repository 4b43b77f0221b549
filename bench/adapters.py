"""Training a rack's newest stack in full vs with a LoRA stack adapter: trainable parameters, peak memory, step time.

Variants (the trunk stacks, embeddings and head are frozen in all of them):
  full        the newest stack in float32, every weight trained (AdamW)
  lora        the newest stack frozen in float32, its `stack_{n-1}` LoRA adapter trained
  lora-lowp   the newest stack frozen in `--dtype` (bf16 by default), a float32 adapter trained

Each variant runs in a child process of its own, because peak RSS is a per-process high-water mark.
Peak memory is the child's peak RSS on CPU and `torch.cuda.max_memory_allocated` on CUDA; "training"
is the part of it above what the process held once the model and optimizer were built.

    .venv/bin/python bench/adapters.py
    python bench/adapters.py --device cuda --hidden 2048 --intermediate 5632 --batch 8 --seq 2048 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import _common

VARIANTS = ("full", "lora", "lora-lowp")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--stacks", type=int, default=4, help="stacks in the rack; the last one is trained")
    parser.add_argument("--blocks", type=int, default=2, help="blocks per stack")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--r", type=int, default=16, help="LoRA rank of the stack adapter")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the frozen trunk (and of lora-lowp's stack)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# One variant, in a child process ---------------------------------------------------------------------


def build(args, variant: str):
    import torch

    from stackwise_hf import StackWiseConfig, StackWiseForCausalLM
    from stackwise_hf.adapters import add_stack_adapter, freeze_base_weights

    newest = args.stacks - 1
    newest_dtype = args.dtype if variant == "lora-lowp" else "float32"
    config = StackWiseConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq,
        stack_sizes=[args.blocks] * args.stacks, stack_dtypes=[args.dtype] * newest + [newest_dtype],
    )
    torch.manual_seed(0)
    rack = StackWiseForCausalLM(config).to(args.device)
    freeze_base_weights(rack)
    if variant == "full":
        rack.unfreeze_stacks([newest])
    else:
        add_stack_adapter(rack, newest, r=args.r, lora_alpha=2 * args.r)
    return rack


def run_child(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    rack = build(args, args.child).train()
    params = [p for p in rack.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    batch = batch.to(args.device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()

    losses, times = [], []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = rack(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss.item())

    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "variant": args.child,
        "trainable": sum(p.numel() for p in params),
        "total": sum(p.numel() for p in rack.parameters()),
        "peak_mib": peak / 2**20,
        "training_mib": (peak - before) / 2**20,
        "step_s": sum(times) / len(times),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# The parent: one child per variant, then the table -----------------------------------------------------


def run_variant(argv: list[str], variant: str) -> dict:
    return _common.run_child([os.path.abspath(__file__), *argv, "--child", variant], label=f"variant {variant}")


def print_table(args, results: list[dict]) -> None:
    memory = "peak alloc MiB" if args.device.startswith("cuda") else "peak RSS MiB"
    print(
        f"rack: {args.stacks} stacks x {args.blocks} blocks, hidden {args.hidden}, ffn {args.intermediate}, "
        f"vocab {args.vocab}; batch {args.batch}x{args.seq}; trunk {args.dtype}; LoRA r={args.r}; "
        f"{results[0]['device']}, {results[0]['threads']} thread(s); "
        f"mean of {args.steps} steps after {args.warmup} warm-up"
    )
    header = ("variant", "trainable params", memory, "training MiB", "step s", "loss first->last")
    rows = [header]
    for r in results:
        rows.append((r["variant"], f"{r['trainable']:,}", f"{r['peak_mib']:.0f}", f"{r['training_mib']:.0f}",
                     f"{r['step_s']:.3f}", f"{r['loss_first']:.3f}->{r['loss_last']:.3f}"))
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))))
    full = next((r for r in results if r["variant"] == "full"), None)
    if full:
        for r in results:
            if r is not full:
                print(
                    f"{r['variant']} / full: trainable x{r['trainable'] / full['trainable']:.4f}, "
                    f"peak x{r['peak_mib'] / full['peak_mib']:.2f}, training memory "
                    f"x{r['training_mib'] / full['training_mib']:.2f}, step time x{r['step_s'] / full['step_s']:.2f}"
                )


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return
    print_table(args, [run_variant(argv, v) for v in args.variants])


if __name__ == "__main__":
    main()
