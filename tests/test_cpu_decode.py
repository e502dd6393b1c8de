"""The cpu decode step (fastgpt::decode_blocks): every block of a GPT over a decode step's few new
tokens in one C++ call. It runs the same kernels in the same order as the per-module path, so its
results must be bitwise equal to it, caches included; GPT.generate must take it exactly for decode-
sized steps on the cpu backend; and bad arguments to the op must raise before any kernel runs."""

import pytest
import torch

pytest.importorskip("fastgpt.ops.compiled", reason="fastgpt._C (the cpu backend) is not built")

from tolerance import assert_close

from fastgpt import reference
from fastgpt.functional import decode_attention_with_length
from fastgpt.nn import GPT, GPTConfig, KVCache
from fastgpt.ops import compiled

SMALL = {"n_layer": 3, "n_embd": 64, "n_head": 4, "vocab_size": 97, "block_size": 64}


def model_and_caches(dtype, batch, max_len, **config):
    model = GPT(GPTConfig(**{**SMALL, **config})).eval().to(dtype)
    for p in model.parameters():  # biases and LayerNorm weights off their zero/one init
        torch.nn.init.normal_(p, std=0.1)
    c = model.config
    caches = [
        KVCache(batch, c.n_kv_head, max_len, c.head_dim, dtype=dtype, device="cpu") for _ in range(c.n_layer)
    ]
    return model, caches


def clone_caches(caches):
    copies = []
    for cache in caches:
        copy = KVCache.__new__(KVCache)
        copy.keys, copy.values = cache.keys.clone(), cache.values.clone()
        copies.append(copy)
    return copies


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "n_kv_head,bias", [(4, True), (2, False), (1, True)], ids=["mha", "gqa-nobias", "mqa"]
)
@pytest.mark.parametrize("batch,new", [(1, 1), (3, 1), (2, 5)])
def test_decode_blocks_equals_the_module_path_bitwise(dtype, n_kv_head, bias, batch, new):
    model, caches = model_and_caches(dtype, batch, 40, n_kv_head=n_kv_head, bias=bias)
    prompt = torch.randint(0, 97, (batch, 13))
    with torch.inference_mode():
        model.hidden_states(prompt, caches, 0)  # a filled prefix of 13 positions
        module_caches = clone_caches(caches)
        idx = torch.randint(0, 97, (batch, new))
        assert model.fused_decode_step(torch.zeros(batch, new, model.config.n_embd, dtype=dtype)) is not None
        fused = model.hidden_states(idx, caches, 13, model.decode_block_parameters())
        per_module = model.hidden_states(idx, module_caches, 13)
    assert torch.isfinite(fused).all()
    assert torch.equal(fused, per_module)
    for cache, module_cache in zip(caches, module_caches):
        assert torch.equal(cache.keys[:, :, : 13 + new], module_cache.keys[:, :, : 13 + new])
        assert torch.equal(cache.values[:, :, : 13 + new], module_cache.values[:, :, : 13 + new])


def count_decode_calls(monkeypatch):
    calls = []
    original = compiled.decode_blocks

    def counting(x, *args):
        calls.append(tuple(x.shape))
        return original(x, *args)

    monkeypatch.setattr(compiled, "decode_blocks", counting)
    return calls


def test_generate_takes_the_decode_op_for_decode_steps_only(monkeypatch):
    calls = count_decode_calls(monkeypatch)
    model = GPT(GPTConfig(**SMALL)).eval()
    prompt = torch.randint(0, 97, (2, 20))
    out = model.generate(prompt, 6, temperature=0)
    # The prefill (2 x 20 = 40 rows) runs module by module; each of the 5 one-token steps is one call.
    assert calls == [(2, 1, 64)] * 5
    calls.clear()
    with torch.inference_mode():
        reference_out = model.set_backend("reference").generate(prompt, 6, temperature=0)
    assert calls == []
    assert out.shape == reference_out.shape == (2, 26)


