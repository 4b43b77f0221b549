"""Progressive training with checkpoints, an interruption and a resume, on the bundled Shakespeare.

    python examples/checkpointing_example.py [--config CONFIG] [--max-steps N]
                                             [--output-dir outputs/checkpointing]

1. Train the first stage and stop, as a job that is killed would: its checkpoints are on disk.
2. A new trainer with `resume_from_checkpoint="latest"` picks the newest valid checkpoint, grows the
   rack and finishes the schedule, as `stackwise train --resume-from-checkpoint latest` would.
3. List the checkpoints, read the newest back and restore it into a fresh rack.
"""

import argparse
from pathlib import Path

from stackwise_hf import StackWiseForCausalLM
from stackwise_hf.training import ExperimentConfig, ProgressiveTrainer

# The repository's experiment file, found from this script so it runs from any working directory.
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "checkpointing.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG), help="experiment YAML (default: configs/checkpointing.yaml)")
    parser.add_argument("--output-dir", default="outputs/checkpointing")
    parser.add_argument("--max-steps", type=int, help="steps per stage (a quick run); checkpoints every half stage")
    args = parser.parse_args()
    overrides = [f"training.output_dir={args.output_dir}", f"training.checkpoint_dir={args.output_dir}/checkpoints"]
    if args.max_steps:
        interval = max(1, args.max_steps // 2)
        overrides += [f"stages.*.max_steps={args.max_steps}", f"training.save_interval={interval}",
                      f"training.eval_steps={interval}"]

    # 1. Train stage 0, then stop.
    trainer = ProgressiveTrainer(ExperimentConfig.from_yaml(args.config, overrides))
    trainer.setup()
    run = trainer.enter_stage(trainer.schedule[0])
    trainer.run_stage(run)
    trainer.exit_stage(run)
    print("Stopped after the first stage. Checkpoints, newest first:")
    for checkpoint in trainer.list_checkpoints():
        loss = "-" if checkpoint["loss"] is None else f"{checkpoint['loss']:.3f}"  # none logged yet at early steps
        print(f"  step {checkpoint['step']:>4}  stage {checkpoint['stage']}  stack {checkpoint['stack_idx']}  "
              f"loss {loss}  {checkpoint['path']}")

    # 2. Resume from the newest valid checkpoint and finish the schedule. (A new process would rebuild
    # the same datasets; here they are handed over to save the time.)
    experiment = ExperimentConfig.from_yaml(args.config, overrides + ["training.resume_from_checkpoint=latest"])
    resumed = ProgressiveTrainer(experiment, train_dataset=trainer.train_dataset, eval_dataset=trainer.eval_dataset,
                                 tokenizer=trainer.tokenizer)
    result = resumed.train()
    info = resumed.get_training_info()
    print(f"Resumed from {info['resumed_from']} and trained to step {info['global_step']}: "
          f"final loss {result.final_loss:.3f}, eval loss {result.eval_loss:.3f}.")
    print(f"Saving {info['checkpoints_saved']} checkpoints took {info['checkpoint_seconds']:.2f} s.")

    # 3. Read the newest checkpoint back and restore it into a fresh rack of the initial layout.
    latest = resumed.load_progressive_checkpoint("latest")
    print(f"Newest checkpoint: step {latest['step']}, stage cursor {latest['stage']}, "
          f"stacks {latest['config']['stack_sizes']}, saved {latest['timestamp']}.")
    rack = StackWiseForCausalLM(ExperimentConfig.from_yaml(args.config).model)
    resumed.restore_from_checkpoint(latest["path"], rack, map_location="cpu")
    print(f"Restored a rack with stacks {rack.config.stack_sizes}; the trained one is in {result.output_dir}.")


if __name__ == "__main__":
    main()
