import pytest
import torch

from stackwise_hf.cli import main
from stackwise_hf.sampling import depth_unroll_generate, diffusion_generate, unmask_schedule
from tiny import tiny_mlm_rack, tiny_rack

MASK = 3


def _counting(rack):
    calls = []
    rack.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_unmask_schedule_spreads_the_span_over_the_steps():
    assert unmask_schedule(10, 4) == [3, 3, 2, 2]
    assert unmask_schedule(5, 5) == [1] * 5 and sum(unmask_schedule(37, 6)) == 37


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_diffusion_generate_fills_every_mask_in_steps_passes_and_keeps_the_prefix(temperature):
    rack = tiny_mlm_rack(stack_sizes=[1, 1])
    calls = _counting(rack)
    prefix = torch.tensor([[5, 6, 7], [8, 9, 10]])
    out = diffusion_generate(rack, prefix_ids=prefix, length=11, steps=4, temperature=temperature, seed=0)
    assert out.shape == (2, 14) and torch.equal(out[:, :3], prefix)
    assert not (out == MASK).any() and len(calls) == 4
    assert diffusion_generate(rack, length=3, steps=10).shape == (1, 3)  # steps capped at the length


def test_sampling_is_deterministic_with_a_seed():
    rack = tiny_mlm_rack(stack_sizes=[1, 1])
    runs = [diffusion_generate(rack, length=24, steps=6, temperature=1.0, seed=s, num_samples=3) for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    state = torch.random.get_rng_state()
    greedy = [diffusion_generate(rack, length=24, steps=6) for _ in range(2)]
    assert torch.equal(*greedy) and torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched


def test_depth_unroll_fills_every_mask_in_one_pass_over_the_stacks():
    rack = tiny_mlm_rack(stack_sizes=[1, 1, 1])
    calls = []
    for stack in rack.model.stacks:
        stack.register_forward_hook(lambda *a: calls.append(1))
    committed = []
    lm_head = rack.lm_head
    lm_head.register_forward_hook(lambda module, args, out: committed.append(1))
    out = depth_unroll_generate(rack, prefix_ids=torch.tensor([5, 6]), length=20, ratios=[0.9, 0.6, 0.3],
                                temperature=1.0, seed=3)
    assert out.shape == (1, 22) and not (out == MASK).any() and len(calls) == 3 and len(committed) == 3
    again = depth_unroll_generate(rack, prefix_ids=torch.tensor([5, 6]), length=20, ratios=[0.9, 0.6, 0.3],
                                  temperature=1.0, seed=3)
    assert torch.equal(out, again)
    with pytest.raises(ValueError, match="`ratios` has 2 values; the rack has 3 stacks"):
        depth_unroll_generate(rack, length=4, ratios=[0.5, 0.2])


def test_sampling_refuses_a_causal_rack():
    with pytest.raises(ValueError, match="needs a bidirectional rack"):
        diffusion_generate(tiny_rack(mask_token_id=3), length=4, steps=2)


def test_cli_generates_from_a_masked_diffusion_rack(tmp_path, capsys):
    from stackwise_hf.data import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["to be or not to be, that is the question"] * 4, vocab_size=300)
    rack = tiny_mlm_rack(vocab_size=320, mask_token_id=tokenizer.mask_token_id)
    rack.save_rack(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    for sampler in ("steps", "unroll"):
        args = ["generate", str(tmp_path), "--prompt", "to be", "--max-new-tokens", "6", "--diffusion-steps", "3",
                "--temperature", "0", "--sampler", sampler]
        assert main(args) == 0
        first = capsys.readouterr().out
        assert main(args) == 0
        assert first.startswith("to be") and capsys.readouterr().out == first