def test_decode_op_is_not_taken_under_autograd_or_dropout():
    model = GPT(GPTConfig(**SMALL, dropout=0.1))
    x = torch.zeros(1, 1, 64)
    with torch.no_grad():
        assert model.train().fused_decode_step(x) is None  # dropout in training mode
        assert model.eval().fused_decode_step(x) is compiled.decode_blocks
        assert model.fused_decode_step(torch.zeros(17, 1, 64)) is None  # beyond the kernel's 16 rows
    assert model.fused_decode_step(x) is None  # grad mode: the module path keeps autograd


def decode_arguments():
    model, caches = model_and_caches(torch.float32, 2, 8)
    keys, values = [c.keys.normal_() for c in caches], [c.values.normal_() for c in caches]
    return [
        torch.randn(2, 1, 64),
        model.decode_block_parameters(),
        keys,
        values,
        3,
        4,
        1e-5,
        0.25,
        "gelu_tanh",
    ]


@pytest.mark.parametrize(
    "position,value,pattern",
    [
        (1, "drop_last", r"12 parameters per block, got 3 key caches, 3 value caches and 35 parameters"),
        (3, "drop_last", r"one key cache and one value cache per block"),
        (4, 8, r"each cache must have shape \(2, kv_heads dividing 4, >= 9, 16\), got \[2, 4, 8, 16\]"),
        (5, 3, r"heads must divide n_embd \(64\), got 3"),
        (
            0,
            torch.randn(2, 1, 64, dtype=torch.float64),
            r"supports float32 and bfloat16 tensors; x has dtype Double",
        ),
        (1, "none_weight", r"parameter 2 of block 2 \(a weight\) must be a tensor, got None"),
        (1, "short_weight", r"parameter 8 of block 2 must have shape \[256, 64\], got \[255, 64\]"),
    ],
    ids=["params", "values", "past-the-cache", "heads", "dtype", "none-weight", "wrong-shape"],
)
def test_decode_op_rejects_bad_arguments_before_writing(position, value, pattern):
    arguments = decode_arguments()
    before = [t.clone() for t in arguments[2]]
    if value == "drop_last":
        arguments[position] = arguments[position][:-1]
    elif value == "none_weight":  # in the last block: nothing may be written for the first ones either
        arguments[position][24 + 2] = None
    elif value == "short_weight":
        arguments[position][24 + 8] = arguments[position][24 + 8][:-1]
    else:
        arguments[position] = value
    with pytest.raises(RuntimeError, match=pattern):
        compiled.decode_blocks(*arguments)
    assert all(torch.equal(a, b) for a, b in zip(arguments[2], before))


# ----------------------------------------------------------------------------------------------
# Per-sequence lengths: prompts of different lengths decoding together


