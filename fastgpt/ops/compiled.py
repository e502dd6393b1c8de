"""The `cpu` and `cuda` backends: the compiled operators of fastgpt._C.

fastgpt._C defines one torch operator per op and direction, `torch.ops.fastgpt.<op>_forward` and
`<op>_backward` (csrc/api.cpp), each with:
- a CPU kernel (csrc/cpu: OpenMP, AVX-512/AVX2/baseline chosen at run time, BLAS for large GEMMs);
- a CUDA kernel when the extension was built with CUDA (csrc/cuda, registered by csrc/cuda/api_cuda.inc);
- a Meta kernel (output shapes, for FakeTensor and torch.compile);
- one C++ autograd (csrc/autograd.cpp), shared by both devices.
So the `cpu` and `cuda` backends are two implementations of one operator: torch's dispatcher picks the
kernel by the tensors' device, and dispatch.py decides which calls may come here (dtypes and sizes,
below). Every operator takes tensors of any number of leading dimensions, so the functions here pass
the validated arguments straight through.

Also here: `linear`, the kernel that streams the weight once for the few rows of a decode step
(benchmarks/cpu_linear.py), and `decode_blocks`, GPT.generate's whole decode step over every block in
one C++ call (CPU only). Importing this module raises ImportError, with the reason, when fastgpt._C
was not built, and ValueError when FASTGPT_CPU_ISA names no instruction set.
"""

import os

import torch

from fastgpt import dispatch

_BUILD_ERROR_FILE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "_C_build_error.txt")


def _missing_extension_message(error):
    if os.path.exists(_BUILD_ERROR_FILE):
        with open(_BUILD_ERROR_FILE) as file:
            return f"fastgpt._C was not built: {file.read().strip()}"
    return (
        f"fastgpt._C is not built ({error}); compile it with `pip install --no-build-isolation -e .` "
        "or, in a source checkout, `python setup.py build_ext --inplace`"
    )


try:
    from fastgpt import _C  # importing it registers torch.ops.fastgpt.*
except ImportError as _error:
    raise ImportError(_missing_extension_message(_error)) from _error

# The kernels of each device take these dtypes (float32 accumulation): the CPU kernels float32 and
# bfloat16; the CUDA kernels (cp.async, ldmatrix, bfloat16 mma.sync) float16 and bfloat16, float32
# runs on Triton there.
SUPPORTED_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float16, torch.bfloat16)}
CUDA_MIN_CAPABILITY = (8, 0)
# The most rows `linear` runs on the weight-streaming kernel: 1.25-3.9x BLAS at 1-16 rows of GPT-2
# projections, no faster beyond (benchmarks/cpu_linear.py; csrc/cpu/kernels.h).
LINEAR_KERNEL_MAX_ROWS = _C.LINEAR_KERNEL_MAX_ROWS
HAS_CUDA_KERNELS = hasattr(torch.ops.fastgpt, "cuda_unsupported_reason")
# Whether the build holds the Hopper attention kernels (csrc/cuda/*_sm90.cu, opt-in through
# FASTGPT_CUDA_ATTENTION=sm90): True or False as fastgpt._C reports it, None for a _C built before it
# reported this.
_SM90_FLAG = getattr(_C, "SM90_ATTENTION_KERNELS", None)
HAS_SM90_ATTENTION_KERNELS = None if _SM90_FLAG is None else bool(_SM90_FLAG)

# The overloads, bound once: calling an OpOverload skips the packet's overload resolution.
_attention_forward = torch.ops.fastgpt.attention_forward.default
_decode_attention_with_length = torch.ops.fastgpt.decode_attention_with_length.default
_ffn_forward = torch.ops.fastgpt.ffn_forward.default
_layer_norm_forward = torch.ops.fastgpt.layer_norm_forward.default
_linear_cross_entropy_forward = torch.ops.fastgpt.linear_cross_entropy_forward.default
_linear = torch.ops.fastgpt.linear.default


# ----------------------------------------------------------------------------------------------
# The ops, in the argument order of fastgpt.functional (arguments already validated there)


def causal_attention(q, k, v, softmax_scale):
    """q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D), any strides. Returns (B, H, Tq, D) in q's dtype."""
    return _attention_forward(q, k, v, softmax_scale)[0]


