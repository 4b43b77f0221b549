"""Training FLOPs of a stage: what one optimizer step and a trunk-cache build really compute.

The count follows the "model FLOPs" convention of the PaLM paper (appendix B), applied to what each
part of the rack does in a stage rather than to the whole model:

    per token, for every matmul weight W (in x out, N = in * out):
        2N   forward                                  (every matmul that runs)
      + 2N   gradient w.r.t. its input                (matmuls from the first trained stack on: the
                                                       gradient flows back through them)
      + 2N   gradient w.r.t. W                        (W trains)
    so a trained weight costs 6N, a frozen weight the gradient flows through (a frozen stack after the
    trained one, the frozen head, the base of a LoRA layer) 4N, and a frozen trunk before it 2N.
    A LoRA adapter of rank r on that layer computes two more matmuls of r * (in + out) weights, counted
    the same way (6 r (in + out) when it trains). A merged or inactive adapter computes nothing extra.

    per token and layer, attention scores and values (no weights): 4 * T * d_attn forward, twice that
    backward in layers the gradient flows through (T the block length, d_attn = heads * head_dim; the
    causal mask is not halved, as in PaLM and most MFU reports).

    the LM head (a matmul, V x H) runs on the positions that take a loss: T - 1 per block for causal LM
    (the last position predicts nothing), T for the masked objectives.

    gradient checkpointing of the trained stack runs its forward twice (one more 2N + attention forward).

Embedding lookups, norms, rotary, activations and the softmax are elementwise and not counted; nor is
the optimizer update. Evaluation is not training compute and is not counted.

Trunk modes: in `recompute` the frozen trunk's forward runs every step, so it is in the per-step count.
In `cache` it runs once per cached training block and stage when the cache is built (or only the newly
frozen stacks when the cache is extended), and not at all during the steps: `cache_build_flops` counts
that one-off pass over the training rows (eval rows are evaluation compute, not counted).

Example:

```python
>>> from stackwise_hf import StackWiseConfig, StackWiseForCausalLM
>>> from stackwise_hf.training.flops import stage_flops
>>> rack = StackWiseForCausalLM(StackWiseConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
...                                             num_attention_heads=2, stack_sizes=[1]))
>>> flops = stage_flops(rack, first_trained=0, causal=True)  # every weight trains
>>> flops.block_flops(8) == 6 * (8 * flops.stack_weights[0] + 7 * 64 * 16) + 12 * 8 * 8 * 16
True
```
"""

from __future__ import annotations

from dataclasses import dataclass

from peft.tuners.lora import LoraLayer
from torch import nn

# bf16 dense matmul peaks (FLOP/s) by device name, for model FLOP utilisation on CUDA. Matched as a
# substring of `torch.cuda.get_device_name()`, first match wins (so "H100 PCIe" precedes "H100").
BF16_PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A10G", 125e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16 tensor cores: V100 has no bf16
)


def peak_flops(device_name: str | None) -> float | None:
    """The bf16 dense peak of a device named like `torch.cuda.get_device_name()`, or None if unknown."""
    if not device_name:
        return None
    return next((peak for name, peak in BF16_PEAK_FLOPS if name in device_name), None)


@dataclass(frozen=True)
class MatmulCost:
    """Weights of one matmul (or a LoRA layer) by what they cost per token: `forward` weights run,
    `trained` weights of those get a weight gradient."""

    forward: int = 0
    trained: int = 0

    def __add__(self, other: "MatmulCost") -> "MatmulCost":
        return MatmulCost(self.forward + other.forward, self.trained + other.trained)


def matmul_cost(module: nn.Module) -> MatmulCost:
    """The matmul weights of `module` and what trains among them; a LoRA layer counts its base and its
    active, unmerged adapters (peft runs exactly those in its forward)."""
    total = MatmulCost()
    for child in _matmuls(module):
        if isinstance(child, LoraLayer):
            base = child.get_base_layer()
            n = base.in_features * base.out_features
            total += MatmulCost(n, n if base.weight.requires_grad else 0)
            if child.disable_adapters or child.merged:
                continue
            for name in child.active_adapters:
                if name in child.lora_A:
                    a, b = child.lora_A[name], child.lora_B[name]
                    n = a.in_features * a.out_features + b.in_features * b.out_features
                    total += MatmulCost(n, n if a.weight.requires_grad else 0)
        else:
            n = child.in_features * child.out_features
            total += MatmulCost(n, n if child.weight.requires_grad else 0)
    return total


