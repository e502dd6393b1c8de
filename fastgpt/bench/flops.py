"""Work done by each benchmarked op: floating-point operations and bytes moved.

These are model counts (the useful work), not what an implementation happens to execute: a kernel
that recomputes something in its backward does not get credit for it, as in FlashAttention's and
Liger-Kernel's benchmarks.

Modes: "fwd" is the forward alone; "fwd+bwd" is the forward followed by the backward.

FLOPs
- GEMM (M, K) @ (K, N): 2*M*N*K.
- Causal attention, forward: 4*B*H*N*N*D/2 (two GEMMs, QK^T and PV, over the half of the score
  matrix a causal mask leaves), the convention of FlashAttention's benchmarks. Backward: 2.5x forward
  (five GEMMs instead of two). With q_len < kv_len (bottom-right mask, a prompt appended to a cache)
  the visible pairs are counted by the same convention: the Tq x Tk rectangle minus the masked
  triangle of area Tq*Tq/2. The exact count, Tq*(Tk-Tq) + Tq*(Tq+1)/2, differs from it by Tq/2 pairs.
- FFN: its two GEMMs, tokens x C -> hidden -> C_out. The backward of each GEMM is two GEMMs of the
  same size (the input gradient and the weight gradient), so backward = 2x forward. Bias and
  activation FLOPs are elementwise and left out.
- Linear cross-entropy: the logits GEMM, tokens x C -> vocab; backward = 2x forward (dx and dW).
  The softmax is elementwise per logit and left out.
- GPT training step (forward + backward): 6 FLOPs per matmul parameter per token (the lm_head
  included), plus the causal attention FLOPs above for every layer.

Bytes (memory-bound ops, reported as GB/s; the compulsory traffic of a single fused pass)
- LayerNorm forward reads x (and the residual) and writes out (and x + residual); the backward reads
  dout (and d(x + residual)) and x, and writes dx once (the residual's gradient equals it). The
  C-sized weight, bias and their gradients are counted; the per-row statistics (O(tokens), under 1%
  of the traffic for C >= 256) are not.
- Linear cross-entropy forward reads x, the weight and the targets and writes the loss; the backward
  adds writing dx and dW. It is compute-bound at GPT vocabularies; its GB/s is reported for reference.
"""

FWD = "fwd"
FWD_BWD = "fwd+bwd"
MODES = (FWD, FWD_BWD)

ATTENTION_BACKWARD_FACTOR = 2.5  # five GEMMs in the backward against two in the forward
GEMM_BACKWARD_FACTOR = 2.0  # input gradient and weight gradient, each a GEMM of the forward's size


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def gemm_flops(m, n, k):
    """(m, k) @ (k, n)."""
    return 2 * m * n * k


def causal_pairs(q_len, kv_len):
    """Visible (query, key) pairs under the bottom-right causal mask, by the N*N/2 convention."""
    return q_len * kv_len - q_len * q_len / 2


def attention_flops(batch, heads, q_len, kv_len, head_dim, mode=FWD):
    """Causal attention: forward 4*B*H*D*pairs (= 4*B*H*N*N*D/2 when q_len == kv_len), backward 2.5x."""
    _check_mode(mode)
    forward = 4 * batch * heads * head_dim * causal_pairs(q_len, kv_len)
    return forward if mode == FWD else forward * (1 + ATTENTION_BACKWARD_FACTOR)


def ffn_flops(tokens, channels, hidden, out_channels=None, mode=FWD):
    """fc: (tokens, C) -> (tokens, hidden); proj: (tokens, hidden) -> (tokens, C_out)."""
    _check_mode(mode)
    out_channels = channels if out_channels is None else out_channels
    forward = gemm_flops(tokens, hidden, channels) + gemm_flops(tokens, out_channels, hidden)
    return forward if mode == FWD else forward * (1 + GEMM_BACKWARD_FACTOR)


def linear_cross_entropy_flops(tokens, channels, vocab, mode=FWD):
    """The logits GEMM (tokens, C) @ (C, vocab) and, for fwd+bwd, its two gradient GEMMs."""
    _check_mode(mode)
    forward = gemm_flops(tokens, vocab, channels)
    return forward if mode == FWD else forward * (1 + GEMM_BACKWARD_FACTOR)


def layer_norm_bytes(tokens, channels, element_size, residual=False, mode=FWD):
    """Compulsory bytes of LayerNorm (with the fused residual add when residual=True)."""
    _check_mode(mode)
    rows = tokens * channels * element_size
    params = channels * element_size
    streams_in = 2 if residual else 1  # x (and residual)
    streams_out = 2 if residual else 1  # out (and x + residual)
    forward = (streams_in + streams_out) * rows + 2 * params  # + weight, bias
    if mode == FWD:
        return forward
    gradients_in = 2 if residual else 1  # dout (and d(x + residual))
    backward = (gradients_in + 1 + 1) * rows + 3 * params  # + read x, write dx; read w, write dw, db
    return forward + backward


def linear_cross_entropy_bytes(tokens, channels, vocab, element_size, mode=FWD):
    """Compulsory bytes of a fused linear cross-entropy (int64 targets, float32 loss)."""
    _check_mode(mode)
    inputs = tokens * channels * element_size
    weight = vocab * channels * element_size
    forward = inputs + weight + tokens * 8 + 4
    return forward if mode == FWD else forward + inputs + weight


def gpt_matmul_params(n_layer, n_embd, vocab_size):
    """Parameters that take part in a matmul: per layer qkv (3C^2), proj (C^2), fc (4C^2), proj (4C^2),
    plus the lm_head (vocab x C, tied to the token embedding). Biases and LayerNorms are left out."""
    return 12 * n_layer * n_embd * n_embd + vocab_size * n_embd


def gpt_train_flops(batch, seq, n_layer, n_head, n_embd, vocab_size):
    """One training step (forward + backward) over batch x seq tokens."""
    tokens = batch * seq
    dense = 6 * gpt_matmul_params(n_layer, n_embd, vocab_size) * tokens
    attention = n_layer * attention_flops(batch, n_head, seq, seq, n_embd // n_head, FWD_BWD)
    return dense + attention
