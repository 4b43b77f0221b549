"""Fuzzes every file of a saved rack (a stack adapter, a trunk adapter, an int8-quantized stack when
torchao is installed): each file x {truncate to 0, to half, by one byte; flip a byte; random bytes;
delete; invalid JSON; JSON with a wrong type; JSON with a missing key} is applied to a fresh copy, then
`load_rack` runs into a fresh rack. Each case is one of:

- clear:  a StackWiseError subclass whose message names the damaged file;
- equal:  loaded, and exactly equal to the saved rack (the damage did not matter, e.g. a JSON key no
          reader needs);
- silent: loaded, but different from the saved rack (the worst outcome: must be zero);
- ugly:   any other exception, or a StackWiseError that does not name the file.

    python bench/fuzz.py            # the full sweep, several byte positions per file
    python bench/fuzz.py --quick    # one position per file (what tests/test_fuzz_rack.py runs)

Prints `tried=N clear=N equal=N silent=N ugly=N` and each silent or ugly case.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile

import torch

from stackwise_hf import StackWiseConfig, StackWiseError, StackWiseForCausalLM
from stackwise_hf.adapters import activate_adapters, add_stack_adapter, add_trunk_adapter
from stackwise_hf.quantization import backend_available, quantize_stacks

SHAPE = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
             max_position_embeddings=32)
BYTE_DAMAGES = ("truncate_0", "truncate_half", "truncate_1", "flip", "random", "delete")
JSON_DAMAGES = ("invalid_json", "wrong_type", "missing_key")


def build_rack(directory: str) -> dict:
    """Saves the fuzzed rack to `directory`; returns its fingerprint."""
    torch.manual_seed(0)
    rack = StackWiseForCausalLM(StackWiseConfig(**SHAPE, stack_sizes=[1, 1, 1])).eval()
    if backend_available("torchao") is None:
        quantize_stacks(rack, [0], bits=8, backend="torchao")
    add_trunk_adapter(rack, [0, 1], r=2, lora_alpha=4, target="attention", init_lora_weights=False)
    add_stack_adapter(rack, 2, r=2, lora_alpha=4, init_lora_weights=False)
    activate_adapters(rack, ["trunk", "stack_2"], trainable=["stack_2"])
    rack.save_rack(directory, max_shard_size="8KB")
    return fingerprint(rack)


def fingerprint(rack) -> dict:
    """Everything a load restores: weights (quantized ones as codes), adapters' activity, config."""
    state = {}
    for name, tensor in rack.state_dict().items():
        if type(tensor).__module__.startswith("torchao"):
            state[f"{name}:qdata"], state[f"{name}:scale"] = tensor.qdata.clone(), tensor.scale.clone()
        elif "rotary_emb" not in name:
            state[name] = tensor.detach().clone()
    trainable = sorted(n for n, p in rack.named_parameters() if p.requires_grad)
    # `architectures`, `dtype` and `auto_map` are stamped on the config by a save; a load does not restore them.
    config = {k: v for k, v in rack.config.to_dict().items() if k not in ("architectures", "dtype", "auto_map")}
    return {"state": state, "trainable": trainable, "config": config,
            "adapters": sorted(getattr(rack, "peft_config", {}) or {}), "merged": getattr(rack, "_merged_adapters", [])}


def same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys() or a["state"].keys() != b["state"].keys():
        return False
    tensors = all(x.dtype == b["state"][k].dtype and torch.equal(x, b["state"][k]) for k, x in a["state"].items())
    return tensors and all(a[k] == b[k] for k in ("trainable", "config", "adapters", "merged"))


def files_of(directory: str) -> list[str]:
    out = []
    for root, _, names in os.walk(directory):
        out += [os.path.relpath(os.path.join(root, n), directory).replace(os.sep, "/") for n in names]
    return sorted(out)


def damages(rel: str) -> tuple[str, ...]:
    return BYTE_DAMAGES + (JSON_DAMAGES if rel.endswith(".json") else ())


def damage(path: str, kind: str, rng: random.Random) -> None:
    data = open(path, "rb").read()
    if kind == "delete":
        os.remove(path)
        return
    if kind in JSON_DAMAGES:
        new = _json_damage(json.loads(data), kind, rng)
        data = (new if isinstance(new, str) else json.dumps(new)).encode()
    elif kind == "truncate_0":
        data = b""
    elif kind == "truncate_half":
        data = data[: len(data) // 2]
    elif kind == "truncate_1":
        data = data[:-1]
    elif kind == "flip":
        data = bytearray(data)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        data = bytes(data)
    elif kind == "random":
        data = rng.randbytes(len(data))
    with open(path, "wb") as f:
        f.write(data)


def _json_damage(doc, kind: str, rng: random.Random):
    if kind == "invalid_json":
        return json.dumps(doc)[:-1] + ",}"
    paths = list(_paths(doc))
    if not paths:
        return [] if kind == "wrong_type" else {}
    where = rng.choice(paths)
    parent = doc
    for key in where[:-1]:
        parent = parent[key]
    if kind == "missing_key" and isinstance(parent, dict):
        del parent[where[-1]]
    else:
        value = parent[where[-1]]
        parent[where[-1]] = {"x": 1} if isinstance(value, (str, int, float, bool, list)) or value is None else "x"
    return doc


def _paths(doc, prefix=()):
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield prefix + (key,)
            yield from _paths(value, prefix + (key,))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield prefix + (i,)
            yield from _paths(value, prefix + (i,))


def run_case(saved: str, reference: dict, rel: str, kind: str, rng: random.Random, scratch: str) -> tuple[str, str]:
    """Returns (outcome, detail) for one damage of one file."""
    copy = os.path.join(scratch, "rack")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(saved, copy)
    damage(os.path.join(copy, rel), kind, rng)
    rack = StackWiseForCausalLM(StackWiseConfig(**SHAPE, stack_sizes=[2])).eval()
    try:
        rack.load_rack(copy)
    except StackWiseError as err:
        named = os.path.basename(rel) in str(err) or os.path.dirname(rel) and os.path.dirname(rel) in str(err)
        return ("clear", "") if named else ("ugly", f"{type(err).__name__} not naming the file: {err}")
    except Exception as err:  # noqa: BLE001  (a fuzzer classifies every failure, whatever its type)
        return "ugly", f"{type(err).__name__}: {err}"
    return ("equal", "") if same(fingerprint(rack), reference) else ("silent", "loaded different data")


def sweep(positions: int = 3, seed: int = 0, log=None) -> dict:
    counts = dict(tried=0, clear=0, equal=0, silent=0, ugly=0)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        saved = os.path.join(tmp, "saved")
        reference = build_rack(saved)
        for rel in files_of(saved):
            for kind in damages(rel):
                repeats = positions if kind in ("flip", "wrong_type", "missing_key") else 1
                for _ in range(repeats):
                    outcome, detail = run_case(saved, reference, rel, kind, rng, tmp)
                    counts["tried"] += 1
                    counts[outcome] += 1
                    if outcome in ("silent", "ugly") and log is not None:
                        log.append(f"{outcome}: {rel} {kind}: {detail}")
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one position per file and damage")
    parser.add_argument("--positions", type=int, default=8, help="byte flips / JSON edits per file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    problems: list[str] = []
    counts = sweep(1 if args.quick else args.positions, args.seed, problems)
    print("\n".join(problems))
    print(" ".join(f"{k}={v}" for k, v in counts.items()))
    return 1 if counts["silent"] or counts["ugly"] else 0


if __name__ == "__main__":
    sys.exit(main())
