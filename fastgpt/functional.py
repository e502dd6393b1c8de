"""The public ops. Each validates its arguments, resolves a backend and calls it."""

from fastgpt import dispatch


def causal_attention(q, k, v, *, softmax_scale=None, backend="auto"):
    """Causal softmax attention, bottom-right aligned, with GQA/MQA.

    q: (batch, heads, q_len, head_dim); k, v: (batch, kv_heads, kv_len, head_dim), in SDPA's layout.
    heads % kv_heads == 0 and q_len <= kv_len: query i sees keys j <= i + kv_len - q_len.
    Returns (batch, heads, q_len, head_dim) in q's dtype. Differentiable in q, k and v.
    """
    scale = dispatch.validate_attention(q, k, v, softmax_scale)
    impl = dispatch.resolve("causal_attention", backend, q.device, q.dtype, head_dim=q.shape[-1])
    return impl(q, k, v, softmax_scale=scale)


def fused_ffn(x, fc_weight, fc_bias, proj_weight, proj_bias, *, activation="gelu_tanh", residual=None, backend="auto"):
    """proj(act(fc(x))) (+ residual), with weights in nn.Linear layout; biases may be None.

    x: (..., C); fc_weight: (hidden, C); proj_weight: (C_out, hidden). Returns (..., C_out).
    Activations: gelu_tanh (GPT-2's gelu_new), gelu, relu, silu.
    """
    dispatch.validate_ffn(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual)
    impl = dispatch.resolve("fused_ffn", backend, x.device, x.dtype, hidden=fc_weight.shape[0])
    return impl(x, fc_weight, fc_bias, proj_weight, proj_bias, activation=activation, residual=residual)


def layer_norm(x, weight, bias, eps=1e-5, *, residual=None, backend="auto"):
    """LayerNorm over the last dimension. With residual: returns (out, x + residual), the add fused."""
    dispatch.validate_layer_norm(x, weight, bias, eps, residual)
    impl = dispatch.resolve("layer_norm", backend, x.device, x.dtype, hidden=x.shape[-1])
    return impl(x, weight, bias, eps=float(eps), residual=residual)


def linear_cross_entropy(x, weight, targets, *, bias=None, ignore_index=-100, reduction="mean", backend="auto"):
    """F.cross_entropy(x @ weight.T + bias, targets) without materialising the (tokens, vocab) logits.

    x: (..., C); weight: (vocab, C); targets: (...) int64. reduction: mean | sum | none.
    The loss is float32 (float64 for float64 inputs).
    """
    dispatch.validate_cross_entropy(x, weight, targets, bias, ignore_index, reduction)
    impl = dispatch.resolve("linear_cross_entropy", backend, x.device, x.dtype, vocab=weight.shape[0])
    return impl(x, weight, targets, bias=bias, ignore_index=ignore_index, reduction=reduction)
