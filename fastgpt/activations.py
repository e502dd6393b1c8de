"""The FFN activations and their exact derivatives, in eager PyTorch.

Shared by reference.py and by any backend that applies an activation outside a kernel. The kernels
implement the same formulas in their own language.
"""

import math

import torch

ACTIVATIONS = ("gelu_tanh", "gelu", "relu", "silu")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_CUBIC = 0.044715
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def activation_forward(h, name):
    """act(h) for one of ACTIVATIONS, in h's dtype. gelu_tanh is GPT-2's gelu_new.

    float16/bfloat16 inputs are computed in float32 and rounded once, as torch's own F.gelu does:
    in float16, h**3 overflows for |h| > 40 and the tanh form's gradient turns into NaN."""
    if h.dtype in (torch.float16, torch.bfloat16):
        return _activation(h.float(), name).to(h.dtype)
    return _activation(h, name)


def _activation(h, name):
    if name == "gelu_tanh":
        return 0.5 * h * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (h + _GELU_TANH_CUBIC * h**3)))
    if name == "gelu":
        return 0.5 * h * (1.0 + torch.erf(h * _INV_SQRT_2))
    if name == "relu":
        return torch.clamp_min(h, 0.0)
    if name == "silu":
        return h * torch.sigmoid(h)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def activation_derivative(h, name):
    """d act(h) / dh, elementwise."""
    if name == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (h + _GELU_TANH_CUBIC * h**3)
        t = torch.tanh(inner)
        d_inner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_CUBIC * h**2)
        return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * d_inner
    if name == "gelu":
        return 0.5 * (1.0 + torch.erf(h * _INV_SQRT_2)) + h * _INV_SQRT_2PI * torch.exp(-0.5 * h * h)
    if name == "relu":
        return (h > 0).to(h.dtype)
    if name == "silu":
        s = torch.sigmoid(h)
        return s * (1.0 + h * (1.0 - s))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
