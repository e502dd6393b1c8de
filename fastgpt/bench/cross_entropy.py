"""Linear cross-entropy (the lm_head GEMM and the loss) at GPT-2's vocabulary: time and peak memory.

Baselines: eager (fastgpt.reference: full logits, upcast to float32 as transformers' loss does),
`F.cross_entropy(x @ W.T, targets)` in the run's dtype, torch.compile of the eager code, and
Liger-Kernel's LigerFusedLinearCrossEntropyLoss (same function: mean over targets != -100, no bias),
when installed. Targets are uniform over the vocabulary, with no ignored rows.
"""

import math

import torch
import torch.nn.functional as F

import fastgpt
from fastgpt import reference
from fastgpt.bench import flops as counts
from fastgpt.bench.kernels import KernelBench
from fastgpt.bench.providers import baseline, gpu_only_baseline

GPT2_VOCAB = 50257
SHAPES = {
    # one shape, within benchmarks/gpu_check.sh's budget (its run of 2026-11-30 was cut in a second one,
    # 16384 tokens at 1600 channels)
    ("cuda", "full"): [{"tokens": 8192, "channels": 768, "vocab": GPT2_VOCAB}],
    ("cuda", "quick"): [{"tokens": 8192, "channels": 768, "vocab": GPT2_VOCAB}],
    ("cpu", "full"): [{"tokens": 256, "channels": 768, "vocab": GPT2_VOCAB}],
    ("cpu", "quick"): [{"tokens": 128, "channels": 256, "vocab": GPT2_VOCAB}],
}
TINY = [{"tokens": 32, "channels": 16, "vocab": 1000}]


def _torch_cross_entropy(x, weight, targets):
    return F.cross_entropy(x @ weight.T, targets)


def _liger(module):
    loss = module.LigerFusedLinearCrossEntropyLoss()

    def liger_cross_entropy(x, weight, targets):
        return loss(weight, x, targets)

    return liger_cross_entropy


class CrossEntropyBench(KernelBench):
    name = "cross_entropy"
    public_op = staticmethod(fastgpt.linear_cross_entropy)
    reference_op = staticmethod(reference.linear_cross_entropy)
    metric = "tflops"

    def shapes(self, device_type, sweep):
        return TINY if sweep == "tiny" else SHAPES[(device_type, sweep)]

    def tensors(self, shape, dtype, device):
        tokens, channels, vocab = shape["tokens"], shape["channels"], shape["vocab"]
        return {
            "x": torch.randn(tokens, channels, device=device, dtype=dtype).requires_grad_(),
            "weight": (
                torch.randn(vocab, channels, device=device, dtype=dtype) / math.sqrt(channels)
            ).requires_grad_(),
            "targets": torch.randint(0, vocab, (tokens,), device=device),
        }

    def grad_outputs(self, shape, dtype, device):
        return (torch.ones((), device=device, dtype=torch.float32),)

    def baselines(self, shape, dtype, device):
        return [
            baseline("F.cross_entropy", _torch_cross_entropy),
            gpu_only_baseline(
                "liger",
                "liger_kernel.transformers",
                device,
                dtype,
                _liger,
                dtypes=(torch.float32, torch.float16, torch.bfloat16),
            ),
        ]

    def flops(self, shape, mode):
        return counts.linear_cross_entropy_flops(shape["tokens"], shape["channels"], shape["vocab"], mode)

    def bytes(self, shape, dtype, mode):
        element_size = torch.empty((), dtype=dtype).element_size()
        tokens, channels, vocab = shape["tokens"], shape["channels"], shape["vocab"]
        return counts.linear_cross_entropy_bytes(tokens, channels, vocab, element_size, mode)
