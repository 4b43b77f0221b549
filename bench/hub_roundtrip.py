"""Hub push and pull, time and bytes: a rack vs an equally sized `LlamaForCausalLM`, through one loopback Hub.

Both models have the same weights (the rack is `from_llama` of the Llama). The Llama goes through plain
transformers (`push_to_hub`, `from_pretrained`), the rack through its own (`push_to_hub` with per-stack
shards, adapters manifest check and model card; `from_pretrained` with hash verification of every
shard), against the Hub-compatible test server of `tests/hub_server.py` on 127.0.0.1 (stdlib only, loaded
by path). Every push goes to a new repo and every pull into an empty cache, so nothing is deduplicated.
Bytes are what the server received (pushes: uploads and API payloads) and served (pulls: file content).
Also: the bytes `load_stack(i, repo_id)` pulls for one stack of the rack, as a fraction of a whole pull.

    python bench/hub_roundtrip.py --hidden 512 --layers 8 --stacks 4 --repeats 3
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time


def start_hub():
    """Starts the loopback Hub and points the HF clients at it (before they are imported)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests", "hub_server.py")
    spec = importlib.util.spec_from_file_location("hub_server", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    hub = module.HubServer().start()
    home = tempfile.mkdtemp(prefix="bench-hf-home-")
    os.environ.update(HF_ENDPOINT=hub.url, HF_HOME=home, HF_TOKEN="hf_bench_dummy", HF_HUB_DISABLE_XET="1",
                      HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1")
    return hub, module.USER


def measure(hub, action) -> tuple[float, int, int]:
    """Seconds, bytes received and bytes served by the server during `action()`."""
    hub.clear_log()
    start = time.perf_counter()
    action()
    return time.perf_counter() - start, hub.bytes_received, hub.bytes_served


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--stacks", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    hub, user = start_hub()

    import torch
    from _common import llama_and_rack
    from transformers import LlamaForCausalLM

    from stackwise_hf import StackWiseForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    llama, rack = llama_and_rack(args.hidden, args.layers, args.stacks, args.vocab)
    params = sum(p.numel() for p in llama.parameters())
    print(f"{params / 1e6:.1f}M parameters, {args.layers} layers, rack of {args.stacks} stacks, repeats={args.repeats}, "
          f"server {hub.url}")

    models = {"llama": (llama, LlamaForCausalLM), "rack": (rack, StackWiseForCausalLM)}
    runs = {name: {"push": [], "pull": []} for name in models}
    # Alternate the two every repeat (after one warm-up round), so drifts in load fall on both alike.
    for r in range(args.repeats + 1):
        for name, (model, model_cls) in models.items():
            repo_id = f"{user}/{name}-{r}"
            push = measure(hub, lambda: model.push_to_hub(repo_id))
            cache = tempfile.mkdtemp(prefix="bench-cache-")
            pull = measure(hub, lambda: model_cls.from_pretrained(repo_id, cache_dir=cache))
            if r > 0:
                runs[name]["push"].append(push)
                runs[name]["pull"].append(pull)
    results = {
        name: {"push_s": statistics.median(p[0] for p in run["push"]), "push_bytes": run["push"][-1][1],
               "pull_s": statistics.median(p[0] for p in run["pull"]), "pull_bytes": run["pull"][-1][2],
               "repo": f"{user}/{name}-1"}
        for name, run in runs.items()
    }
    print(f"{'':8}{'push s':>10}{'push bytes':>14}{'pull s':>10}{'pull bytes':>14}")
    for name, r in results.items():
        print(f"{name:8}{r['push_s']:>10.3f}{r['push_bytes']:>14,}{r['pull_s']:>10.3f}{r['pull_bytes']:>14,}")
    keys = ("push_s", "push_bytes", "pull_s", "pull_bytes")
    ratio = {k: results["rack"][k] / results["llama"][k] for k in keys}
    print(f"{'ratio':8}{ratio['push_s']:>10.3f}{ratio['push_bytes']:>14.4f}{ratio['pull_s']:>10.3f}"
          f"{ratio['pull_bytes']:>14.4f}   (rack / llama)")

    # One stack of the rack: only the index and that stack's shards travel.
    repo_id = results["rack"]["repo"]
    stack = args.stacks // 2
    fresh = StackWiseForCausalLM(rack.config)
    seconds, _, served = measure(hub, lambda: fresh.load_stack(stack, repo_id, cache_dir=tempfile.mkdtemp()))
    files = sorted(set(r.file for r in hub.requests if r.route == "resolve" and r.method == "GET"))
    stacks_bytes = sum(p.numel() * p.element_size() for n, p in rack.named_parameters() if ".stacks." in n)
    print(f"load_stack({stack}) of the {args.stacks}-stack rack: {served:,} bytes in {seconds:.3f}s, files {files}")
    print(f"  = {served / results['rack']['pull_bytes']:.3f} of a whole-rack pull; "
          f"{served / stacks_bytes:.3f} of the stacks' weights (1/{args.stacks} = {1 / args.stacks:.3f})")
    hub.stop()


if __name__ == "__main__":
    main()
