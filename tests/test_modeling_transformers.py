"""The rack as a transformers user meets it: outputs, attention backends, caches, RoPE types, losses,
checkpointing, loading options. Each test pins one behaviour that transformers' own decoders have."""

import warnings

import pytest
import torch
import transformers.integrations.flex_attention
import transformers.masking_utils
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from stackwise_hf import StackWiseConfig, StackWiseForCausalLM, StackWiseModel
from stackwise_hf.llama_interop import from_llama
from stackwise_hf.modeling_stackwise import _CACHE_FIELD, stack_hidden_states
from tiny import tiny_config, tiny_rack, tokens

# fp32 on CPU: the backends sum in different orders, so outputs agree to float32 rounding, not bit for bit.
BACKEND_ATOL = 1e-5


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    fields = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    fields.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**fields)).eval()


# Outputs ----------------------------------------------------------------------------------------------


def test_hidden_states_are_per_layer_like_llama_with_a_per_stack_view():
    llama = tiny_llama(attn_implementation="eager")
    rack = from_llama(llama, stack_sizes=[2, 1]).eval()
    x = tokens(2, 10)
    ours = rack(x, output_hidden_states=True).hidden_states
    theirs = llama(x, output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs) == 4  # layers + 1
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    per_stack = stack_hidden_states(ours, rack.config.stack_sizes)
    assert len(per_stack) == 3 and per_stack[1] is ours[2] and per_stack[2] is ours[3]


def test_config_flags_are_honoured_and_tuples_come_back():
    rack = tiny_rack()
    x = tokens(1, 6)
    rack.config.output_hidden_states = True
    assert len(rack(x).hidden_states) == rack.config.num_hidden_layers + 1
    rack.config.output_hidden_states = False
    as_tuple = rack(x, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], rack(x).logits)
    rack.config.return_dict = False
    assert isinstance(rack(x), tuple) and isinstance(rack.model(x), tuple)
    labelled = rack(x, labels=x, use_cache=False)
    assert len(labelled) == 2 and labelled[0].ndim == 0  # (loss, logits), Nones dropped as transformers does


def test_eager_attention_returns_llamas_attention_weights():
    llama = tiny_llama(attn_implementation="eager")
    rack = from_llama(llama, stack_sizes=[1, 2]).eval()
    rack.set_attn_implementation("eager")
    x = tokens(2, 9)
    ours = rack(x, output_attentions=True).attentions
    theirs = llama(x, output_attentions=True).attentions
    assert len(ours) == 3 and ours[0].shape == (2, 4, 9, 9)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert torch.triu(ours[0][0, 0], diagonal=1).abs().max() == 0  # causal


