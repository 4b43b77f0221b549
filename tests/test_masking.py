import math

import pytest
import torch

from stackwise_hf.training import ProgressiveTrainer, StageConfig, resolve_schedule
from stackwise_hf.training.masking import (
    DepthAsTimeObjective,
    MaskedDiffusionObjective,
    MaskedLMObjective,
    ObjectiveConfig,
    stage_mask_ratios,
)
from stackwise_hf.training.objectives import build_objective
from tiny import state_dicts_equal, synthetic_blocks, tiny_experiment, tiny_mlm_rack

MASK, VOCAB = 3, 96


def _batch(n=64, length=128, seed=0):
    ids = torch.randint(4, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
    return ids, torch.arange(n)


def test_mlm_masks_15_percent_with_the_80_10_10_split_and_labels_only_there():
    objective = MaskedLMObjective({"seed": 1}, mask_token_id=MASK, vocab_size=VOCAB)
    ids, sample_ids = _batch()
    batch = objective.prepare(ids, 0, sample_ids)
    selected = batch.labels != -100
    assert abs(selected.float().mean().item() - 0.15) < 0.01
    assert torch.equal(batch.labels[selected], ids[selected])  # the label is the original token
    assert torch.equal(batch.input_ids[~selected], ids[~selected])  # unselected positions untouched
    masked = (batch.input_ids == MASK) & selected
    changed = (batch.input_ids != ids) & (batch.input_ids != MASK) & selected
    kept = (batch.input_ids == ids) & selected
    n = selected.sum().item()
    # A random replacement may draw the original token: it then counts as kept (1/96 of 10%).
    assert abs(masked.sum().item() / n - 0.8) < 0.03
    assert abs(changed.sum().item() / n - 0.1) < 0.02
    assert abs(kept.sum().item() / n - 0.1) < 0.02
    assert batch.weights is None


def test_masks_are_a_pure_function_of_seed_sample_and_stage():
    objective = MaskedLMObjective({"seed": 1}, mask_token_id=MASK, vocab_size=VOCAB)
    ids, sample_ids = _batch(8, 32)
    first = objective.prepare(ids, 0, sample_ids)
    # Same samples in another order and another batch: the same masks, row for row.
    perm = torch.tensor([5, 2, 7, 0])
    again = objective.prepare(ids[perm], 3, sample_ids[perm])
    assert torch.equal(again.input_ids, first.input_ids[perm]) and torch.equal(again.labels, first.labels[perm])
    other_seed = MaskedLMObjective({"seed": 2}, mask_token_id=MASK, vocab_size=VOCAB).prepare(ids, 0, sample_ids)
    assert not torch.equal(other_seed.labels, first.labels)
    held_out = objective.prepare(ids, 0, sample_ids, evaluation=True)
    assert not torch.equal(held_out.labels, first.labels)  # the eval split has masks of its own
    per_stage = MaskedLMObjective({"seed": 1, "resample_per_stage": True}, mask_token_id=MASK, vocab_size=VOCAB)
    assert torch.equal(per_stage.prepare(ids, 0, sample_ids).labels, first.labels)
    assert not torch.equal(per_stage.prepare(ids, 1, sample_ids).labels, first.labels)
    with pytest.raises(ValueError, match="needs `sample_ids`"):
        objective.prepare(ids, 0, None)


def test_masked_diffusion_draws_a_ratio_per_sample_and_weights_by_its_inverse():
    objective = MaskedDiffusionObjective({"mask_ratio_range": [0.2, 0.6], "loss_weighting": "inverse_ratio"},
                                         mask_token_id=MASK, vocab_size=VOCAB)
    ids, sample_ids = _batch(256, 256)
    batch = objective.prepare(ids, 0, sample_ids)
    selected = batch.labels != -100
    assert torch.equal(selected, batch.input_ids == MASK)  # every selected position is the mask token
    ratios = selected.float().mean(1)
    assert ratios.min() > 0.2 - 0.08 and ratios.max() < 0.6 + 0.08
    assert abs(ratios.mean().item() - 0.4) < 0.02 and ratios.std() > 0.08  # spread over the range
    # 1/ratio per sample: the weight matches the realised fraction to sampling error.
    weight = batch.weights[:, 0]
    assert torch.allclose(1 / weight, ratios, atol=0.1)
    assert (batch.weights == weight[:, None]).all()
    assert objective.prepare(ids, 0, sample_ids, evaluation=True).weights is None  # eval: plain masked CE


def test_loss_is_taken_only_on_masked_positions():
    objective = MaskedDiffusionObjective({}, mask_token_id=MASK, vocab_size=VOCAB)
    ids, sample_ids = _batch(4, 16)
    batch = objective.prepare(ids, 0, sample_ids)
    head = torch.nn.Linear(8, VOCAB, bias=False)
    hidden = torch.randn(4, 16, 8)
    loss, count = objective.loss(hidden, head, batch.labels)
    selected = batch.labels != -100
    expected = torch.nn.functional.cross_entropy(head(hidden)[selected], ids[selected])
    assert count == selected.sum() and torch.allclose(loss, expected)
    # Changing what the head sees at unmasked positions changes nothing.
    hidden2 = torch.where(selected[..., None], hidden, torch.randn(4, 16, 8))
    assert torch.allclose(objective.loss(hidden2, head, batch.labels)[0], loss)


def test_every_block_carries_a_loss():
    objective = MaskedDiffusionObjective({"mask_ratio_range": [0.01, 0.01]}, mask_token_id=MASK, vocab_size=VOCAB)
    ids, sample_ids = _batch(32, 8)
    batch = objective.prepare(ids, 0, sample_ids)
    assert ((batch.labels != -100).sum(1) >= 1).all()


def _schedule(grow, n=4):
    stages = [StageConfig(max_steps=1, objective="depth_as_time")] + [
        StageConfig(grow=grow, n_blocks=1, max_steps=1, objective="depth_as_time") for _ in range(n - 1)]
    return resolve_schedule(stages, [1])


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_depth_schedules_put_the_most_noise_on_the_leftmost_stack(kind):
    config = ObjectiveConfig(depth_schedule=kind, min_ratio=0.1, max_ratio=0.9)
    ratios = config.depth_ratios_for(5)
    assert ratios[0] == pytest.approx(0.9) and ratios[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(ratios, ratios[1:]))
    if kind == "cosine":
        assert ratios[1] == pytest.approx(0.1 + 0.8 * (1 + math.cos(math.pi / 4)) / 2)
    # Append: the first stage trains the leftmost stack (heaviest); prepend: each new stack is leftmost.
    assert stage_mask_ratios(_schedule("append", 5), config) == pytest.approx(ratios)
    assert stage_mask_ratios(_schedule("prepend", 5), config) == pytest.approx(ratios[::-1])


def test_depth_as_time_list_schedule_stage_override_and_nested_masks():
    schedule = _schedule("prepend", 3)
    config = {"depth_schedule": "list", "depth_ratios": [0.8, 0.5, 0.2]}
    assert stage_mask_ratios(schedule, config) == [0.2, 0.5, 0.8]
    with pytest.raises(ValueError, match="`depth_ratios` has 2 ratio.*3 stacks"):
        stage_mask_ratios(schedule, {"depth_schedule": "list", "depth_ratios": [0.8, 0.5]})
    objectives = [build_objective("depth_as_time", config=config, stage=s, num_stages=3, mask_token_id=MASK,
                                  vocab_size=VOCAB, schedule=schedule) for s in schedule]
    ids, sample_ids = _batch(64, 128)
    masks = [o.prepare(ids, s.index, sample_ids).labels != -100 for o, s in zip(objectives, schedule)]
    for mask, ratio in zip(masks, [0.2, 0.5, 0.8]):
        assert abs(mask.float().mean().item() - ratio) < 0.02
    assert (masks[0] <= masks[1]).all() and (masks[1] <= masks[2]).all()  # nested: lighter is a subset
    override = StageConfig(max_steps=1, objective="depth_as_time", mask_ratio=0.33)
    stage = resolve_schedule([override], [1])[0]
    assert DepthAsTimeObjective({}, stage=stage, mask_token_id=MASK, vocab_size=VOCAB).ratio == 0.33


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"mlm_probability": 1.5}, r"`mlm_probability` must be a number in \(0, 1\]; got 1.5"),
        ({"mask_ratio_range": [0.7, 0.2]}, r"`mask_ratio_range` must have low <= high"),
        ({"mask_ratio_range": 0.5}, r"`mask_ratio_range` must be a pair"),
        ({"loss_weighting": "elbo"}, r"`loss_weighting` must be one of \['none', 'inverse_ratio'\]; got 'elbo'"),
        ({"depth_schedule": "exp"}, r"`depth_schedule` must be one of \['linear', 'cosine', 'list'\]"),
        ({"depth_schedule": "list"}, r"needs `depth_ratios`"),
        ({"min_ratio": 0.9, "max_ratio": 0.5}, r"`min_ratio` \(0.9\) must not exceed `max_ratio` \(0.5\)"),
        ({"mask_rato": 0.5}, r"unknown ObjectiveConfig field\(s\) \['mask_rato'\]"),
    ],
)
def test_bad_objective_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        ObjectiveConfig.from_dict(fields)


