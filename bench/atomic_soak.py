"""SIGKILL soak over rack overwrites: a child process saves two different racks (with adapters, several
shards per stack) over the same directory in turn; the parent kills it at a random moment, then loads
the directory and counts which version it holds. Any load error or a mix counts as `broken`.

    python bench/atomic_soak.py --kills 200

Prints: kills, version0, version1, absent (killed before the first save ended), broken, leftovers
removed by the next save.
"""

import argparse
import multiprocessing
import os
import random
import signal
import sys
import tempfile
import time

import torch

from stackwise_hf import StackWiseConfig, StackWiseForCausalLM
from stackwise_hf.adapters import add_stack_adapter
from stackwise_hf.atomic import remove_leftovers

SHAPE = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             stack_sizes=[1, 1], max_position_embeddings=64)


def versions():
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        rack = StackWiseForCausalLM(StackWiseConfig(**SHAPE)).eval()
        add_stack_adapter(rack, 1, r=2, lora_alpha=4, init_lora_weights=False)
        out.append(rack)
    return out


def fingerprint(rack):
    return torch.cat([p.detach().float().flatten() for _, p in sorted(rack.named_parameters())])


def saver(path):
    torch.set_num_threads(1)
    racks = versions()
    i = 0
    while True:
        racks[i % 2].save_rack(path, max_shard_size="4KB")
        i += 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--max-delay", type=float, default=1.0, help="seconds before a kill, drawn uniformly")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    expected = [fingerprint(r) for r in versions()]
    rng = random.Random(args.seed)
    counts = dict(kills=0, version0=0, version1=0, absent=0, broken=0, leftovers=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rack")
        for _ in range(args.kills):
            child = multiprocessing.get_context("fork").Process(target=saver, args=(path,))
            child.start()
            time.sleep(rng.uniform(0.0, args.max_delay))
            os.kill(child.pid, signal.SIGKILL)
            child.join()
            counts["kills"] += 1
            counts["leftovers"] += len([e for e in os.listdir(tmp) if e != "rack"])
            if not os.path.exists(path):
                counts["absent"] += 1
                continue
            try:
                rack = StackWiseForCausalLM(StackWiseConfig(**SHAPE))
                rack.load_rack(path)
                got = fingerprint(rack)
                match = [i for i, e in enumerate(expected) if torch.equal(got, e)]
                counts[f"version{match[0]}" if len(match) == 1 else "broken"] += 1
            except Exception as err:  # noqa: BLE001  (a soak counts every failure, whatever its type)
                print(f"broken: {type(err).__name__}: {err}", file=sys.stderr)
                counts["broken"] += 1
            remove_leftovers(path)
    print(" ".join(f"{k}={v}" for k, v in counts.items()))
    return 1 if counts["broken"] else 0


if __name__ == "__main__":
    sys.exit(main())
