"""The reference definitions agree with PyTorch's own ops (SDPA, F.layer_norm, F.cross_entropy, HF's
gelu_new), in float64."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastgpt import reference
from fastgpt.activations import ACTIVATIONS, activation_derivative, activation_forward


def test_attention_matches_sdpa_when_square():
    q, k, v = (torch.randn(2, 3, 17, 16, dtype=torch.float64) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(reference.causal_attention(q, k, v), expected)


def test_attention_bottom_right_mask_and_gqa():
    q = torch.randn(1, 4, 3, 8, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 7, 8, dtype=torch.float64) for _ in range(2))
    out, lse = reference.causal_attention(q, k, v, return_lse=True)
    # Query row i (of 3) sees keys 0 .. i + 4, and head h reads kv head h // 2.
    for head in range(4):
        for row in range(3):
            visible = row + 4 + 1
            scores = q[0, head, row] @ k[0, head // 2, :visible].T / math.sqrt(8)
            torch.testing.assert_close(lse[0, head, row], torch.logsumexp(scores, 0))
            torch.testing.assert_close(
                out[0, head, row], torch.softmax(scores, 0) @ v[0, head // 2, :visible]
            )


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_derivatives_match_autograd(activation):
    h = torch.randn(257, dtype=torch.float64, requires_grad=True) * 3
    (grad,) = torch.autograd.grad(activation_forward(h, activation).sum(), h)
    torch.testing.assert_close(activation_derivative(h.detach(), activation), grad)


def test_gelu_variants_match_torch():
    h = torch.randn(100, dtype=torch.float64)
    torch.testing.assert_close(activation_forward(h, "gelu_tanh"), F.gelu(h, approximate="tanh"))
    torch.testing.assert_close(activation_forward(h, "gelu"), F.gelu(h))
    torch.testing.assert_close(activation_forward(h, "silu"), F.silu(h))


def test_ffn_matches_composed_linears():
    x = torch.randn(5, 8, dtype=torch.float64)
    w1, b1 = torch.randn(32, 8, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    w2, b2 = torch.randn(8, 32, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    residual = torch.randn(5, 8, dtype=torch.float64)
    expected = F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2) + residual
    torch.testing.assert_close(reference.fused_ffn(x, w1, b1, w2, b2, "gelu_tanh", residual), expected)


def test_layer_norm_matches_torch_with_and_without_residual():
    x, residual = torch.randn(6, 33, dtype=torch.float64), torch.randn(6, 33, dtype=torch.float64)
    weight, bias = torch.randn(33, dtype=torch.float64), torch.randn(33, dtype=torch.float64)
    torch.testing.assert_close(reference.layer_norm(x, weight, bias), F.layer_norm(x, (33,), weight, bias))
    out, summed = reference.layer_norm(x, weight, bias, residual=residual)
    torch.testing.assert_close(summed, x + residual)
    torch.testing.assert_close(out, F.layer_norm(x + residual, (33,), weight, bias))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch(reduction):
    x, weight, bias = (
        torch.randn(9, 8, dtype=torch.float64),
        torch.randn(11, 8, dtype=torch.float64),
        torch.randn(11, dtype=torch.float64),
    )
    targets = torch.randint(0, 11, (9,))
    targets[[1, 4]] = -100
    expected = F.cross_entropy(F.linear(x, weight, bias), targets, reduction=reduction)
    torch.testing.assert_close(
        reference.linear_cross_entropy(x, weight, targets, bias, reduction=reduction), expected
    )


def test_cross_entropy_all_ignored_mean_is_nan():
    loss = reference.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.full((3,), -100))
    assert torch.isnan(loss)
