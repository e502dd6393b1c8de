"""The 'cuda' backend's Hopper attention (csrc/cuda/attention_fwd_sm90.cu and attention_bwd_sm90.cu),
opted into with FASTGPT_CUDA_ATTENTION=sm90 (read per call in csrc/cuda/api_cuda.inc), through the
public API: outputs and every gradient (the sm90 backward, fed the lse the sm90 forward saves) against
float64 fastgpt.reference with FlashAttention's rule. Also that the sm_90a kernels are what ran, that
calls they do not take (inputs TMA cannot describe) still match on the sm_80 kernels, that under
torch.use_deterministic_algorithms the backward leaves the atomic sm90 kernel for the sm_80 one and is
bitwise repeatable, and that an unknown setting is refused. Needs a compute capability 9.x GPU and
fastgpt._C built with CUDA and the CUTLASS headers; marked `gpu`."""

import pytest
import torch
from deterministic import deterministic_algorithms
from test_cuda_backend import check_against_reference
from tolerance import assert_close

import fastgpt
from fastgpt import reference

pytestmark = pytest.mark.gpu

DTYPES = (torch.bfloat16, torch.float16)
DEVICE = "cuda"
KERNEL_NAME = "attention_forward_sm90_kernel"
BACKWARD_KERNEL_NAME = "attention_backward_sm90_kernel"
# The sm_80 kernels (csrc/cuda/attention_fwd.cu, attention_bwd.cu): a check that the sm_90a kernel did
# not run also finds these, so it cannot pass on a trace that recorded no kernel at all.
SM80_KERNEL_NAME = "attention_forward_kernel"
SM80_BACKWARD_KERNEL_NAME = "attention_backward_dkdv_kernel"

SHAPES = [
    # (batch, heads, kv_heads, q_len, kv_len, head_dim)
    (2, 4, 4, 1, 1, 64),
    (2, 4, 4, 97, 97, 64),
    (1, 4, 4, 128, 128, 128),  # exactly one tile
    (1, 4, 4, 257, 257, 128),
    (2, 6, 2, 300, 300, 64),  # GQA
    (1, 4, 1, 130, 130, 128),  # MQA
    (1, 4, 2, 17, 300, 64),  # q_len < kv_len: the bottom-right diagonal
    (1, 2, 1, 300, 1100, 128),  # the same over 3 query tiles, diagonal 800: masked and whole blocks mix
    (2, 2, 2, 1, 257, 128),  # one query over a long cache
    (2, 16, 8, 1000, 1000, 128),  # 256 tiles: more than the SMs, so persistent CTAs take several
]


@pytest.fixture
def sm90(monkeypatch):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the sm_90a attention kernel runs on compute capability 9.x only")
    if "cuda" not in fastgpt.available_backends():
        pytest.skip("fastgpt._C is not built with CUDA")
    from fastgpt.ops import compiled

    if not compiled.HAS_SM90_ATTENTION_KERNELS:
        pytest.skip(
            "fastgpt._C was built without the sm_90a attention kernels (no CUTLASS headers or no 9.0 arch)"
        )
    monkeypatch.setenv("FASTGPT_CUDA_ATTENTION", "sm90")


