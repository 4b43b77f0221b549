"""Sampling from a masked-diffusion rack (`StackWiseForMaskedLM`): iterative unmasking, and the one-pass
"depth as time" unroll.

`diffusion_generate` is the reverse process of MDLM / LLaDA with low-confidence remasking: the span to
generate starts as mask tokens after an optional prefix; at each of `steps` steps the rack predicts
every masked position at once, and the `k` most confident predictions are committed, with `k` chosen
so that the span is full after exactly `steps` forward passes (the linear schedule: as many tokens per
step as possible, the remainder on the first steps).

`depth_unroll_generate` runs the rack's stacks once, left to right, and reads the shared head after
each stack: stack i was trained to denoise text masked at ratio r_i (depth as time, heaviest on the
left), so after stack i the most confident predictions are committed until only r_{i+1} of the span
is masked, and none after the last stack. A committed token enters the residual stream in place of the
mask token's embedding (h += E[token] - E[mask]): the earlier stacks' contributions at that position
are kept, as if the token had been there at the input. This is one forward pass of the rack (plus one
head per stack); it suits racks trained left to right with the head trained at every stage, whose
every prefix is a denoiser at its own ratio.
"""

from __future__ import annotations

import torch

__all__ = ["diffusion_generate", "depth_unroll_generate", "unmask_schedule"]


def unmask_schedule(length: int, steps: int) -> list[int]:
    """Tokens committed at each step: `length` spread over `steps`, the remainder on the first steps.

    >>> unmask_schedule(10, 4)
    [3, 3, 2, 2]
    """
    base, remainder = divmod(length, steps)
    return [base + (1 if s < remainder else 0) for s in range(steps)]


def _start(rack, prefix_ids, length: int, num_samples: int | None):
    mask_id = rack.config.mask_token_id
    if mask_id is None:
        raise ValueError("the rack's config has no `mask_token_id`; a masked-diffusion rack needs one to sample.")
    if rack.config.attention_mode != "bidirectional":
        raise ValueError(
            f"diffusion sampling needs a bidirectional rack (StackWiseForMaskedLM); this rack's attention_mode is "
            f"{rack.config.attention_mode!r}: use `rack.generate` for a causal rack."
        )
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
        raise ValueError(f"`length` must be a positive integer; got {length!r}.")
    device = rack.get_input_embeddings().weight.device
    if prefix_ids is None:
        prefix = torch.empty((num_samples or 1, 0), dtype=torch.long, device=device)
    else:
        prefix = torch.as_tensor(prefix_ids, device=device).long()
        prefix = prefix[None] if prefix.ndim == 1 else prefix
        if num_samples is not None and prefix.shape[0] == 1:
            prefix = prefix.expand(num_samples, -1)
    span = torch.full((prefix.shape[0], length), mask_id, dtype=torch.long, device=device)
    return torch.cat([prefix, span], dim=1), mask_id


def _predict(logits: torch.Tensor, mask_id: int, temperature: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, confidence) per position: the argmax (temperature 0) or a Gumbel-max sample, never the mask
    token; confidence is the token's probability under the untempered distribution."""
    logits = logits.float()
    logits[..., mask_id] = float("-inf")
    probs = logits.softmax(-1)
    if temperature > 0:
        # Gumbel-max in float64 (low-precision Gumbel noise biases masked-diffusion samples).
        u = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device="cpu").to(logits.device)
        scores = logits.double() / temperature - torch.log(-torch.log(u.clamp_min(1e-20)))
        tokens = scores.argmax(-1)
    else:
        tokens = logits.argmax(-1)
    return tokens, probs.gather(-1, tokens[..., None]).squeeze(-1)


def _generator(seed: int | None):
    return torch.Generator().manual_seed(seed) if seed is not None else None


def _commit(ids, still_masked, tokens, confidence, k_per_row) -> torch.Tensor:
    """Commits the `k` most confident predictions among still-masked positions of each row; returns the
    boolean (B, T) of positions committed."""
    score = confidence.masked_fill(~still_masked, float("-inf"))
    chosen = torch.zeros_like(still_masked)
    for row, k in enumerate(k_per_row):
        if k > 0:
            chosen[row, score[row].topk(k).indices] = True
    ids[chosen] = tokens[chosen]
    return chosen


