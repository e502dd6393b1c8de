"""The split-KV decode kernel: one query per head against a KV cache, against the float64 reference.

Under the interpreter the cache is cut into splits of a few dozen keys (see triton_decode), so
lengths 17/97/257 cover one split, several splits, and ragged ones.
"""

import pytest
import torch

pytest.importorskip("triton")

import triton
from tolerance import assert_close

import fastgpt
from fastgpt import reference
from fastgpt.functional import decode_attention_with_length
from fastgpt.ops import triton_decode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    "triton" not in fastgpt.available_backends(), reason="the triton backend is not available here"
)


def cache_views(batch, kv_heads, kv_len, head_dim, dtype, capacity, device=DEVICE):
    """k and v as views cache[:, :, :kv_len] of preallocated (B, Hkv, capacity, D) caches."""
    k_cache = torch.randn(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
    v_cache = torch.randn(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
    return k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]


def check_decode(q, k, v, softmax_scale=None):
    with torch.no_grad():
        out = fastgpt.causal_attention(q, k, v, softmax_scale=softmax_scale, backend="triton")
        expected = reference.causal_attention(q.double(), k.double(), v.double(), softmax_scale)
        eager = reference.causal_attention(q, k, v, softmax_scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close("out", out, expected, eager)
    return out


# (batch, heads, kv_heads, kv_len, head_dim, dtype)
SHAPES = [
    (1, 1, 1, 1, 16, torch.float32),
    (1, 4, 4, 17, 80, torch.float32),
    (2, 8, 2, 97, 64, torch.float32),
    (1, 4, 1, 257, 128, torch.float16),
    (2, 6, 3, 97, 256, torch.float16),
]


@pytest.mark.parametrize("batch, heads, kv_heads, kv_len, head_dim, dtype", SHAPES)
def test_matches_reference(batch, heads, kv_heads, kv_len, head_dim, dtype):
    q = torch.randn(batch, heads, 1, head_dim, dtype=dtype, device=DEVICE)
    check_decode(q, *cache_views(batch, kv_heads, kv_len, head_dim, dtype, capacity=kv_len + 40))


def test_reads_the_cache_in_place_and_splits_it(monkeypatch):
    """The partial kernel gets the cache views themselves (pointer and strides), in several splits,
    with all the query heads of a GQA group in one program."""
    launches = []

    class RecordingKernel:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((grid, args, kwargs))
                return self.kernel[grid](*args, **kwargs)

            return launch

    if triton_decode.INTERPRETER:
        kernel = RecordingKernel(triton_decode._decode_partial_kernel)
        monkeypatch.setattr(triton_decode, "_decode_partial_kernel", kernel)
    else:
        autotuned = triton_decode._autotuned_partial
        monkeypatch.setattr(
            triton_decode, "_autotuned_partial", lambda *key: RecordingKernel(autotuned(*key))
        )
    q = torch.randn(2, 8, 1, 64, device=DEVICE)
    k, v = cache_views(2, 2, 97, 64, torch.float32, capacity=160)
    check_decode(q, k, v)

    ((grid, args, kwargs),) = launches
    assert args[1].data_ptr() == k.data_ptr() and args[1].stride() == k.stride()
    assert args[2].data_ptr() == v.data_ptr() and args[2].stride() == v.stride()
    assert grid[0] == 2 * 2  # one program per (batch, kv head) and split
    if triton_decode.INTERPRETER:
        assert grid[1] > 1, "97 keys should span several splits under the interpreter"
    assert kwargs["BLOCK_H"] >= 4


def test_single_query_without_grad_uses_the_decode_kernel(monkeypatch, fresh_routes):
    calls = []
    monkeypatch.setattr(triton_decode, "decode_attention_op", lambda *args: calls.append(args) or args[0])
    q = torch.randn(1, 2, 1, 16, device=DEVICE)
    k, v = cache_views(1, 1, 30, 16, torch.float32, capacity=30)
    with torch.no_grad():
        fastgpt.causal_attention(q, k, v, backend="triton")
    assert len(calls) == 1
    fastgpt.causal_attention(q.requires_grad_(), k, v, backend="triton")
    assert len(calls) == 1, "a query that needs a gradient must take the differentiable kernel"


def test_single_query_with_grad_is_differentiable():
    q = torch.randn(1, 4, 1, 32, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 2, 45, 32, device=DEVICE, requires_grad=True)
    v = torch.randn(1, 2, 45, 32, device=DEVICE, requires_grad=True)
    out = fastgpt.causal_attention(q, k, v, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    upcast = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64 = reference.causal_attention(*upcast)
    grads64 = torch.autograd.grad(out64, upcast, dout.double())
    same_dtype = [t.detach().requires_grad_() for t in (q, k, v)]
    out32 = reference.causal_attention(*same_dtype)
    grads32 = torch.autograd.grad(out32, same_dtype, dout)
    assert_close("out", out.detach(), out64.detach(), out32.detach())
    for name, actual, expected, eager in zip(("dq", "dk", "dv"), grads, grads64, grads32):
        assert_close(name, actual, expected, eager)


def test_huge_logits_and_nan_stay_contained():
    """Scores ~1e4 do not overflow; a NaN query head poisons only its own output, not the other
    heads of its GQA group that share the program."""
    q = torch.randn(1, 4, 1, 64, device=DEVICE)
    k, v = cache_views(1, 1, 97, 64, torch.float32, capacity=97)
    check_decode(q, k, v, softmax_scale=1000.0)
    q[0, 2] = float("nan")
    out = check_decode(q, k, v)
    assert out[0, 2].isnan().all() and not out[0, [0, 1, 3]].isnan().any()


def test_empty_batch():
    q = torch.randn(0, 4, 1, 16, device=DEVICE)
    k, v = cache_views(0, 2, 10, 16, torch.float32, capacity=10)
    with torch.no_grad():
        assert fastgpt.causal_attention(q, k, v, backend="triton").shape == q.shape


def test_direct_calls_are_validated():
    q = torch.randn(1, 2, 3, 16, device=DEVICE)
    expected = r"q must have shape \(batch, heads, 1, head_dim\), got \(1, 2, 3, 16\)"
    with pytest.raises(ValueError, match=expected):
        triton_decode.decode_attention(q, q, q)
    with pytest.raises(ValueError, match=r"multiple of k's kv_heads .*heads=2, kv_heads=3"):
        kv = torch.randn(1, 3, 5, 16, device=DEVICE)
        triton_decode.decode_attention(q[:, :, :1], kv, kv)


def test_opcheck():
    q = torch.randn(1, 4, 1, 16, device=DEVICE)
    k, v = cache_views(1, 2, 40, 16, torch.float32, capacity=48)
    torch.library.opcheck(torch.ops.fastgpt.triton_decode_attention.default, (q, k, v, 0.25))


def test_torch_compile_fullgraph():
    @torch.compile(fullgraph=True)
    def decode_step(q, k, v):
        return fastgpt.causal_attention(q, k, v, backend="triton") + 1.0

    q = torch.randn(1, 4, 1, 16, device=DEVICE)
    k, v = cache_views(1, 2, 40, 16, torch.float32, capacity=48)
    with torch.no_grad():
        out = decode_step(q, k, v)
        expected = triton_decode.decode_attention(q, k, v, 0.25) + 1.0
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "batch, heads, kv_heads, kv_len, head_dim",
    [(4, 32, 8, 4000, 128), (1, 12, 12, 1025, 64), (16, 16, 1, 300, 128), (1, 8, 2, 8191, 256)],
)
def test_gpu_matches_reference(batch, heads, kv_heads, kv_len, head_dim, dtype):
    q = torch.randn(batch, heads, 1, head_dim, dtype=dtype, device="cuda")
    k, v = cache_views(batch, kv_heads, kv_len, head_dim, dtype, capacity=kv_len + 512, device="cuda")
    check_decode(q, k, v)


def test_head_span_beyond_32_bits_is_rejected():
    """Inside one (batch, head) slice the kernels index with 32-bit integers; a layout whose slice
    spans 2**31 elements or more is refused before any launch (shapes only: a meta tensor)."""
    cache = torch.empty_strided((1, 1, 3, 16), (0, 0, 2**30, 1), device="meta")
    with pytest.raises(ValueError, match=r"k spans 2147483663 elements within one \(batch, head\) slice"):
        triton_decode.check_head_span("k", cache)


# The device-length variant (the captured decode step's): capacity 97 is cut into splits of 40 keys
# under the interpreter ([0, 40), [40, 80), [80, 97)), so lengths 1, 17 and 40 leave whole splits
# empty, 41 and 97 fill a split's first key and the whole cache, and 200 is clamped to the capacity.
DEVICE_LENGTHS = [1, 17, 40, 41, 97, 200]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_device_length_matches_reference(heads, kv_heads, dtype):
    capacity, head_dim = 97, 64
    q = torch.randn(2, heads, 1, head_dim, dtype=dtype, device=DEVICE)
    k_cache, v_cache = cache_views(2, kv_heads, capacity, head_dim, dtype, capacity=capacity)
    for kv_len in DEVICE_LENGTHS:
        length = torch.tensor([kv_len], device=DEVICE)
        valid = min(kv_len, capacity)
        with torch.no_grad():
            out = decode_attention_with_length(q, k_cache, v_cache, length, backend="triton")
            k, v = k_cache[:, :, :valid], v_cache[:, :, :valid]
            expected = reference.causal_attention(q.double(), k.double(), v.double())
            eager = reference.causal_attention(q, k, v)
        assert out.dtype == q.dtype and out.shape == q.shape
        assert_close(f"out at kv_len={kv_len}", out, expected, eager)
        reference_out = reference.decode_attention_with_length(
            q.double(), k_cache.double(), v_cache.double(), length
        )
        torch.testing.assert_close(reference_out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_device_length_per_sequence_matches_reference(dtype):
    """One length per sequence (prompts of different lengths decoding together): each of the six
    sequences reads its own length, among them the cases above (empty splits, a split's first key, the
    whole cache, clamped past it) and 0 (output 0)."""
    lengths = [1, 41, 97, 0, 200, 17]
    batch, capacity, head_dim = len(lengths), 97, 64
    q = torch.randn(batch, 8, 1, head_dim, dtype=dtype, device=DEVICE)
    k_cache, v_cache = cache_views(batch, 2, capacity, head_dim, dtype, capacity=capacity)
    kv_len = torch.tensor(lengths, device=DEVICE)
    column = torch.stack([kv_len, kv_len + 1], dim=1)[:, 0]  # the lengths as a view of stride 2
    with torch.no_grad():
        out = decode_attention_with_length(q, k_cache, v_cache, kv_len, backend="triton")
        assert torch.equal(decode_attention_with_length(q, k_cache, v_cache, column, backend="triton"), out)
    for b, length in enumerate(lengths):
        valid = min(length, capacity)
        if valid == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
            continue
        k, v = k_cache[b : b + 1, :, :valid], v_cache[b : b + 1, :, :valid]
        expected = reference.causal_attention(q[b : b + 1].double(), k.double(), v.double())
        eager = reference.causal_attention(q[b : b + 1], k, v)
        assert_close(f"sequence {b} at kv_len={length}", out[b : b + 1], expected, eager)


@pytest.mark.skipif(not triton_decode.INTERPRETER, reason="sets the interpreter's block and split sizes")
@pytest.mark.parametrize("block_n", [128, 64, 32])
def test_gpu_split_geometry(monkeypatch, block_n):
    """The GPU's split sizing (splits of at least 256 keys aligned to 128, as many as two waves of 132
    SMs want) with its key blocks, which the interpreter's 24-key splits of 16-key blocks never run: 700
    keys make splits of 256, 256 and 188 (not a multiple of any BLOCK_N), and a device length of 450
    leaves the second split part-valid and the third empty."""
    monkeypatch.setattr(triton_decode, "INTERPRETER_CONFIG", {"BLOCK_N": block_n})
    monkeypatch.setattr(
        triton_decode, "INTERPRETER_SPLITS", triton.cdiv(triton_decode.WAVES_PER_SM * 132, 2 * 2)
    )
    monkeypatch.setattr(triton_decode, "INTERPRETER_MIN_SPLIT_KEYS", triton_decode.MIN_SPLIT_KEYS)
    monkeypatch.setattr(triton_decode, "INTERPRETER_SPLIT_ALIGN", triton_decode.SPLIT_ALIGN)
    assert triton_decode._split_len(2 * 2, 700, None) == 256
    q = torch.randn(2, 8, 1, 72, dtype=torch.float16, device=DEVICE)
    k, v = cache_views(2, 2, 700, 72, torch.float16, capacity=700)
    check_decode(q, k, v)
    length = torch.tensor([450], device=DEVICE)
    with torch.no_grad():
        out = decode_attention_with_length(q, k, v, length, backend="triton")
        expected = reference.decode_attention_with_length(q.double(), k.double(), v.double(), length)
        eager = reference.decode_attention_with_length(q, k, v, length)
    assert_close("out at kv_len=450", out, expected, eager)


def test_device_length_past_int32_is_clamped_to_the_capacity():
    """An int64 length of 2**32 + 17 is clamped to the capacity like 200 is above (the kernel cast it to
    int32 first, which made it 17): the same output as the capacity itself."""
    q = torch.randn(1, 4, 1, 16, device=DEVICE)
    k, v = cache_views(1, 2, 97, 16, torch.float32, capacity=97)
    with torch.no_grad():
        huge = decode_attention_with_length(
            q, k, v, torch.tensor([2**32 + 17], device=DEVICE), backend="triton"
        )
        full = decode_attention_with_length(q, k, v, torch.tensor([97], device=DEVICE), backend="triton")
    assert torch.equal(huge, full)


def test_device_length_with_every_split_empty_is_zero_and_nan_stays_in_its_row():
    q = torch.randn(1, 4, 1, 16, device=DEVICE)
    k, v = cache_views(1, 2, 97, 16, torch.float32, capacity=97)
    empty = torch.tensor([0], dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        assert torch.equal(
            decode_attention_with_length(q, k, v, empty, backend="triton"), torch.zeros_like(q)
        )
        assert torch.equal(reference.decode_attention_with_length(q, k, v, empty), torch.zeros_like(q))
        q[0, 1] = float("nan")
        out = decode_attention_with_length(q, k, v, torch.tensor([60], device=DEVICE), backend="triton")
    assert out[0, 1].isnan().all() and not out[0, [0, 2, 3]].isnan().any()


def test_device_length_launches_one_grid_for_every_length(monkeypatch):
    """The grid and every host-side argument depend on the cache's capacity, not on the length, so
    one captured launch serves every step; the int-length path is unchanged (KvLen None)."""
    launches = []
    kernel = triton_decode._decode_partial_kernel

    class RecordingKernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((grid, [a for a in args if not isinstance(a, torch.Tensor)], kwargs))
                return kernel[grid](*args, **kwargs)

            return launch

    if not triton_decode.INTERPRETER:
        pytest.skip("records the interpreter's launch; on a GPU the autotuner wraps the kernel")
    monkeypatch.setattr(triton_decode, "_decode_partial_kernel", RecordingKernel())
    q = torch.randn(1, 2, 1, 16, device=DEVICE)
    k, v = cache_views(1, 1, 97, 16, torch.float32, capacity=97)
    with torch.no_grad():
        for kv_len in (1, 50):
            decode_attention_with_length(q, k, v, torch.tensor([kv_len], device=DEVICE), backend="triton")
        fastgpt.causal_attention(q, k[:, :, :50], v[:, :, :50], backend="triton")
    (grid_1, host_1, flags_1), (grid_50, host_50, _), (_, host_int, flags_int) = launches
    assert grid_1 == grid_50 and grid_1[1] == 3 and host_1 == host_50
    assert flags_1["KV_LEN_ON_DEVICE"] and not flags_int["KV_LEN_ON_DEVICE"]
    # (..., kv_len, KvLen, stride_len, split_len, num_splits): 40-key splits of the 97-key capacity, one
    # length for every sequence (stride 0); the int path sizes its splits for its own 50 keys, with no
    # length pointer.
    assert host_1[-4:] == [97, 0, 40, 3]
    assert host_int[-5:] == [50, None, 0, 24, 3]


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        ({"kv_len": 5}, TypeError, r"kv_len must be an int32/int64 torch.Tensor, got int 5"),
        (
            {"kv_len": torch.tensor([5.0])},
            TypeError,
            r"kv_len must be an int32/int64 torch.Tensor, got a torch.float32 tensor",
        ),
        (
            {"kv_len": torch.tensor([5, 6])},
            ValueError,
            r"kv_len must have 1 or batch \(1\) elements, got shape \(2,\)",
        ),
        ({"kv_len": torch.tensor([5], device="meta")}, ValueError, r"kv_len must be on q's device"),
        ({"q": torch.randn(1, 4, 2, 16)}, ValueError, r"q must have shape \(batch, heads, 1, head_dim\)"),
        ({"k": torch.randn(1, 3, 40, 16)}, ValueError, r"multiple of k's kv_heads"),
    ],
)
def test_device_length_rejects_bad_arguments(change, error, pattern):
    if DEVICE != "cpu":
        pytest.skip("the argument tensors are built on the CPU")
    arguments = {"q": torch.randn(1, 4, 1, 16), "k": torch.randn(1, 2, 40, 16), "kv_len": torch.tensor([5])}
    arguments |= change
    arguments["v"] = arguments["k"]
    with pytest.raises(error, match=pattern):
        decode_attention_with_length(
            arguments["q"], arguments["k"], arguments["v"], arguments["kv_len"], backend="triton"
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_device_length_matches_reference(dtype):
    q = torch.randn(16, 32, 1, 128, dtype=dtype, device="cuda")
    k_cache, v_cache = cache_views(16, 8, 4096, 128, dtype, capacity=4096, device="cuda")
    for kv_len in (1, 129, 300, 2048, 4096):
        with torch.no_grad():
            out = decode_attention_with_length(
                q, k_cache, v_cache, torch.tensor([kv_len], device="cuda"), backend="triton"
            )
            k, v = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
            expected = reference.causal_attention(q.double(), k.double(), v.double())
            eager = reference.causal_attention(q, k, v)
        assert_close(f"out at kv_len={kv_len}", out, expected, eager)
