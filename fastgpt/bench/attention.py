"""Causal attention: fastgpt's backends against eager, SDPA, torch.compile and flash-attn.

On sm_90, `fastgpt:triton[gluon]` is the triton backend with FASTGPT_TRITON_ATTENTION=gluon: its
forward is the warp-specialized Gluon kernel (fastgpt/ops/gluon_attention.py), its backward the same.

SDPA is timed as it chooses (`sdpa`, whose records name the GPU kernels it ran: cuDNN's on Hopper with
torch 2.11) and pinned to each of its fused kernels (`sdpa[cudnn]`, `sdpa[flash]`).

Shapes follow FlashAttention's benchmark: batch x seq = 16k tokens and heads x head_dim = 2048 on
GPU, so every point does comparable work; q_len == kv_len (training and prefill). Inputs are in
SDPA's (batch, heads, seq, head_dim) layout; flash-attn gets transposed views of the same tensors
(its (batch, seq, heads, head_dim) layout with the last dim contiguous), so nothing is copied.
"""

import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastgpt
from fastgpt import reference
from fastgpt.bench import flops as counts
from fastgpt.bench.kernels import KernelBench
from fastgpt.bench.providers import Provider, baseline, gpu_only_baseline, optional_module
from fastgpt.bench.records import FASTGPT

GPU_TOKENS = 16384  # batch x seq, FlashAttention's benchmark convention
GPU_HIDDEN = 2048  # heads x head_dim
# The eager reference materialises the (batch, heads, seq, seq) scores several times over; above this
# many bytes of float32 scores it is not run (it would only measure the allocator).
EAGER_SCORES_LIMIT = {"cuda": 8 * 2**30, "cpu": 2 * 2**30}
# The float64 reference is computed on one (batch, kv-head) slice when the whole would need more
# score bytes than this.
FLOAT64_SCORES_LIMIT = {"cuda": 4 * 2**30, "cpu": 2**28}
# torch.compile of the eager code recompiles at each shape (5-15 s on a GPU). The full GPU sweep
# therefore compiles it at bf16, head_dim 128, seq <= 4k only; SDPA and flash-attn are the fused
# baselines everywhere.
GPU_COMPILE_SCOPE = {"dtype": torch.bfloat16, "head_dim": 128, "max_seq": 4096}


def _gpu_shape(seq, head_dim):
    return {
        "batch": GPU_TOKENS // seq,
        "heads": GPU_HIDDEN // head_dim,
        "kv_heads": GPU_HIDDEN // head_dim,
        "seq": seq,
        "head_dim": head_dim,
    }


def _cpu_shape(batch, heads, seq, head_dim):
    return {"batch": batch, "heads": heads, "kv_heads": heads, "seq": seq, "head_dim": head_dim}


SHAPES = {
    ("cuda", "full"): [_gpu_shape(seq, d) for d in (64, 128) for seq in (512, 1024, 2048, 4096, 8192, 16384)],
    # the full range at three lengths: benchmarks/gpu_check.sh runs fp16 at this set, within its budget
    ("cuda", "quick"): [_gpu_shape(seq, d) for d in (64, 128) for seq in (512, 4096, 16384)],
    ("cpu", "full"): [_cpu_shape(1, 8, seq, 64) for seq in (256, 512, 1024, 2048)],
    ("cpu", "quick"): [_cpu_shape(2, 4, seq, 64) for seq in (128, 256, 512)],
}
TINY = [_cpu_shape(1, 2, seq, 16) for seq in (32, 64)]


def _scores_bytes(shape, element_size):
    return shape["batch"] * shape["heads"] * shape["seq"] ** 2 * element_size


def _sdpa(q, k, v):
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)


def _pinned_sdpa(backend):
    """SDPA restricted to one of its kernels (it raises where that kernel declines the call). The
    context manager costs a few microseconds of host time per call, which plain `sdpa` does not pay."""

    def pinned(q, k, v):
        with sdpa_kernel(backend):
            return _sdpa(q, k, v)

    return pinned


def _sdpa_backend_baselines(device, dtype):
    """SDPA pinned to cuDNN and to FlashAttention-2, so that a comparison with `sdpa` says which of
    its kernels it was measured against (records of `sdpa` also name the kernels it ran)."""
    pinned = {"sdpa[cudnn]": SDPBackend.CUDNN_ATTENTION, "sdpa[flash]": SDPBackend.FLASH_ATTENTION}
    if torch.device(device).type != "cuda":
        return [baseline(name, skip="SDPA's cuDNN and flash kernels run on CUDA only") for name in pinned]
    if dtype not in (torch.float16, torch.bfloat16):
        return [
            baseline(name, skip="SDPA's cuDNN and flash kernels take float16 and bfloat16") for name in pinned
        ]
    return [baseline(name, _pinned_sdpa(backend)) for name, backend in pinned.items()]


