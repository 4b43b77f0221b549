"""Save and load time and bytes written: a rack vs an equally sized `LlamaForCausalLM`, in one run.

Both models have the same weights (the rack is `from_llama` of the Llama); the Llama is saved and
loaded with plain transformers, the rack with its per-stack sharding. Prints absolute figures and
rack/Llama ratios (target: within 10%). Each figure is the median of `--repeats` interleaved runs.

    python bench/save_load.py --hidden 512 --layers 8 --stacks 4 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch
from _common import llama_and_rack
from transformers import LlamaForCausalLM

from stackwise_hf import StackWiseForCausalLM


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def save_load_once(model, model_cls, max_shard_size: str, tmpdir: str | None) -> tuple[float, float, int]:
    directory = tempfile.mkdtemp(prefix="bench-save-", dir=tmpdir)
    try:
        start = time.perf_counter()
        model.save_pretrained(directory, max_shard_size=max_shard_size)
        save_s = time.perf_counter() - start
        size = directory_bytes(directory)
        start = time.perf_counter()
        model_cls.from_pretrained(directory)
        return save_s, time.perf_counter() - start, size
    finally:
        shutil.rmtree(directory)


def measure(models: dict, max_shard_size: str, repeats: int, tmpdir: str | None) -> dict:
    """Median save/load seconds per model; repeats interleave the models so that disk and page-cache
    drift on a shared machine falls on both sides alike."""
    runs = {name: [] for name in models}
    for _ in range(repeats):
        for name, (model, model_cls) in models.items():
            runs[name].append(save_load_once(model, model_cls, max_shard_size, tmpdir))
    return {
        name: {"save_s": statistics.median(r[0] for r in rs), "load_s": statistics.median(r[1] for r in rs),
               "bytes": rs[-1][2]}
        for name, rs in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--stacks", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tmpdir", default=None, help="where to write (e.g. /dev/shm to leave the disk out)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    llama, rack = llama_and_rack(args.hidden, args.layers, args.stacks, args.vocab)
    params = sum(p.numel() for p in llama.parameters())
    print(f"{params / 1e6:.1f}M parameters, {args.layers} layers, rack of {args.stacks} stacks, repeats={args.repeats}")

    models = {"llama": (llama, LlamaForCausalLM), "rack": (rack, StackWiseForCausalLM)}
    measure(models, args.max_shard_size, 1, args.tmpdir)  # warm-up: first-call costs fall on neither side
    results = measure(models, args.max_shard_size, args.repeats, args.tmpdir)
    print(f"{'':8}{'save s':>10}{'load s':>10}{'bytes':>14}")
    for name, r in results.items():
        print(f"{name:8}{r['save_s']:>10.3f}{r['load_s']:>10.3f}{r['bytes']:>14,}")
    ratio = {k: results["rack"][k] / results["llama"][k] for k in ("save_s", "load_s", "bytes")}
    print(f"{'ratio':8}{ratio['save_s']:>10.3f}{ratio['load_s']:>10.3f}{ratio['bytes']:>14.4f}   (rack / llama)")


if __name__ == "__main__":
    main()