# Attention backends ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _flex_attention_uncompiled(monkeypatch):
    # transformers compiles flex attention once per shape (tens of seconds each on CPU); uncompiled, torch runs
    # the same scores and masks through its reference implementation, which is what these tests check.
    def uncompiled(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    def uncompiled_block_mask(*args, _compile=False, **kwargs):
        return create_block_mask(*args, **kwargs)

    monkeypatch.setattr(transformers.integrations.flex_attention, "compile_friendly_flex_attention", uncompiled)
    monkeypatch.setattr(transformers.masking_utils, "create_block_mask", uncompiled_block_mask)


def _rack_with(implementation: str, **overrides) -> StackWiseForCausalLM:
    torch.manual_seed(0)
    return StackWiseForCausalLM(tiny_config(attn_implementation=implementation, **overrides)).eval()


@pytest.mark.parametrize("implementation", ["sdpa", "flex_attention"])
@torch.no_grad()  # torch's flex attention has no backward on CPU
def test_backends_match_eager_with_padding_and_the_kv_cache(implementation):
    eager, other = _rack_with("eager", stack_dtypes=["float32", "float32"]), _rack_with(implementation)
    assert other.config._attn_implementation == implementation
    x = tokens(2, 10)
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # left padding
    torch.testing.assert_close(other(x).logits, eager(x).logits, rtol=0, atol=BACKEND_ATOL)
    real = mask.bool()  # a padded query's output is arbitrary and differs between backends by design
    padded_other, padded_eager = other(x, attention_mask=mask).logits, eager(x, attention_mask=mask).logits
    torch.testing.assert_close(padded_other[real], padded_eager[real], rtol=0, atol=BACKEND_ATOL)
    # The per-stack KV cache: a prefix, then a 4-token chunk, equals the full forward in each backend.
    full = other(x, use_cache=False).logits
    prefix = other(x[:, :6], use_cache=True)
    step = other(x[:, 6:], cache=getattr(prefix, _CACHE_FIELD), use_cache=True).logits
    torch.testing.assert_close(step, full[:, 6:], rtol=0, atol=BACKEND_ATOL)
    assert torch.equal(
        other.generate(x[:, :4], max_new_tokens=5, do_sample=False),
        eager.generate(x[:, :4], max_new_tokens=5, do_sample=False),
    )


def test_flash_attention_2_is_accepted_where_the_kernel_is_installed():
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available() and torch.cuda.is_available():
        rack = _rack_with("flash_attention_2", stack_dtypes=["bfloat16", "bfloat16"]).cuda()
        assert rack.config._attn_implementation == "flash_attention_2"
        assert torch.isfinite(rack(tokens(2, 8).cuda()).logits).all()
    else:  # transformers refuses it with its own message naming the missing package
        with pytest.raises(ImportError, match="FlashAttention2|flash_attn"):
            _rack_with("flash_attention_2")


@torch.no_grad()
def test_caller_4d_mask_and_restarting_positions_keep_packed_documents_apart():
    # Two documents packed in one row (lengths 5 and 7) must give what each gives alone.
    x = tokens(1, 12)
    docs = torch.tensor([0] * 5 + [1] * 7)
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None]
    block_diagonal = (docs[:, None] == docs[None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()
    for implementation in ("eager", "sdpa", "flex_attention"):
        rack = _rack_with(implementation)
        alone = torch.cat([rack(x[:, :5]).logits, rack(x[:, 5:]).logits], dim=1)
        with_mask = rack(x, attention_mask=block_diagonal[None, None], position_ids=position_ids).logits
        torch.testing.assert_close(with_mask, alone, rtol=0, atol=BACKEND_ATOL)
        # transformers reads packing from positions only without a KV cache (as in training).
        from_positions = rack(x, position_ids=position_ids, use_cache=False).logits
        torch.testing.assert_close(from_positions, alone, rtol=0, atol=BACKEND_ATOL)


# Caches and generation ---------------------------------------------------------------------------------


def test_static_and_dynamic_caches_generate_the_same_text():
    rack = tiny_rack(stack_dtypes=["float32", "bfloat16"])
    prompt = tokens(2, 5)
    dynamic = rack.generate(prompt, max_new_tokens=6, do_sample=False)
    static = rack.generate(prompt, max_new_tokens=6, do_sample=False, cache_implementation="static")
    uncached = rack.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(dynamic, static) and torch.equal(dynamic, uncached)


def test_past_key_values_keyword_still_works_and_warns_where_renamed():
    rack = tiny_rack()
    x = tokens(1, 6)
    cache = getattr(rack(x[:, :4], use_cache=True), _CACHE_FIELD)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = rack(x[:, 4:], past_key_values=cache, use_cache=True).logits
    renamed = [w for w in caught if issubclass(w.category, FutureWarning) and "past_key_values" in str(w.message)]
    assert len(renamed) == (1 if _CACHE_FIELD == "cache" else 0)
    torch.testing.assert_close(step, rack(x, use_cache=False).logits[:, 4:], rtol=0, atol=1e-5)


# RoPE types: the same logits as Llama with the same rope_parameters ----------------------------------------

HEAD_HALF = 4  # head_dim 8 -> 4 frequencies
ROPE_TYPES = {
    "default": {"rope_type": "default", "rope_theta": 500.0},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "rope_theta": 10000.0},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3], "long_factor": [2.0, 2.5, 3.0, 3.5],
                 "original_max_position_embeddings": 8, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8, "rope_theta": 10000.0},
}


@pytest.mark.parametrize("rope_type", sorted(ROPE_TYPES))
def test_rope_types_give_llamas_logits(rope_type):
    # 16 positions with max_position_embeddings=12: past the original length, where dynamic/longrope switch.
    llama = tiny_llama(rope_parameters=dict(ROPE_TYPES[rope_type]), max_position_embeddings=12)
    rack = from_llama(llama, stack_sizes=[2, 1]).eval()
    assert rack.config.rope_parameters["rope_type"] == rope_type
    x = tokens(2, 16)
    torch.testing.assert_close(rack(x).logits, llama(x).logits, rtol=0, atol=1e-5)
    short = x[:, :6]
    torch.testing.assert_close(rack(short).logits, llama(short).logits, rtol=0, atol=1e-5)
    if rope_type != "default":  # the scaling is not silently ignored
        plain = StackWiseForCausalLM(StackWiseConfig(**{**rack.config.to_dict(), "rope_parameters": None,
                                                         "rope_theta": 10000.0}))
        plain.load_state_dict(rack.state_dict())
        assert not torch.allclose(plain.eval()(x).logits, rack(x).logits, atol=1e-4)


# Loss and training ----------------------------------------------------------------------------------------


def test_shift_labels_give_the_same_loss_as_labels():
    rack = tiny_rack()
    x = tokens(2, 10)
    from_labels = rack(x, labels=x).loss
    shifted = torch.cat([x[:, 1:], torch.full((2, 1), -100)], dim=1)
    torch.testing.assert_close(rack(x, shift_labels=shifted).loss, from_labels, rtol=0, atol=1e-6)
    torch.testing.assert_close(rack(x, labels=x, shift_labels=shifted).loss, from_labels, rtol=0, atol=1e-6)
    assert not torch.allclose(rack(x, shift_labels=x).loss, from_labels)  # unshifted: a different target


