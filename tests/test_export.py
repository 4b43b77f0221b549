"""`stackwise export RACK OUT --to llama`: a plain Llama folder that transformers alone loads, in the dtype asked."""

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from stackwise_hf import adapters
from stackwise_hf.cli import main
from stackwise_hf.data import train_bpe_tokenizer
from stackwise_hf.llama_interop import export_dtype, to_llama

from tiny import tiny_rack

PROMPT = "to be or not"


@pytest.fixture(scope="module")
def mixed_rack_dir(tmp_path_factory):
    """A float32 rack whose stack 1 is bf16, saved with a tokenizer and an unmerged stack adapter."""
    tokenizer = train_bpe_tokenizer(["to be or not to be, that is the question"] * 4, vocab_size=300)
    rack = tiny_rack(vocab_size=320, initializer_range=0.2)  # wide enough weights for varied text
    rack.cast_stack(1, "bfloat16")
    adapters.add_stack_adapter(rack, 0, r=4)
    with torch.no_grad():  # a non-zero update, so a missing merge would change the text
        for name, param in rack.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    path = tmp_path_factory.mktemp("export") / "rack"
    rack.save_rack(path)
    tokenizer.save_pretrained(path)
    return path


def _greedy(model, tokenizer) -> str:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:])


def _rack_in(path, dtype: torch.dtype):
    """The rack as the export sees it (adapter merged), every stack cast to `dtype`."""
    rack = AutoModelForCausalLM.from_pretrained(path).eval()
    adapters.merge_stack_adapter(rack, "stack_0")
    for i in range(rack.num_stacks):
        rack.cast_stack(i, dtype)
    return rack.to(dtype)


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_export_gives_the_racks_greedy_text_in_plain_transformers(mixed_rack_dir, tmp_path, caplog, dtype):
    out = tmp_path / "llama"
    with caplog.at_level(logging.WARNING, logger="stackwise_hf"):
        assert main(["export", str(mixed_rack_dir), str(out), "--to", "llama"] + (["--dtype", dtype] if dtype else [])) == 0
    expected = torch.float32 if dtype is None else torch.bfloat16  # default: the widest dtype in the rack
    converted = "stack 1 (bfloat16)" if dtype is None else "embeddings (float32), stack 0 (float32)"
    assert any(converted in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]

    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "generation_config.json").is_file()
    llama = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers: a LlamaForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(llama) is LlamaForCausalLM
    assert {p.dtype for p in llama.parameters()} == {expected}

    rack = _rack_in(mixed_rack_dir, expected)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        # Same weights, same function: float32 agrees to float32 rounding; in bf16 the two models round
        # intermediate results in different places (one bf16 step at |logit| ~ 4 is 0.03).
        tolerance = 1e-5 if expected == torch.float32 else 0.1
        torch.testing.assert_close(llama(ids).logits, rack(ids).logits, atol=tolerance, rtol=0)
    assert _greedy(llama, tokenizer) == _greedy(rack, tokenizer)


def test_export_dtype_is_the_widest_in_the_rack():
    rack = tiny_rack()
    assert export_dtype(rack) == torch.float32
    rack.to(torch.bfloat16)
    assert export_dtype(rack) == torch.bfloat16
    rack.cast_stack(1, "float16")
    assert export_dtype(rack) == torch.float32  # bf16 and fp16: neither holds the other


def test_to_llama_names_a_bad_dtype_and_unmerged_adapters():
    rack = tiny_rack()
    with pytest.raises(ValueError, match=r"dtype 'int8'.*allowed dtypes are \['float32', 'bfloat16', 'float16'\]"):
        to_llama(rack, "int8")
    adapters.add_stack_adapter(rack, 1, r=2)
    with pytest.raises(ValueError, match="unmerged adapter weights"):
        to_llama(rack)
