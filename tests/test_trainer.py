import copy
from types import SimpleNamespace

import pytest
import torch

from stackwise_hf.training import ExperimentConfig, ObjectiveConfig, ProgressiveTrainer, StageConfig, resolve_schedule
from stackwise_hf.training.stage import optimizer_groups
from tiny import state_dicts_equal, synthetic_blocks, tiny_experiment, tiny_rack


def _trainer(tmp_path, stages, rack=None, **training):
    return ProgressiveTrainer(tiny_experiment(tmp_path, stages, **training), rack=rack,
                              train_dataset=synthetic_blocks(64), eval_dataset=synthetic_blocks(16, seed=1))


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_stage_freezes_trunk_bit_for_bit_and_trains_the_new_stack(tmp_path):
    trainer = _trainer(tmp_path, [{"max_steps": 3}, {"grow": "append", "n_blocks": 1, "max_steps": 4}])
    trainer.setup()
    run = trainer.enter_stage(trainer.schedule[0])
    trainer.run_stage(run)
    trainer.exit_stage(run)
    rack = trainer.rack
    trunk, embed = _snapshot(rack.model.stacks[0]), rack.model.embed_tokens.weight.clone()
    run = trainer.enter_stage(trainer.schedule[1])
    new_before, head_before = _snapshot(rack.model.stacks[1]), rack.lm_head.weight.clone()
    trainer.run_stage(run)
    assert state_dicts_equal(_snapshot(rack.model.stacks[0]), trunk)
    assert torch.equal(rack.model.embed_tokens.weight, embed)
    after = _snapshot(rack.model.stacks[1])
    assert all(not torch.equal(after[k], new_before[k]) for k in after)
    assert not torch.equal(rack.lm_head.weight, head_before)


def test_optimizer_holds_exactly_the_trainable_parameters(tmp_path):
    trainer = _trainer(tmp_path, [{"max_steps": 1, "train": ["stack"]},
                                  {"grow": "append", "n_blocks": 1, "max_steps": 1, "train": ["stack", "head"],
                                   "weight_decay": 0.1}])
    trainer.setup()
    for stage in trainer.schedule:
        run = trainer.enter_stage(stage)
        in_optimizer = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
        trainable = {id(p) for p in trainer.rack.parameters() if p.requires_grad}
        assert in_optimizer == trainable
        names = [n for g in run.optimizer.param_groups for n in g["names"]]
        assert sorted(names) == sorted(run.trainable)
        trainer.run_stage(run)
        trainer.exit_stage(run)
    groups = optimizer_groups(trainer.rack, 0.1)
    assert {n for g in groups if g["weight_decay"] == 0 for n in g["names"]} == {"model.norm.weight"} | {
        n for g in groups for n in g["names"] if "layernorm" in n}


@pytest.mark.parametrize("grow", ["append", "prepend"])
def test_both_curricula_train(tmp_path, grow):
    stages = [{"max_steps": 15, "train": ["stack", "head", "embeddings"], "learning_rate": 3e-3}] + [
        {"grow": grow, "n_blocks": 1, "init": "identity", "max_steps": 40, "learning_rate": 1e-2,
         "train": ["stack"] if grow == "prepend" else ["stack", "head"]}
    ] * 2
    trainer = _trainer(tmp_path, stages)
    result = trainer.train()
    assert trainer.rack.config.stack_sizes == [1, 1, 1]
    assert [s.stack for s in result.stages] == ([0, 1, 2] if grow == "append" else [0, 0, 0])
    for stage in result.stages[1:]:
        assert stage.final_loss < stage.first_loss
    assert result.stages[-1].eval_loss < result.stages[0].eval_loss + 0.05
    assert (tmp_path / "run" / "log.jsonl").exists() and (tmp_path / "run" / "final" / "config.json").exists()


def test_prepend_trains_under_a_frozen_suffix_and_head(tmp_path):
    trainer = _trainer(tmp_path, [{"max_steps": 2}, {"grow": "prepend", "n_blocks": 1, "max_steps": 3, "train": ["stack"]}])
    trainer.setup()
    run = trainer.enter_stage(trainer.schedule[0])
    trainer.run_stage(run)
    trainer.exit_stage(run)
    suffix, head = _snapshot(trainer.rack.model.stacks[0]), trainer.rack.lm_head.weight.clone()
    run = trainer.enter_stage(trainer.schedule[1])
    trainer.run_stage(run)
    assert state_dicts_equal(_snapshot(trainer.rack.model.stacks[1]), suffix)
    assert torch.equal(trainer.rack.lm_head.weight, head)
    assert run.module.first_trained == 0


def test_gradient_accumulation_and_epochs(tmp_path):
    trainer = _trainer(tmp_path, [{"num_epochs": 2}], gradient_accumulation_steps=2)
    result = trainer.train()
    # 64 blocks / batch 8 = 8 micro-batches per epoch -> 4 optimizer steps per epoch.
    assert result.global_step == 8 and trainer.state.epoch == 2