def _gluon_attention(q, k, v):
    """The triton backend with FASTGPT_TRITON_ATTENTION=gluon for this call (the variable is read on
    every call, and set back afterwards)."""
    previous = os.environ.get("FASTGPT_TRITON_ATTENTION")
    os.environ["FASTGPT_TRITON_ATTENTION"] = "gluon"
    try:
        return fastgpt.causal_attention(q, k, v, backend="triton")
    finally:
        if previous is None:
            del os.environ["FASTGPT_TRITON_ATTENTION"]
        else:
            os.environ["FASTGPT_TRITON_ATTENTION"] = previous


def _gluon_variant(shape, dtype, device):
    """`fastgpt:triton[gluon]` where the Gluon forward would serve the call, else skipped with why."""
    name = "fastgpt:triton[gluon]"
    device = torch.device(device)
    if device.type != "cuda" or "triton" not in fastgpt.available_backends():
        return Provider(name, FASTGPT, skip="the Gluon forward runs with the triton backend on CUDA only")
    module = optional_module("fastgpt.ops.gluon_attention")
    if module is None:
        return Provider(name, FASTGPT, skip="triton.experimental.gluon does not import here")
    q = torch.empty(1, 1, 1, shape["head_dim"], device=device, dtype=dtype)
    if not module.supports(q, q, q):
        return Provider(
            name, FASTGPT, skip="the Gluon forward takes sm_90, float16/bfloat16 and head_dim 64 or 128 only"
        )
    return Provider(name, FASTGPT, _gluon_attention)


def _flash_attn(module):
    def flash_attn(q, k, v):
        out = module.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2)

    return flash_attn


class AttentionBench(KernelBench):
    name = "attention"
    public_op = staticmethod(fastgpt.causal_attention)
    reference_op = staticmethod(reference.causal_attention)
    metric = "tflops"
    profiled_providers = ("sdpa",)

    def shapes(self, device_type, sweep):
        return TINY if sweep == "tiny" else SHAPES[(device_type, sweep)]

    def tensors(self, shape, dtype, device):
        q = torch.randn(
            shape["batch"], shape["heads"], shape["seq"], shape["head_dim"], device=device, dtype=dtype
        )
        kv_shape = (shape["batch"], shape["kv_heads"], shape["seq"], shape["head_dim"])
        k = torch.randn(kv_shape, device=device, dtype=dtype)
        v = torch.randn(kv_shape, device=device, dtype=dtype)
        return {"q": q.requires_grad_(), "k": k.requires_grad_(), "v": v.requires_grad_()}

    def grad_outputs(self, shape, dtype, device):
        out_shape = (shape["batch"], shape["heads"], shape["seq"], shape["head_dim"])
        return (torch.randn(out_shape, device=device, dtype=dtype),)

    def eager_skip(self, shape, dtype, device):
        limit = EAGER_SCORES_LIMIT[torch.device(device).type]
        needed = _scores_bytes(shape, 4)
        if needed > limit:
            return (
                f"eager would materialise {needed / 2**30:.0f} GiB of float32 scores "
                f"(limit {limit / 2**30:.0f} GiB)"
            )
        return None

    def compile_skip(self, shape, dtype, device):
        if torch.device(device).type != "cuda":
            return None
        scope = GPU_COMPILE_SCOPE
        if (
            dtype != scope["dtype"]
            or shape["head_dim"] != scope["head_dim"]
            or shape["seq"] > scope["max_seq"]
        ):
            return "compiled at bf16, head_dim 128, seq <= 4k only (compile time within the GPU budget)"
        return None

    def fastgpt_variants(self, shape, dtype, device):
        return [_gluon_variant(shape, dtype, device)]

    def baselines(self, shape, dtype, device):
        return [
            baseline("sdpa", _sdpa),
            *_sdpa_backend_baselines(device, dtype),
            gpu_only_baseline("flash_attn", "flash_attn", device, dtype, _flash_attn),
        ]

    def flops(self, shape, mode):
        seq = shape["seq"]
        return counts.attention_flops(shape["batch"], shape["heads"], seq, seq, shape["head_dim"], mode)

    def error_scope(self, shape, device):
        if _scores_bytes(shape, 8) <= FLOAT64_SCORES_LIMIT[torch.device(device).type]:
            return super().error_scope(shape, device)
        group = shape["heads"] // shape["kv_heads"]

        def select(name, value):
            # q, out0 and dq carry query heads; k, v, dk and dv carry kv heads
            heads = group if name in ("q", "out0", "dq") else 1
            return value[:1, :heads]

        return select, f"batch 0, kv head 0 and its {group} query head(s) (an exact part of the computation)"
