"""Document-aware packing (stackwise_hf/packing.py): position ids, block-diagonal masks, the packer, and
that a packed document computes what it computes alone, in the rack, the stage module and the trunk cache."""

import doctest

import numpy as np
import pytest
import torch

from stackwise_hf import packing
from stackwise_hf.packing import BlockPacker, DocumentMasking, document_attention_mask, document_position_ids
from stackwise_hf.training.objectives import CausalLMObjective
from stackwise_hf.training.stage import StageModule
from stackwise_hf.training.trunk_cache import TrunkCache
from tiny import tiny_mlm_rack, tiny_rack

EOS = 0
# Fp32 on one thread. SDPA with an explicit mask and SDPA alone (is_causal) sum the same terms, but in
# kernels that may order them differently: equal up to float rounding, not bit for bit.
TOL = dict(rtol=1e-5, atol=1e-5)


def _docs():
    first = torch.tensor([5, 6, 7, 8, 9, EOS])  # each document ends with the separator, as packed
    second = torch.tensor([10, 11, 12, EOS])
    return first, second


def test_position_ids_restart_after_each_separator_and_at_the_block_start():
    ids = torch.tensor([[4, EOS, 5, 6, EOS, 7], [8, 9, 10, 11, 12, 13]])
    assert document_position_ids(ids, EOS).tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]


def test_mask_is_block_diagonal_and_causal_inside_documents():
    positions = torch.tensor([[0, 1, 0, 1, 2]])
    causal = document_attention_mask(positions, causal=True)[0, 0].int()
    assert causal.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    both_ways = document_attention_mask(positions, causal=False)[0, 0].int()
    assert both_ways.tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1]]


def test_one_document_per_block_needs_no_mask():
    masking = DocumentMasking(EOS, causal=True)
    assert masking.model_inputs(torch.tensor([[4, 5, 6, EOS], [EOS, 7, 8, 9]])[:1]) == {}
    assert set(masking.model_inputs(torch.tensor([[4, EOS, 6, 7]]))) == {"position_ids", "attention_mask"}


def test_causal_labels_do_not_cross_a_document_start():
    masking = DocumentMasking(EOS, causal=True)
    ids = torch.tensor([[4, 5, EOS, 6, 7]])
    inputs = masking.model_inputs(ids)
    # Label t+1 is predicted at t: the first token of the second document (index 3) is no target of the EOS.
    assert masking.labels(ids, inputs).tolist() == [[-100, 5, EOS, -100, 7]]
    assert DocumentMasking(EOS, causal=False).labels(ids, inputs).tolist() == ids.tolist()


def test_packed_documents_give_the_logits_they_give_alone():
    rack = tiny_rack(stack_sizes=[2, 1])
    first, second = _docs()
    packed = torch.cat([first, second])[None]
    inputs = DocumentMasking(EOS, causal=True).model_inputs(packed)
    with torch.no_grad():
        logits = rack(packed, use_cache=False, **inputs).logits[0]
        alone = [rack(doc[None], use_cache=False).logits[0] for doc in (first, second)]
        unmasked = rack(packed, use_cache=False).logits[0]
    torch.testing.assert_close(logits[: len(first)], alone[0], **TOL)
    torch.testing.assert_close(logits[len(first):], alone[1], **TOL)
    # Without the mask the second document sees the first (the invariant above is not vacuous).
    assert not torch.allclose(unmasked[len(first):], alone[1], **TOL)


def test_packed_documents_alone_under_bidirectional_attention():
    rack = tiny_mlm_rack(stack_sizes=[1, 1])
    first, second = _docs()
    packed = torch.cat([first, second])[None]
    inputs = DocumentMasking(EOS, causal=False).model_inputs(packed)
    with torch.no_grad():
        logits = rack(packed, **inputs).logits[0]
        alone = [rack(doc[None]).logits[0] for doc in (first, second)]
    torch.testing.assert_close(logits[: len(first)], alone[0], **TOL)
    torch.testing.assert_close(logits[len(first):], alone[1], **TOL)


def test_stage_module_loss_of_a_packed_block_is_the_loss_of_its_documents():
    rack = tiny_rack(stack_sizes=[1, 1])
    first, second = _docs()
    packed = torch.cat([first, second])[None]
    masking = DocumentMasking(EOS, causal=True)
    inputs = masking.model_inputs(packed)
    module = StageModule(rack, CausalLMObjective(), first_trained=1)
    with torch.no_grad():
        loss, count = module(packed, masking.labels(packed, inputs), **inputs)
        parts = [module(doc[None], doc[None]) for doc in (first, second)]
    assert int(count) == sum(int(n) for _, n in parts) == len(first) - 1 + len(second) - 1
    expected = sum(float(l) * int(n) for l, n in parts) / int(count)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_trunk_cache_keeps_documents_apart_like_the_recomputed_trunk():
    rack = tiny_rack(stack_sizes=[2, 1])
    first, second = _docs()
    blocks = [{"input_ids": torch.cat([first, second])}, {"input_ids": torch.cat([second, first])}]
    masking = DocumentMasking(EOS, causal=True)
    module = StageModule(rack, CausalLMObjective(), first_trained=1)
    cache = TrunkCache(budget="1MB", batch_size=1)
    report = cache.sync(module, CausalLMObjective(), 1, {"train": blocks, "eval": blocks[:1]}, documents=masking)
    assert report.action == "built" and cache.fingerprint["documents"] == [EOS, True]
    ids = torch.stack([b["input_ids"] for b in blocks])
    expected = module.trunk_forward(ids, **masking.model_inputs(ids))
    torch.testing.assert_close(cache.hidden("train", torch.arange(2)), expected, **TOL)
    # The same cache without document masking is another cache.
    assert cache.sync(module, CausalLMObjective(), 1, {"train": blocks, "eval": blocks[:1]}).action == "built"


def test_block_packer_appends_the_separator_and_carries_the_rest():
    packer = BlockPacker(block_size=4, separator_id=EOS)
    assert packer.add([1, 2]) == []
    blocks = packer.add([3, 4, 5, 6, 7])
    assert [b.tolist() for b in blocks] == [[1, 2, EOS, 3], [4, 5, 6, 7]]
    assert packer.carry.tolist() == [EOS]
    assert packer.add([]) == []  # a blank document adds nothing, not even a separator
    assert packer.carry.tolist() == [EOS]
    other = BlockPacker(block_size=4, separator_id=EOS)
    other.set_carry(np.array([9]))
    assert [b.tolist() for b in other.add([8, 7])] == [[9, 8, 7, EOS]]
    with pytest.raises(ValueError, match="fewer than block_size=4 tokens; got 4"):
        other.set_carry(np.arange(4))


def test_docstring_example_runs():
    assert doctest.testmod(packing, raise_on_error=True).attempted > 0
