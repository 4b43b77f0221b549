"""Peak memory and tokens/s of the last stage's training step as the rack deepens: recompute and cache
trunk modes next to an end-to-end step of the same rack, as ratios, in one run.

For each depth the rack has `depth / blocks-per-stack` stacks; the last stage trains the last stack and
the head. Modes:

- `e2e`: every weight trains (the baseline of the ratios);
- `recompute`: the frozen trunk runs under `no_grad` at every step (`trunk_mode: recompute`);
- `cache`: the trunk's output comes from a `TrunkCache` built beforehand (`trunk_mode: cache`); the trunk
  is then taken off the device (on the CPU: its weights are freed) and never runs in the step.

Each (depth, mode) runs in a fresh process. The peak is taken over the measured steps only (one warmup
step, which also allocates AdamW's state, then `--steps` steps): on the CPU the process's peak RSS
(`VmHWM`, reset through `/proc/self/clear_refs` once the setup is done; glibc's fixed mmap threshold
makes freed tensors leave the RSS at once), on a GPU `torch.cuda.max_memory_allocated`. Tokens/s do not count the cache's construction (once per stage).

    python bench/memory_vs_depth.py --depths 2 4 8 16            # CPU, one thread per worker
    python bench/memory_vs_depth.py --hidden 2048 --ffn 5632 --heads 16 --kv-heads 4 --vocab 32000 \
        --seq 2048 --batch 8 --blocks-per-stack 4 --depths 8 16 32 --bf16   # a GPU
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import sys
import time

from _common import DOCS, run_child, write_section

MODES = ("e2e", "recompute", "cache")
SECTION = "memory_vs_depth"


def _rss_peak_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def _reset_peak(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed pages (a dropped trunk) back before the reset
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(args) -> dict:
    import torch

    from stackwise_hf import StackWiseConfig, StackWiseForCausalLM
    from stackwise_hf.training.objectives import CausalLMObjective
    from stackwise_hf.training.stage import StageModule
    from stackwise_hf.training.trunk_cache import TrunkCache

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n_stacks = args.depth // args.blocks_per_stack
    config = StackWiseConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq, stack_sizes=[args.blocks_per_stack] * n_stacks,
    )
    rack = StackWiseForCausalLM(config).to(device)
    rack.requires_grad_(args.mode == "e2e")
    if args.mode != "e2e":
        rack.unfreeze_stacks([n_stacks - 1])
        for p in rack.head_parameters():
            p.requires_grad_(True)
    first_trained = 0 if args.mode == "e2e" else n_stacks - 1
    objective = CausalLMObjective()
    module = StageModule(rack, objective, first_trained, train_embeddings=args.mode == "e2e")
    frozen_bytes = sum(p.numel() * p.element_size() for s in rack.model.stacks[:first_trained] for p in s.parameters())
    n_blocks = args.steps + 1
    g = torch.Generator().manual_seed(0)
    blocks = [{"input_ids": row} for row in torch.randint(0, args.vocab, (n_blocks * args.batch, args.seq), generator=g)]
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else None

    cache = None
    if args.mode == "cache":
        cache = TrunkCache(budget="1TB", batch_size=args.batch)
        cache.sync(module, objective, 0, {"train": blocks}, device=device, autocast=autocast)
        if device.type == "cuda":
            cache.offload_trunk(rack, first_trained, "cpu")
        else:  # nowhere to offload to on the CPU: the trunk's weights go away
            for stack in rack.model.stacks[:first_trained]:
                stack.to("meta")
    optimizer = torch.optim.AdamW([p for p in rack.parameters() if p.requires_grad], lr=1e-4)

    def step(i: int) -> None:
        ids = torch.stack([b["input_ids"] for b in blocks[i * args.batch:(i + 1) * args.batch]]).to(device)
        rows = torch.arange(i * args.batch, (i + 1) * args.batch)
        hidden = cache.hidden("train", rows, device) if cache is not None and cache.active else None
        with autocast() if autocast else torch.autocast(device.type, enabled=False):
            loss, _ = module(ids, ids, None, trunk_hidden=hidden)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    _reset_peak(device)
    step(0)  # warmup: allocates AdamW's state
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(1, n_blocks):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_peak_kib() * 1024
    return {"depth": args.depth, "mode": args.mode, "peak_bytes": peak, "frozen_bytes": frozen_bytes,
            "tokens_per_s": args.steps * args.batch * args.seq / seconds, "device": device.type,
            "memory_kind": "max_memory_allocated" if device.type == "cuda" else "peak RSS"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16], help="blocks in the rack")
    parser.add_argument("--blocks-per-stack", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=688)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="measured steps after one warmup step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks.md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    rows = []
    for depth in args.depths:
        if depth % args.blocks_per_stack:
            parser.error(f"depth {depth} is not a multiple of --blocks-per-stack {args.blocks_per_stack}")
        for mode in MODES:
            shape = ["blocks_per_stack", "hidden", "ffn", "heads", "kv_heads", "vocab", "seq", "batch", "steps", "threads"]
            cmd = [__file__, "--worker", "--depth", str(depth), "--mode", mode]
            cmd += [x for name in shape for x in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]
            cmd += ["--bf16"] if args.bf16 else []
            # Every allocation from 128 KiB up is its own mapping, returned to the system when freed: RSS then
            # follows live tensors instead of what glibc's heap keeps after a free (the dropped trunk).
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_="131072")
            rows.append(run_child(cmd, env, f"worker {depth}/{mode}"))
            print(f"  measured depth {depth:>3} {mode:<9}", file=sys.stderr)
    text = table(rows)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.docs:
        write_section(os.path.join(DOCS, "benchmarks.md"), SECTION, section_text(text, rows, args))


def table(rows: list[dict]) -> str:
    mib = 2**20
    e2e = {r["depth"]: r for r in rows if r["mode"] == "e2e"}
    first = {m: next(r for r in rows if r["mode"] == m) for m in MODES}
    kind = rows[0]["memory_kind"]
    lines = [
        f"| blocks | mode | {kind} MiB | vs e2e | growth since {first['e2e']['depth']} blocks MiB | "
        f"frozen weights MiB | tokens/s | vs e2e |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = e2e[r["depth"]]
        lines.append(
            f"| {r['depth']} | {r['mode']} | {r['peak_bytes'] / mib:.0f} | {r['peak_bytes'] / base['peak_bytes']:.2f} | "
            f"{(r['peak_bytes'] - first[r['mode']]['peak_bytes']) / mib:+.0f} | {r['frozen_bytes'] / mib:.0f} | "
            f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f} |"
        )
    return "\n".join(lines)


def section_text(table_text: str, rows: list[dict], args) -> str:
    import platform

    import torch

    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    command = "python bench/memory_vs_depth.py " + " ".join(sys.argv[1:])
    return "\n".join([
        "## Memory and speed of a stage's step vs depth (`bench/memory_vs_depth.py`)",
        "",
        f"- Date: {datetime.date.today().isoformat()}; machine: {rows[0]['device']}, {cpu}, {os.cpu_count()} cores, "
        f"{args.threads} thread(s) per worker; torch {torch.__version__}.",
        f"- Command: `{command}`",
        f"- Rack: hidden {args.hidden}, ffn {args.ffn}, {args.heads}/{args.kv_heads} heads, vocab {args.vocab}, "
        f"{args.blocks_per_stack} blocks per stack; batch {args.batch} x {args.seq} tokens; the stage trains the last "
        f"stack and the head. One warmup step, then {args.steps} measured steps; peak over those steps only.",
        "",
        table_text,
        "",
    ])


if __name__ == "__main__":
    main()