def test_missing_mask_token_is_a_clear_error():
    with pytest.raises(ValueError, match="`mask_token_id` is None"):
        MaskedLMObjective({}, mask_token_id=None, vocab_size=VOCAB)


def _trainer(tmp_path, stages, objective=None, rack=None):
    experiment = tiny_experiment(tmp_path, stages)
    experiment.objective = objective or {}
    rack = rack or tiny_mlm_rack(stack_sizes=[1])
    return ProgressiveTrainer(experiment, rack=rack, train_dataset=synthetic_blocks(64),
                              eval_dataset=synthetic_blocks(16, seed=1))


@pytest.mark.parametrize("name", ["mlm", "masked_diffusion"])
def test_masked_objectives_train_a_bidirectional_rack(tmp_path, name):
    # 80 steps (10 epochs of 8 batches): masks are drawn anew each epoch, so no block's mask is learned by heart.
    trainer = _trainer(tmp_path, [{"max_steps": 80, "objective": name, "learning_rate": 1e-2,
                                   "train": ["stack", "head", "embeddings"]}])
    result = trainer.train()
    assert trainer.rack.config.attention_mode == "bidirectional"
    stage = result.stages[0]
    assert stage.final_loss < stage.first_loss - 0.25, stage


def test_bad_objective_section_fails_before_training(tmp_path):
    trainer = _trainer(tmp_path, [{"max_steps": 1, "objective": "masked_diffusion"}], {"loss_weighting": "elbo"})
    with pytest.raises(ValueError, match="objective: `loss_weighting`"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_right_to_left_depth_as_time_trains_the_prepended_stack_under_a_frozen_suffix(tmp_path):
    stages = [{"max_steps": 10, "objective": "depth_as_time", "train": ["stack", "head", "embeddings"],
               "learning_rate": 1e-2}] + [
        {"grow": "prepend", "n_blocks": 1, "init": "identity", "objective": "depth_as_time", "max_steps": 4,
         "train": ["stack"], "learning_rate": 1e-2}] * 2
    trainer = _trainer(tmp_path, stages, {"min_ratio": 0.2, "max_ratio": 0.8})
    trainer.setup()
    seen = []
    for stage in trainer.schedule:
        run = trainer.enter_stage(stage)
        seen.append(run.objective.ratio)
        suffix = {k: v.clone() for k, v in trainer.rack.model.stacks[1:].state_dict().items()}
        head = trainer.rack.lm_head.weight.clone()
        new = {k: v.clone() for k, v in trainer.rack.model.stacks[0].state_dict().items()}
        trainer.run_stage(run)
        if stage.index:
            assert run.module.first_trained == 0
            assert state_dicts_equal(trainer.rack.model.stacks[1:].state_dict(), suffix)
            assert torch.equal(trainer.rack.lm_head.weight, head)
            after = trainer.rack.model.stacks[0].state_dict()
            assert any(not torch.equal(after[k], new[k]) for k in new)
        trainer.exit_stage(run)
    # Each prepended stack is leftmost in the final rack: the noise grows stage by stage.
    assert seen == pytest.approx([0.2, 0.5, 0.8])
    assert [r["stack_sizes"] for r in trainer.state.stage_results][-1] == [1, 1, 1]


def test_the_bundled_depth_as_time_config_is_right_to_left_with_rising_noise():
    from stackwise_hf.training import ExperimentConfig

    experiment = ExperimentConfig.from_yaml("configs/depth_as_time.yaml")
    schedule = resolve_schedule(experiment.stages, experiment.model.stack_sizes)
    assert [s.config.grow for s in schedule] == [None, "prepend", "prepend"] and schedule[-1].stack_sizes == (2, 2, 2)
    assert all(s.config.train == ["stack"] for s in schedule[1:])
    assert stage_mask_ratios(schedule, experiment.objective) == pytest.approx([0.15, 0.5, 0.85])
    assert experiment.model.attention_mode == "bidirectional"


class _Tokenizer:
    mask_token_id, pad_token_id, eos_token_id, bos_token_id = 3, 0, 1, 1


def test_a_given_tokenizer_supplies_the_mask_token(tmp_path):
    experiment = tiny_experiment(tmp_path, [{"max_steps": 1, "objective": "mlm"}])
    assert experiment.model.mask_token_id is None
    trainer = ProgressiveTrainer(experiment, train_dataset=synthetic_blocks(16), eval_dataset=synthetic_blocks(8),
                                 tokenizer=_Tokenizer())
    trainer.setup()
    assert trainer.enter_stage(trainer.schedule[0]).objective.mask_token_id == 3


@pytest.mark.parametrize("objective_class", [MaskedLMObjective, MaskedDiffusionObjective])
def test_training_masks_are_drawn_anew_every_epoch_and_eval_masks_never(objective_class):
    ids, sample_ids = _batch(8, 64)
    objective = objective_class({"seed": 1}, mask_token_id=MASK, vocab_size=VOCAB)
    epochs = [objective.prepare(ids, 0, sample_ids, epoch=e).labels for e in range(3)]
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    assert torch.equal(objective.prepare(ids, 0, sample_ids, epoch=1).labels, epochs[1])  # still reproducible
    assert torch.equal(objective.prepare(ids, 0, sample_ids).labels, epochs[0])  # epoch 0: the masks of old
    held_out = [objective.prepare(ids, 0, sample_ids, evaluation=True, epoch=e).labels for e in range(2)]
    assert torch.equal(held_out[0], held_out[1])
    fixed = objective_class({"seed": 1, "resample_per_epoch": False}, mask_token_id=MASK, vocab_size=VOCAB)
    assert torch.equal(fixed.prepare(ids, 0, sample_ids, epoch=2).labels, epochs[0])


@pytest.mark.parametrize("mode", ["recompute", "cache"])
def test_the_trainer_masks_each_epoch_afresh_except_over_a_cache(tmp_path, monkeypatch, mode):
    seen = {}  # sample id -> {epoch: masked positions} of the training blocks of stage 1
    original = MaskedLMObjective.prepare

    def spy(self, input_ids, stage_index, sample_ids=None, evaluation=False, epoch=0):
        batch = original(self, input_ids, stage_index, sample_ids, evaluation, epoch)
        if stage_index == 1 and not evaluation:
            for sample, labels in zip(torch.as_tensor(sample_ids).tolist(), batch.labels):
                seen.setdefault(sample, {})[epoch] = tuple((labels != -100).nonzero().flatten().tolist())
        return batch

    monkeypatch.setattr(MaskedLMObjective, "prepare", spy)
    stages = [{"max_steps": 2, "objective": "mlm", "train": ["stack", "head", "embeddings"]},
              {"grow": "append", "n_blocks": 1, "max_steps": 6, "objective": "mlm", "trunk_mode": mode}]
    trainer = _trainer(tmp_path, stages)
    trainer.train_dataset = synthetic_blocks(16)  # 2 steps of 8 blocks per epoch: stage 1 runs 3 epochs
    trainer.train()
    assert sorted(seen) == list(range(16))
    if mode == "recompute":
        assert all(sorted(masks) == [0, 1, 2] and len(set(masks.values())) == 3 for masks in seen.values())
    else:  # the cache holds the trunk's output over epoch 0's masked inputs, so the labels stay epoch 0's
        assert all(list(masks) == [0] for masks in seen.values())


def test_progressive_masked_diffusion_lowers_the_held_out_loss_at_every_stage(tmp_path):
    """Each stage sees the 64 blocks five times. With masks drawn anew each epoch, every stage after the first
    lowers the held-out masked-token loss; with one mask per block for the whole run, the later stages learn
    those masks and the held-out loss rises (the failure this setting fixes)."""
    stage_ends = {}
    for fresh in (True, False):
        stages = [{"max_steps": 40, "objective": "masked_diffusion", "learning_rate": 1e-2,
                   "train": ["stack", "head", "embeddings"]}]
        stages += [{"grow": "append", "n_blocks": 1, "init": "identity", "max_steps": 40,
                    "objective": "masked_diffusion", "learning_rate": 1e-2}] * 2
        trainer = _trainer(tmp_path / str(fresh), stages, {"resample_per_epoch": fresh})
        trainer.eval_dataset = synthetic_blocks(32, seed=1)
        stage_ends[fresh] = [s.eval_loss for s in trainer.train().stages]
    fresh, fixed = stage_ends[True], stage_ends[False]
    assert fresh[2] < fresh[1] < fresh[0], fresh
    assert fresh[2] < fixed[2] - 0.05, (fresh, fixed)
