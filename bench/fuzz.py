"""Fuzzes every file of a saved rack and of a training checkpoint: each file x {truncate to 0, to half,
by one byte; flip a byte; random bytes; delete; invalid JSON; JSON with a wrong type; JSON with a missing
key} is applied to a fresh copy, which is then read back:

- target `rack`: a rack with a stack adapter, a trunk adapter and an int8-quantized stack (when torchao
  is installed), read by `load_rack` into a fresh rack;
- target `checkpoint`: a mid-stage checkpoint of a tiny 2-stage run, resumed the way
  `resume_from_checkpoint` does (`ProgressiveTrainer.setup` verifies it and restores rack, trainer state
  and RNG; `enter_stage` restores optimizer, LR scheduler, Accelerate's step counter and RNG again).

Each case is one of:

- clear:  a StackWiseError subclass whose message names the damaged file (or its folder);
- equal:  read, and exactly equal to the undamaged read (the damage did not matter, e.g. a JSON key no
          reader needs);
- silent: read, but different (the worst outcome: must be zero);
- ugly:   any other exception, or a StackWiseError that does not name the file.

    python bench/fuzz.py                     # the full sweep of both targets, several positions per file
    python bench/fuzz.py --quick             # one position per file (what tests/test_fuzz_*.py run)
    python bench/fuzz.py --target checkpoint # one target: rack, checkpoint or all

Prints `<target>: tried=N clear=N equal=N silent=N ugly=N` and each silent or ugly case.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import tempfile

import numpy as np
import torch

from stackwise_hf import StackWiseConfig, StackWiseError, StackWiseForCausalLM
from stackwise_hf.adapters import activate_adapters, add_stack_adapter, add_trunk_adapter
from stackwise_hf.quantization import backend_available, quantize_stacks
from stackwise_hf.training import ExperimentConfig, ProgressiveTrainer

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
    except Exception as err:  # noqa: BLE001  (a fuzzer classifies every failure, whatever its type)
        return classify(err, rel)
    return ("equal", "") if same(fingerprint(rack), reference) else ("silent", "loaded different data")


def classify(err: Exception, rel: str) -> tuple[str, str]:
    """clear when `err` is ours and names the damaged file `rel` (or its folder); ugly otherwise."""
    if not isinstance(err, StackWiseError):
        return "ugly", f"{type(err).__name__}: {err}"
    named = os.path.basename(rel) in str(err) or os.path.dirname(rel) and os.path.dirname(rel) in str(err)
    return ("clear", "") if named else ("ugly", f"{type(err).__name__} not naming the file: {err}")


def sweep(positions: int = 3, seed: int = 0, log=None, target: str = "rack", fuzzed: set | None = None) -> dict:
    """Damages every file of the target's saved copy every way, `positions` times for flips and JSON edits.
    Counts outcomes (plus `files`: how many files the saved copy holds); appends silent and ugly cases to
    `log` and the relative path of each file damaged to `fuzzed`."""
    build, run = {"rack": (build_rack, run_case), "checkpoint": (build_checkpoint, run_checkpoint_case)}[target]
    counts = dict(tried=0, clear=0, equal=0, silent=0, ugly=0)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        saved = os.path.join(tmp, "saved")
        reference = build(saved)
        files = files_of(saved)
        for rel in files:
            for kind in damages(rel):
                repeats = positions if kind in ("flip", "wrong_type", "missing_key") else 1
                for _ in range(repeats):
                    outcome, detail = run(saved, reference, rel, kind, rng, tmp)
                    if fuzzed is not None:
                        fuzzed.add(rel)
                    counts["tried"] += 1
                    counts[outcome] += 1
                    if outcome in ("silent", "ugly") and log is not None:
                        log.append(f"{outcome}: {target} {rel} {kind}: {detail}")
    return {**counts, "files": len(files)}


# Checkpoints -----------------------------------------------------------------------------------------------
#
# The run: stage 0 trains a 1-block stack with embeddings and head for 3 steps; stage 1 appends a block and
# trains it for 4 steps; a checkpoint every 5 optimizer steps lands 2 steps into stage 1 (optimizer,
# scheduler, RNG and the data position all saved), and that one is fuzzed.

CHECKPOINT_NAME = "checkpoint-00000005"


def experiment(out: str, resume: str | None = None) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "model": {**SHAPE, "vocab_size": 48, "stack_sizes": [1]},
        "training": {"output_dir": f"{out}/run", "checkpoint_dir": f"{out}/checkpoints", "save_interval": 5,
                     "save_total_limit": None, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
                     "logging_steps": 1, "report_to": "none", "plot": False, "seed": 3,
                     "resume_from_checkpoint": resume},
        "stages": [
            {"max_steps": 3, "train": ["stack", "head", "embeddings"], "learning_rate": 3e-3},
            {"grow": "append", "n_blocks": 1, "max_steps": 4, "learning_rate": 2e-3, "warmup_steps": 1},
        ],
    })


def blocks(n: int, seed: int) -> list[dict]:
    """Token blocks that are arithmetic progressions modulo the vocabulary (something to learn)."""
    g = torch.Generator().manual_seed(seed)
    starts, steps = torch.randint(0, 48, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
    return [{"input_ids": row} for row in (starts + steps * torch.arange(8)) % 48]


def build_checkpoint(directory: str) -> dict:
    """Trains the tiny run, copies its mid-stage checkpoint to `directory`; returns the fingerprint of an
    undamaged resume from it."""
    with tempfile.TemporaryDirectory() as out:
        ProgressiveTrainer(experiment(out), train_dataset=blocks(16, 0), eval_dataset=blocks(4, 1)).train()
        shutil.copytree(os.path.join(out, "checkpoints", CHECKPOINT_NAME), directory)
    with tempfile.TemporaryDirectory() as scratch:
        return resume(directory, scratch)


def resume(saved: str, scratch: str) -> dict:
    """Resumes a run from a copy of `saved` as `resume_from_checkpoint` does, up to the first step it would
    train; returns everything restored: weights, optimizer, scheduler, step counters and data position
    (the trainer state), Accelerate's step, and the python, numpy and torch RNG states."""
    checkpoint = os.path.join(scratch, "checkpoints", CHECKPOINT_NAME)
    if not os.path.exists(checkpoint):
        shutil.copytree(saved, checkpoint)
    trainer = ProgressiveTrainer(experiment(scratch, resume=checkpoint), train_dataset=blocks(16, 0),
                                 eval_dataset=blocks(4, 1))
    trainer.setup()
    if trainer.resumed_from is None:
        raise AssertionError("setup did not resume")  # never a silent fresh start: counted as ugly
    run = trainer.enter_stage(trainer.schedule[trainer.state.stage])
    names = [n for group in run.optimizer.param_groups for n in group["names"]]
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    optimizer = {f"{name}:{key}": value.clone() for name, p in zip(names, params)
                 for key, value in run.optimizer.state[p].items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups]
    return {"state": {k: v.detach().clone() for k, v in trainer.rack.state_dict().items()},
            "optimizer": optimizer, "groups": repr(groups), "scheduler": repr(run.scheduler.state_dict()),
            "trainer": trainer.state.to_json(), "accelerator_step": trainer.accelerator.step,
            "stack_sizes": list(trainer.rack.config.stack_sizes),
            "rng": (random.getstate(), repr(np.random.get_state()), torch.get_rng_state())}


