"""Held-out loss against training FLOPs and wall time: end-to-end training vs the recipes of configs/recipes/.

Every recipe gets the training FLOPs of the end-to-end run (`--e2e-steps` steps of the final architecture,
every weight trained), counted as `stackwise_hf.training.flops` counts them: the bench replays each
recipe's growth on a throwaway rack, computes every stage's FLOPs per step with the trainer's own
functions, and scales the recipe's stage lengths (keeping its stages' shares of the FLOPs) so the total
equals end-to-end's. Then it trains, evaluating the held-out loss every `--evals` th of the run, and
reports per (corpus, depth, objective):

- the final held-out loss, the gap to end-to-end at equal FLOPs (recipe final - e2e final, in nats),
- tokens-to-parity and FLOPs-to-parity: the budget at which a run's held-out loss first reaches
  end-to-end's final held-out loss (mean over seeds); "never" when it does not within the budget,
- the held-out loss at each stage's end (masked diffusion: does every stage lower it?),
- the largest predicted peak device memory of a stage other than a full fusion stage, over end-to-end's
  (`stackwise_hf.planner`, checked against measured peaks within a few percent in docs/benchmarks.md;
  the runs here share processes, so a measured RSS would not be per run).

Corpora: "shakespeare" (the bundled plays) and "python" (the top-level modules of this interpreter's
standard library: real text on every machine that runs Python, held out by file). Depths: "default"
(3 stacks of 2 blocks, the shape of configs/default.yaml) and "deep" (6 stacks of 2 blocks; a recipe's
middle growth stage is repeated). End to end runs at each of its `--lr` rates; the best is the target.
Models are smaller than configs/default.yaml's (hidden 64, vocab 1024, blocks of 64 tokens) so the whole
grid, 70 runs at the default flags, trains in 26 minutes on 2 otherwise idle cores (docs/benchmarks.md);
`--hidden 128 --ffn 352 --heads 4 --kv-heads 2 --vocab 4096 --block 128` is the default config's width.

    nice -n 10 python bench/quality.py --docs
    python bench/quality.py --corpora shakespeare --depths default --objectives clm --recipes identity copy
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import yaml
from _common import DOCS

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
RECIPES_DIR = os.path.join(REPO, "configs", "recipes")
SECTION = "quality"
OBJECTIVES = ("clm", "masked_diffusion")
CORPORA = ("shakespeare", "python")
DEPTHS = {"default": 3, "deep": 6}  # stacks of the final rack (2 blocks each)
E2E_BASELINES = ("e2e_constant_lr",)  # end-to-end runs beside "e2e" (the budget and parity target)


# The experiments --------------------------------------------------------------------------------------


def recipe_names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(RECIPES_DIR) if f.endswith(".yaml"))


def recipe_stages(name: str, n_stacks: int) -> list[dict]:
    """The recipe's stages for a rack of `n_stacks` stacks. A deeper rack repeats the recipe's middle growth
    stage (the one before its last) and keeps the last growth stage last, since a recipe may treat it
    apart (constant_lr decays the rate only there); a shallower one drops middle stages. Stages after
    the growth (a fusion stage) stay last."""
    with open(os.path.join(RECIPES_DIR, f"{name}.yaml"), encoding="utf-8") as f:
        stages = yaml.safe_load(f)["stages"]
    growth = [i for i, s in enumerate(stages) if s.get("grow")]
    head, tail = stages[:growth[0]], stages[growth[-1] + 1:]
    grown = [stages[i] for i in growth]
    wanted = n_stacks - 1  # growth stages: one per stack after the first
    if wanted == 0:
        grown = []
    else:
        middle = grown[-2] if len(grown) > 1 else grown[-1]
        extra = max(0, wanted - len(grown))
        grown = (grown[:-1] + [middle] * extra)[:wanted - 1] + [grown[-1]]
    out = [copy.deepcopy(s) for s in head + grown + tail]
    for k, stage in enumerate(out):
        if stage.get("grow"):
            stage["name"] = f"stack_{k}"
    return out


def e2e_steps(args, objective: str) -> int:
    """End-to-end steps, the budget of every run: masked diffusion learns more slowly per token than causal
    LM (it predicts from partial context), so it gets its own, larger budget."""
    return args.e2e_steps_md if objective == "masked_diffusion" else args.e2e_steps


def e2e_rates(args, objective: str) -> list[float]:
    """End to end's peak learning rates: each is a run ("e2e@<rate>"), and the best of them (lowest mean
    final held-out loss over seeds) is the parity target, so no recipe is measured against a badly tuned
    end-to-end run. The best rate differs between the corpora (docs/benchmarks.md)."""
    return args.lr_md if objective == "masked_diffusion" else args.lr


def is_e2e(run: str) -> bool:
    return run.startswith("e2e@")


def e2e_stages(args, objective: str, lr: float) -> list[dict]:
    return [dict(name="e2e", train=["all"], max_steps=e2e_steps(args, objective), learning_rate=lr, warmup_steps=10)]


def e2e_constant_lr_stages(args, objective: str) -> list[dict]:
    """End to end with the learning-rate shape of the `constant_lr` recipe: its first stage's rate held
    for two thirds of the steps, then its last stage's rate decayed (cosine) over the last third; a
    baseline that separates the schedule's effect from growth's. (Two stages: AdamW restarts between.)"""
    recipe, steps = recipe_stages("constant_lr", 3), e2e_steps(args, objective)
    hold = round(steps * 2 / 3)
    return [dict(name="e2e_hold", train=["all"], max_steps=hold, learning_rate=recipe[0]["learning_rate"],
                 warmup_steps=10, lr_scheduler_type="constant_with_warmup"),
            dict(name="e2e_decay", train=["all"], max_steps=steps - hold, learning_rate=recipe[-1]["learning_rate"],
                 warmup_steps=0, lr_scheduler_type=recipe[-1].get("lr_scheduler_type", "cosine"))]


def experiment_document(args, corpus: str, depth: str, objective: str, run: str, seed: int, data_dir: str,
                        output_dir: str) -> dict:
    n = DEPTHS[depth]
    whole = is_e2e(run) or run in E2E_BASELINES  # end-to-end runs start with the final rack
    model = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                 num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                 max_position_embeddings=max(512, args.block), stack_sizes=[2] * n if whole else [2])
    if is_e2e(run):
        stages = e2e_stages(args, objective, float(run[len("e2e@"):]))
    elif run in E2E_BASELINES:
        stages = e2e_constant_lr_stages(args, objective)
    else:
        stages = recipe_stages(run, n)
    for stage in stages:
        stage["objective"] = objective
        stage.pop("trunk_mode", None)  # recompute: a cache is built over the whole corpus, never repaid here
    if objective != "clm":
        model["attention_mode"] = "bidirectional"
    data = dict(tokenizer_vocab_size=args.vocab, block_size=args.block, max_eval_blocks=args.eval_blocks)
    data.update(corpus_data(corpus, data_dir))
    training = dict(output_dir=output_dir, per_device_train_batch_size=args.batch, per_device_eval_batch_size=32,
                    logging_steps=10, max_eval_batches=args.eval_blocks // 32, save_interval=None,
                    save_total_limit=1, report_to="none", plot=False, seed=seed, mixed_precision="no")
    return {"model": model, "data": data, "training": training, "objective": {"seed": seed}, "stages": stages}


def corpus_data(corpus: str, data_dir: str) -> dict:
    if corpus == "shakespeare":
        return {"dataset": "shakespeare"}
    folder = os.path.join(data_dir, "python-stdlib")
    return {"dataset": None, "data_files": {"train": os.path.join(folder, "train.txt"),
                                            "validation": os.path.join(folder, "validation.txt")}}


def write_python_corpus(data_dir: str) -> None:
    """The interpreter's top-level standard-library modules as text; every tenth file (sorted) held out."""
    folder = os.path.join(data_dir, "python-stdlib")
    if os.path.isfile(os.path.join(folder, "validation.txt")):
        return
    os.makedirs(folder, exist_ok=True)
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in os.listdir(stdlib) if f.endswith(".py"))
    for split, chosen in (("train", [f for i, f in enumerate(files) if i % 10]),
                          ("validation", [f for i, f in enumerate(files) if i % 10 == 0])):
        text = "\n\n".join(open(os.path.join(stdlib, f), encoding="utf-8", errors="replace").read() for f in chosen)
        with open(os.path.join(folder, f"{split}.txt.tmp"), "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(os.path.join(folder, f"{split}.txt.tmp"), os.path.join(folder, f"{split}.txt"))


# FLOP budgets ------------------------------------------------------------------------------------------


def flops_per_step(experiment) -> list[float]:
    """Training FLOPs of one optimizer step of every stage, from the trainer's own growth, freezing and
    counting functions replayed on a throwaway rack."""
    from stackwise_hf import StackWiseForCausalLM, StackWiseForMaskedLM
    from stackwise_hf.training.flops import stage_flops
    from stackwise_hf.training.schedule import resolve_schedule
    from stackwise_hf.training.stage import first_trained_stack, grow_for_stage, set_trainable

    config = copy.deepcopy(experiment.model)
    config.mask_token_id = config.mask_token_id if config.mask_token_id is not None else 3
    rack = (StackWiseForCausalLM if config.attention_mode == "causal" else StackWiseForMaskedLM)(config)
    block, batch = experiment.data.block_size, experiment.training.per_device_train_batch_size
    per_step = []
    for stage in resolve_schedule(experiment.stages, config.stack_sizes):
        grow_for_stage(rack, stage)
        set_trainable(rack, stage)
        first = first_trained_stack(rack, stage.config.trains("embeddings"))
        causal = stage.config.objective == "clm"
        per_step.append(batch * stage_flops(rack, first, causal=causal).block_flops(block))
    return per_step


def fit_budget(experiment, target: float) -> float:
    """Scales the stages' `max_steps` so the run's FLOPs equal `target`; returns the planned FLOPs."""
    per_step = flops_per_step(experiment)
    planned = sum(s.max_steps * f for s, f in zip(experiment.stages, per_step))
    scale = target / planned
    for stage in experiment.stages:
        stage.max_steps = max(1, round(stage.max_steps * scale))
    return sum(s.max_steps * f for s, f in zip(experiment.stages, per_step))


def stage_peaks(experiment) -> list[int]:
    """Predicted peak device memory of each stage (bytes, `stackwise_hf.planner`)."""
    from stackwise_hf.planner import plan_experiment

    return [s.device.total for s in plan_experiment(copy.deepcopy(experiment), device_type="cpu").stages]


# One group of runs in one process ------------------------------------------------------------------------


def worker(args) -> list[dict]:
    import torch

    from stackwise_hf.data import build_datasets, load_or_train_tokenizer
    from stackwise_hf.training import ExperimentConfig, ProgressiveTrainer

    torch.set_num_threads(args.threads)
    results = []
    e2e_flops = None
    for run in args.runs:
        with tempfile.TemporaryDirectory() as output_dir:
            doc = experiment_document(args, args.corpus, args.depth, args.objective, run, args.seed, args.data_dir,
                                      output_dir)
            experiment = ExperimentConfig.from_dict(doc)
            if e2e_flops is None:  # the budget: the end-to-end run's FLOPs
                first_e2e = f"e2e@{e2e_rates(args, args.objective)[0]}"  # every rate has the same FLOPs
                e2e = ExperimentConfig.from_dict(experiment_document(
                    args, args.corpus, args.depth, args.objective, first_e2e, args.seed, args.data_dir, output_dir))
                e2e_flops = flops_per_step(e2e)[0] * e2e_steps(args, args.objective)
            planned = fit_budget(experiment, e2e_flops)
            eval_every = max(5, sum(s.max_steps for s in experiment.stages) // args.evals)
            experiment.training.logging_steps = experiment.training.eval_steps = eval_every
            tokenizer = load_or_train_tokenizer(experiment.data)
            train, held_out = build_datasets(experiment.data, tokenizer)
            start = time.perf_counter()
            trainer = ProgressiveTrainer(experiment, train_dataset=train, eval_dataset=held_out, tokenizer=tokenizer)
            result = trainer.train()
            wall = time.perf_counter() - start
            history = trainer.run_log.history
            seconds = {r["step"]: r["seconds"] for r in history if r["kind"] == "train"}
            evals = [{"tokens": r["tokens"], "flops": r["flops"], "seconds": seconds.get(r["step"]), "loss": r["loss"],
                      "stage": r["stage"]} for r in history if r["kind"] == "eval"]
            results.append({
                "corpus": args.corpus, "depth": args.depth, "objective": args.objective, "run": run, "seed": args.seed,
                "evals": evals, "final": result.eval_loss, "flops": trainer.state.flops, "planned_flops": planned,
                "tokens": trainer.state.tokens_seen, "train_seconds": trainer.state.train_seconds, "wall": wall,
                "stage_ends": [s.eval_loss for s in result.stages],
                "stage_names": [s.name for s in result.stages],
                "stage_steps": [s.max_steps for s in experiment.stages],
                "full_fusion": [s.grow is None and "all" in s.train for s in experiment.stages],
                "peaks": stage_peaks(experiment),
            })
            print(f"  {args.corpus}/{args.depth}/{args.objective}/{run}/seed {args.seed}: held-out "
                  f"{result.eval_loss:.3f}, {trainer.state.flops:.3g} FLOPs, {wall:.0f} s", file=sys.stderr)
    return results


# The grid ------------------------------------------------------------------------------------------------


def plan_groups(args) -> list[dict]:
    """One group per (corpus, depth, objective, seed): the runs it trains in one process, e2e first. The
    first corpus at the first depth runs every recipe; elsewhere only the headline recipes (all with
    `--full`). Seeds beyond the first run the headline recipes."""
    groups = []
    for corpus in args.corpora:
        for depth in args.depths:
            for objective in args.objectives:
                for seed_index in range(args.first_seed, args.first_seed + args.seeds):
                    everything = args.full or (corpus == args.corpora[0] and depth == args.depths[0])
                    recipes = args.recipes if everything and seed_index == args.first_seed else [
                        r for r in args.recipes if r in args.headline]
                    groups.append({"corpus": corpus, "depth": depth, "objective": objective, "seed": seed_index,
                                   "runs": [*(f"e2e@{lr}" for lr in e2e_rates(args, objective)),
                                            *(args.baselines if everything else []), *recipes]})
    return groups


def run_group(group: dict, args, passthrough: list[str]) -> list[dict]:
    cmd = [sys.executable, __file__, "--worker", "--corpus", group["corpus"], "--depth", group["depth"],
           "--objective", group["objective"], "--seed", str(group["seed"]), "--runs", *group["runs"], *passthrough]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    sys.stderr.write(done.stderr if done.returncode else "".join(
        line + "\n" for line in done.stderr.splitlines() if line.startswith("  ")))
    if done.returncode:
        raise RuntimeError(f"group {group} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare_data(args) -> None:
    """Builds each corpus's tokenizer and token blocks once, so the parallel groups only read caches."""
    write_python_corpus(args.data_dir)
    for corpus in args.corpora:
        code = ("import sys; sys.path.insert(0, %r); import quality, argparse\n"
                "from stackwise_hf.data import DataArguments, build_datasets, load_or_train_tokenizer\n"
                "d = DataArguments(**quality.corpus_data(%r, %r), tokenizer_vocab_size=%d, block_size=%d, "
                "max_eval_blocks=%d)\nbuild_datasets(d, load_or_train_tokenizer(d))\n") % (
            os.path.dirname(os.path.abspath(__file__)), corpus, args.data_dir, args.vocab, args.block, args.eval_blocks)
        subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpora", nargs="+", choices=CORPORA, default=list(CORPORA))
    parser.add_argument("--depths", nargs="+", choices=list(DEPTHS), default=list(DEPTHS))
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    parser.add_argument("--recipes", nargs="+", default=recipe_names())
    parser.add_argument("--baselines", nargs="*", default=list(E2E_BASELINES),
                        help="other end-to-end runs, on the first corpus and depth")
    parser.add_argument("--headline", nargs="+", default=["constant_lr", "identity"],
                        help="recipes run on every corpus and depth and with every seed")
    parser.add_argument("--full", action="store_true", help="every recipe on every corpus and depth")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed, first-seed + 1, ...")
    parser.add_argument("--e2e-steps", type=int, default=300, help="causal LM: end-to-end steps (their FLOPs are "
                        "every recipe's budget); the deep rack gets the same steps, so twice the FLOPs")
    parser.add_argument("--e2e-steps-md", type=int, default=600, help="masked diffusion: end-to-end steps")
    parser.add_argument("--evals", type=int, default=12, help="evaluations per run (plus one per stage end)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--ffn", type=int, default=176)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--block", type=int, default=64, help="tokens per block")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval-blocks", type=int, default=128)
    parser.add_argument("--lr", type=float, nargs="+", default=[2e-3, 6e-3], help="causal LM: end-to-end peak "
                        "learning rates, one run each; the best is the parity target")
    parser.add_argument("--lr-md", type=float, nargs="+", default=[2e-3], help="masked diffusion: the same")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2, help="groups trained in parallel processes")
    parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "stackwise-quality-data"))
    parser.add_argument("--json", help="also write every run's record here")
    parser.add_argument("--from-json", nargs="+", help="redo the table and plot from --json files (e.g. of two "
                        "partial grids) without training")
    parser.add_argument("--docs", action="store_true", help="write the table and plot into docs/")
    parser.add_argument("--note", help="a markdown file whose text follows the table in docs/ (the commands of "
                        "partial grids put together with --from-json, and the reading of the figures)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--depth", help=argparse.SUPPRESS)
    parser.add_argument("--objective", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--runs", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    unknown = sorted(set(args.recipes) - set(recipe_names())) + sorted(set(args.baselines) - set(E2E_BASELINES))
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; configs/recipes has {recipe_names()}")

    started = time.perf_counter()
    if args.from_json:
        results = []
        for path in args.from_json:
            with open(path, encoding="utf-8") as f:
                results += json.load(f)
    else:
        prepare_data(args)
        passthrough = [a for a in _shared_flags(args)]
        with ThreadPoolExecutor(args.jobs) as pool:
            groups = plan_groups(args)
            results = [r for rs in pool.map(lambda g: run_group(g, args, passthrough), groups) for r in rs]
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(results, f)
    rows = summarize(results)
    text = table(rows)
    print(text)
    print(f"bench wall time: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.docs:
        plot(results, os.path.join(DOCS, "quality.png"))
        from _common import write_section

        write_section(os.path.join(DOCS, "benchmarks.md"), SECTION, section_text(text, rows, args, results))


def _shared_flags(args) -> list[str]:
    return ["--e2e-steps", str(args.e2e_steps), "--e2e-steps-md", str(args.e2e_steps_md), "--evals", str(args.evals),
            "--hidden", str(args.hidden), "--ffn", str(args.ffn), "--heads", str(args.heads),
            "--kv-heads", str(args.kv_heads), "--vocab", str(args.vocab), "--block", str(args.block),
            "--batch", str(args.batch), "--eval-blocks", str(args.eval_blocks), "--lr", *map(str, args.lr),
            "--lr-md", *map(str, args.lr_md), "--threads", str(args.threads), "--data-dir", args.data_dir]


# Reading the results -------------------------------------------------------------------------------------


def parity(evals: list[dict], target: float):
    """The first evaluation at or below `target`: (tokens, FLOPs), or None."""
    hit = next((e for e in evals if e["loss"] <= target), None)
    return (hit["tokens"], hit["flops"]) if hit else None


def best_e2e(results: list[dict]) -> dict:
    """(corpus, depth, objective) -> the end-to-end run (rate) with the lowest mean final held-out loss."""
    finals = {}
    for r in results:
        if is_e2e(r["run"]):
            finals.setdefault((r["corpus"], r["depth"], r["objective"]), {}).setdefault(r["run"], []).append(r["final"])
    return {panel: min(runs, key=lambda run: statistics.mean(runs[run])) for panel, runs in finals.items()}


def summarize(results: list[dict]) -> list[dict]:
    """One row per (corpus, depth, objective, run), seeds pooled: mean and spread of the final loss."""
    keys = list(dict.fromkeys((r["corpus"], r["depth"], r["objective"], r["run"]) for r in results))
    panels = list(dict.fromkeys(key[:3] for key in keys))
    keys.sort(key=lambda key: panels.index(key[:3]))  # rows of one panel together, across --from-json files
    targets = best_e2e(results)
    rows = []
    for key in keys:
        runs = [r for r in results if (r["corpus"], r["depth"], r["objective"], r["run"]) == key]
        target_key = (*key[:3], targets[key[:3]])
        e2e = [r for r in results if (r["corpus"], r["depth"], r["objective"], r["run"]) == target_key]
        target = statistics.mean(r["final"] for r in e2e)
        e2e_flops = statistics.mean(r["flops"] for r in e2e)
        e2e_peak = max(e2e[0]["peaks"])
        finals = [r["final"] for r in runs]
        hits = [parity(r["evals"], target) for r in runs]
        partial_peaks = [p for r in runs for p, fusion in zip(r["peaks"], r["full_fusion"]) if not fusion]
        stage_ends = [statistics.mean(v) for v in zip(*[r["stage_ends"] for r in runs])]
        rows.append({
            "corpus": key[0], "depth": key[1], "objective": key[2], "run": key[3], "seeds": len(runs),
            "target": key[3] == targets[key[:3]],
            "final": statistics.mean(finals), "spread": (max(finals) - min(finals)) / 2 if len(finals) > 1 else None,
            "gap": statistics.mean(finals) - target, "flops": statistics.mean(r["flops"] for r in runs),
            "flops_ratio": statistics.mean(r["flops"] for r in runs) / e2e_flops,
            "tokens": statistics.mean(r["tokens"] for r in runs),
            "seconds": statistics.mean(r["train_seconds"] for r in runs),
            "parity": [h for h in hits], "parity_flops_ratio": (
                statistics.mean(h[1] for h in hits) / e2e_flops if all(hits) else None),
            "stage_ends": stage_ends, "falls_every_stage": sum(
                all(b < a for a, b in zip(r["stage_ends"], r["stage_ends"][1:])) for r in runs),
            "peak_ratio": max(partial_peaks) / e2e_peak if partial_peaks else None,
        })
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| corpus | depth | objective | run | seeds | held-out final | gap vs e2e (nats) | tokens | FLOPs / e2e | "
             "tokens to parity | FLOPs to parity (/ e2e) | held-out at stage ends | falls every stage (seeds) | "
             "peak mem / e2e (non-fusion) | train s |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        spread = f" ± {r['spread']:.3f}" if r["spread"] is not None else ""
        hits = r["parity"]
        if r["target"]:  # its own final loss (mean over seeds) is the target
            tokens = flops = "target"
        elif all(hits):
            tokens = f"{statistics.mean(h[0] for h in hits) / 1e3:.0f}k"
            flops = f"{statistics.mean(h[1] for h in hits):.3g} ({r['parity_flops_ratio']:.2f})"
        else:
            reached = sum(1 for h in hits if h)
            tokens = flops = "never" if not reached else f"{reached}/{len(hits)} seeds"
        ends = " → ".join(f"{v:.3f}" for v in r["stage_ends"])
        falls = f"{r['falls_every_stage']}/{r['seeds']}" if len(r["stage_ends"]) > 1 else "-"
        peak = f"{r['peak_ratio']:.2f}" if r["peak_ratio"] is not None else "-"
        gap = "-" if r["target"] else f"{r['gap']:+.3f}"
        lines.append(f"| {r['corpus']} | {r['depth']} | {r['objective']} | {r['run']} | {r['seeds']} | "
                     f"{r['final']:.3f}{spread} | {gap} | {r['tokens'] / 1e3:.0f}k | {r['flops_ratio']:.2f} | "
                     f"{tokens} | {flops} | {ends} | {falls} | {peak} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["corpus"], r["depth"], r["objective"]) for r in results))
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.2 * len(panels)), squeeze=False)
    runs = list(dict.fromkeys(r["run"] for r in results))
    colours = {run: f"C{i}" for i, run in enumerate(runs)}
    for (ax_flops, ax_time), panel in zip(axes, panels):
        for r in results:
            if (r["corpus"], r["depth"], r["objective"]) != panel:
                continue
            style = dict(color=colours[r["run"]], linewidth=1.6 if is_e2e(r["run"]) else 1.0, marker=".",
                         label=r["run"] if r["seed"] == 0 else None, alpha=1.0 if r["seed"] == 0 else 0.5)
            ax_flops.plot([e["flops"] for e in r["evals"]], [e["loss"] for e in r["evals"]], **style)
            ax_time.plot([e["seconds"] for e in r["evals"]], [e["loss"] for e in r["evals"]], **style)
        name = "/".join(panel)
        ax_flops.set(title=f"{name}: held-out loss vs training FLOPs", xlabel="training FLOPs", ylabel="held-out loss")
        ax_time.set(title=f"{name}: vs training wall time", xlabel="seconds (shared CPU)", ylabel="held-out loss")
        ax_flops.legend(fontsize=7)
        for ax in (ax_flops, ax_time):
            finals = [r["evals"][-1]["loss"] for r in results if (r["corpus"], r["depth"], r["objective"]) == panel]
            headroom = 0.9 if panel[2] == "clm" else 0.25  # masked diffusion moves a few tenths of a nat
            ax.set_ylim(min(finals) - 0.15, max(finals) + headroom)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def section_text(table_text: str, rows: list[dict], args, results: list[dict]) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    # File arguments by name only (where they lay on the measuring machine says nothing here).
    command = "nice -n 10 python bench/quality.py " + " ".join(os.path.basename(a) if os.sep in a else a
                                                                for a in sys.argv[1:])
    note = open(args.note, encoding="utf-8").read().strip() if args.note else ""
    return "\n".join([
        "## Recipes vs end to end at equal training FLOPs (`bench/quality.py`)",
        "",
        f"- Date: {datetime.date.today().isoformat()}; {cpu}, {os.cpu_count()} cores; "
        f"torch {torch.__version__}.",
        f"- Command: `{command}`",
        f"- Model: hidden {args.hidden}, ffn {args.ffn}, {args.heads}/{args.kv_heads} heads, vocab {args.vocab} (BPE "
        f"trained on each corpus), blocks of {args.block} tokens, batch {args.batch}; stacks of 2 blocks, 3 (default) "
        f"or 6 (deep). End to end: {args.e2e_steps} steps (masked diffusion: {args.e2e_steps_md}), every weight, "
        f"peak lr {' or '.join(map(str, args.lr))} (masked diffusion: {' or '.join(map(str, args.lr_md))}), cosine, "
        "the best rate's final loss the target. Each recipe's stage lengths are scaled to end to end's "
        "training FLOPs (`stackwise_hf/training/flops.py`).",
        "- Held-out loss on the first "
        f"{args.eval_blocks} held-out blocks: causal LM cross-entropy; masked diffusion: cross-entropy at the masked "
        "positions under fixed eval masks. Parity target: end to end's final held-out loss (mean over seeds). "
        "± is half the range over seeds. Peak memory: planner prediction of the largest stage that is not a full "
        "fusion stage, over end to end's.",
        "",
        table_text,
        "",
        "![held-out loss against training FLOPs and wall time](quality.png)",
        "",
        note,
        "",
    ])


if __name__ == "__main__":
    main()
