import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, LlamaConfig, LlamaForCausalLM

from stackwise_hf import StackWiseConfig, StackWiseForCausalLM, StackWiseForMaskedLM, StackWiseModel
from stackwise_hf.llama_interop import from_llama, to_llama
from tiny import tiny_config, tiny_mlm_rack, tiny_rack, tokens


@pytest.mark.parametrize("tie", [False, True])
def test_parity_with_hf_llama_both_ways(tie):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=tie, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        )
    ).eval()
    x = tokens(2, 16)
    rack = from_llama(llama, stack_sizes=[1, 3]).eval()
    assert rack.config.stack_sizes == [1, 3] and rack.config.rope_theta == 500.0
    torch.testing.assert_close(rack(x).logits, llama(x).logits, rtol=0, atol=1e-5)
    back = to_llama(rack).eval()
    assert isinstance(back, LlamaForCausalLM) and back.config.num_hidden_layers == 4
    torch.testing.assert_close(back(x).logits, llama(x).logits, rtol=0, atol=1e-5)


def test_from_llama_rejects_what_a_rack_cannot_express():
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, attention_bias=True))
    with pytest.raises(ValueError, match="attention_bias=True"):
        from_llama(llama)
    llama.config.attention_bias = False
    with pytest.raises(ValueError, match=r"sums to 3.*2 layers"):
        from_llama(llama, stack_sizes=[1, 2])


def test_generation_with_and_without_kv_cache_is_equal():
    rack = tiny_rack(stack_dtypes=["float32", "bfloat16"])
    prompt = tokens(2, 5)
    cached = rack.generate(prompt, max_new_tokens=8, do_sample=False)
    uncached = rack.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (2, 13)
    assert torch.equal(cached, uncached)


def test_incremental_decoding_matches_full_forward():
    rack = tiny_rack()
    x = tokens(1, 10)
    full = rack(x, use_cache=False).logits
    out = rack(x[:, :6], use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    step = rack(x[:, 6:], cache=cache, use_cache=True).logits  # a 4-token chunk after a 6-token prefix
    torch.testing.assert_close(step, full[:, 6:], rtol=0, atol=1e-5)


def test_left_padded_batch_generates_like_unpadded():
    rack = tiny_rack()
    batch = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    padded = rack.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False)
    alone = rack.generate(batch[:1, 2:], max_new_tokens=4, do_sample=False)
    assert torch.equal(padded[0, 5:], alone[0, 3:])


def test_causal_vs_bidirectional_attention():
    x = tokens(1, 8)
    later = x.clone()
    later[0, -1] = (later[0, -1] + 1) % 96
    causal = tiny_rack()
    assert torch.equal(causal(x).logits[:, :-1], causal(later).logits[:, :-1])
    mlm = tiny_mlm_rack()
    assert not torch.allclose(mlm(x).logits[:, 0], mlm(later).logits[:, 0])


def test_heads_require_matching_attention_mode():
    with pytest.raises(ValueError, match="attention_mode='causal'"):
        StackWiseForCausalLM(tiny_config(attention_mode="bidirectional"))
    with pytest.raises(ValueError, match="attention_mode='bidirectional'"):
        StackWiseForMaskedLM(tiny_config())


def test_masked_lm_loss_only_on_labelled_positions():
    rack = tiny_mlm_rack()
    x = tokens(2, 8)
    labels = torch.full_like(x, -100)
    labels[:, 3] = x[:, 3]
    out = rack(x, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[:, 3], x[:, 3])
    torch.testing.assert_close(out.loss, expected)


def test_per_stack_dtype_and_activation_casts():
    rack = tiny_rack(stack_sizes=[1, 1, 1], stack_dtypes=["float32", "bfloat16", "float16"])
    assert [s.dtype for s in rack.model.stacks] == [torch.float32, torch.bfloat16, torch.float16]
    logits = rack(tokens()).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_module_paths_follow_llama_names():
    rack = tiny_rack()
    names = {n for n, _ in rack.named_modules()}
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert f"model.stacks.1.blocks.0.{proj}" in names


def test_auto_classes_are_registered():
    config = tiny_config()
    assert type(AutoConfig.for_model("stackwise", hidden_size=32, num_attention_heads=4)) is StackWiseConfig
    assert type(AutoModel.from_config(config)) is StackWiseModel
    assert type(AutoModelForCausalLM.from_config(config)) is StackWiseForCausalLM
    assert type(AutoModelForMaskedLM.from_config(tiny_config(attention_mode="bidirectional"))) is StackWiseForMaskedLM


def test_gradient_checkpointing_gives_the_same_gradients():
    x = tokens(2, 12)
    grads = []
    for checkpointing in (False, True):
        rack = tiny_rack().train()
        if checkpointing:
            # transformers 5.24 renamed gradient_checkpointing_enable; 5.17 only has the old name.
            enable = getattr(rack, "activation_checkpointing_enable", None) or rack.gradient_checkpointing_enable
            enable()
            assert all(s.gradient_checkpointing for s in rack.model.stacks)
        rack(x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in rack.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=1e-6)


def test_checkpointed_stack_trains_over_a_frozen_trunk():
    rack = tiny_rack().train()
    rack.freeze_stacks([0])
    rack.model.stacks[1].gradient_checkpointing = True
    x = tokens(2, 12)
    rack(x, labels=x).loss.backward()
    assert rack.model.stacks[0].blocks[0].mlp.up_proj.weight.grad is None
    assert rack.model.stacks[1].blocks[0].mlp.up_proj.weight.grad.abs().sum() > 0
