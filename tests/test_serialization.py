import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from stackwise_hf import CorruptFileError, ShapeMismatchError, StackWiseForCausalLM
from stackwise_hf.serialization import INDEX_NAME, check_shard
from tiny import state_dicts_equal, tiny_rack, tokens


def _shards(directory):
    return sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))


def _index(directory):
    return json.loads((directory / INDEX_NAME).read_text())


@pytest.fixture
def saved(tmp_path):
    rack = tiny_rack(stack_sizes=[2, 1, 2], stack_dtypes=["float32", "bfloat16", "float16"])
    rack.save_pretrained(tmp_path, max_shard_size="20KB")
    return rack, tmp_path


def test_forced_multi_shard_save_is_bit_exact_and_loads_with_auto(saved):
    rack, path = saved
    assert len(_shards(path)) > 5
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert type(loaded) is StackWiseForCausalLM
    assert state_dicts_equal(loaded.state_dict(), rack.state_dict())
    x = tokens()
    assert torch.equal(loaded(x).logits, rack(x).logits)


def test_shards_never_mix_stacks_and_index_lists_them(saved):
    _, path = saved
    index = _index(path)
    owners = {}
    for key, filename in index["weight_map"].items():
        owner = key.split(".")[2] if ".stacks." in key else "rack"
        owners.setdefault(filename, set()).add(owner)
    assert all(len(o) == 1 for o in owners.values())
    stacks = index["metadata"]["stacks"]
    assert [stacks[str(i)]["num_blocks"] for i in range(3)] == [2, 1, 2]
    assert stacks["1"]["dtype"] == "bfloat16"
    for i in range(3):
        assert all(f.startswith(f"model-stack{i:03d}") for f in stacks[str(i)]["files"])


def test_tied_weights_are_stored_once(tmp_path):
    rack = tiny_rack(tie_word_embeddings=True)
    rack.save_pretrained(tmp_path)
    keys = _index(tmp_path)["weight_map"]
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    loaded = StackWiseForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded(tokens()).logits, rack(tokens()).logits)


def test_load_stack_from_rack_dir_reads_only_that_stacks_files(saved):
    rack, path = saved
    index = _index(path)
    for i in (0, 2):  # delete every shard but stack 1's
        for f in index["metadata"]["stacks"][str(i)]["files"]:
            os.remove(path / f)
    for f in {v for k, v in index["weight_map"].items() if ".stacks." not in k}:
        os.remove(path / f)
    target = tiny_rack(seed=7, stack_sizes=[2, 1, 2])
    assert target.load_stack(1, path) is True
    assert state_dicts_equal(target.model.stacks[1].state_dict(), rack.model.stacks[1].state_dict())
    assert target.model.stacks[1].dtype == torch.bfloat16 and target.config.stack_dtypes[1] == "bfloat16"


def test_save_stack_and_load_into_another_index(tmp_path):
    rack = tiny_rack(stack_sizes=[2, 2])
    out = rack.save_stack(0, tmp_path / "stack_0.pt", max_shard_size="10KB")
    assert os.path.isdir(out) and all(f.startswith("model-stack000") for f in _shards(tmp_path / "stack_0.pt"))
    target = tiny_rack(seed=3, stack_sizes=[2, 2])
    target.load_stack(1, out)
    assert state_dicts_equal(target.model.stacks[1].state_dict(), rack.model.stacks[0].state_dict())


def test_stack_with_wrong_block_count_is_refused_and_nothing_changes(tmp_path):
    rack = tiny_rack(stack_sizes=[2, 1])
    rack.save_stack(0, tmp_path / "s0")
    before = {k: v.clone() for k, v in rack.state_dict().items()}
    with pytest.raises(ShapeMismatchError, match="has 2 blocks; the rack's stack has 1"):
        rack.load_stack(1, tmp_path / "s0")
    assert state_dicts_equal(rack.state_dict(), before)


def test_stack_with_wrong_shapes_names_the_tensor(tmp_path):
    tiny_rack(intermediate_size=48).save_stack(0, tmp_path / "s0")
    rack = tiny_rack()
    before = {k: v.clone() for k, v in rack.state_dict().items()}
    with pytest.raises(ShapeMismatchError, match=r"blocks\.0\.mlp\.\w+_proj\.weight.*\(48, 32\)|\(32, 48\)"):
        rack.load_stack(0, tmp_path / "s0")
    assert state_dicts_equal(rack.state_dict(), before)


def test_load_stack_index_errors(saved):
    rack, path = saved
    with pytest.raises(IndexError, match="stack index 3"):
        rack.load_stack(3, path)
    with pytest.raises(ShapeMismatchError, match="no stack 4"):
        rack.load_stack(0, path, source_stack=4)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        rack.load_stack(0, path / "nowhere")


def test_truncated_shard_is_named_before_loading(saved):
    _, path = saved
    shard = path / _index(path)["metadata"]["stacks"]["1"]["files"][0]
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(CorruptFileError, match=rf"{shard.name}.*truncated"):
        StackWiseForCausalLM.from_pretrained(path)
    with pytest.raises(CorruptFileError, match=shard.name):
        tiny_rack(stack_sizes=[2, 1, 2]).load_stack(1, path)


def test_garbage_shard_header(saved):
    _, path = saved
    shard = path / _shards(path)[0]
    shard.write_bytes(b"\x00" * 4)
    with pytest.raises(CorruptFileError, match=shard.name):
        check_shard(str(shard))


def test_missing_shard_and_index_naming_missing_file(saved):
    _, path = saved
    victim = _index(path)["metadata"]["stacks"]["2"]["files"][-1]
    os.remove(path / victim)
    with pytest.raises(FileNotFoundError, match=victim):
        StackWiseForCausalLM.from_pretrained(path)


def test_corrupt_index_is_named(saved):
    rack, path = saved
    (path / INDEX_NAME).write_text("{not json")
    with pytest.raises(CorruptFileError, match=INDEX_NAME):
        rack.load_stack(0, path)


def test_load_rack_weights_reshapes_to_saved_layout_and_refuses_other_architectures(tmp_path):
    source = tiny_rack(stack_sizes=[1, 1, 2], stack_dtypes=["float32", "bf16", "float32"])
    source.save_pretrained(tmp_path / "a")
    target = tiny_rack(seed=5)
    assert target.load_rack_weights(tmp_path / "a")
    assert target.config.stack_sizes == [1, 1, 2] and target.config.stack_dtypes[1] == "bfloat16"
    assert torch.equal(target(tokens()).logits, source(tokens()).logits)

    tiny_rack(hidden_size=64).save_pretrained(tmp_path / "b")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ShapeMismatchError, match="`hidden_size` is 64; this rack has 32"):
        target.load_rack_weights(tmp_path / "b")
    assert state_dicts_equal(target.state_dict(), before)


def test_resave_removes_stale_shards(tmp_path):
    rack = tiny_rack(stack_sizes=[1, 1, 1])
    rack.save_pretrained(tmp_path, max_shard_size="10KB")
    many = _shards(tmp_path)
    rack.save_pretrained(tmp_path)
    assert len(_shards(tmp_path)) == 4 < len(many)
    assert state_dicts_equal(StackWiseForCausalLM.from_pretrained(tmp_path).state_dict(), rack.state_dict())
