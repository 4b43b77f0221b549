"""Cross-entropy over the vocabulary, computed chunk by chunk so the full logits never materialise.

For a batch of N positions and a vocabulary of V, the plain path holds (N, V) logits in the compute
dtype, an fp32 copy for the softmax and its gradient: at N = 16k and V = 32k that is several GiB,
often the largest tensors of a stage. Here the head's matmul, log-softmax and the gradients with
respect to the hidden states and the head weight are computed per chunk of positions during the
forward pass; backward only scales the stored gradients. Peak extra memory is one chunk of logits.

Written by hand because neither torch nor transformers ships a fused linear + cross-entropy (Liger
Kernel and Apple's cut-cross-entropy do, as extra dependencies with Triton kernels).
"""

from __future__ import annotations

import torch


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, scale, chunk_size: int, compute_dtype, grad_mode: bool):
        # hidden: (N, H), weight: (V, H), labels: (N,) with -100 = ignore, scale: (N,) per-position factor.
        # `grad_mode` is the caller's: needs_input_grad stays True under torch.no_grad(), and grad mode
        # is always off inside forward, so evaluation would otherwise pay two gradient matmuls per chunk.
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if grad_mode and ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if grad_mode and ctx.needs_input_grad[1] else None
        w = weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size].to(compute_dtype)
            y = labels[start:start + chunk_size]
            s = scale[start:start + chunk_size].float()
            logits = (h @ w.t()).float()                                     # (n, V) fp32
            lse = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, y.clamp(min=0)[:, None]).squeeze(1)
            total += ((lse - target) * s).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(sum_i s_i * ce_i)/d logits = s_i * (softmax_i - onehot(y_i)); s_i = 0 where ignored.
            grad_logits = torch.exp_(logits.sub_(lse[:, None]))
            grad_logits[torch.arange(len(y), device=y.device), y.clamp(min=0)] -= 1.0
            grad_logits.mul_(s[:, None])
            g = grad_logits.to(compute_dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_size] = (g @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (g.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        dh = grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None
        dw = (grad_weight * grad_output).to(ctx.weight_dtype) if grad_weight is not None else None
        return dh, dw, None, None, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    chunk_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of `hidden @ weight.T` against `labels`, chunked over positions.

    Args:
        hidden: (..., H) final hidden states.
        weight: (V, H) LM head weight (bias-free, as the rack's head is).
        labels: (...) target ids, -100 where no loss is taken.
        weights: optional (...) per-position loss weights (e.g. 1/ratio for masked diffusion).
        chunk_size: positions per chunk; peak extra memory is about `chunk_size * V * 12` bytes.

    Returns:
        `(loss, n_positions)`: the (weighted) sum over labelled positions divided by their number,
        and that number, as `objectives.token_cross_entropy` returns them. The matmul runs in the
        autocast dtype when autocast is on, the softmax in float32.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    valid = labels != -100
    scale = valid.to(torch.float32)
    if weights is not None:
        scale = scale * weights.reshape(-1).float()
    device_type = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    count = valid.sum()
    with torch.autocast(device_type, enabled=False):
        total = _ChunkedLinearCrossEntropy.apply(
            hidden, weight, labels, scale, chunk_size, compute_dtype, torch.is_grad_enabled()
        )
    return total / count.clamp(min=1), count
