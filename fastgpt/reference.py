"""Readable eager PyTorch definitions of every fastgpt op.

These functions define what "correct" means. They run on any device and in any dtype, including
float64 on CPU, which is what the tests compare every kernel against. They are also the "eager torch"
baseline of the benchmarks when called in the benchmark's dtype. This module imports no kernel code.
"""

import math

import torch
import torch.nn.functional as F

from fastgpt.activations import activation_forward


def _at_least_float32(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def causal_attention(q, k, v, softmax_scale=None, return_lse=False):
    """Causal softmax attention with GQA and a bottom-right aligned mask.

    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) with H % Hkv == 0 and Tq <= Tk.
    Query i sees keys j <= i + (Tk - Tq), so a prompt appended to a KV cache attends to all of it.
    Returns out (B, H, Tq, D), and lse (B, H, Tq) in float32 (natural log) if return_lse.
    """
    heads, q_len, head_dim = q.shape[1:]
    kv_heads, kv_len = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    group = heads // kv_heads
    k = k.repeat_interleave(group, dim=1)  # (B, H, Tk, D)
    v = v.repeat_interleave(group, dim=1)  # (B, H, Tk, D)

    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    query_pos = torch.arange(q_len, device=q.device)[:, None] + (kv_len - q_len)
    key_pos = torch.arange(kv_len, device=q.device)[None, :]
    scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
    scores = scores.to(_at_least_float32(scores.dtype))  # softmax statistics in float32 or wider
    probs = torch.softmax(scores, dim=-1)
    out = (probs.to(v.dtype) @ v).to(q.dtype)  # (B, H, Tq, D)
    if return_lse:
        return out, torch.logsumexp(scores, dim=-1)  # (B, H, Tq)
    return out


def decode_attention_with_length(q, k, v, kv_len, softmax_scale=None):
    """One query per head against a preallocated cache whose valid length is a tensor.

    q: (B, H, 1, D); k, v: (B, Hkv, L, D) caches; kv_len: an integer tensor of 1 element (every
    sequence's number of valid keys) or B (each sequence's), clamped to [0, L], read by the device only.
    Returns (B, H, 1, D) in q's dtype: attention of sequence b's query to its keys 0 .. kv_len[b]-1, or 0
    where that length is 0.
    """
    batch, heads, head_dim = q.shape[0], q.shape[1], q.shape[3]
    kv_heads, capacity = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    group = heads // kv_heads
    k = k.repeat_interleave(group, dim=1)  # (B, H, L, D)
    v = v.repeat_interleave(group, dim=1)  # (B, H, L, D)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, 1, L)
    lengths = kv_len.reshape(-1, 1, 1, 1).expand(batch, 1, 1, 1)  # (B, 1, 1, 1)
    invalid = torch.arange(capacity, device=q.device) >= lengths  # (B, 1, 1, L)
    scores = scores.masked_fill(invalid, float("-inf")).to(_at_least_float32(scores.dtype))
    # Positions past the length were never written (a preallocated cache may hold NaN there), and
    # 0 * NaN is NaN: their values are zeroed, not just weighed 0.
    v = v.masked_fill(invalid.transpose(-2, -1), 0.0)  # (B, H, L, D)
    # Softmax with no valid key is 0/0; such rows get 0 (the kernels' value), other rows keep NaN.
    probs = torch.softmax(scores, dim=-1).masked_fill(invalid.all(-1, keepdim=True), 0.0)
    return (probs.to(v.dtype) @ v).to(q.dtype)  # (B, H, 1, D)


def fused_ffn(x, fc_weight, fc_bias, proj_weight, proj_bias, activation="gelu_tanh", residual=None):
    """proj(act(fc(x))) (+ residual). Weights in nn.Linear layout (out_features, in_features).

    x: (..., C); fc_weight: (Hid, C); proj_weight: (C_out, Hid). Biases may be None.
    """
    h = F.linear(x, fc_weight, fc_bias)  # (..., Hid)
    a = activation_forward(h, activation)  # (..., Hid)
    y = F.linear(a, proj_weight, proj_bias)  # (..., C_out)
    if residual is not None:
        y = y + residual
    return y


def linear(x, weight, bias=None):
    """x (..., in_features) @ weight (out_features, in_features)^T + bias: nn.Linear's projection."""
    return F.linear(x, weight, bias)


def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    """LayerNorm over the last dimension, with statistics in at least float32.

    With a residual, the normalised input is x + residual, and (out, x + residual) is returned.
    """
    if residual is not None:
        x = x + residual
    stats_dtype = _at_least_float32(x.dtype)
    xs = x.to(stats_dtype)
    mean = xs.mean(dim=-1, keepdim=True)  # (..., 1)
    var = ((xs - mean) ** 2).mean(dim=-1, keepdim=True)  # (..., 1), biased as in nn.LayerNorm
    normed = (xs - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        normed = normed * weight.to(stats_dtype)
    if bias is not None:
        normed = normed + bias.to(stats_dtype)
    out = normed.to(x.dtype)
    if residual is not None:
        return out, x
    return out


def linear_cross_entropy(x, weight, targets, bias=None, ignore_index=-100, reduction="mean"):
    """cross_entropy(x @ weight.T + bias, targets), written out: log-softmax, pick, mask, reduce.

    x: (N, C) or (..., C); weight: (V, C); targets: (N,) or (...) int64. Rows whose target is ignore_index add nothing;
    'mean' divides by the number of kept rows, so all-ignored gives NaN as in torch.
    The loss is float32 for float16/bfloat16/float32 inputs and float64 for float64 inputs.
    """
    logits = F.linear(x, weight, bias)  # (N, V)
    logits = logits.to(_at_least_float32(logits.dtype))
    lse = torch.logsumexp(logits, dim=-1)  # (N,)
    keep = targets != ignore_index  # (N,)
    safe_targets = torch.where(keep, targets, torch.zeros_like(targets))
    target_logit = logits.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # (N,)
    loss = torch.where(keep, lse - target_logit, torch.zeros_like(lse))  # (N,)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / keep.sum()
