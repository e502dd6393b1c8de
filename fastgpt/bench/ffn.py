"""The GPT-2 feed-forward block, proj(gelu_tanh(fc(x))), at GPT-2 small and XL widths.

Baselines: eager (fastgpt.reference: nn.Linear layout GEMMs and the tanh-GELU written out), `torch`
(F.linear -> F.gelu(approximate="tanh") -> F.linear, as nanoGPT and transformers run it), and
torch.compile of the eager code.

Liger-Kernel is not a baseline here: its fused MLPs (LigerGEGLUMLP, LigerSwiGLUMLP) are gated,
down(act(gate(x)) * up(x)), a different function with a third weight; GPT-2's MLP has no gate.
"""

import math

import torch
import torch.nn.functional as F

import fastgpt
from fastgpt import reference
from fastgpt.bench import flops as counts
from fastgpt.bench.kernels import KernelBench
from fastgpt.bench.providers import baseline

GPT2_SMALL, GPT2_XL = 768, 1600  # n_embd; the hidden width is 4x
SHAPES = {
    # 8k tokens only, within gpu_check.sh's budget (16k is in benchmarks/results/2026-11-29-h200.json)
    ("cuda", "full"): [{"tokens": 8192, "channels": c, "hidden": 4 * c} for c in (GPT2_SMALL, GPT2_XL)],
    ("cuda", "quick"): [{"tokens": 8192, "channels": c, "hidden": 4 * c} for c in (GPT2_SMALL, GPT2_XL)],
    ("cpu", "full"): [{"tokens": t, "channels": GPT2_SMALL, "hidden": 4 * GPT2_SMALL} for t in (256, 1024)],
    ("cpu", "quick"): [{"tokens": 256, "channels": GPT2_SMALL, "hidden": 4 * GPT2_SMALL}],
}
TINY = [{"tokens": 64, "channels": 32, "hidden": 128}]
LIGER_MISMATCH = (
    "liger's fused MLPs are gated (GEGLU/SwiGLU); GPT-2's MLP is not, so none computes this function"
)


def _torch_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias):
    return F.linear(F.gelu(F.linear(x, fc_weight, fc_bias), approximate="tanh"), proj_weight, proj_bias)


class FFNBench(KernelBench):
    name = "ffn"
    public_op = staticmethod(fastgpt.fused_ffn)
    reference_op = staticmethod(reference.fused_ffn)
    metric = "tflops"

    def shapes(self, device_type, sweep):
        return TINY if sweep == "tiny" else SHAPES[(device_type, sweep)]

    def tensors(self, shape, dtype, device):
        tokens, channels, hidden = shape["tokens"], shape["channels"], shape["hidden"]

        def weight(rows, columns):  # nn.Linear's scale keeps the activations O(1) in every dtype
            return (
                torch.randn(rows, columns, device=device, dtype=dtype) / math.sqrt(columns)
            ).requires_grad_()

        def bias(size):
            return (0.1 * torch.randn(size, device=device, dtype=dtype)).requires_grad_()

        return {
            "x": torch.randn(tokens, channels, device=device, dtype=dtype).requires_grad_(),
            "fc_weight": weight(hidden, channels),
            "fc_bias": bias(hidden),
            "proj_weight": weight(channels, hidden),
            "proj_bias": bias(channels),
        }

    def grad_outputs(self, shape, dtype, device):
        return (torch.randn(shape["tokens"], shape["channels"], device=device, dtype=dtype),)

    def baselines(self, shape, dtype, device):
        return [baseline("torch", _torch_mlp), baseline("liger", skip=LIGER_MISMATCH)]

    def flops(self, shape, mode):
        return counts.ffn_flops(shape["tokens"], shape["channels"], shape["hidden"], mode=mode)