def _matmuls(module: nn.Module):
    """The LoRA layers and plain linears of `module`, not descending into a LoRA layer's own linears."""
    if isinstance(module, (LoraLayer, nn.Linear)):
        yield module
        return
    for child in module.children():
        yield from _matmuls(child)


@dataclass(frozen=True)
class StageFlops:
    """What one stage computes, as functions of the block length T (any loader's blocks).

    Args:
        per_token (`float`): matmul FLOPs per token of a step, the head excluded.
        attention_per_token (`float`): attention FLOPs per token of a step, per unit of T.
        head_per_position (`float`): FLOPs of the head per position it runs on.
        head_skipped (`int`): positions per block without a head (1 for causal LM: the last one).
        stack_forward (`tuple`): per stack, its forward's (matmul FLOPs per token, attention FLOPs per
            token per unit of T): what a cache build or extension of that stack costs.
        stack_weights (`tuple[int]`): matmul weights of each stack, for reading the count.
    """

    per_token: float
    attention_per_token: float
    head_per_position: float
    head_skipped: int
    stack_forward: tuple[tuple[float, float], ...]
    stack_weights: tuple[int, ...]

    def block_flops(self, block_size: int) -> float:
        """Training FLOPs of one block of `block_size` tokens in a step."""
        t = block_size
        return t * self.per_token + t * t * self.attention_per_token + (t - self.head_skipped) * self.head_per_position

    def step_flops(self, shape) -> float:
        """Training FLOPs of a micro-batch of input ids of `shape` (blocks, tokens)."""
        blocks, t = shape
        return blocks * self.block_flops(t)

    def cache_build_flops(self, stacks_run, rows: int, block_size: int) -> float:
        """The forward of `stacks_run` over `rows` training blocks (a trunk-cache build or extension)."""
        t = block_size
        return rows * sum(t * self.stack_forward[i][0] + t * t * self.stack_forward[i][1] for i in stacks_run)


def stage_flops(rack, first_trained: int, causal: bool = True, trunk_cached: bool = False,
                checkpointed_stacks=()) -> StageFlops:
    """Training FLOPs of a stage's step, as the module docstring counts them.

    Args:
        rack: the rack as the stage trains it (grown, frozen, adapters attached and activated).
        first_trained (`int`): stacks before it are the frozen trunk, run under no_grad (0 when the
            embeddings train: the gradient then flows through every stack).
        causal (`bool`): causal LM (the head skips each block's last position) or a masked objective.
        trunk_cached (`bool`): the trunk's output comes from the cache, so the trunk does not run per step.
        checkpointed_stacks: stacks whose forward is recomputed in the backward pass.
    """
    config = rack.config
    attention = 4 * config.num_attention_heads * config.head_dim  # per token, layer and unit of T: q k^T, softmax v
    per_token = attention_per_token = 0.0
    forwards, weights = [], []
    for i, stack in enumerate(rack.base_model.stacks):
        cost = matmul_cost(stack)
        layers = len(stack.blocks)
        forward = (2 * cost.forward, layers * attention)
        forwards.append(forward)
        weights.append(cost.forward)
        if i < first_trained:
            if not trunk_cached:
                per_token, attention_per_token = per_token + forward[0], attention_per_token + forward[1]
            continue
        # forward, input gradients (2N, twice the attention), weight gradients (2N of what trains)
        passes = 1 + (1 if i in checkpointed_stacks else 0)
        per_token += passes * forward[0] + 2 * cost.forward + 2 * cost.trained
        attention_per_token += passes * forward[1] + 2 * forward[1]
    head = matmul_cost(rack.get_output_embeddings())
    head_input_grad = first_trained < len(rack.base_model.stacks)  # something before the head trains
    head_per_position = 2 * head.forward + (2 * head.forward if head_input_grad else 0) + 2 * head.trained
    return StageFlops(per_token, attention_per_token, head_per_position, 1 if causal else 0, tuple(forwards),
                      tuple(weights))