def test_schedule_errors_name_the_stage():
    stages = [StageConfig(max_steps=1), StageConfig(grow="append", n_blocks=1, max_steps=1, name="grow")]
    with pytest.raises(ValueError, match=r"stages\[1\] \(grow\) grows the rack to 2 stacks, beyond max_stacks=1"):
        resolve_schedule(stages, [2], max_stacks=1)
    with pytest.raises(ValueError, match=r"stages\[0\] \(stage_0\) names stack 3.*valid: 0..1"):
        resolve_schedule([StageConfig(stack=3, max_steps=1)], [1, 1])


@pytest.mark.parametrize(
    "stage, message",
    [
        ({"grow": "sideways", "n_blocks": 1, "max_steps": 1}, "`grow`"),
        ({"grow": "append", "max_steps": 1}, "`n_blocks`"),
        ({"max_steps": 1, "num_epochs": 1}, "exactly one of `max_steps` and `num_epochs`"),
        ({"max_steps": 1, "train": ["stak"]}, "stak"),
        ({"max_steps": 1, "objective": "gpt"}, "`objective`"),
        ({"max_step": 1}, r"unknown StageConfig field\(s\) \['max_step'\]"),
        ({"max_steps": 1, "stack_adapter": {"rank": 4}}, r"`stack_adapter`: Unknown adapter setting\(s\) \['rank'\]"),
        ({"max_steps": 1, "trunk_adapter": 8}, "`trunk_adapter` must be a mapping"),
    ],
)
def test_bad_stage_fields(tmp_path, stage, message):
    with pytest.raises(ValueError, match=message):
        tiny_experiment(tmp_path, [stage])


def test_bad_input_fails_before_training(tmp_path):
    trainer = _trainer(tmp_path, [{"max_steps": 1}, {"grow": "append", "n_blocks": 1, "max_steps": 1}], max_stacks=1)
    with pytest.raises(ValueError, match="beyond max_stacks=1"):
        trainer.train()
    assert trainer.state.global_step == 0 and trainer.rack.num_stacks == 1

    mlm = _trainer(tmp_path, [{"max_steps": 1, "objective": "mlm"}], rack=tiny_rack(stack_sizes=[1]))
    with pytest.raises(ValueError, match="needs a bidirectional rack"):
        mlm.train()


def test_experiment_overrides(tmp_path):
    experiment = ExperimentConfig.from_yaml("configs/default.yaml", overrides=[
        "stages.*.max_steps=3", "training.mixed_precision=bf16", "stages.1.learning_rate=0.5"])
    assert [s.max_steps for s in experiment.stages] == [3, 3, 3]
    assert experiment.training.mixed_precision == "bf16" and experiment.stages[1].learning_rate == 0.5
    with pytest.raises(ValueError, match=r"unknown section\(s\) \['trainig'\]"):
        ExperimentConfig.from_dict({"model": {}, "trainig": {}})
    with pytest.raises(ValueError, match="not an index"):
        ExperimentConfig.from_yaml("configs/default.yaml", overrides=["stages.9.max_steps=3"])


class _Tokenizer(SimpleNamespace):
    def save_pretrained(self, directory):
        pass


def test_the_same_experiment_twice_gives_identical_results_and_stays_unchanged(tmp_path):
    stages = [{"max_steps": 3, "train": ["stack", "head", "embeddings"], "objective": "mlm"},
              {"grow": "append", "n_blocks": 1, "max_steps": 3, "objective": "mlm"}]
    experiment = tiny_experiment(tmp_path, stages)
    before = copy.deepcopy(experiment)
    results = []
    for run in ("a", "b"):
        experiment.training.output_dir = str(tmp_path / run)
        trainer = ProgressiveTrainer(experiment, train_dataset=synthetic_blocks(32), eval_dataset=synthetic_blocks(8, seed=1),
                                     tokenizer=_Tokenizer(mask_token_id=3, pad_token_id=0))
        results.append((trainer.train(), {k: v.clone() for k, v in trainer.rack.state_dict().items()}))
    # The caller's config is not touched: not the attention mode of a masked rack, nor token ids from the tokenizer.
    assert experiment.model.attention_mode == before.model.attention_mode == "causal"
    assert experiment.model.mask_token_id is None and experiment.model.to_dict() == before.model.to_dict()
    assert experiment.objective == before.objective and experiment.stages == before.stages
    (first, weights_a), (second, weights_b) = results
    assert [s.final_loss for s in first.stages] == [s.final_loss for s in second.stages]
    assert [s.eval_loss for s in first.stages] == [s.eval_loss for s in second.stages]
    assert state_dicts_equal(weights_a, weights_b)


def test_objective_section_is_typed_and_refuses_unknown_keys(tmp_path):
    with pytest.raises(ValueError, match=r"objective: unknown ObjectiveConfig field\(s\) \['mask_ratoi'\]; allowed fields "
                                         r"are \['seed', 'mlm_probability'"):
        ExperimentConfig.from_dict({"model": {}, "objective": {"mask_ratoi": 0.3}})
    experiment = ExperimentConfig.from_dict({"model": {}, "objective": {"mlm_probability": 0.3}})
    assert isinstance(experiment.objective, ObjectiveConfig) and experiment.objective.mlm_probability == 0.3
