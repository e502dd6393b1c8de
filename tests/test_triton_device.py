"""The Triton ops on tensors of a GPU that is not the current device.

Triton launches on the current CUDA device (JITFunction.run reads the driver's current device and
stream), so each Triton custom op enters its tensors' device (fastgpt/ops/device.py). Here every op
runs, forward and backward, on cuda:1 while cuda:0 is current, against the float64 reference.
Needs two GPUs.
"""

import pytest
import torch
from tolerance import assert_close

import fastgpt

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"
    ),
]
DEVICE = "cuda:1"


def outputs_and_grads(call, tensors, backend, dtype=None):
    """call(tensors, backend) -> one output; returns it and the gradients of its sum with respect to
    every floating-point tensor, in `dtype` (default: the tensors' own)."""
    leaves = {
        name: t.detach().to(dtype or t.dtype).requires_grad_() if t.is_floating_point() else t
        for name, t in tensors.items()
    }
    out = call(leaves, backend)
    differentiable = [t for t in leaves.values() if t.requires_grad]
    grads = torch.autograd.grad(out.sum(), differentiable)
    return [out.detach(), *grads]


def check_on_other_device(call, tensors):
    with torch.cuda.device(0):
        actual = outputs_and_grads(call, tensors, "triton")
        expected = outputs_and_grads(call, tensors, "reference", torch.float64)
        eager = outputs_and_grads(call, tensors, "reference")
    for index, (got, want, same_dtype) in enumerate(zip(actual, expected, eager)):
        assert got.device == torch.device(DEVICE)
        assert_close(f"output {index}", got, want, same_dtype)


def randn(*shape, scale=1.0):
    return torch.randn(*shape, device=DEVICE) * scale


def test_attention_and_decode():
    tensors = {"q": randn(1, 4, 70, 64), "k": randn(1, 2, 90, 64), "v": randn(1, 2, 90, 64)}
    check_on_other_device(
        lambda t, backend: fastgpt.causal_attention(t["q"], t["k"], t["v"], backend=backend), tensors
    )
    q = randn(1, 4, 1, 64)
    with torch.cuda.device(0), torch.no_grad():
        out = fastgpt.causal_attention(q, tensors["k"], tensors["v"], backend="triton")  # decode kernel
        out64 = fastgpt.causal_attention(
            *(t.double() for t in (q, tensors["k"], tensors["v"])), backend="reference"
        )
        eager = fastgpt.causal_attention(q, tensors["k"], tensors["v"], backend="reference")
    assert_close("decode", out, out64, eager)


def test_ffn_layer_norm_and_cross_entropy():
    ffn = {
        "x": randn(70, 48),
        "fc_weight": randn(96, 48, scale=48**-0.5),
        "fc_bias": randn(96),
        "proj_weight": randn(48, 96, scale=96**-0.5),
        "proj_bias": randn(48),
    }
    check_on_other_device(
        lambda t, backend: fastgpt.fused_ffn(
            t["x"], t["fc_weight"], t["fc_bias"], t["proj_weight"], t["proj_bias"], backend=backend
        ),
        ffn,
    )
    norm = {"x": randn(70, 48), "weight": randn(48), "bias": randn(48)}
    check_on_other_device(
        lambda t, backend: fastgpt.layer_norm(t["x"], t["weight"], t["bias"], backend=backend), norm
    )
    entropy = {
        "x": randn(70, 48),
        "weight": randn(300, 48, scale=0.2),
        "targets": torch.randint(0, 300, (70,), device=DEVICE),
    }
    for reduction in ("mean", "none"):
        check_on_other_device(
            lambda t, backend, reduction=reduction: fastgpt.linear_cross_entropy(
                t["x"], t["weight"], t["targets"], reduction=reduction, backend=backend
            ),
            entropy,
        )
