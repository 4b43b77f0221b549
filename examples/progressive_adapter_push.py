"""A progressive run on the bundled Shakespeare whose last stage trains a LoRA adapter, then a push to the Hub.

    python examples/progressive_adapter_push.py [--repo-id NAME/tiny-rack] [--output-dir outputs/adapter_push]
                                                [--max-steps N]

Stage 0 trains the first stack with the head and the embeddings; stage 1 appends a stack (initialised to
the identity, so the rack computes the same function) and trains it; stage 2 appends one more and trains
only a peft LoRA adapter on it, with the head. The final rack (weights, the adapter in peft's layout,
tokenizer, loss plot) is in OUTPUT_DIR/final. With --repo-id the run pushes, while it trains, each
stage-end checkpoint to that repo's `last-checkpoint/` and at the end the final rack, on the Hub that
HF_ENDPOINT names (huggingface.co unless set); the rack is then pulled back. An interrupted run resumes
from the repo with `resume_from_checkpoint=REPO_ID`.
"""

import argparse

from stackwise_hf import StackWiseForCausalLM
from stackwise_hf.training import ExperimentConfig, ProgressiveTrainer

MODEL = {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 128, "stack_sizes": [1]}
DATA = {"dataset": "shakespeare", "tokenizer_vocab_size": 1024, "block_size": 64, "max_train_blocks": 600,
        "max_eval_blocks": 16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo-id", help="Hub repo to push the final rack to (created if missing)")
    parser.add_argument("--output-dir", default="outputs/adapter_push")
    parser.add_argument("--max-steps", type=int, default=60, help="optimizer steps per stage")
    args = parser.parse_args()
    grow = {"grow": "append", "n_blocks": 1, "init": "identity", "max_steps": args.max_steps}
    experiment = ExperimentConfig.from_dict({
        "model": MODEL, "data": DATA,
        "training": {"output_dir": args.output_dir, "per_device_train_batch_size": 16, "logging_steps": 10,
                     "report_to": "none", "push_to_hub": bool(args.repo_id), "hub_model_id": args.repo_id,
                     "hub_strategy": "stage_end"},
        "stages": [
            {"train": ["stack", "head", "embeddings"], "max_steps": args.max_steps, "learning_rate": 3e-3},
            {**grow, "train": ["stack", "head"], "learning_rate": 2e-3},
            {**grow, "train": ["stack_adapter", "head"], "stack_adapter": {"r": 8}, "learning_rate": 2e-3},
        ],
    })
    trainer = ProgressiveTrainer(experiment)
    result = trainer.train()
    print(f"trained {trainer.rack.config.stack_sizes}: eval loss {result.eval_loss:.3f}, rack in {result.output_dir}")

    if args.repo_id:
        pulled = StackWiseForCausalLM.from_pretrained(args.repo_id)
        print(f"pulled {args.repo_id} back with adapters {pulled.get_rack_info()['adapters']}")


if __name__ == "__main__":
    main()
