import json
import logging

import pytest
import torch

from stackwise_hf.training import ProgressiveTrainer
from stackwise_hf.training.masking import MaskedLMObjective
from stackwise_hf.training.objectives import CausalLMObjective
from stackwise_hf.training.stage import StageModule
from stackwise_hf.training.trunk_cache import FORMAT_VERSION, MANIFEST, CorruptCacheError, StaleCacheError, TrunkCache
from tiny import synthetic_blocks, tiny_experiment, tiny_mlm_rack, tiny_rack


def _stages(mode, objective="clm", n=3, steps=4):
    first = {"max_steps": steps, "train": ["stack", "head", "embeddings"], "objective": objective,
             "trunk_mode": mode, "learning_rate": 1e-2}
    grow = {"grow": "append", "n_blocks": 1, "max_steps": steps, "objective": objective, "trunk_mode": mode,
            "learning_rate": 1e-2}
    return [first] + [grow] * (n - 1)


def _trainer(tmp_path, stages, objective=None, masked=False, **training):
    experiment = tiny_experiment(tmp_path, stages, **training)
    experiment.objective = objective or {}
    rack = tiny_mlm_rack(stack_sizes=[1]) if masked else tiny_rack(stack_sizes=[1])
    return ProgressiveTrainer(experiment, rack=rack, train_dataset=synthetic_blocks(48),
                              eval_dataset=synthetic_blocks(16, seed=1))


def _losses(trainer):
    return [(r["kind"], r["step"], r["loss"]) for r in trainer.run_log.history if r["kind"] in ("train", "eval")]


def _cache_records(trainer):
    return [r for r in trainer.run_log.history if r["kind"] == "trunk_cache"]


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_cache_and_recompute_give_the_same_trajectory_and_the_cache_is_extended(tmp_path, objective):
    masked = objective != "clm"
    recompute = _trainer(tmp_path / "r", _stages("recompute", objective), masked=masked)
    recompute.train()
    cached = _trainer(tmp_path / "c", _stages("cache", objective), masked=masked)
    cached.train()
    expected, got = _losses(recompute), _losses(cached)
    assert [k[:2] for k in got] == [k[:2] for k in expected] and len(got) >= 9
    for (_, _, a), (_, _, b) in zip(expected, got):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
    for (name, a), b in zip(recompute.rack.state_dict().items(), cached.rack.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
    # Stage 0 trains the embeddings (no frozen trunk); stage 1 builds the cache over stack 0; stage 2
    # extends it by running only stack 1, the stack stage 1 trained, over the cached rows.
    records = _cache_records(cached)
    assert [r["action"] for r in records] == ["skipped", "built", "extended"]
    assert [r["stacks_run"] for r in records] == [[], [0], [1]]
    assert cached.trunk_cache.stack_passes == [0, 1]
    assert records[1]["rows"] == {"train": 48, "eval": 16}


def test_training_from_the_cache_never_runs_the_trunk(tmp_path):
    trainer = _trainer(tmp_path, _stages("cache", n=2, steps=3))
    trainer.setup()
    run = trainer.enter_stage(trainer.schedule[0])
    trainer.run_stage(run)
    trainer.exit_stage(run)
    run = trainer.enter_stage(trainer.schedule[1])  # builds the cache over stack 0
    calls = []
    hooks = [trainer.rack.model.stacks[0].register_forward_hook(lambda *a: calls.append(1)),
             trainer.rack.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))]
    trainer.run_stage(run)
    trainer.evaluate(run)
    for hook in hooks:
        hook.remove()
    assert calls == [] and trainer.state.stage_step == 3


def _module(rack, depth=1):
    rack.requires_grad_(False)
    return StageModule(rack, CausalLMObjective(), first_trained=depth)


class _Tokenizer:
    def __init__(self, extra=0):
        self.vocab = {f"t{i}": i for i in range(96 + extra)}

    def get_vocab(self):
        return self.vocab


def test_a_stale_cache_is_detected_and_rebuilt_or_refused(tmp_path):
    rack = tiny_rack(stack_sizes=[1, 1, 1])
    blocks, held_out = synthetic_blocks(12), synthetic_blocks(4, seed=1)
    data = {"train": blocks, "eval": held_out}
    directory = tmp_path / "cache"
    cache = TrunkCache("1MB", directory, batch_size=5)
    assert cache.sync(_module(rack, 2), CausalLMObjective(), 1, data, tokenizer=_Tokenizer()).action == "built"
    expected = cache.hidden("train", torch.arange(12))
    fingerprint = cache.fingerprint

    # A later run finds it on disk and reuses it, without running the trunk.
    again = TrunkCache("1MB", directory)
    report = again.sync(_module(rack, 2), CausalLMObjective(), 1, data, tokenizer=_Tokenizer())
    assert report.action == "reused" and report.stacks_run == []
    assert torch.equal(again.hidden("train", torch.arange(12)), expected)

    with pytest.raises(StaleCacheError, match=r"\['tokenizer'\] differ"):
        TrunkCache.load(directory, expected={**fingerprint, "tokenizer": "other"})

    changes = {
        "tokenizer": lambda: dict(tokenizer=_Tokenizer(extra=1)),
        "data": lambda: dict(datasets={"train": synthetic_blocks(12, seed=5), "eval": held_out}),
        "inputs": lambda: dict(objective=MaskedLMObjective({}, mask_token_id=3, vocab_size=96)),
    }
    for what, change in changes.items():
        kwargs = dict(tokenizer=_Tokenizer(), datasets=data, objective=CausalLMObjective()) | change()
        stale = TrunkCache("1MB", directory)
        report = stale.sync(_module(rack, 2), kwargs["objective"], 1, kwargs["datasets"], tokenizer=kwargs["tokenizer"])
        assert report.action == "built" and what in report.reason, (what, report.reason)
        stale.sync(_module(rack, 2), CausalLMObjective(), 1, data, tokenizer=_Tokenizer())  # back to the original

    # A trunk weight changes: the stack hashes no longer match; the cache is rebuilt, never reused.
    with torch.no_grad():
        rack.model.stacks[0].blocks[0].mlp.up_proj.weight[0, 0] += 1.0
    stale = TrunkCache("1MB", directory)
    report = stale.sync(_module(rack, 2), CausalLMObjective(), 1, data, tokenizer=_Tokenizer())
    assert report.action == "built" and "stacks changed" in report.reason and report.stacks_run == [0, 1]
    assert not torch.allclose(stale.hidden("train", torch.arange(12)), expected)