def same_resume(a: dict, b: dict) -> bool:
    tensors = all(x.keys() == y.keys() and all(t.dtype == y[k].dtype and torch.equal(t, y[k]) for k, t in x.items())
                  for x, y in ((a["state"], b["state"]), (a["optimizer"], b["optimizer"])))
    rng = a["rng"][:2] == b["rng"][:2] and torch.equal(a["rng"][2], b["rng"][2])
    plain = ("groups", "scheduler", "trainer", "accelerator_step", "stack_sizes")
    return tensors and rng and all(a[k] == b[k] for k in plain)


def run_checkpoint_case(saved: str, reference: dict, rel: str, kind: str, rng: random.Random,
                        scratch: str) -> tuple[str, str]:
    """Returns (outcome, detail) for one damage of one checkpoint file, resumed in a fresh run folder."""
    case = os.path.join(scratch, "case")
    shutil.rmtree(case, ignore_errors=True)
    checkpoint = os.path.join(case, "checkpoints", CHECKPOINT_NAME)
    shutil.copytree(saved, checkpoint)
    damage(os.path.join(checkpoint, rel), kind, rng)
    try:
        restored = resume(saved, case)
    except Exception as err:  # noqa: BLE001  (a fuzzer classifies every failure, whatever its type)
        return classify(err, rel)
    return ("equal", "") if same_resume(restored, reference) else ("silent", "resumed different state")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one position per file and damage")
    parser.add_argument("--positions", type=int, default=8, help="byte flips / JSON edits per file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", choices=("rack", "checkpoint", "all"), default="all")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.ERROR)  # the trainer's INFO lines and the skipped-file warnings
    failed = False
    for target in ("rack", "checkpoint") if args.target == "all" else (args.target,):
        problems: list[str] = []
        counts = sweep(1 if args.quick else args.positions, args.seed, problems, target)
        print("\n".join(problems))
        print(f"{target}: " + " ".join(f"{k}={v}" for k, v in counts.items()), flush=True)
        failed = failed or bool(counts["silent"] or counts["ugly"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
