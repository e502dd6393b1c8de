"""The public ops. Each validates its arguments once, asks dispatch for the function that serves the
call, and calls it with the arguments in the op's order. Nothing else runs per call: this is the host
time a call adds to its kernel's (benchmarks/host_overhead.py --calls-at-tiny-shapes measures it)."""

import torch

from fastgpt import dispatch


def causal_attention(q, k, v, *, softmax_scale=None, backend="auto"):
    """Causal softmax attention, bottom-right aligned, with GQA/MQA.

    q: (batch, heads, q_len, head_dim); k, v: (batch, kv_heads, kv_len, head_dim), in SDPA's layout.
    heads % kv_heads == 0 and q_len <= kv_len: query i sees keys j <= i + kv_len - q_len.
    softmax_scale: 1/sqrt(head_dim) by default; any float in [2**-64, 2**64] (dispatch.SOFTMAX_SCALE_MIN
    and _MAX). Returns (batch, heads, q_len, head_dim) in q's dtype. Differentiable in q, k and v.
    """
    if dispatch.skip_validation(q):
        scale = dispatch.default_softmax_scale(q.shape[-1]) if softmax_scale is None else softmax_scale
    else:
        scale = dispatch.validate_attention(q, k, v, softmax_scale)
    decode = q.shape[2] == 1 and not (
        torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    )
    impl = dispatch.resolve(
        "causal_attention",
        backend,
        dispatch.device_type(q),
        q.dtype,
        dispatch.attention_facts(q.shape[0], q.shape[1], q.shape[3], k.shape[2]),
        "decode" if decode else None,
    )
    return impl(q, k, v, scale)


def decode_attention_with_length(q, k_cache, v_cache, kv_len, *, softmax_scale=None, backend="auto"):
    """Attention of one query per head to the first kv_len keys of a preallocated KV cache, where
    kv_len lives on the device: a decode step whose shapes never change, which a CUDA graph captures.

    q: (batch, heads, 1, head_dim); k_cache, v_cache: (batch, kv_heads, capacity, head_dim), any
    strides; kv_len: an int32/int64 tensor on q's device, of one element (every sequence's length) or
    batch elements (each sequence's, FlashAttention's cache_seqlens: prompts of different lengths
    decoding together), clamped to capacity; never read by the host on CUDA. Returns (batch, heads, 1,
    head_dim) in q's dtype; 0 where the length is 0. Inference only (no gradient). Backends:
    dispatch.device_length_decode.
    """
    if dispatch.skip_validation(q):
        scale = dispatch.default_softmax_scale(q.shape[-1]) if softmax_scale is None else softmax_scale
    else:
        scale = dispatch.validate_decode_with_length(q, k_cache, v_cache, kv_len, softmax_scale)
    impl = dispatch.device_length_decode(backend, dispatch.device_type(q), q.dtype, q.shape[3])
    return impl(q, k_cache, v_cache, kv_len, scale)


def fused_ffn(
    x, fc_weight, fc_bias, proj_weight, proj_bias, *, activation="gelu_tanh", residual=None, backend="auto"
):
    """proj(act(fc(x))) (+ residual), with weights in nn.Linear layout; biases may be None.

    x: (..., C); fc_weight: (hidden, C); proj_weight: (C_out, hidden). Returns (..., C_out).
    Activations: gelu_tanh (GPT-2's gelu_new), gelu, relu, silu.
    """
    if not dispatch.skip_validation(x):
        dispatch.validate_ffn(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual)
    impl = dispatch.resolve(
        "fused_ffn", backend, dispatch.device_type(x), x.dtype, (("hidden", fc_weight.shape[0]),)
    )
    return impl(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual)


def layer_norm(x, weight, bias, eps=1e-5, *, residual=None, backend="auto"):
    """LayerNorm over the last dimension. With residual: returns (out, x + residual), the add fused."""
    if not dispatch.skip_validation(x):
        dispatch.validate_layer_norm(x, weight, bias, eps, residual)
    impl = dispatch.resolve(
        "layer_norm", backend, dispatch.device_type(x), x.dtype, (("hidden", x.shape[-1]),)
    )
    return impl(x, weight, bias, float(eps), residual)


def linear_cross_entropy(
    x, weight, targets, *, bias=None, ignore_index=-100, reduction="mean", backend="auto"
):
    """F.cross_entropy(x @ weight.T + bias, targets) without materialising the (tokens, vocab) logits.

    x: (..., C); weight: (vocab, C); targets: (...) int64. reduction: mean | sum | none.
    The loss is float32 (float64 for float64 inputs).
    """
    if not dispatch.skip_validation(x):
        dispatch.validate_cross_entropy(x, weight, targets, bias, ignore_index, reduction)
    impl = dispatch.resolve(
        "linear_cross_entropy", backend, dispatch.device_type(x), x.dtype, (("vocab", weight.shape[0]),)
    )
    return impl(x, weight, targets, bias, ignore_index, reduction)


def linear(x, weight, bias=None, *, backend="auto"):
    """F.linear(x, weight, bias): x (..., in_features) @ weight (out_features, in_features)^T + bias.

    The few rows of a decode step (at most 16) run on the cpu backend's kernel that streams the weight
    once; every other call is F.linear (BLAS or cuBLAS), which is as fast there. Differentiable.
    """
    if not dispatch.skip_validation(x):
        dispatch.validate_linear(x, weight, bias)
    # Under torch.compile the row count may be symbolic, and the graph's GEMMs are inductor's anyway.
    rows = 0 if torch.compiler.is_compiling() or not x.shape[-1] else x.numel() // x.shape[-1]
    few_rows = 0 < rows <= dispatch.LINEAR_KERNEL_MAX_ROWS
    impl = dispatch.resolve("linear", backend, dispatch.device_type(x), x.dtype, (("few_rows", few_rows),))
    return impl(x, weight, bias)
