"""The `stackwise` command line: train, info, generate, plan (more subcommands register in `COMMANDS`).

    stackwise train --config configs/default.yaml [--set training.max_steps=5 ...]
    stackwise info outputs/default/final
    stackwise generate outputs/default/final --prompt "ROMEO:" --max-new-tokens 40
    stackwise push outputs/default/final me/shakespeare-rack
    stackwise export outputs/default/final llama-out --to llama [--dtype bfloat16]
    stackwise verify outputs/default/final

`accelerate launch -m stackwise_hf.cli train --config ...` runs the same trainer on several processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch
from huggingface_hub import file_exists
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from . import adapters
from .errors import StackWiseError
from .hub import push_checkpoint_to_hub, push_rack_folder_to_hub
from .llama_interop import save_llama
from .planner import format_plan, plan_experiment
from .rack_files import verify_rack
from .sampling import depth_unroll_generate, diffusion_generate
from .training import ExperimentConfig, ProgressiveTrainer

logger = logging.getLogger("stackwise_hf")


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    if args.resume_from_checkpoint:
        overrides.append(f"training.resume_from_checkpoint={args.resume_from_checkpoint}")
    if args.output_dir:
        overrides.append(f"training.output_dir={args.output_dir}")
    experiment = ExperimentConfig.from_yaml(args.config, overrides=overrides)
    trainer = ProgressiveTrainer(experiment)
    result = trainer.train()
    if trainer.accelerator.is_main_process:
        print(_stage_table(result.stages))
        print(f"final rack: {result.output_dir}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    rack = load_rack_for_cli(args.path, args.revision)
    info = rack.get_rack_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['architecture']}: {info['num_stacks']} stacks, {info['total_blocks']} blocks, "
          f"{info['total_parameters']:,} parameters, hidden {info['hidden_size']}, vocab {info['vocab_size']}, "
          f"{info['attention_mode']} attention")
    print(f"{'stack':>5} {'blocks':>6} {'parameters':>12} {'dtype':>9} {'adapters'}")
    for s in info["stack_info"]:
        print(f"{s['stack_idx']:>5} {s['n_blocks']:>6} {s['parameters']:>12,} {s['dtype']:>9} {', '.join(s['adapters']) or '-'}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    rack = load_rack_for_cli(args.path, args.revision)
    tokenizer = AutoTokenizer.from_pretrained(args.path, revision=args.revision)
    torch.manual_seed(args.seed)
    if rack.config.attention_mode == "bidirectional":
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids if args.prompt else None
        if args.sampler == "unroll":
            out = depth_unroll_generate(rack, prefix_ids=ids, length=args.max_new_tokens,
                                        temperature=args.temperature, seed=args.seed)
        else:
            out = diffusion_generate(rack, prefix_ids=ids, length=args.max_new_tokens, steps=args.diffusion_steps,
                                     temperature=args.temperature, seed=args.seed)
    else:
        inputs = tokenizer(args.prompt or tokenizer.bos_token, return_tensors="pt")
        out = rack.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                            temperature=args.temperature or None, top_k=args.top_k,
                            pad_token_id=tokenizer.pad_token_id)
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    common = dict(commit_message=args.commit_message, private=args.private or None, revision=args.revision,
                  create_pr=args.create_pr, token=args.token)
    if args.checkpoint:
        info = push_checkpoint_to_hub(args.path, args.repo_id, path_in_repo=args.path_in_repo or "", **common)
    else:
        info = push_rack_folder_to_hub(args.path, args.repo_id, training_run=args.training_run or _run_dir_of(args.path),
                                       remote_code=not args.no_remote_code, **common)
    print(f"pushed {args.path} to {info.pr_url or info.commit_url}")
    return 0


def _run_dir_of(path: str) -> str | None:
    """The training output directory of a rack saved by the trainer (`<output_dir>/final`), if any."""
    for candidate in (path, os.path.dirname(os.path.normpath(path))):
        if os.path.isfile(os.path.join(candidate, "log.jsonl")):
            return candidate
    return None


def cmd_export(args: argparse.Namespace) -> int:
    rack = load_rack_for_cli(args.path, args.revision)
    _merge_adapters(rack)
    tokenizer = _tokenizer_beside(args.path, args.revision)
    if tokenizer is None:
        logger.warning("%s has no tokenizer; the export has none either.", args.path)
    save_llama(rack, args.out, dtype=args.dtype, tokenizer=tokenizer, max_shard_size=args.max_shard_size)
    print(f"exported {args.path} as a Llama to {args.out}")
    return 0


def _merge_adapters(rack) -> None:
    """Folds every adapter a loaded rack carries into its weights: a plain Llama has no adapters."""
    if not getattr(rack, "peft_config", None):
        return

    for name in adapters.adapter_names(rack):
        logger.info("Merging adapter %s into the exported weights.", name)
        adapters.merge_stack_adapter(rack, name)


def _tokenizer_beside(path: str, revision: str | None):
    """The tokenizer saved with a rack (directory or Hub repo), or None when it has none."""
    name = "tokenizer_config.json"
    has = os.path.isfile(os.path.join(path, name)) if os.path.isdir(path) else file_exists(path, name, revision=revision)
    return AutoTokenizer.from_pretrained(path, revision=revision) if has else None


def cmd_plan(args: argparse.Namespace) -> int:
    experiment = ExperimentConfig.from_yaml(args.config, overrides=list(args.set or []))
    overrides = {"micro_batch": args.micro_batch} if args.micro_batch else {}
    plan = plan_experiment(experiment, gpu_memory=args.gpu_memory, host_memory=args.host_memory,
                           reserve=args.reserve, device_type=args.device_type, **overrides)
    print(json.dumps(plan.as_dict(), indent=2) if args.json else format_plan(plan))
    return 0 if plan.fits is not False else 1


def load_rack_for_cli(path: str, revision: str | None = None):
    """Loads the rack class its config names (causal or masked), with its adapters."""


    config = AutoConfig.from_pretrained(path, revision=revision)
    auto = AutoModelForMaskedLM if config.attention_mode == "bidirectional" else AutoModelForCausalLM
    return auto.from_pretrained(path, revision=revision).eval()


def _stage_table(stages) -> str:
    """One line per `StageSummary`; `tokens` and `PFLOP` are the run's totals at the stage's end (training
    FLOPs as `stackwise_hf.training.flops` counts them: trunk-cache builds included, evaluation not)."""
    lines = [f"{'stage':<12}{'stacks':<14}{'steps':>6}{'first':>9}{'final':>9}{'eval':>9}{'ppl':>9}{'sec':>8}"
             f"{'tokens':>12}{'PFLOP':>10}"]
    for s in stages:
        lines.append(
            f"{s.name:<12}{str(s.stack_sizes):<14}{s.steps:>6}{_f(s.first_loss)}{_f(s.final_loss)}"
            f"{_f(s.eval_loss)}{_f(s.perplexity, 1)}{s.seconds:>8.1f}{s.tokens:>12,}{s.flops / 1e15:>10.4f}"
        )
    return "\n".join(lines)


def _f(value, digits: int = 3) -> str:
    return f"{value:>9.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>9}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stackwise", description="Progressive, stack-wise training of racks.")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a rack progressively from an experiment YAML")
    train.add_argument("--config", required=True, help="experiment YAML (sections model/data/training/stages)")
    train.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override a config field")
    train.add_argument("--output-dir", help="override training.output_dir")
    train.add_argument("--resume-from-checkpoint", help='a checkpoint directory, "latest", or a Hub repo id')
    train.set_defaults(func=cmd_train)

    info = sub.add_parser("info", help="print a rack's stacks, dtypes, adapters and parameters")
    info.add_argument("path", help="rack directory or Hub repo id")
    info.add_argument("--revision")
    info.add_argument("--json", action="store_true", help="print get_rack_info() as JSON")
    info.set_defaults(func=cmd_info)

    gen = sub.add_parser("generate", help="generate text from a saved rack")
    gen.add_argument("path", help="rack directory or Hub repo id (with its tokenizer)")
    gen.add_argument("--prompt", default="")
    gen.add_argument("--max-new-tokens", type=int, default=60)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--diffusion-steps", type=int, default=16, help="unmasking steps for a masked-diffusion rack")
    gen.add_argument("--sampler", choices=["steps", "unroll"], default="steps",
                     help="masked-diffusion racks: unmask over --diffusion-steps passes, or the one-pass "
                          "depth-as-time unroll (one stack per noise level)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--revision")
    gen.set_defaults(func=cmd_generate)

    push = sub.add_parser("push", help="push a saved rack directory (or a training checkpoint) to the Hub in one commit")
    push.add_argument("path", help="rack directory (save_rack / a run's final/), or a checkpoint with --checkpoint")
    push.add_argument("repo_id", help="namespace/name of the repo; created if missing, updated otherwise")
    push.add_argument("--revision", help="branch to push to (created from main if missing)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    push.add_argument("--commit-message", help="default: a summary of what is pushed")
    push.add_argument("--token", help="Hub token (default: the logged-in one / HF_TOKEN)")
    push.add_argument("--training-run", help="run directory with log.jsonl and loss.png for the model card "
                                             "(default: PATH's parent when it holds log.jsonl)")
    push.add_argument("--no-remote-code", action="store_true",
                      help="push the rack without its modeling code (by default it carries it, so "
                           "trust_remote_code=True loads it without stackwise_hf)")
    push.add_argument("--checkpoint", action="store_true", help="push PATH as a training checkpoint")
    push.add_argument("--path-in-repo", help="with --checkpoint: folder in the repo (default: the root)")
    push.set_defaults(func=cmd_push)

    export = sub.add_parser("export", help="write a rack as a plain model folder (weights, config, tokenizer)")
    export.add_argument("path", help="rack directory or Hub repo id; its adapters are merged into the export")
    export.add_argument("out", help="directory to write")
    export.add_argument("--to", choices=["llama"], default="llama", help="architecture to export to")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the export (default: the widest dtype in the rack; a warning names what is cast)")
    export.add_argument("--max-shard-size", default="5GB")
    export.add_argument("--revision")
    export.set_defaults(func=cmd_export)

    plan = sub.add_parser("plan", help="predict each stage's peak device memory; say which stages fit")
    plan.add_argument("--config", required=True, help="experiment YAML")
    plan.add_argument("--gpu-memory", help='device memory, e.g. "141GB" or "80GiB"')
    plan.add_argument("--host-memory", help="host memory, checked against an offloaded trunk")
    plan.add_argument("--reserve", type=float, default=0.05, help="fraction of device memory kept free (default 0.05)")
    plan.add_argument("--micro-batch", type=int, help="override per_device_train_batch_size")
    plan.add_argument("--device-type", default="cuda", choices=["cuda", "cpu"])
    plan.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override a config field")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=cmd_plan)

    verify = sub.add_parser("verify", help="check every file of a saved rack against the sha256 its index records")
    verify.add_argument("path", help="rack or stack directory, or Hub repo id")
    verify.add_argument("--revision")
    verify.set_defaults(func=cmd_verify)
    return parser


# What a user's input can get wrong (a file, a field, a value, a damaged checkpoint): reported as one line.
# Anything else is a bug of ours and keeps its traceback.
USER_ERRORS = (StackWiseError, ValueError, OSError, KeyError)


def cmd_verify(args: argparse.Namespace) -> int:
    """Checks every file of a saved rack or stack directory (or Hub repo) against the sha256 its index
    records; exit status 1 and one line naming the file when one is missing or damaged."""
    try:
        report = verify_rack(args.path, revision=args.revision)
    except (OSError, ValueError) as err:  # CorruptFileError, UnsafePathError are ValueErrors
        print(f"FAILED {args.path}: {err}", file=sys.stderr)
        return 1
    if report["unverified"]:
        print(f"UNVERIFIED {args.path}: saved without sha256 digests; {report['files']} shard(s) are complete, "
              f"their content cannot be checked.")
    else:
        print(f"OK {args.path}: {report['verified']} of {report['files']} file(s) match their recorded sha256.")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs one command. A bad file, field or value prints one line naming it (the traceback only with
    `--debug`) and exits with status 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except USER_ERRORS as err:
        if args.debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"stackwise {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
