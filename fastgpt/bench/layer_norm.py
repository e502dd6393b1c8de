"""LayerNorm, alone and with the fused residual add of a pre-LN block, in GB/s against the measured
copy bandwidth.

Baselines: eager (fastgpt.reference), `F.layer_norm` (after `x + residual` when there is one),
torch.compile of the eager code, and Liger-Kernel's LigerLayerNormFunction (after the same add: it
has no fused residual), when installed.
"""

import torch
import torch.nn.functional as F

import fastgpt
from fastgpt import reference
from fastgpt.bench import flops as counts
from fastgpt.bench.kernels import KernelBench
from fastgpt.bench.providers import baseline, gpu_only_baseline

EPS = 1e-5
GPU_TOKENS = 16384  # GPT-2's B=16 x T=1024
SHAPES = {
    ("cuda", "full"): [
        {"tokens": GPU_TOKENS, "channels": 768, "residual": True},
        {"tokens": GPU_TOKENS, "channels": 1600, "residual": True},
        {"tokens": GPU_TOKENS, "channels": 4096, "residual": True},
        {"tokens": GPU_TOKENS, "channels": 1600, "residual": False},
    ],
    ("cuda", "quick"): [
        {"tokens": GPU_TOKENS, "channels": 768, "residual": True},
        {"tokens": GPU_TOKENS, "channels": 1600, "residual": False},
    ],
    ("cpu", "full"): [
        {"tokens": 4096, "channels": c, "residual": r} for c in (768, 1600) for r in (False, True)
    ],
    # 512 rows (1.5 MiB per tensor, within the caches): at 2048 the speedups over three quick runs spread
    # by up to 28%, with the eager reference's memory-bound passes taking 1.8-2.2 ms in different processes
    ("cpu", "quick"): [{"tokens": 512, "channels": 768, "residual": r} for r in (False, True)],
}
TINY = [{"tokens": 64, "channels": 32, "residual": True}]


def _torch_layer_norm(x, weight, bias, residual=None):
    if residual is None:
        return F.layer_norm(x, weight.shape, weight, bias, EPS)
    summed = x + residual
    return F.layer_norm(summed, weight.shape, weight, bias, EPS), summed


def _liger(module):
    def liger_layer_norm(x, weight, bias, residual=None):
        if residual is None:
            return module.LigerLayerNormFunction.apply(x, weight, bias, EPS)
        summed = x + residual
        return module.LigerLayerNormFunction.apply(summed, weight, bias, EPS), summed

    return liger_layer_norm


class LayerNormBench(KernelBench):
    name = "layer_norm"
    public_op = staticmethod(fastgpt.layer_norm)
    reference_op = staticmethod(reference.layer_norm)
    metric = "gbps"

    def shapes(self, device_type, sweep):
        return TINY if sweep == "tiny" else SHAPES[(device_type, sweep)]

    def tensors(self, shape, dtype, device):
        tokens, channels = shape["tokens"], shape["channels"]
        tensors = {
            "x": torch.randn(tokens, channels, device=device, dtype=dtype).requires_grad_(),
            "weight": (1 + 0.1 * torch.randn(channels, device=device, dtype=dtype)).requires_grad_(),
            "bias": (0.1 * torch.randn(channels, device=device, dtype=dtype)).requires_grad_(),
        }
        if shape["residual"]:
            tensors["residual"] = torch.randn(tokens, channels, device=device, dtype=dtype).requires_grad_()
        return tensors

    def grad_outputs(self, shape, dtype, device):
        size = (shape["tokens"], shape["channels"])
        outputs = 2 if shape["residual"] else 1  # out, and x + residual
        return tuple(torch.randn(size, device=device, dtype=dtype) for _ in range(outputs))

    def baselines(self, shape, dtype, device):
        return [
            baseline("F.layer_norm", _torch_layer_norm),
            gpu_only_baseline(
                "liger",
                "liger_kernel.ops.layer_norm",
                device,
                dtype,
                _liger,
                dtypes=(torch.float32, torch.float16, torch.bfloat16),
            ),
        ]

    def bytes(self, shape, dtype, mode):
        element_size = torch.empty((), dtype=dtype).element_size()
        return counts.layer_norm_bytes(
            shape["tokens"], shape["channels"], element_size, shape["residual"], mode
        )