def kernels_run(function):
    """Names of the CUDA kernels that `function()` launches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        function()
        torch.cuda.synchronize()
    return [event.name for event in profile.events()]


def random_heads(batch, heads, length, head_dim, dtype):
    return torch.randn(batch, heads, length, head_dim, device=DEVICE, dtype=dtype)


def reference_gradients(q, k, v, dout, scale, precision):
    """(dq, dk, dv) of the reference attention computed in `precision` on the same inputs."""
    leaves = [t.detach().to(precision).requires_grad_() for t in (q, k, v)]
    expected = reference.causal_attention(*leaves, softmax_scale=scale)
    return torch.autograd.grad(expected, leaves, dout.to(precision))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sm90_attention_matches_reference(sm90, shape, dtype):
    batch, heads, kv_heads, q_len, kv_len, head_dim = shape
    q = random_heads(batch, heads, q_len, head_dim, dtype)
    k = random_heads(batch, kv_heads, kv_len, head_dim, dtype)
    v = random_heads(batch, kv_heads, kv_len, head_dim, dtype)
    grad = random_heads(batch, heads, q_len, head_dim, dtype)
    check_against_reference(
        "sm90 attention",
        lambda q, k, v: fastgpt.causal_attention(q, k, v, backend="cuda"),
        lambda q, k, v: reference.causal_attention(q, k, v),
        [q, k, v],
        [grad],
    )


# The forward's own outputs through the op, for the statistics the backward reads: (batch, heads,
# kv_heads, q_len, kv_len, head_dim) with padded query rows, ragged key blocks and GQA together.
LSE_SHAPES = [
    (2, 4, 2, 1, 300, 128),  # one query: 127 zero-filled rows in its tile, lse written for row 0 only
    (1, 6, 2, 257, 385, 64),  # q_len < kv_len over 3 query tiles, kv_len 3 x 128 + 1, 3-stage ring
    (1, 2, 1, 300, 1100, 128),  # diagonal 800: rows that see no key of the first block visited
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LSE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sm90_attention_forward_saves_the_reference_lse(sm90, shape, dtype):
    """out and the logsumexp (natural log, float32, (batch, heads, q_len)) the sm_90a forward saves,
    against float64: the gradient tests see lse only through the backward, so a wrong lse would show as
    wrong dq/dk/dv without saying which kernel is at fault."""
    batch, heads, kv_heads, q_len, kv_len, head_dim = shape
    scale = 0.3
    q = random_heads(batch, heads, q_len, head_dim, dtype)
    k = random_heads(batch, kv_heads, kv_len, head_dim, dtype)
    v = random_heads(batch, kv_heads, kv_len, head_dim, dtype)
    names = kernels_run(lambda: torch.ops.fastgpt.attention_forward(q, k, v, scale))
    assert any(KERNEL_NAME in name for name in names), names
    out, lse = torch.ops.fastgpt.attention_forward(q, k, v, scale)
    exact_out, exact_lse = reference.causal_attention(
        q.double(), k.double(), v.double(), scale, return_lse=True
    )
    # The bar is eager in the input dtype, as in the Gluon forward's lse test: the wgmma's float32
    # accumulation of the scores is not IEEE summation, so float32 eager would be too tight a bar.
    eager_out, eager_lse = reference.causal_attention(q, k, v, scale, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (batch, heads, q_len)
    assert_close("sm90 forward out", out, exact_out, eager_out)
    assert_close("sm90 forward lse", lse, exact_lse, eager_lse)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_sm90_attention_packed_qkv_views(sm90, head_dim, dtype):
    """q, k, v as strided views of one fused projection output (TMA reads them in place): head stride
    head_dim, row stride 3 * heads * head_dim, at both head dims (their TMA boxes differ: V^T comes in
    as one 64 x 128 box a block at 64, as 1 KB boxes at 128)."""
    batch, seq, heads = 2, 300, 4
    qkv = torch.randn(batch, seq, 3, heads, head_dim, device=DEVICE, dtype=dtype)
    grad = random_heads(batch, heads, seq, head_dim, dtype)

    def split(packed):
        return [packed[:, :, i].transpose(1, 2) for i in range(3)]  # (B, H, T, D) views

    check_against_reference(
        "sm90 attention packed",
        lambda packed: fastgpt.causal_attention(*split(packed), softmax_scale=0.2, backend="cuda"),
        lambda packed: reference.causal_attention(*split(packed), softmax_scale=0.2),
        [qkv],
        [grad],
    )


def test_sm90_attention_kernel_is_what_runs(sm90):
    q = random_heads(1, 4, 300, 64, torch.bfloat16)
    names = kernels_run(lambda: fastgpt.causal_attention(q, q, q, backend="cuda"))
    assert any(KERNEL_NAME in name for name in names), names


def test_sm90_attention_backward_kernel_is_what_runs(sm90):
    q, k, v = (random_heads(1, 4, 300, 128, torch.bfloat16).requires_grad_() for _ in range(3))
    out = fastgpt.causal_attention(q, k, v, backend="cuda")
    grad = torch.randn_like(out)
    names = kernels_run(lambda: out.backward(grad))
    assert any(BACKWARD_KERNEL_NAME in name for name in names), names


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sm90_attention_backward_takes_a_broadcast_dout(sm90, dtype):
    """A dout whose batch dimension has stride 0 (as the backward of out.sum(0) hands it on; read in place,
    16-byte aligned): TMA has no stride 0, so this backward must not describe dout to TMA with another
    stride (it leaves such calls to the sm_80 kernels); dq, dk and dv match the reference's gradients."""
    batch, heads, seq, head_dim = 2, 4, 300, 64
    scale = head_dim**-0.5
    q, k, v = (random_heads(batch, heads, seq, head_dim, dtype) for _ in range(3))
    dout = random_heads(1, heads, seq, head_dim, dtype).expand(batch, heads, seq, head_dim)
    assert dout.stride(0) == 0
    out, lse = torch.ops.fastgpt.attention_forward(q, k, v, scale)
    actual = torch.ops.fastgpt.attention_backward(dout, q, k, v, out, lse, scale)
    exact = reference_gradients(q, k, v, dout, scale, torch.float64)
    bar = reference_gradients(q, k, v, dout, scale, dtype)
    for name, got, want, eager in zip(("dq", "dk", "dv"), actual, exact, bar):
        assert_close(f"sm90 attention broadcast dout {name}", got, want, eager)