def test_disk_shards_and_memory_agree_and_both_extend(tmp_path):
    rack = tiny_rack(stack_sizes=[1, 1, 1])
    data = {"train": synthetic_blocks(10), "eval": synthetic_blocks(3, seed=1)}
    row_bytes = 16 * 32 * 4
    disk = TrunkCache("1MB", tmp_path / "cache", batch_size=4, shard_bytes=3 * row_bytes)
    memory = TrunkCache("1MB", batch_size=4)
    for cache in (disk, memory):
        assert cache.sync(_module(rack, 1), CausalLMObjective(), 1, data).action == "built"
    assert len(list((tmp_path / "cache" / "train").glob("*.safetensors"))) == 4  # 10 rows, 3 per shard
    ids = torch.tensor([9, 0, 4, 3, 3])
    assert torch.equal(disk.hidden("train", ids), memory.hidden("train", ids))
    for cache in (disk, memory):
        report = cache.sync(_module(rack, 3), CausalLMObjective(), 2, data)
        assert report.action == "extended" and report.stacks_run == [1, 2]
    recomputed = _module(rack, 3).trunk_forward(torch.stack([b["input_ids"] for b in data["train"]]))
    assert torch.allclose(memory.hidden("train", torch.arange(10)), recomputed, atol=1e-6)
    assert torch.equal(disk.hidden("train", ids), memory.hidden("train", ids))
    saved = TrunkCache.load(memory.save(tmp_path / "saved"), expected=memory.fingerprint)
    assert torch.equal(saved.hidden("eval", torch.arange(3)), memory.hidden("eval", torch.arange(3)))


def test_the_budget_is_checked_and_logged_before_building(tmp_path, caplog):
    rack = tiny_rack(stack_sizes=[1, 1])
    data = {"train": synthetic_blocks(40), "eval": synthetic_blocks(8, seed=1)}
    size = 48 * 16 * 32 * 4
    cache = TrunkCache(size - 1, tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="stackwise_hf.training.trunk_cache"):
        with pytest.raises(ValueError, match=rf"needs 96.0 KiB \({size} bytes.*trunk_cache_budget=96.0 KiB"):
            cache.sync(_module(rack), CausalLMObjective(), 1, data)
    assert "96.0 KiB" in caplog.text and cache.stack_passes == []
    assert not (tmp_path / "cache" / "train").exists()
    assert TrunkCache(size).sync(_module(rack), CausalLMObjective(), 1, data).bytes == size


def test_depth_as_time_rebuilds_the_cache_at_each_stage(tmp_path):
    stages = _stages("cache", "depth_as_time", n=3, steps=2)
    trainer = _trainer(tmp_path, stages, masked=True)
    trainer.train()
    records = _cache_records(trainer)
    # The mask ratio changes with the stage, so the trunk's input does: never extended, rebuilt.
    assert [r["action"] for r in records] == ["skipped", "built", "built"]
    assert "inputs changed" in records[2]["reason"] and records[2]["stacks_run"] == [0, 1]


@pytest.mark.parametrize("split, shard", [("train", "../outside.safetensors"), ("../train", "hidden-0.safetensors"),
                                          ("train", "/etc/passwd"), ("train", 7)])
def test_a_cache_manifest_naming_paths_outside_its_folder_is_refused(tmp_path, split, shard):
    manifest = {"format_version": FORMAT_VERSION, "fingerprint": {"stacks": []},
                "splits": {split: {"shards": [{"file": shard, "start": 0, "stop": 1}], "rows": 1, "dtype": "float32"}}}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CorruptCacheError, match="not a plain file name inside the cache folder"):
        TrunkCache(directory=tmp_path)


def test_a_cache_of_an_unknown_version_is_not_read(tmp_path, caplog):
    (tmp_path / MANIFEST).write_text(json.dumps({"format_version": 99, "fingerprint": {}, "splits": {}}))
    with pytest.raises(StaleCacheError, match="no trunk cache manifest"):
        TrunkCache.load(tmp_path)
    assert "format_version 99; this library supports [1]" in caplog.text
