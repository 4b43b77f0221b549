import pytest
import torch

from stackwise_hf import StackWiseForCausalLM
from tiny import state_dicts_equal, tiny_mlm_rack, tiny_rack, tokens


@pytest.mark.parametrize("position", ["append", "prepend"])
def test_identity_growth_leaves_logits_unchanged(position):
    rack = tiny_rack()
    x = tokens()
    before = rack(x).logits
    grow = rack.append_stack if position == "append" else rack.prepend_stack
    index = grow(2, init="identity")
    assert index == (2 if position == "append" else 0)
    assert rack.config.stack_sizes == ([2, 1, 2] if position == "append" else [2, 2, 1])
    torch.testing.assert_close(rack(x).logits, before, rtol=0, atol=1e-6)


def test_identity_growth_of_a_masked_rack():
    rack = tiny_mlm_rack()
    x = tokens()
    before = rack(x).logits
    rack.append_stack(1, init="identity")
    torch.testing.assert_close(rack(x).logits, before, rtol=0, atol=1e-6)


def test_copy_init_copies_the_neighbouring_blocks():
    rack = tiny_rack(stack_sizes=[1, 2])
    rack.append_stack(3, init="copy")
    last, new = rack.model.stacks[1], rack.model.stacks[2]
    # Blocks nearest the output are copied, cycling when the new stack is deeper.
    for j, src in enumerate([1, 0, 1]):
        assert state_dicts_equal(new.blocks[j].state_dict(), last.blocks[src].state_dict())
    rack.prepend_stack(1, init="copy")
    assert state_dicts_equal(rack.model.stacks[0].blocks[0].state_dict(), rack.model.stacks[1].blocks[0].state_dict())


def test_growth_renumbers_kv_cache_slots_and_generation_still_matches():
    rack = tiny_rack()
    rack.prepend_stack(1, init="random", dtype="bf16")
    slots = [b.self_attn.layer_idx for s in rack.model.stacks for b in s.blocks]
    assert slots == list(range(rack.config.num_hidden_layers))
    prompt = tokens(1, 4)
    assert torch.equal(
        rack.generate(prompt, max_new_tokens=5, do_sample=False),
        rack.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False),
    )


def test_grown_rack_round_trips_through_save_pretrained(tmp_path):
    rack = tiny_rack()
    rack.append_stack(2, init="random", precision="half")
    rack.prepend_stack(1, precision="bfloat16")
    rack.save_pretrained(tmp_path)
    loaded = StackWiseForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.stack_sizes == [1, 2, 1, 2]
    assert loaded.config.stack_dtypes == ["bfloat16", "float32", "float32", "float16"]
    assert state_dicts_equal(loaded.state_dict(), rack.state_dict())


def test_new_stack_dtype_defaults_to_its_neighbour():
    rack = tiny_rack(stack_dtypes=["float32", "bfloat16"])
    rack.append_stack(1)
    assert rack.model.stacks[2].dtype == torch.bfloat16 and rack.config.stack_dtypes[2] == "bfloat16"


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(n_blocks=0), "`n_blocks`"),
        (dict(n_blocks=1, init="zeros"), "`init`"),
        (dict(n_blocks=1, dtype="int4"), "int4"),
        (dict(n_blocks=1, dtype="float32", precision="half"), "not both"),
    ],
)
def test_bad_growth_arguments(kwargs, error):
    rack = tiny_rack()
    with pytest.raises(ValueError, match=error):
        rack.append_stack(**kwargs)
    assert rack.num_stacks == 2


def test_freeze_and_unfreeze_and_info():
    rack = tiny_rack()
    rack.freeze_stacks([0])
    info = rack.get_rack_info()
    assert info["current_stacks"] == 2 and info["total_blocks"] == 3
    assert [s["trainable"] for s in info["stack_info"]] == [False, True]
    assert info["stack_info"][0]["trainable_parameters"] == 0
    assert info["stack_info"][1]["precision"] == "full"
    assert info["total_parameters"] == sum(p.numel() for p in rack.parameters())
    rack.unfreeze_stacks()
    assert all(p.requires_grad for p in rack.parameters())
    with pytest.raises(IndexError, match=r"stack index 5 does not exist.*valid: 0..1"):
        rack.freeze_stacks([5])
    with pytest.raises(IndexError, match="stack index 2"):
        rack.get_stack_info(2)
