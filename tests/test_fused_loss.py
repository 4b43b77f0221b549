import pytest
import torch
import torch.nn.functional as F

from stackwise_hf.training.fused_loss import chunked_linear_cross_entropy


def _reference(hidden, weight, labels, weights=None):
    logits = (hidden @ weight.t()).float()
    losses = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="none")
    if weights is not None:
        losses = losses * weights.flatten()
    return losses.sum() / (labels != -100).sum()


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("with_weights", [False, True])
def test_matches_plain_cross_entropy_in_value_and_gradients(chunk, with_weights):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 20, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (3, 20), generator=g)
    labels[0, :5] = -100
    weights = torch.rand(3, 20, generator=g) + 0.5 if with_weights else None

    loss, count = chunked_linear_cross_entropy(hidden, weight, labels, weights, chunk_size=chunk)
    loss.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = _reference(hidden, weight, labels, weights)
    expected.backward()
    assert count.item() == 55
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-4, atol=1e-6)


def test_frozen_head_only_returns_hidden_gradient_and_scales_with_upstream_grad():
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(30, 8)
    labels = torch.randint(0, 30, (10,))
    loss, _ = chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=3)
    (2.5 * loss).backward()
    reference = hidden.detach().clone().requires_grad_(True)
    (2.5 * _reference(reference, weight, labels)).backward()
    torch.testing.assert_close(hidden.grad, reference.grad, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_runs_the_matmul_in_bf16_and_stays_close():
    hidden = torch.randn(64, 32, requires_grad=True)
    weight = torch.randn(100, 32, requires_grad=True)
    labels = torch.randint(0, 100, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=16)
    loss.backward()
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    torch.testing.assert_close(loss, _reference(hidden.detach(), weight.detach(), labels), rtol=2e-2, atol=2e-2)


def test_all_positions_ignored_gives_zero_loss():
    hidden = torch.randn(4, 8, requires_grad=True)
    loss, count = chunked_linear_cross_entropy(hidden, torch.randn(12, 8), torch.full((4,), -100), chunk_size=2)
    loss.backward()
    assert count.item() == 0 and loss.item() == 0 and torch.count_nonzero(hidden.grad) == 0


def test_no_grad_evaluation_gives_the_same_loss():
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(30, 8, requires_grad=True)
    labels = torch.randint(0, 30, (10,))
    with torch.no_grad():
        loss, _ = chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=4)
    torch.testing.assert_close(loss, _reference(hidden.detach(), weight.detach(), labels), rtol=1e-5, atol=1e-6)
