"""The building blocks of a GPT, each a thin module over one fastgpt op.

Every module keeps its parameters in nanoGPT's layout and names, and holds a `backend` attribute
(the fastgpt backend its op runs on; GPT.set_backend changes all of them at once). Modules call the
public ops only, and leave the checking of their inputs to them: the op validates once, before any
kernel, and only when it rejects an argument (TypeError/ValueError) does the module look at its inputs
again, to raise the error in the module's own terms (its parameters, its expected shape); a call that
succeeds pays nothing for that (a try block is free in Python 3.11). A module checks
upfront only what its first op cannot see (a rank the op accepts, a residual that meets the op only
after another op ran).
"""

import torch
from torch import nn

from fastgpt.dispatch import check_eps, check_tensor, describe
from fastgpt.functional import causal_attention, decode_attention_with_length, fused_ffn, layer_norm, linear


def check_module_input(module, name, x, *, parameter, features, ndim=None):
    """Checks a module's input: a floating-point tensor in the dtype and on the device of `parameter`
    (one of the module's), with `features` values in its last dimension (and exactly `ndim` dimensions
    when given). The message names the module, the argument, expected and given."""
    op = type(module).__name__
    check_tensor(op, name, x, min_ndim=1)
    if x.dtype != parameter.dtype:
        raise TypeError(
            f"{op}: {name} must have the dtype of the module's parameters ({parameter.dtype}), got {x.dtype}"
        )
    if x.device != parameter.device:
        raise ValueError(
            f"{op}: {name} must be on the device of the module's parameters ({parameter.device}), got {x.device}"
        )
    expected = f"(batch, seq_len, {features})" if ndim == 3 else f"(..., {features})"
    if (ndim is not None and x.dim() != ndim) or x.shape[-1] != features:
        raise ValueError(f"{op}: {name} must have shape {expected} (n_embd={features}), got {describe(x)}")


def is_sequence_batch(x):
    """Whether x can be a (batch, seq_len, features) input: what a module checks before its first op."""
    return isinstance(x, torch.Tensor) and x.dim() == 3


class Linear(nn.Linear):
    """nn.Linear on fastgpt.linear: the few rows of a decode step run on the cpu backend's kernel that
    streams the weight once, every other call as F.linear."""

    def __init__(self, in_features, out_features, *, bias=True, backend="auto"):
        super().__init__(in_features, out_features, bias=bias)
        self.backend = backend

    def forward(self, x):
        """x: (..., in_features) -> (..., out_features)."""
        try:
            return linear(x, self.weight, self.bias, backend=self.backend)
        except (TypeError, ValueError):
            check_module_input(self, "x", x, parameter=self.weight, features=self.in_features)
            raise


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension, with an optional bias (nanoGPT's), and a fused residual add."""

    def __init__(self, n_embd, *, bias=True, eps=1e-5, backend="auto"):
        super().__init__()
        check_eps("LayerNorm", eps)
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd)) if bias else None
        self.eps = eps
        self.backend = backend

    def forward(self, x, residual=None):
        """x: (..., C). Returns ln(x), or with residual (..., C): (ln(x + residual), x + residual) in one pass."""
        try:
            return layer_norm(x, self.weight, self.bias, self.eps, residual=residual, backend=self.backend)
        except (TypeError, ValueError):
            self.check_inputs(x, residual)
            raise

    def check_inputs(self, x, residual):
        check_module_input(self, "x", x, parameter=self.weight, features=self.weight.shape[0])
        if residual is not None:
            check_module_input(
                self, "residual", residual, parameter=self.weight, features=self.weight.shape[0]
            )


class KVCache:
    """Preallocated keys and values of one attention layer, each (B, n_kv_head, max_len, D).

    `update` writes new keys and values at a position and returns views of everything cached up to
    their end, which causal_attention reads in place (its bottom-right mask lets new queries see
    the whole prefix).
    """

    def __init__(self, batch, n_kv_head, max_len, head_dim, *, dtype, device):
        # Uninitialised: attention only ever reads positions that update() has written.
        self.keys = torch.empty(batch, n_kv_head, max_len, head_dim, dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)
        self.rows = torch.arange(batch, device=device)  # (B,): write_at's index of each sequence

    def update(self, k, v, start):
        """k, v: (B, n_kv_head, T, D) for positions start .. start+T-1. Returns (B, n_kv_head, start+T, D) views."""
        end = start + k.shape[2]
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]

    def write_at(self, k, v, positions):
        """k, v: (B, n_kv_head, 1, D), sequence b's at positions[b] (a (B,) int64 device tensor): written
        in place with no host read of the positions (a captured decode step)."""
        self.keys[self.rows, :, positions] = k[:, :, 0]  # (B, n_kv_head, D) rows
        self.values[self.rows, :, positions] = v[:, :, 0]


