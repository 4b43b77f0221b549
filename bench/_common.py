"""What several benchmarks share: running a measurement in a child process, writing a section of
docs/benchmarks.md, and the Llama/rack pair the rack-vs-Llama comparisons measure. (Peak RSS is per
process and only grows, so each variant gets a fresh process.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "docs")


def run_child(args: list[str], env: dict | None = None, label: str = "worker") -> dict:
    """Runs `python <args>` and returns the JSON object its last line of stdout prints."""
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{label} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_section(path: str, name: str, body: str) -> None:
    """Replaces a script's section of `path` (between its markers), or appends it; other sections stay."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}\n"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def llama_and_rack(hidden: int, layers: int, stacks: int, vocab: int):
    """A random `LlamaForCausalLM` (head dim 64, two query heads per key/value head, ffn 8/3 of hidden) and
    the rack `from_llama` makes of it in `stacks` equal stacks: the same weights, for rack-vs-Llama runs.
    Imports transformers only when called (the Hub benchmark points its clients at a server first)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from stackwise_hf.llama_interop import from_llama

    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
            num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
        )
    )
    return llama, from_llama(llama, stack_sizes=[layers // stacks] * stacks)
