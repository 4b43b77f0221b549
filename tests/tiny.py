"""Tiny racks for tests: small enough that a forward pass takes milliseconds on one thread."""

import torch

from stackwise_hf import StackWiseConfig, StackWiseForCausalLM, StackWiseForMaskedLM


def tiny_config(**overrides) -> StackWiseConfig:
    fields = dict(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        stack_sizes=[2, 1], max_position_embeddings=128,
    )
    fields.update(overrides)
    return StackWiseConfig(**fields)


def tiny_rack(seed: int = 0, **overrides) -> StackWiseForCausalLM:
    torch.manual_seed(seed)
    return StackWiseForCausalLM(tiny_config(**overrides)).eval()


def tiny_mlm_rack(seed: int = 0, **overrides) -> StackWiseForMaskedLM:
    torch.manual_seed(seed)
    overrides.setdefault("attention_mode", "bidirectional")
    overrides.setdefault("mask_token_id", 3)
    return StackWiseForMaskedLM(tiny_config(**overrides)).eval()


def tokens(batch: int = 2, length: int = 12, vocab: int = 96, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