def per_sequence_attention(q, k_cache, v_cache, lengths):
    """reference.causal_attention of each sequence's query to its own first lengths[b] keys, in q's
    dtype (0 for no key)."""
    rows = []
    for b, length in enumerate(lengths):
        k, v = k_cache[b : b + 1, :, :length], v_cache[b : b + 1, :, :length]
        rows.append(
            reference.causal_attention(q[b : b + 1], k, v) if length else torch.zeros_like(q[b : b + 1])
        )
    return torch.cat(rows)  # (B, H, 1, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_decode_attention_with_per_sequence_lengths_matches_reference(dtype, heads, kv_heads):
    """The cpu kernel's per-sequence lengths: 700 keys of capacity make two key splits (at least 256
    keys each), so the lengths leave the second split empty (0, 1, 64), part-filled (300) or full (700),
    and a length past the capacity (900) is clamped to it. The reference's per-sequence mask agrees."""
    lengths = [300, 0, 1, 64, 700, 900]
    batch, capacity, head_dim = len(lengths), 700, 64
    q = torch.randn(batch, heads, 1, head_dim, dtype=dtype)
    k_cache = torch.randn(batch, kv_heads, capacity, head_dim, dtype=dtype)
    v_cache = torch.randn(batch, kv_heads, capacity, head_dim, dtype=dtype)
    clamped = [min(n, capacity) for n in lengths]
    expected = per_sequence_attention(q.double(), k_cache.double(), v_cache.double(), clamped)
    eager = per_sequence_attention(q, k_cache, v_cache, clamped)
    for kv_len in (torch.tensor(lengths, dtype=torch.int32), torch.tensor(lengths)):
        with torch.inference_mode():
            out = decode_attention_with_length(q, k_cache, v_cache, kv_len, backend="cpu")
            masked = reference.decode_attention_with_length(q, k_cache, v_cache, kv_len)
        assert out.dtype == dtype and out.shape == q.shape
        assert torch.equal(out[1], torch.zeros_like(out[1]))  # no key: 0, not NaN
        assert_close("per-sequence decode", out, expected, eager)
        assert_close("reference mask", masked, expected, eager)
    with torch.inference_mode():
        one_length = decode_attention_with_length(q, k_cache, v_cache, torch.tensor([64]), backend="cpu")
    expected_64 = per_sequence_attention(q.double(), k_cache.double(), v_cache.double(), [64] * batch)
    assert_close(
        "one length for all",
        one_length,
        expected_64,
        per_sequence_attention(q, k_cache, v_cache, [64] * batch),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n_kv_head", [4, 1], ids=["mha", "mqa"])
def test_decode_blocks_with_positions_equals_the_module_path_bitwise(monkeypatch, dtype, n_kv_head):
    """decode_blocks with per-sequence positions (the static decode step of prompts of different
    lengths) runs the kernels of the per-module path (KVCache.write_at, decode_attention_with_length on
    the cpu kernel): the same hidden states and caches, bit for bit. Each sequence's new keys land at its
    own position and no other cached key changes."""
    batch = 3
    model, caches = model_and_caches(dtype, batch, 40, n_kv_head=n_kv_head)
    for cache in caches:
        cache.keys.normal_()
        cache.values.normal_()
    module_caches = clone_caches(caches)
    for copy, cache in zip(module_caches, caches):
        copy.rows = cache.rows
    before = clone_caches(caches)
    tokens = torch.randint(0, 97, (batch, 1))
    positions = torch.tensor([13, 0, 39])
    with torch.inference_mode():
        fused = model.decode_hidden_state(tokens, positions, caches, model.decode_block_parameters())
        monkeypatch.setattr(GPT, "fused_decode_step", lambda self, x: None)
        per_module = model.decode_hidden_state(tokens, positions, module_caches, None)
    assert torch.isfinite(fused).all() and torch.equal(fused, per_module)
    for cache, module_cache, old in zip(caches, module_caches, before):
        assert torch.equal(cache.keys, module_cache.keys) and torch.equal(cache.values, module_cache.values)
        for b, position in enumerate(positions.tolist()):
            others = [p for p in range(40) if p != position]
            assert torch.equal(cache.keys[b, :, others], old.keys[b, :, others])
            assert not torch.equal(cache.keys[b, :, position], old.keys[b, :, position])


@pytest.mark.parametrize(
    "positions,error,pattern",
    [
        (
            torch.tensor([3, 8]),
            RuntimeError,
            r"each cache must have shape \(2, kv_heads dividing 4, >= 9, 16\)",
        ),
        (torch.tensor([3, -1]), ValueError, r"start and positions must be >= 0, got -1"),
        (
            torch.tensor([3, 4], dtype=torch.int32),
            TypeError,
            r"positions must be a CPU int64 tensor, got Int",
        ),
        (torch.tensor([3]), RuntimeError, r"positions must have shape \[2\], got \[1\]"),
    ],
    ids=["past-the-cache", "negative", "int32", "one-for-two"],
)
def test_decode_op_rejects_bad_positions_before_writing(positions, error, pattern):
    arguments = decode_arguments()
    before = [t.clone() for t in arguments[2]]
    with pytest.raises(error, match=pattern):
        compiled.decode_blocks(*arguments, positions)
    assert all(torch.equal(a, b) for a, b in zip(arguments[2], before))