def decode_attention_with_length(q, k_cache, v_cache, kv_len, softmax_scale):
    """q (B, H, 1, D) against the first kv_len keys of the caches (B, Hkv, L, D); kv_len: a CPU integer
    tensor of 1 or B elements, read on the host. Returns (B, H, 1, D) in q's dtype."""
    return _decode_attention_with_length(q, k_cache, v_cache, kv_len, softmax_scale)


def fused_ffn(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual):
    """proj(act(fc(x))) (+ residual); x: (..., C). Returns (..., C_out)."""
    return _ffn_forward(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual)[0]


def layer_norm(x, weight, bias, eps, residual):
    """LayerNorm over the last dim; with a residual, returns (out, x + residual)."""
    out, residual_out, _, _ = _layer_norm_forward(x, weight, bias, residual, eps)
    return out if residual is None else (out, residual_out)


def linear_cross_entropy(x, weight, targets, bias, ignore_index, reduction):
    """cross_entropy(x @ weight.T + bias, targets) in chunks; the loss is float32. The autograd decides
    whether the forward pass also forms the gradients (compute_grad=False leaves it that choice)."""
    return _linear_cross_entropy_forward(x, weight, targets, bias, ignore_index, reduction, False)[0]


def linear(x, weight, bias):
    """x: (..., K) @ weight (N, K)^T + bias (N). Returns (..., N)."""
    return _linear(x, weight, bias)


def decode_blocks(
    x, block_params, keys, values, start, heads, eps, softmax_scale, activation, positions=None
):
    """The pre-LN GPT-2 blocks of fastgpt.nn over x (B, T, C), the new tokens at positions start ..
    start+T-1, in one call: block_params holds 12 tensors (or None for absent biases) per block (ln_1,
    attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj; weight then bias), keys and values one
    (B, Hkv, max_len, D) cache per block, written at those positions. positions: None, or (B,) int64
    with T = 1: sequence b's token is at positions[b] and attends to its first positions[b] + 1 keys
    (prompts of different lengths; `start` is then unused). Returns the residual stream after the last
    block (B, T, C), equal to running the blocks one op at a time on this backend. Inference only (no
    autograd); 2.6 -> 0.5 ms per token of host overhead for GPT-2's 12 blocks."""
    return torch.ops.fastgpt.decode_blocks(
        x, block_params, keys, values, start, heads, eps, softmax_scale, activation, positions
    )


# ----------------------------------------------------------------------------------------------
# What each device's kernels decline (dispatch.py has checked the dtype against SUPPORTED_DTYPES)


def cpu_unsupported_reason(op, **facts):
    """Why the CPU kernels decline a call, or None. facts: few_rows= for linear."""
    if op == "linear" and not facts.get("few_rows", True):
        return f"linear runs on the cpu kernel for 1 to {LINEAR_KERNEL_MAX_ROWS} rows; BLAS (F.linear) is as fast beyond"
    return None


def cuda_capability_reason():
    """Why the current GPU cannot run the CUDA kernels (mma.sync, cp.async and bfloat16 need compute
    capability 8.0), or None."""
    capability = torch.cuda.get_device_capability()
    if capability < CUDA_MIN_CAPABILITY:
        major, minor = capability
        return f"the CUDA kernels need compute capability 8.0 or newer, this GPU has {major}.{minor}"
    return None


def cuda_unsupported_reason(op, **facts):
    """Why the CUDA kernels decline a call, or None. facts: head_dim= and wide_grid= (causal_attention),
    hidden= (fused_ffn, layer_norm) or vocab= (linear_cross_entropy). The C++ answers are the same for
    float16 and bfloat16."""
    if not HAS_CUDA_KERNELS:
        return (
            "fastgpt._C was built without CUDA kernels; rebuild it with FASTGPT_CUDA=1 on a machine with nvcc "
            "and a CUDA-enabled torch"
        )
    reason = cuda_capability_reason()
    if reason:
        return reason
    if facts.get("wide_grid"):
        return (
            f"the CUDA attention kernels take batch and heads up to {dispatch.MAX_GRID_YZ} (CUDA's grid "
            "y and z limit)"
        )
    size_fact = {"causal_attention": "head_dim", "linear_cross_entropy": "vocab"}.get(op, "hidden")
    size = facts.get(size_fact, 0)
    return torch.ops.fastgpt.cuda_unsupported_reason(op, int(size), torch.bfloat16) or None
