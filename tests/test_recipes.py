"""configs/recipes/: every recipe is an experiment file that loads, resolves its schedule and trains as it is."""

import pathlib

import pytest

from stackwise_hf.training import ExperimentConfig, ProgressiveTrainer, resolve_schedule
from tiny import synthetic_blocks

RECIPES = sorted((pathlib.Path(__file__).parent.parent / "configs" / "recipes").glob("*.yaml"))
NAMES = [p.stem for p in RECIPES]


def test_the_recipes_the_project_documents_are_there():
    assert {"identity", "copy", "dual_lora", "fusion_full", "fusion_lora", "constant_lr"} <= set(NAMES)


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
                 "training.plot=false", "training.save_interval=null", f"training.output_dir={tmp_path / 'run'}"]
    experiment = ExperimentConfig.from_yaml(path, overrides=overrides)
    result = ProgressiveTrainer(experiment, train_dataset=synthetic_blocks(8), eval_dataset=synthetic_blocks(4)).train()
    assert [s.name for s in result.stages] == [s.name for s in experiment.stages]
    assert result.stages[-1].stack_sizes == [2, 2, 2] and result.stages[-1].flops > 0