# The backward's own edge cases, through the op with a scale other than the default: (batch, heads,
# kv_heads, q_len, kv_len, head_dim). Each key block's CTA loops over (query head of the group, query
# block) steps from the first query block that sees its first key, over a 2-slot Q/dO ring.
BACKWARD_SHAPES = [
    (2, 4, 2, 1, 257, 64),  # one query: 2 steps (one a head) in the ring's 2 slots; the last CTA one key
    (1, 6, 2, 129, 385, 128),  # last CTA: one key, its first query block 2, 3 heads of 1 step each
    (1, 4, 1, 200, 200, 64),  # MQA: 4 heads x 4 blocks = 16 steps (8 ring phases); last block 8 rows
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BACKWARD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sm90_attention_backward_edge_shapes(sm90, shape, dtype):
    """dq, dk and dv of the sm_90a backward (checked to be the kernel that ran, so that a gate declining
    these shapes cannot pass them on the sm_80 kernel) against float64, at softmax_scale 0.3: dK's
    factor is applied in the kernel's epilogue and dQ's by the convert kernel."""
    batch, heads, kv_heads, q_len, kv_len, head_dim = shape
    scale = 0.3
    q = random_heads(batch, heads, q_len, head_dim, dtype)
    k = random_heads(batch, kv_heads, kv_len, head_dim, dtype)
    v = random_heads(batch, kv_heads, kv_len, head_dim, dtype)
    dout = random_heads(batch, heads, q_len, head_dim, dtype)
    out, lse = torch.ops.fastgpt.attention_forward(q, k, v, scale)
    names = kernels_run(lambda: torch.ops.fastgpt.attention_backward(dout, q, k, v, out, lse, scale))
    assert any(BACKWARD_KERNEL_NAME in name for name in names), names
    actual = torch.ops.fastgpt.attention_backward(dout, q, k, v, out, lse, scale)
    exact = reference_gradients(q, k, v, dout, scale, torch.float64)
    bar = reference_gradients(q, k, v, dout, scale, dtype)
    for name, got, want, eager in zip(("dq", "dk", "dv"), actual, exact, bar):
        assert got.shape == want.shape and got.dtype == dtype
        assert_close(f"sm90 attention backward {name}", got, want, eager)


@pytest.fixture
def deterministic():
    with deterministic_algorithms():
        yield


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sm90_attention_backward_deterministic_mode(sm90, deterministic, dtype):
    """With deterministic algorithms on, the backward runs the sm_80 kernels (no atomics): two runs give
    the same bits, and they still match the reference."""
    q = random_heads(2, 6, 300, 64, dtype)
    k = random_heads(2, 2, 300, 64, dtype)
    v = random_heads(2, 2, 300, 64, dtype)
    grad = random_heads(2, 6, 300, 64, dtype)

    def gradients():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        fastgpt.causal_attention(*leaves, backend="cuda").backward(grad)
        return [t.grad for t in leaves]

    names = kernels_run(gradients)
    assert not any(BACKWARD_KERNEL_NAME in name for name in names), names
    assert any(SM80_BACKWARD_KERNEL_NAME in name for name in names), names
    first, second = gradients(), gradients()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    check_against_reference(
        "sm90 attention deterministic",
        lambda q, k, v: fastgpt.causal_attention(q, k, v, backend="cuda"),
        lambda q, k, v: reference.causal_attention(q, k, v),
        [q, k, v],
        [grad],
    )


def ran_the_sm80_forward_only(names):
    return not any(KERNEL_NAME in name for name in names) and any(SM80_KERNEL_NAME in name for name in names)


def test_sm90_attention_leaves_other_calls_to_the_sm80_kernel(sm90):
    """head_dim 96 (no sm_90a instantiation), a q that starts 2 bytes off a 16-byte boundary and k/v
    broadcast over the batch by expand (stride 0; both of which TMA cannot describe) run the sm_80
    kernel, and match the reference there."""
    q96 = random_heads(1, 2, 150, 96, torch.bfloat16)
    names = kernels_run(lambda: fastgpt.causal_attention(q96, q96, q96, backend="cuda"))
    assert ran_the_sm80_forward_only(names), names

    storage = torch.randn(1 * 2 * 150 * 64 + 1, device=DEVICE, dtype=torch.bfloat16)
    misaligned = storage[1:].view(1, 2, 150, 64)
    k = random_heads(1, 2, 150, 64, torch.bfloat16)
    names = kernels_run(lambda: fastgpt.causal_attention(misaligned, k, k, backend="cuda"))
    assert ran_the_sm80_forward_only(names), names
    out = fastgpt.causal_attention(misaligned, k, k, backend="cuda")
    exact = reference.causal_attention(misaligned.double(), k.double(), k.double())
    assert_close("sm90 attention misaligned q", out, exact, reference.causal_attention(misaligned, k, k))

    q = random_heads(2, 2, 150, 64, torch.bfloat16)
    shared_kv = random_heads(1, 2, 150, 64, torch.bfloat16).expand(2, -1, -1, -1)  # batch stride 0
    names = kernels_run(lambda: fastgpt.causal_attention(q, shared_kv, shared_kv, backend="cuda"))
    assert ran_the_sm80_forward_only(names), names
    out = fastgpt.causal_attention(q, shared_kv, shared_kv, backend="cuda")
    exact = reference.causal_attention(q.double(), shared_kv.double(), shared_kv.double())
    assert_close(
        "sm90 attention broadcast kv", out, exact, reference.causal_attention(q, shared_kv, shared_kv)
    )


def test_the_extensions_sm90_flag_says_whether_its_kernels_run(monkeypatch):
    """fastgpt._C's SM90_ATTENTION_KERNELS, the `sm_90a attention (_C)` line of `fastgpt info`, against
    what FASTGPT_CUDA_ATTENTION=sm90 runs on Hopper: the sm_90a kernel where it says they were built,
    the sm_80 kernel where not (the line used to show the CUTLASS headers found at run time)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the sm_90a attention kernel runs on compute capability 9.x only")
    if "cuda" not in fastgpt.available_backends():
        pytest.skip("fastgpt._C is not built with CUDA")
    from fastgpt.ops import compiled

    monkeypatch.setenv("FASTGPT_CUDA_ATTENTION", "sm90")
    q = random_heads(1, 4, 300, 64, torch.bfloat16)
    names = kernels_run(lambda: fastgpt.causal_attention(q, q, q, backend="cuda"))
    expected = KERNEL_NAME if compiled.HAS_SM90_ATTENTION_KERNELS else SM80_KERNEL_NAME
    assert any(expected in name for name in names), (compiled.HAS_SM90_ATTENTION_KERNELS, names)


def test_sm90_attention_rejects_an_unknown_setting(monkeypatch):
    if "cuda" not in fastgpt.available_backends():
        pytest.skip("fastgpt._C is not built with CUDA")
    monkeypatch.setenv("FASTGPT_CUDA_ATTENTION", "fa3")
    q = random_heads(1, 2, 8, 64, torch.bfloat16)
    with pytest.raises(RuntimeError, match="FASTGPT_CUDA_ATTENTION must be 'sm90' or 'mma', got 'fa3'"):
        fastgpt.causal_attention(q, q, q, backend="cuda")
