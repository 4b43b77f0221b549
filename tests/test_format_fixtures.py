"""Racks saved by an earlier version (tests/fixtures/racks_v1, written at commit 1b50e34 by
tests/fixtures/make_racks.py) still load, bit-exact: the on-disk format is a contract.

Weights are compared exactly. Logits are compared with atol 1e-5: the fixtures' logits were computed on
one CPU, and a matmul kernel may sum in another order on another CPU (ISA, thread count)."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from stackwise_hf import StackWiseConfig, StackWiseForCausalLM
from stackwise_hf.quantization import backend_available, quantized_stacks

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "racks_v1")
SHAPE = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
             max_position_embeddings=32)
needs_torchao = pytest.mark.skipif(backend_available("torchao") is not None, reason=str(backend_available("torchao")))


def _expected(name):
    return load_file(os.path.join(FIXTURES, name))


def _plain_state(rack) -> dict:
    out = {}
    for name, tensor in rack.state_dict().items():
        if type(tensor).__module__.startswith("torchao"):
            out[f"{name}:qdata"], out[f"{name}:scale"] = tensor.qdata, tensor.scale
        elif "rotary_emb" not in name:
            out[name] = tensor
    return out


def _assert_same_state(rack, expected: dict) -> None:
    state = _plain_state(rack)
    assert sorted(state) == sorted(expected)
    for key, tensor in expected.items():
        assert state[key].dtype == tensor.dtype, key
        assert torch.equal(state[key], tensor), key


def _copy(tmp_path, name):
    # Loading must not need to write, but work on a copy so a faulty reader cannot damage the fixtures.
    return shutil.copytree(os.path.join(FIXTURES, name), tmp_path / name)


def test_a_rack_saved_with_save_pretrained_loads_bit_exact(tmp_path):
    path = _copy(tmp_path, "pretrained")
    rack = StackWiseForCausalLM.from_pretrained(path).eval()
    assert rack.config.stack_sizes == [1, 2] and rack.config.stack_dtypes == ["float32", "bfloat16"]
    _assert_same_state(rack, _expected("expected_pretrained_state.safetensors"))
    logits = _expected("expected_logits.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(rack(logits["input_ids"]).logits, logits["pretrained"], rtol=0, atol=1e-5)


def test_a_saved_stack_loads_bit_exact(tmp_path):
    path = _copy(tmp_path, "stack1")
    rack = StackWiseForCausalLM(StackWiseConfig(**SHAPE, stack_sizes=[2, 2])).eval()
    rack.load_stack(0, path)
    expected = _expected("expected_pretrained_state.safetensors")
    for key, tensor in rack.model.stacks[0].state_dict().items():
        want = expected[f"model.stacks.1.{key}"]
        assert tensor.dtype == want.dtype and torch.equal(tensor, want), key
    assert rack.config.stack_dtypes[0] == "bfloat16"


@needs_torchao
@pytest.mark.filterwarnings("ignore:TorchaoLoraLinear was instantiated")
def test_a_rack_saved_with_save_rack_loads_bit_exact_with_adapters_and_int8_stack(tmp_path):
    path = _copy(tmp_path, "rack")
    rack = StackWiseForCausalLM(StackWiseConfig(**SHAPE, stack_sizes=[2])).eval()
    rack.load_rack(path)
    assert rack.config.stack_sizes == [1, 1, 1]
    assert quantized_stacks(rack) == {0: {"bits": 8, "backend": "torchao", "scheme": "int8"}}
    assert sorted(rack.peft_config) == ["stack_2", "trunk"]
    assert [r["name"] for r in rack._merged_adapters] == ["stack_1"]
    trainable = sorted({n.split(".lora_")[1].split(".")[1] for n, p in rack.named_parameters()
                        if ".lora_" in n and p.requires_grad})
    assert trainable == ["stack_2"]
    _assert_same_state(rack, _expected("expected_rack_state.safetensors"))
    logits = _expected("expected_logits.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(rack(logits["input_ids"]).logits, logits["rack"], rtol=0, atol=1e-5)