@torch.no_grad()
def diffusion_generate(rack, prefix_ids=None, length: int = 64, steps: int = 16, temperature: float = 0.0,
                       seed: int | None = None, num_samples: int | None = None) -> torch.LongTensor:
    """Generates `length` tokens after `prefix_ids` by iterative unmasking.

    Args:
        rack: a bidirectional rack (`StackWiseForMaskedLM`) with `config.mask_token_id`.
        prefix_ids (`torch.LongTensor`, *optional*): `(P,)` or `(B, P)` tokens kept as they are.
        length (`int`): tokens to generate.
        steps (`int`): forward passes; capped at `length` (each step commits at least one token).
        temperature (`float`): 0 for the argmax; above 0, each step samples (Gumbel-max) at this temperature.
        seed (`int`, *optional*): seeds the sampling noise (a private generator: the global RNG is untouched).
        num_samples (`int`, *optional*): rows to generate when `prefix_ids` has one row (or is None).

    Returns:
        `torch.LongTensor` of shape `(B, P + length)`, with no mask token left.

    Example:

    ```python
    >>> import torch
    >>> from stackwise_hf import StackWiseConfig, StackWiseForMaskedLM
    >>> from stackwise_hf.sampling import diffusion_generate
    >>> rack = StackWiseForMaskedLM(StackWiseConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...     num_attention_heads=2, stack_sizes=[1, 1], attention_mode="bidirectional", mask_token_id=3)).eval()
    >>> out = diffusion_generate(rack, prefix_ids=torch.tensor([5, 6]), length=8, steps=4, seed=0)
    >>> out.shape, bool((out != 3).all())
    (torch.Size([1, 10]), True)
    ```
    """
    ids, mask_id = _start(rack, prefix_ids, length, num_samples)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"`steps` must be a positive integer; got {steps!r}.")
    steps = min(steps, length)
    generator = _generator(seed)
    was_training = rack.training
    rack.eval()
    try:
        for k in unmask_schedule(length, steps):
            still_masked = ids == mask_id
            still_masked[:, : ids.shape[1] - length] = False  # a prefix's own mask tokens stay
            logits = rack(input_ids=ids).logits  # (B, T, V)
            tokens, confidence = _predict(logits, mask_id, temperature, generator)
            _commit(ids, still_masked, tokens, confidence, [k] * ids.shape[0])
    finally:
        rack.train(was_training)
    return ids


@torch.no_grad()
def depth_unroll_generate(rack, prefix_ids=None, length: int = 64, ratios: list[float] | None = None,
                          temperature: float = 0.0, seed: int | None = None,
                          num_samples: int | None = None) -> torch.LongTensor:
    """Generates `length` tokens in one left-to-right pass over the stacks ("depth as time").

    Args:
        rack: a bidirectional rack with `config.mask_token_id`.
        prefix_ids, temperature, seed, num_samples: as in `diffusion_generate`.
        ratios (`list[float]`, *optional*): the mask ratio each stack was trained at, leftmost first;
            defaults to the objective's default depth schedule (`ObjectiveConfig().depth_ratios_for`).
            After stack i, `ratios[i + 1]` of the span is still masked; nothing after the last stack.

    Returns:
        `torch.LongTensor` of shape `(B, P + length)`, with no mask token left.
    """
    ids, mask_id = _start(rack, prefix_ids, length, num_samples)
    n = rack.num_stacks
    if ratios is None:
        # Imported here, not at the top: `stackwise_hf.training` brings in the whole trainer (accelerate,
        # datasets hooks), which sampling from a rack does not otherwise need.
        from .training.masking import ObjectiveConfig

        ratios = ObjectiveConfig().depth_ratios_for(n)
    if len(ratios) != n:
        raise ValueError(f"`ratios` has {len(ratios)} values; the rack has {n} stacks (one ratio per stack).")
    generator = _generator(seed)
    body = rack.base_model
    embed = body.embed_tokens
    head = rack.get_output_embeddings()
    span_start = ids.shape[1] - length
    was_training = rack.training
    rack.eval()
    try:
        hidden = embed(ids)
        attention = body.attention_inputs(hidden)
        for i in range(n):
            hidden = body.forward_stacks(hidden, i, i + 1, **attention)
            still_masked = ids == mask_id
            still_masked[:, :span_start] = False
            target = round(ratios[i + 1] * length) if i + 1 < n else 0
            k = (still_masked.sum(1) - target).clamp(min=0).tolist()
            if not any(k):
                continue
            logits = head(body.norm(hidden.to(body.norm.weight.dtype)).to(head.weight.dtype))
            tokens, confidence = _predict(logits, mask_id, temperature, generator)
            chosen = _commit(ids, still_masked, tokens, confidence, k)
            # The committed token replaces the mask token's embedding in the residual stream.
            delta = (embed(ids) - embed(torch.full_like(ids, mask_id))) * chosen[..., None]
            hidden = hidden + delta.to(hidden.dtype)
    finally:
        rack.train(was_training)
    return ids
