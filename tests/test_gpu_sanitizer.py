"""A small Triton attention run for compute-sanitizer (memcheck and racecheck), on a GPU only.

benchmarks/gpu_check.sh runs exactly this node, e.g.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \\
        python -m pytest -q tests/test_gpu_sanitizer.py::test_triton_attention_sanitizer_smoke

(without the caching allocator, an access past a tensor's end leaves its allocation and memcheck
sees it). The shapes are the ones whose edges are easiest to get wrong, yet small enough for the
sanitizer's slowdown: a head_dim padded to the next block (80 -> 128), lengths that are not
multiples of any block (q_len < kv_len, the bottom-right causal mask), GQA, a strided (packed qkv)
layout, the backward, and the split-KV decode kernel for a single query without gradients.
"""

import pytest
import torch
from tolerance import assert_close

import fastgpt
from fastgpt import reference


@pytest.mark.gpu
def test_triton_attention_sanitizer_smoke():
    torch.manual_seed(0)
    batch, heads, kv_heads, q_len, kv_len, head_dim = 2, 4, 2, 37, 53, 80
    packed = torch.randn(batch, kv_len, heads + 2 * kv_heads, head_dim, device="cuda", dtype=torch.float16)
    q = packed[:, kv_len - q_len :, :heads].transpose(1, 2).detach().requires_grad_()  # (B, H, Tq, D) view
    k = packed[:, :, heads : heads + kv_heads].transpose(1, 2)  # (B, Hkv, Tk, D), strided
    v = packed[:, :, heads + kv_heads :].transpose(1, 2)
    k, v = k.detach().requires_grad_(), v.detach().requires_grad_()
    grad = torch.randn(batch, heads, q_len, head_dim, device="cuda", dtype=torch.float16)

    out = fastgpt.causal_attention(q, k, v, backend="triton")
    out.backward(grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = reference.causal_attention(q64, k64, v64)
    expected.backward(grad.double())
    q16, k16, v16 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    eager = reference.causal_attention(q16, k16, v16)
    eager.backward(grad)
    torch.cuda.synchronize()  # a kernel fault surfaces here, inside the test, not at exit
    assert_close("out", out.detach(), expected.detach(), eager.detach())
    for name, actual, exact, same_dtype in (("dq", q, q64, q16), ("dk", k, k64, k16), ("dv", v, v64, v16)):
        assert_close(name, actual.grad, exact.grad, same_dtype.grad)

    with torch.no_grad():  # one query over the cache: the split-KV decode kernel
        decoded = fastgpt.causal_attention(q[:, :, -1:], k, v, backend="triton")
        torch.cuda.synchronize()
        assert_close("decode", decoded, expected[:, :, -1:].detach(), eager[:, :, -1:])
