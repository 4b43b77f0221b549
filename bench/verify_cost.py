"""What verifying a rack's files costs: load time of a ~1 GB rack with and without sha256 verification
(`load_rack(path, verify=...)`), alternating, in one process.

    python bench/verify_cost.py [--layers 16 --hidden 1024 --repeats 3]

Prints the rack's size on disk, the median load time each way and their ratio. On CPU only the ratio
means something (absolute times depend on the machine and its load).
"""

import argparse
import os
import statistics
import tempfile
import time

import torch

from stackwise_hf import StackWiseConfig, StackWiseForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = StackWiseConfig(vocab_size=4096, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                             num_attention_heads=16, stack_sizes=[args.layers // 4] * 4)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rack")
        StackWiseForCausalLM(config).save_rack(path)
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))
        rack = StackWiseForCausalLM(config)
        times = {True: [], False: []}
        for _ in range(args.repeats):
            for verify in (False, True):
                start = time.perf_counter()
                rack.load_rack(path, verify=verify)
                times[verify].append(time.perf_counter() - start)
    plain, verified = statistics.median(times[False]), statistics.median(times[True])
    print(f"rack {size / 2**30:.2f} GiB on disk, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")
    print(f"load_rack verify=False median {plain:.2f} s, verify=True median {verified:.2f} s, "
          f"ratio {verified / plain:.2f} (runs: {[round(t, 2) for t in times[False]]} / {[round(t, 2) for t in times[True]]})")


if __name__ == "__main__":
    main()
