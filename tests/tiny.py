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


def synthetic_blocks(n: int = 64, length: int = 16, vocab: int = 96, seed: int = 0) -> list[dict]:
    """Token blocks with learnable structure: each is an arithmetic progression modulo `vocab`."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, vocab, (n, 1), generator=g)
    steps = torch.randint(1, 4, (n, 1), generator=g)
    return [{"input_ids": row} for row in (starts + steps * torch.arange(length)) % vocab]


def tiny_experiment(tmp_path, stages: list[dict], model: dict | None = None, **training):
    """An ExperimentConfig over a tiny model config for trainer tests (datasets are passed separately);
    `model` overrides fields of the model config."""
    overrides = model
    from stackwise_hf.training import ExperimentConfig

    fields = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, per_device_eval_batch_size=8,
                  logging_steps=2, report_to="none", plot=False, seed=0)
    fields.update(training)
    model = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                 stack_sizes=[1], max_position_embeddings=64)
    model.update(overrides or {})
    return ExperimentConfig.from_dict({"model": model, "training": fields, "stages": stages})
