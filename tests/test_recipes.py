"""configs/recipes/: every recipe is an experiment file that loads, resolves its schedule and trains as it is."""

import importlib
import pathlib

import pytest

from stackwise_hf.training import ExperimentConfig, ProgressiveTrainer, resolve_schedule
from tiny import synthetic_blocks

RECIPES = sorted((pathlib.Path(__file__).parent.parent / "configs" / "recipes").glob("*.yaml"))
NAMES = [p.stem for p in RECIPES]


def test_the_recipes_the_project_documents_are_there():
    assert {"identity", "copy", "dual_lora", "fusion_full", "fusion_lora", "constant_lr", "diffusion"} <= set(NAMES)


@pytest.mark.parametrize("path", RECIPES, ids=NAMES)
def test_every_recipe_resolves_to_three_stacks_of_two_blocks(path):
    experiment = ExperimentConfig.from_yaml(path)
    schedule = resolve_schedule(experiment.stages, experiment.model.stack_sizes, experiment.training.max_stacks)
    assert list(schedule[-1].stack_sizes) == [2, 2, 2]
    assert schedule[0].config.trains("embeddings")  # the first stage trains the embeddings with its stack
    assert experiment.training.output_dir.endswith(path.stem)  # recipes do not overwrite each other's runs


@pytest.mark.parametrize("path", RECIPES, ids=NAMES)
def test_every_recipe_trains_as_it_is(tmp_path, path):
    # The recipe's schedule on a tiny model and synthetic blocks: what is checked is that every stage runs.
    overrides = ["stages.*.max_steps=1", "stages.*.warmup_steps=0", "model.vocab_size=96", "model.hidden_size=32",
                 "model.intermediate_size=64", "training.per_device_train_batch_size=4", "training.report_to=none",
                 "training.plot=false", "training.save_interval=null", f"training.output_dir={tmp_path / 'run'}",
                 "model.mask_token_id=3"]  # the bundled tokenizer's <mask>; masked recipes need one, no tokenizer here
    experiment = ExperimentConfig.from_yaml(path, overrides=overrides)
    result = ProgressiveTrainer(experiment, train_dataset=synthetic_blocks(8), eval_dataset=synthetic_blocks(4)).train()
    assert [s.name for s in result.stages] == [s.name for s in experiment.stages]
    assert result.stages[-1].stack_sizes == [2, 2, 2] and result.stages[-1].flops > 0


def test_the_default_config_trains_on_the_recommended_recipe():
    root = pathlib.Path(__file__).parent.parent
    default = ExperimentConfig.from_yaml(root / "configs" / "default.yaml")
    recommended = ExperimentConfig.from_yaml(root / "configs" / "recipes" / "constant_lr.yaml")
    assert default.stages == recommended.stages and default.model.to_dict() == recommended.model.to_dict()


def test_the_quality_bench_grows_a_deeper_rack_by_repeating_the_middle_growth_stage(monkeypatch):
    # bench/quality.py's deep rack (6 stacks) must keep the recipe's last growth stage last: constant_lr
    # decays its rate only there, so repeating it would decay the rate in every added stage.
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parent.parent / "bench"))
    quality = importlib.import_module("quality")
    for n_stacks, schedules in ((3, ["constant_with_warmup", "constant", "cosine"]),
                                (6, ["constant_with_warmup"] + ["constant"] * 4 + ["cosine"]),
                                (2, ["constant_with_warmup", "cosine"])):
        stages = quality.recipe_stages("constant_lr", n_stacks)
        assert [s["lr_scheduler_type"] for s in stages] == schedules
        assert [s["name"] for s in stages] == [f"stack_{k}" for k in range(n_stacks)]
    fusion = quality.recipe_stages("fusion_full", 6)
    assert [s["name"] for s in fusion][-2:] == ["stack_5", "fusion"] and len(fusion) == 7