class CausalSelfAttention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention with a fused qkv projection."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        qkv_features = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.c_attn = Linear(config.n_embd, qkv_features, bias=config.bias, backend=config.backend)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias, backend=config.backend)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.backend = config.backend

    def split_heads(self, qkv):
        """(B, T, (H + 2*Hkv) * D) -> q (B, H, T, D), k and v (B, Hkv, T, D): strided views, no copy."""
        batch, seq, _ = qkv.shape
        heads = qkv.view(batch, seq, self.n_head + 2 * self.n_kv_head, self.head_dim).transpose(1, 2)
        return heads.split((self.n_head, self.n_kv_head, self.n_kv_head), dim=1)

    def forward(self, x, cache=None, start=0):
        """x: (B, T, C). With a KVCache, x holds positions start .. start+T-1 and attends to the cached prefix too."""
        if not is_sequence_batch(x):
            self.check_input(x)
        try:
            qkv = self.c_attn(x)  # (B, T, (H + 2 Hkv) D)
        except (TypeError, ValueError):
            self.check_input(x)
            raise
        batch, seq, channels = x.shape
        q, k, v = self.split_heads(qkv)  # (B, H, T, D), (B, Hkv, T, D), (B, Hkv, T, D)
        if cache is not None:
            k, v = cache.update(k, v, start)  # (B, Hkv, start + T, D)
        y = causal_attention(q, k, v, backend=self.backend)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(batch, seq, channels)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def decode_at(self, x, cache, position, length):
        """The static decode step: x (B, 1, C) holds each sequence's token at its `position` (a (B,)
        int64 device tensor); its k/v are written into the KVCache there, and its query attends to the
        sequence's first `length` (a (B,) device tensor, position + 1) cached keys. Every shape is the
        same at every position, and the host reads neither tensor. Returns (B, 1, C)."""
        qkv = self.c_attn(x)  # (B, 1, (H + 2 Hkv) D)
        batch, seq, channels = x.shape
        q, k, v = self.split_heads(qkv)  # (B, H, 1, D), (B, Hkv, 1, D), (B, Hkv, 1, D)
        cache.write_at(k, v, position)
        y = decode_attention_with_length(q, cache.keys, cache.values, length, backend=self.backend)
        y = y.transpose(1, 2).reshape(batch, seq, channels)  # (B, 1, C)
        return self.resid_dropout(self.c_proj(y))

    def check_input(self, x):
        check_module_input(
            self, "x", x, parameter=self.c_proj.weight, features=self.c_proj.out_features, ndim=3
        )


class MLP(nn.Module):
    """c_proj(act(c_fc(x))) as one fused_ffn call, with the residual add fused into its epilogue."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner, bias=config.bias)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.activation = config.activation
        self.backend = config.backend

    def forward(self, x, residual=None):
        """x: (..., C). Returns mlp(x), or residual + mlp(x) when residual (..., C) is given."""
        weights = (self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias)
        if self.training and self.dropout.p > 0:
            # Dropout sits between the projection and the residual add, so the add cannot be fused, and
            # the residual meets an op only after the FFN ran: check it first.
            if residual is not None:
                self.check_inputs(x, residual)
            try:
                y = self.dropout(fused_ffn(x, *weights, activation=self.activation, backend=self.backend))
            except (TypeError, ValueError):
                self.check_inputs(x, None)
                raise
            return y if residual is None else residual + y
        try:
            return fused_ffn(x, *weights, activation=self.activation, residual=residual, backend=self.backend)
        except (TypeError, ValueError):
            self.check_inputs(x, residual)
            raise

    def check_inputs(self, x, residual):
        check_module_input(self, "x", x, parameter=self.c_fc.weight, features=self.c_fc.in_features)
        if residual is None:
            return
        check_module_input(
            self, "residual", residual, parameter=self.c_proj.weight, features=self.c_proj.out_features
        )
        if residual.shape[:-1] != x.shape[:-1]:
            raise ValueError(
                f"MLP: residual must have shape {(*x.shape[:-1], self.c_proj.out_features)} to match x, "
                f"got {tuple(residual.shape)}"
            )


class Block(nn.Module):
    """A pre-LN transformer block: x + attn(ln_1(x)), then + mlp(ln_2(.)).

    Both residual adds are fused: ln_2 adds the attention output to the stream while normalising it,
    and the MLP adds its output in its last GEMM's epilogue, so the stream is never re-read for an add.
    """

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(
            config.n_embd, bias=config.bias, eps=config.layer_norm_eps, backend=config.backend
        )
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(
            config.n_embd, bias=config.bias, eps=config.layer_norm_eps, backend=config.backend
        )
        self.mlp = MLP(config)

    def forward(self, x, cache=None, start=0):
        """x: (B, T, C) -> (B, T, C)."""
        if not is_sequence_batch(x):
            self.check_input(x)
        try:
            h = self.ln_1(x)  # (B, T, C)
        except (TypeError, ValueError):
            self.check_input(x)
            raise
        attn_out = self.attn(h, cache, start)  # (B, T, C)
        h, x = self.ln_2(attn_out, residual=x)  # h = ln_2(x + attn_out); x = x + attn_out
        return self.mlp(h, residual=x)  # x + mlp(h)

    def decode_at(self, x, cache, position, length):
        """The block over one token per sequence, x (B, 1, C), at device-held positions (B,)
        (CausalSelfAttention.decode_at) -> (B, 1, C)."""
        attn_out = self.attn.decode_at(self.ln_1(x), cache, position, length)  # (B, 1, C)
        h, x = self.ln_2(attn_out, residual=x)  # h = ln_2(x + attn_out); x = x + attn_out
        return self.mlp(h, residual=x)  # x + mlp(h)

    def check_input(self, x):
        check_module_input(
            self, "x", x, parameter=self.ln_1.weight, features=self.ln_1.weight.shape[0], ndim=3
        )