def test_blocks_are_checkpointing_layers_enabled_the_transformers_way():
    x = tokens(2, 12)
    reference = tiny_rack().train()
    reference(x, labels=x).loss.backward()
    rack = tiny_rack().train()
    assert all(isinstance(b, GradientCheckpointingLayer) for s in rack.model.stacks for b in s.blocks)
    rack.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    blocks = [b for s in rack.model.stacks for b in s.blocks]
    assert all(b.gradient_checkpointing for b in blocks) and rack.get_stack_info(0)["gradient_checkpointing"]
    calls = []
    for block in blocks:  # count calls of what transformers installed, and with which options
        installed = block._gradient_checkpointing_func
        block._gradient_checkpointing_func = lambda fn, *a, f=installed: calls.append(f.keywords) or f(fn, *a)
    rack(x, labels=x).loss.backward()
    assert calls == [{"use_reentrant": False}] * len(blocks)
    for name, param in reference.named_parameters():
        torch.testing.assert_close(dict(rack.named_parameters())[name].grad, param.grad, rtol=0, atol=1e-6)
    rack.gradient_checkpointing_disable()
    assert not any(s.gradient_checkpointing for s in rack.model.stacks)


# Loading ------------------------------------------------------------------------------------------------------


def test_saved_extra_config_attributes_round_trip(tmp_path):
    rack = tiny_rack()
    rack.config.my_flag = 1
    rack.save_pretrained(tmp_path)
    assert StackWiseForCausalLM.from_pretrained(tmp_path).config.my_flag == 1


def test_output_loading_info_and_a_state_dict_without_a_path(tmp_path):
    rack = tiny_rack(stack_dtypes=["float32", "bfloat16"])
    rack.save_pretrained(tmp_path)
    loaded, info = StackWiseForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(loaded, StackWiseForCausalLM) and info["missing_keys"] == set() == info["unexpected_keys"]
    assert loaded.model.stacks[1].dtype == torch.bfloat16
    x = tokens(1, 6)
    from_memory = StackWiseForCausalLM.from_pretrained(None, config=rack.config, state_dict=rack.state_dict())
    assert torch.equal(from_memory(x).logits, rack(x).logits)


def test_dtype_at_load_applies_to_every_stack_and_per_stack_overrides(tmp_path):
    rack = tiny_rack(stack_dtypes=["bfloat16", "float16"])
    rack.save_pretrained(tmp_path)
    saved = StackWiseForCausalLM.from_pretrained(tmp_path)
    assert [s.dtype for s in saved.model.stacks] == [torch.bfloat16, torch.float16]
    full = StackWiseForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert [s.dtype for s in full.model.stacks] == [torch.float32, torch.float32]
    assert full.config.stack_dtypes == ["float32", "float32"]
    torch.testing.assert_close(full(tokens()).logits, rack(tokens()).logits, rtol=0, atol=0.05)  # same weights
    mixed = StackWiseForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, stack_dtypes=["float32", "bfloat16"])
    assert [s.dtype for s in mixed.model.stacks] == [torch.float32, torch.bfloat16]
    assert mixed.model.embed_tokens.weight.dtype == torch.float32


# Empty racks and config ownership ------------------------------------------------------------------------------


def test_an_empty_rack_is_a_model_that_grows(tmp_path):
    rack = tiny_rack(stack_sizes=[])
    x = tokens(2, 6)
    assert rack(x).logits.shape == (2, 6, 96)
    assert rack.generate(x[:, :3], max_new_tokens=3, do_sample=False).shape == (2, 6)
    rack.save_pretrained(tmp_path)
    loaded = StackWiseForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.stack_sizes == [] and torch.equal(loaded(x).logits, rack(x).logits)
    assert rack.append_stack(2, init="identity") == 0
    assert rack.config.stack_sizes == [2] and rack.model.stacks[0].dtype == torch.float32
    torch.testing.assert_close(rack(x).logits, loaded(x).logits, rtol=0, atol=1e-6)  # identity init
    rack.append_stack(1, dtype="bfloat16")
    assert rack.config.stack_dtypes == ["float32", "bfloat16"] and rack.model.stacks[1].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="no stacks"):
        loaded.append_stack(1, init="copy")


def test_racks_built_from_one_config_do_not_share_it():
    config = tiny_config(stack_sizes=[1])
    first, second = StackWiseForCausalLM(config), StackWiseForCausalLM(config)
    body = StackWiseModel(config)
    first.append_stack(2)
    assert config.stack_sizes == [1] and second.config.stack_sizes == [1] and body.config.stack_sizes == [1]
    assert first.config.stack_sizes == [1, 2] and first.model.config is first.config


def test_a_plain_single_file_checkpoint_still_loads(tmp_path):
    # transformers' own saver (one model.safetensors, no per-stack index), e.g. a Llama converted with from_llama.
    rack = from_llama(tiny_llama(), stack_sizes=[1, 2]).eval()
    rack.cast_stack(1, "bfloat16")
    PreTrainedModel.save_pretrained(rack, tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "model.safetensors.index.json").exists()
    loaded = StackWiseForCausalLM.from_pretrained(tmp_path)
    assert [s.dtype for s in loaded.model.stacks] == [torch.float32, torch.bfloat16]
    x = tokens(2, 8)
    assert torch.equal(loaded(x).logits, rack(x).logits)
