"""fastgpt: fused Triton and CUDA C++ kernels for GPT models, with a CPU path behind the same API."""

from fastgpt.dispatch import available_backends
from fastgpt.functional import causal_attention, fused_ffn, layer_norm, linear_cross_entropy

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "causal_attention",
    "fused_ffn",
    "layer_norm",
    "linear_cross_entropy",
]
