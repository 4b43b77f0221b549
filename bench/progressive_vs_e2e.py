"""A rack trained progressively vs the same architecture trained end to end at equal tokens, on Shakespeare.

For each objective (causal LM; masked diffusion, whose held-out loss is the cross-entropy at masked
positions under the same deterministic eval masks for both runs):

- `progressive`: stage 0 trains the first stack with the embeddings and head; each later stage appends
  a stack (identity init) and trains it with the head over the frozen trunk (`--trunk-mode`);
- `e2e`: the final architecture, every weight trained from the start, for as many steps (and so tokens)
  as all stages together, evaluated at the same token counts as the stage boundaries.

Each run is its own process, so its peak memory is its own: peak RSS on the CPU (reset once the data is
built), `torch.cuda.max_memory_allocated` on a GPU. Prints a table, draws the held-out loss against
tokens, and with `--docs` writes both into its own section of `docs/benchmarks.md`.

    python bench/progressive_vs_e2e.py --docs
    python bench/progressive_vs_e2e.py --objectives masked_diffusion --steps-per-stage 50
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import sys
import tempfile
import time

from _common import DOCS, run_child, write_section

# A run is (objective, kind); another kind registers here with a function building its experiment.
OBJECTIVES = ("clm", "masked_diffusion")
KINDS = ("progressive", "e2e")
SECTION = "progressive_vs_e2e"


def experiment_document(args, objective: str, kind: str, output_dir: str) -> dict:
    n = args.stages
    model = dict(vocab_size=4096, hidden_size=args.hidden, intermediate_size=args.ffn, num_attention_heads=args.heads,
                 num_key_value_heads=args.kv_heads, max_position_embeddings=512,
                 stack_sizes=[args.blocks_per_stack] * (1 if kind == "progressive" else n))
    if objective != "clm":
        model["attention_mode"] = "bidirectional"
    common = dict(objective=objective, warmup_steps=args.warmup, lr_scheduler_type="cosine")
    if kind == "progressive":
        stages = [dict(name="stack_0", train=["stack", "head", "embeddings"], max_steps=args.steps_per_stage,
                       learning_rate=args.lr, **common)]
        stages += [dict(name=f"stack_{k}", grow="append", n_blocks=args.blocks_per_stack, init="identity",
                        train=["stack", "head"], max_steps=args.steps_per_stage, learning_rate=args.lr,
                        trunk_mode=args.trunk_mode, **common) for k in range(1, n)]
    else:
        stages = [dict(name="e2e", train=["all"], max_steps=args.steps_per_stage * n, learning_rate=args.lr, **common)]
    training = dict(output_dir=output_dir, per_device_train_batch_size=args.batch, per_device_eval_batch_size=32,
                    logging_steps=10, eval_steps=args.steps_per_stage if kind == "e2e" else None,
                    save_interval=None, save_total_limit=1, report_to="none", plot=False, seed=args.seed,
                    mixed_precision="bf16" if args.bf16 else "no")
    data = dict(dataset="shakespeare", tokenizer_vocab_size=4096, block_size=args.block, max_eval_blocks=args.eval_blocks)
    return {"model": model, "data": data, "training": training, "objective": {"seed": 0}, "stages": stages}


def worker(args) -> dict:
    import torch

    from stackwise_hf.data import build_datasets, load_or_train_tokenizer
    from stackwise_hf.training import ExperimentConfig, ProgressiveTrainer

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as output_dir:
        experiment = ExperimentConfig.from_dict(experiment_document(args, args.objective, args.kind, output_dir))
        tokenizer = load_or_train_tokenizer(experiment.data)
        train, held_out = build_datasets(experiment.data, tokenizer)
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        else:  # the peak of the training, not of tokenization
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        start = time.perf_counter()
        trainer = ProgressiveTrainer(experiment, train_dataset=train, eval_dataset=held_out, tokenizer=tokenizer)
        result = trainer.train()
        seconds = time.perf_counter() - start
        if cuda:
            peak = torch.cuda.max_memory_allocated()
        else:
            with open("/proc/self/status") as f:
                peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) * 1024
        tokens_per_step = args.batch * args.block
        evals = [(r["step"] * tokens_per_step, r["loss"]) for r in trainer.run_log.history if r["kind"] == "eval"]
        return {"objective": args.objective, "kind": args.kind, "seconds": seconds, "peak_bytes": peak,
                "memory_kind": "max_memory_allocated" if cuda else "peak RSS", "evals": evals,
                "stage_seconds": [s.seconds for s in result.stages],
                "stack_sizes": result.stages[-1].stack_sizes, "device": "cuda" if cuda else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--steps-per-stage", type=int, default=150)
    parser.add_argument("--blocks-per-stack", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--ffn", type=int, default=352)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--block", type=int, default=128, help="tokens per block")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval-blocks", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--trunk-mode", choices=("recompute", "cache"), default="recompute")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--docs", action="store_true", help="write the table and plot into docs/benchmarks.md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--objective", choices=OBJECTIVES, help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    results = []
    passthrough = [a for a in sys.argv[1:] if a != "--docs"]
    for objective in args.objectives:
        for kind in KINDS:
            cmd = [__file__, "--worker", "--objective", objective, "--kind", kind, *passthrough]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
            results.append(run_child(cmd, env, f"{objective}/{kind}"))
            print(f"  {objective:<17} {kind:<12} {results[-1]['seconds']:.0f} s", file=sys.stderr)
    text = table(results, args)
    print(text)
    if args.docs:
        plot(results, os.path.join(DOCS, "progressive_vs_e2e.png"))
        write_section(os.path.join(DOCS, "benchmarks.md"), SECTION, section_text(text, results))


def table(results: list[dict], args) -> str:
    mib = 2**20
    kind = results[0]["memory_kind"]
    boundaries = [args.steps_per_stage * (k + 1) * args.batch * args.block for k in range(args.stages)]
    header = " | ".join(f"held-out @ {t / 1e3:.0f}k tok" for t in boundaries)
    lines = [f"| objective | run | {header} | wall s | {kind} MiB | wall vs e2e | memory vs e2e |",
             "|---|---|" + "---:|" * (len(boundaries) + 4)]
    by_key = {(r["objective"], r["kind"]): r for r in results}
    for r in results:
        e2e = by_key.get((r["objective"], "e2e"), r)
        losses = dict(r["evals"])
        cells = " | ".join(f"{losses[t]:.3f}" if t in losses else "-" for t in boundaries)
        name = r["kind"] if r["kind"] == "e2e" else f"{r['kind']} ({args.trunk_mode})"
        lines.append(f"| {r['objective']} | {name} | {cells} | {r['seconds']:.0f} | {r['peak_bytes'] / mib:.0f} | "
                     f"{r['seconds'] / e2e['seconds']:.2f} | {r['peak_bytes'] / e2e['peak_bytes']:.2f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives = list(dict.fromkeys(r["objective"] for r in results))
    fig, axes = plt.subplots(1, len(objectives), figsize=(5.5 * len(objectives), 4), squeeze=False)
    for ax, objective in zip(axes[0], objectives):
        for r in results:
            if r["objective"] == objective:
                tokens, losses = zip(*r["evals"])
                ax.plot([t / 1e6 for t in tokens], losses, "o-", label=r["kind"], markersize=4)
        ax.set_title(f"{objective}: held-out loss")
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel("loss" if objective == "clm" else "masked-token loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section_text(table_text: str, results: list[dict]) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = results[0]["device"]
    command = "python bench/progressive_vs_e2e.py " + " ".join(sys.argv[1:])
    return "\n".join([
        "## Progressive vs end to end at equal tokens (`bench/progressive_vs_e2e.py`)",
        "",
        f"- Date: {datetime.date.today().isoformat()}; machine: {device}, {cpu}, {os.cpu_count()} cores; "
        f"torch {torch.__version__}.",
        f"- Command: `{command}`",
        "- Held-out loss: causal LM cross-entropy; for masked diffusion, the cross-entropy at masked positions under "
        "the eval split's fixed masks (ratios drawn per block from the objective's range), identical for both runs. "
        "Columns are the token counts at the progressive run's stage boundaries; e2e is evaluated at the same counts.",
        "",
        table_text,
        "",
        "![held-out loss against tokens](progressive_vs_e2e.png)",
        "",
    ])


if __name__ == "__main__":
    main()
