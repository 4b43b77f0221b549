"""Grow a Llama: split it into a rack, append stacks, train only the new ones, export a plain Llama again.

    python examples/llama_growth.py [--llama PATH_OR_REPO] [--output-dir outputs/llama_growth] [--max-steps N]

With --llama, a `LlamaForCausalLM` checkpoint and its tokenizer are used; without, a small random Llama
over the bundled Shakespeare tokenizer stands in. The rack trains on the bundled Shakespeare; the original
layers stay frozen bit for bit, and the grown model is written as a Llama folder to OUTPUT_DIR/llama.
"""

import argparse
import os

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from stackwise_hf.data import DataArguments, load_or_train_tokenizer
from stackwise_hf.llama_interop import from_llama, save_llama
from stackwise_hf.training import ExperimentConfig, ProgressiveTrainer

DATA = {"dataset": "shakespeare", "tokenizer_vocab_size": 1024, "block_size": 64, "max_train_blocks": 600,
        "max_eval_blocks": 16}


def load_llama(name: str | None):
    if name:
        return LlamaForCausalLM.from_pretrained(name, dtype=torch.float32), AutoTokenizer.from_pretrained(name)
    tokenizer = load_or_train_tokenizer(DataArguments(**DATA))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama", help="a LlamaForCausalLM directory or Hub repo id (default: a small random one)")
    parser.add_argument("--output-dir", default="outputs/llama_growth")
    parser.add_argument("--max-steps", type=int, default=60, help="optimizer steps per grown stack")
    args = parser.parse_args()

    llama, tokenizer = load_llama(args.llama)
    rack = from_llama(llama, stack_sizes=[llama.config.num_hidden_layers])  # the Llama as one stack
    original = {k: v.clone() for k, v in rack.model.stacks[0].state_dict().items()}
    experiment = ExperimentConfig.from_dict({
        "data": DATA,
        "training": {"output_dir": args.output_dir, "per_device_train_batch_size": 16, "report_to": "none"},
        # Each stage appends two blocks that start as the identity and trains them with the head.
        "stages": [{"grow": "append", "n_blocks": 2, "init": "identity", "train": ["stack", "head"],
                    "max_steps": args.max_steps, "learning_rate": 2e-3}] * 2,
    })
    experiment.model = rack.config
    trainer = ProgressiveTrainer(experiment, rack=rack, tokenizer=tokenizer)
    result = trainer.train()
    unchanged = all(torch.equal(v, original[k]) for k, v in trainer.rack.model.stacks[0].state_dict().items())
    print(f"grew {llama.config.num_hidden_layers} layers to {trainer.rack.config.stack_sizes}: "
          f"eval loss {result.eval_loss:.3f}; the original layers unchanged: {unchanged}")

    out = save_llama(trainer.rack, os.path.join(args.output_dir, "llama"), tokenizer=tokenizer)
    grown = LlamaForCausalLM.from_pretrained(out)
    print(f"exported a {grown.config.num_hidden_layers}-layer Llama to {out}")


if __name__ == "__main__":
    main()
