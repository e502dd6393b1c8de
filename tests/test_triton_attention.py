"""The Triton causal attention kernels (forward and backward) against the float64 reference.

On CPU they run through the Triton interpreter (conftest sets TRITON_INTERPRET=1), in float32 and
float16; bfloat16 and larger shapes run in the `gpu` tests. Every output and gradient is checked with
the FlashAttention tolerance rule against eager PyTorch in the same dtype.
"""

import contextlib
import functools
import math

import pytest
import torch

pytest.importorskip("triton")

import triton
from deterministic import deterministic_algorithms
from tolerance import assert_close
from triton.tools.tensor_descriptor import TensorDescriptor

import fastgpt
from fastgpt import reference
from fastgpt.ops import triton_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    "triton" not in fastgpt.available_backends(), reason="the triton backend is not available here"
)


def leaf(tensor):
    return tensor.detach().requires_grad_()


def random_qkv(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype, device=DEVICE):
    q = torch.randn(batch, heads, q_len, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, dtype=dtype, device=device)
    return leaf(q), leaf(k), leaf(v)


def attention_and_grads(fn, q, k, v, dout, **kwargs):
    out = fn(q, k, v, **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def check_against_reference(q, k, v, softmax_scale=None, names=("out", "dq", "dk", "dv")):
    """Runs the triton backend, float64 reference and same-dtype eager on the same inputs and
    asserts the tolerance rule on the output and the three gradients (those in `names`)."""
    out = fastgpt.causal_attention(q, k, v, softmax_scale=softmax_scale, backend="triton")
    assert out.dtype == q.dtype and out.shape == q.shape
    dout = torch.randn_like(out)
    actual = (out, *torch.autograd.grad(out, (q, k, v), dout))
    upcast = [leaf(t.double()) for t in (q, k, v)]
    expected = attention_and_grads(
        reference.causal_attention, *upcast, dout.double(), softmax_scale=softmax_scale
    )
    eager = attention_and_grads(
        reference.causal_attention, *(leaf(t) for t in (q, k, v)), dout, softmax_scale=softmax_scale
    )
    actual, expected, eager = ([t.detach() for t in results] for results in (actual, expected, eager))
    checked = dict(zip(("out", "dq", "dk", "dv"), zip(actual, expected, eager)))
    for name in names:
        assert_close(name, *checked[name])
    return actual


# (batch, heads, kv_heads, q_len, kv_len, head_dim, dtype): each length paired with a few head dims,
# GQA/MQA groups and q_len < kv_len, rather than the full product (the interpreter is slow).
SHAPES = [
    (1, 2, 2, 1, 1, 16, torch.float32),
    (2, 4, 2, 17, 17, 80, torch.float32),
    (1, 2, 1, 17, 60, 128, torch.float16),
    (1, 2, 2, 97, 97, 16, torch.float32),
    (1, 4, 1, 97, 130, 64, torch.float32),
    (1, 4, 2, 97, 97, 80, torch.float16),
    (1, 2, 2, 257, 257, 64, torch.float16),
    (1, 2, 1, 40, 257, 128, torch.float32),
    (1, 1, 1, 33, 50, 200, torch.float32),
]


@pytest.mark.parametrize("batch, heads, kv_heads, q_len, kv_len, head_dim, dtype", SHAPES)
def test_matches_reference(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype):
    check_against_reference(*random_qkv(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype))


def test_packed_qkv_views_are_read_in_place(monkeypatch):
    """q, k, v split from a fused (B, T, 3, H, D) projection reach the kernels as the same strided
    memory: no copy on the way, in the forward and in the backward."""
    batch, seq, heads, head_dim = 2, 45, 3, 32
    qkv = leaf(torch.randn(batch, seq, 3, heads, head_dim, device=DEVICE))
    q, k, v = (qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))  # (B, H, T, D), non-contiguous
    launched = []
    original_launch = triton_attention._launch

    def recording_launch(kernel_name, inputs, grid, *args, **constexprs):
        launched.append((kernel_name, args))
        return original_launch(kernel_name, inputs, grid, *args, **constexprs)

    monkeypatch.setattr(triton_attention, "_launch", recording_launch)
    out = fastgpt.causal_attention(q, k, v, backend="triton")
    dout = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, dout)

    assert [name for name, _ in launched] == ["forward", "preprocess", "fused", "cast"]
    for name, args in launched:
        if name in ("preprocess", "cast"):
            continue
        for view, argument in zip((q, k, v), args[:3]):
            if isinstance(argument, TensorDescriptor):  # the forward's TMA path
                assert argument.base.data_ptr() == view.data_ptr() and argument.base.stride() == view.stride()
                assert tuple(argument.strides) == view.stride() and tuple(argument.shape) == view.shape
            else:
                assert argument.data_ptr() == view.data_ptr() and argument.stride() == view.stride(), name

    qkv64 = leaf(qkv.double())
    out64 = reference.causal_attention(*(qkv64[:, :, i].permute(0, 2, 1, 3) for i in range(3)))
    (dqkv64,) = torch.autograd.grad(out64, qkv64, dout.double())
    qkv32 = leaf(qkv)
    out32 = reference.causal_attention(*(qkv32[:, :, i].permute(0, 2, 1, 3) for i in range(3)))
    (dqkv32,) = torch.autograd.grad(out32, qkv32, dout)
    assert_close("out", out.detach(), out64.detach(), out32.detach())
    assert_close("dqkv", dqkv, dqkv64, dqkv32)


def test_strided_output_gradient_and_transposed_inputs():
    """Inputs in (B, T, H, D) memory order viewed as (B, H, T, D), and an output gradient with a
    zero stride (what .sum() sends back), are handled through their strides."""
    q = leaf(torch.randn(1, 50, 4, 64, device=DEVICE).transpose(1, 2))
    k = leaf(torch.randn(1, 50, 2, 64, device=DEVICE).transpose(1, 2))
    v = leaf(torch.randn(1, 50, 2, 64, device=DEVICE).transpose(1, 2))
    out = fastgpt.causal_attention(q, k, v, backend="triton")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    upcast = [leaf(t.double()) for t in (q, k, v)]
    out64 = reference.causal_attention(*upcast)
    grads64 = torch.autograd.grad(out64.sum(), upcast)
    eager = [leaf(t) for t in (q, k, v)]
    out32 = reference.causal_attention(*eager)
    grads32 = torch.autograd.grad(out32.sum(), eager)
    assert_close("out", out.detach(), out64.detach(), out32.detach())
    for name, actual, expected, same_dtype in zip(("dq", "dk", "dv"), grads, grads64, grads32):
        assert_close(name, actual, expected, same_dtype)


@pytest.mark.skipif(not triton_attention.INTERPRETER, reason="stands in for a GPU on the interpreter")
def test_gpu_launcher_runs_single_configurations_directly(monkeypatch):
    """The GPU launcher, driven on the interpreter as if on sm_90: the preprocess, the fused backward
    (float16 through descriptors, one candidate at head_dim 32) and the dQ cast each have one
    configuration, so they launch without an autotuner, the descriptors' blocks set from it."""
    q, k, v = random_qkv(1, 4, 2, 70, 90, 32, torch.float16)
    out, lse = triton_attention.attention_forward(q.detach(), k.detach(), v.detach(), 0.2)
    dout = torch.randn_like(out)
    for name in ("preprocess", "fused", "cast"):
        assert len(triton_attention.gpu_configs(name, 90, 32, torch.float16, name == "fused")) == 1
    monkeypatch.setattr(triton_attention, "INTERPRETER", False)
    monkeypatch.setattr(triton_attention, "_capability", lambda device_index: 90)
    monkeypatch.setattr(triton.runtime.Autotuner, "run", None)  # no autotuner may run
    launched = record_launches(monkeypatch)
    grads = triton_attention.attention_backward(dout, q.detach(), k.detach(), v.detach(), out, lse, 0.2, "tl")
    assert launched == ["preprocess", "fused", "cast"]
    upcast = [leaf(t.double()) for t in (q, k, v)]
    expected = attention_and_grads(reference.causal_attention, *upcast, dout.double(), softmax_scale=0.2)
    eager = attention_and_grads(reference.causal_attention, q, k, v, dout, softmax_scale=0.2)
    for name, actual, exact, same_dtype in zip(("dq", "dk", "dv"), grads, expected[1:], eager[1:]):
        assert_close(name, actual, exact.detach(), same_dtype.detach())


@pytest.mark.skipif(not triton_attention.INTERPRETER, reason="stands in for a GPU on the interpreter")
def test_gpu_autotuner_trials_leave_no_trace(monkeypatch):
    """The GPU launcher's autotuner, driven on the interpreter as if on sm_90 with a stand-in benchmark
    that runs each candidate three times and prefers the first: the fused backward at head_dim 128 (two
    candidates, through descriptors) adds dQ into its accumulator with atomics, so the accumulator
    must be zeroed before every trial and before the launch that keeps the result (reset_to_zero), and
    the descriptors must get the kept candidate's blocks back after the other one's trials."""
    q, k, v = random_qkv(1, 2, 1, 40, 50, 128, torch.float16)
    out, lse = triton_attention.attention_forward(q.detach(), k.detach(), v.detach(), 0.2)
    dout = torch.randn_like(out)
    assert len(triton_attention.gpu_configs("fused", 90, 128, torch.float16, True)) == 2
    monkeypatch.setattr(triton_attention, "INTERPRETER", False)
    monkeypatch.setattr(triton_attention, "_capability", lambda device_index: 90)
    fresh = functools.cache(triton_attention._launcher.__wrapped__)  # no tuner from other tests
    monkeypatch.setattr(triton_attention, "_launcher", fresh)
    benchmarked = []

    def first_candidate_wins(kernel_call, quantiles):
        for _ in range(3):
            kernel_call()
        benchmarked.append(kernel_call)
        return [float(len(benchmarked))] * len(quantiles)

    monkeypatch.setattr(triton.runtime.Autotuner, "do_bench", property(lambda tuner: first_candidate_wins))
    grads = triton_attention.attention_backward(dout, q.detach(), k.detach(), v.detach(), out, lse, 0.2, "tl")
    assert len(benchmarked) == 2
    upcast = [leaf(t.double()) for t in (q, k, v)]
    expected = attention_and_grads(reference.causal_attention, *upcast, dout.double(), softmax_scale=0.2)
    eager = attention_and_grads(reference.causal_attention, q, k, v, dout, softmax_scale=0.2)
    for name, actual, exact, same_dtype in zip(("dq", "dk", "dv"), grads, expected[1:], eager[1:]):
        assert_close(name, actual, exact.detach(), same_dtype.detach())


def record_launches(monkeypatch):
    """Patches the launcher to record the name of every kernel launched."""
    names = []
    original_launch = triton_attention._launch

    def recording_launch(kernel_name, inputs, grid, *args, **constexprs):
        names.append(kernel_name)
        return original_launch(kernel_name, inputs, grid, *args, **constexprs)

    monkeypatch.setattr(triton_attention, "_launch", recording_launch)
    return names


def test_backward_takes_the_fused_kernel_by_default(monkeypatch):
    """One preprocess (delta, and the dQ accumulator zeroed), one fused dK/dV/dQ kernel, one dQ cast,
    up to head_dim 128."""
    assert not torch.are_deterministic_algorithms_enabled()
    launched = record_launches(monkeypatch)
    check_against_reference(*random_qkv(1, 4, 2, 37, 50, 24, torch.float16))
    assert launched == ["forward", "preprocess", "fused", "cast"]
    launched.clear()  # head_dim 200 (padded to 256) takes the two-kernel backward: the fused one spills
    check_against_reference(*random_qkv(1, 1, 1, 9, 12, 200, torch.float32))
    assert launched == ["forward", "preprocess", "dkdv", "dq"]


def test_deterministic_backward_is_bitwise_repeatable(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the backward takes the two atomic-free kernels
    (dK/dV summed over a GQA group inside one program, then dQ), matches the reference and repeats
    bitwise; ragged lengths, q_len < kv_len and padded head_dim."""
    launched = record_launches(monkeypatch)
    q, k, v = random_qkv(1, 4, 1, 45, 70, 24, torch.float32)
    dout = torch.randn(1, 4, 45, 24, device=DEVICE)
    with deterministic_algorithms(warn_only=False):
        check_against_reference(q, k, v)
        assert launched == ["forward", "preprocess", "dkdv", "dq"]
        first = attention_and_grads(fastgpt.causal_attention, q, k, v, dout, backend="triton")
        second = attention_and_grads(fastgpt.causal_attention, q, k, v, dout, backend="triton")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.skipif(not triton_attention.INTERPRETER, reason="changes the interpreter's fixed block sizes")
def test_other_block_geometries(monkeypatch):
    """The diagonal bookkeeping holds for block shapes the other way round from the default ones:
    forward and dQ with BLOCK_M < BLOCK_N, dK/dV with BLOCK_M > BLOCK_N."""
    monkeypatch.setitem(triton_attention.INTERPRETER_CONFIGS, "forward", {"BLOCK_M": 16, "BLOCK_N": 32})
    monkeypatch.setitem(triton_attention.INTERPRETER_CONFIGS, "dkdv", {"BLOCK_M": 32, "BLOCK_N": 16})
    monkeypatch.setitem(triton_attention.INTERPRETER_CONFIGS, "dq", {"BLOCK_M": 16, "BLOCK_N": 32})
    monkeypatch.setitem(triton_attention.INTERPRETER_CONFIGS, "fused", {"BLOCK_M": 32, "BLOCK_N": 16})
    check_against_reference(*random_qkv(1, 2, 1, 45, 70, 16, torch.float32))
    check_against_reference(*random_qkv(1, 2, 2, 70, 70, 16, torch.float32))
    with deterministic_algorithms(warn_only=False):  # the dK/dV and dQ kernels of the deterministic path
        check_against_reference(*random_qkv(1, 2, 1, 45, 70, 16, torch.float32))


# GPU autotune geometries that INTERPRETER_CONFIGS never runs: (head_dim, through descriptors (TMA),
# the deterministic backward, {kernel: (BLOCK_M, BLOCK_N)}). The sm_90 TMA forward's 128x128 box with
# the fused backward's 64x128 box; the 128x128 pointer forward with the fused 32x128 pointer tile;
# the deterministic dK/dV block of 128 keys stepping 16 queries and dQ block of 128 queries stepping
# 32 keys (BLOCK_M > BLOCK_N, the reverse of the interpreter's dK/dV); head_dim 200's 128x32 TMA
# forward with its 16x32 dK/dV and 64x16 dQ.
# (heads, length) of q, k and v: GQA, q_len < kv_len.
SHAPES_Q_KV = ((2, 150), (1, 270), (1, 270))
GPU_GEOMETRIES = {
    "tma-d96-forward-128x128-fused-64x128": (96, True, False, {"forward": (128, 128), "fused": (64, 128)}),
    "pointer-d48-forward-128x128-fused-32x128": (
        48,
        False,
        False,
        {"forward": (128, 128), "fused": (32, 128)},
    ),
    "pointer-d96-forward-128x32-dkdv-16x128-dq-128x32": (
        96,
        False,
        True,
        {"forward": (128, 32), "dkdv": (16, 128), "dq": (128, 32)},
    ),
    "tma-d200-forward-128x32-dkdv-16x32-dq-64x16": (
        200,
        True,
        True,
        {"forward": (128, 32), "dkdv": (16, 32), "dq": (64, 16)},
    ),
}


@pytest.mark.skipif(not triton_attention.INTERPRETER, reason="changes the interpreter's fixed block sizes")
@pytest.mark.parametrize("name", list(GPU_GEOMETRIES))
def test_gpu_block_geometries(monkeypatch, name):
    """The largest GPU tiles, float16, against the reference: 150 queries and 270 keys span two and
    three ragged 128-blocks, with GQA and q_len < kv_len. TMA cases run contiguous tensors through
    descriptors with fewer persistent programs than tiles; pointer cases run views with a row stride
    of head_dim + 1 elements (TMA cannot describe them), one program per tile as on the GPU."""
    head_dim, tma, deterministic, geometry = GPU_GEOMETRIES[name]
    block_d = triton_attention._block_d(head_dim)
    for kernel, blocks in geometry.items():  # each is one of the GPU's candidates at this head_dim
        candidates = {
            (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"])
            for capability in (80, 90)
            for config in triton_attention.gpu_configs(
                kernel, capability, block_d, torch.float16, tma and kernel in ("forward", "fused")
            )
        }
        assert blocks in candidates, (kernel, blocks)
        monkeypatch.setitem(
            triton_attention.INTERPRETER_CONFIGS, kernel, {"BLOCK_M": blocks[0], "BLOCK_N": blocks[1]}
        )
    (preprocess,) = triton_attention.gpu_configs("preprocess", 90, block_d, torch.float16)
    monkeypatch.setitem(triton_attention.INTERPRETER_CONFIGS, "preprocess", preprocess.kwargs)
    monkeypatch.setattr(triton_attention, "INTERPRETER_PROGRAMS", 3 if tma else 2**31)
    if tma:
        q, k, v = random_qkv(1, 2, 1, SHAPES_Q_KV[0][1], SHAPES_Q_KV[1][1], head_dim, torch.float16)
    else:  # (B, T, H, D + 1) buffers viewed as (B, H, T, D)
        buffers = (
            torch.randn(1, length, heads, head_dim + 1, dtype=torch.float16) for heads, length in SHAPES_Q_KV
        )
        q, k, v = (leaf(buffer[..., :head_dim].transpose(1, 2)) for buffer in buffers)
    paths = record_forward_paths(monkeypatch)
    launched = record_launches(monkeypatch)
    with deterministic_algorithms(warn_only=False) if deterministic else contextlib.nullcontext():
        check_against_reference(q, k, v)
    assert launched == ["forward", "preprocess", *(("dkdv", "dq") if deterministic else ("fused", "cast"))]
    assert [path for path, _ in paths] == [tma]


def record_forward_paths(monkeypatch):
    """Patches the launcher to record, for each forward launch, whether it took the TMA path and its grid."""
    paths = []
    original_launch = triton_attention._launch

    def recording_launch(kernel_name, inputs, grid, *args, **constexprs):
        if kernel_name == "forward":
            paths.append((constexprs["TMA"], args))
        return original_launch(kernel_name, inputs, grid, *args, **constexprs)

    monkeypatch.setattr(triton_attention, "_launch", recording_launch)
    return paths


@pytest.mark.parametrize(
    "layout",
    [
        "row stride of 17 floats",  # 68 bytes between rows: TMA needs multiples of 16
        "head_dim 20 in float16",  # 40-byte rows
        "base offset by one element",  # the view starts 4 bytes into its allocation
    ],
)
def test_pointer_fallback_for_what_tma_cannot_describe(monkeypatch, layout):
    """Views whose strides or base TMA cannot address take the pointer path, and match the reference."""
    paths = record_forward_paths(monkeypatch)
    if layout == "row stride of 17 floats":
        q, k, v = (leaf(torch.randn(1, heads, 45, 17, device=DEVICE)[..., :16]) for heads in (2, 1, 1))
    elif layout == "head_dim 20 in float16":
        q, k, v = random_qkv(1, 2, 1, 33, 40, 20, torch.float16)
    else:
        q, k, v = (
            leaf(torch.randn(1, heads, 30 * 16 + 1, device=DEVICE)[:, :, 1:].view(1, heads, 30, 16))
            for heads in (2, 2, 2)
        )
    check_against_reference(q, k, v)
    assert [tma for tma, _ in paths] == [False]


def test_size_one_dimensions_with_odd_strides_stay_on_tma(monkeypatch):
    """A dimension of size 1 is never stepped, so its stride (here 7 elements, which TMA could not
    take) does not force the pointer path; the descriptor carries an aligned one in its place."""
    paths = record_forward_paths(monkeypatch)
    q, k, v = (
        leaf(torch.randn(40, 16, device=DEVICE).as_strided((1, 1, 40, 16), (7, 7, 16, 1))) for _ in range(3)
    )
    check_against_reference(q, k, v)
    assert [tma for tma, _ in paths] == [True]


@pytest.mark.skipif(
    not triton_attention.INTERPRETER, reason="sets the interpreter's grid and the L2 section size"
)
def test_persistent_tile_order(monkeypatch):
    """Fewer programs than tiles, so each program loops over several; sections of two GQA groups, the
    last one short; ragged query tiles and q_len < kv_len. Every tile must be visited exactly once
    (unwritten outputs are NaN-poisoned) and for the right (batch, head, query block)."""
    paths = record_forward_paths(monkeypatch)
    batch, heads, kv_heads, q_len, kv_len, head_dim = 3, 2, 1, 70, 83, 16
    group = heads // kv_heads
    slice_kv_bytes = 2 * kv_len * head_dim * 2 // group  # float16 K and V per query head
    monkeypatch.setattr(triton_attention, "INTERPRETER_PROGRAMS", 4)
    monkeypatch.setattr(triton_attention, "KV_SECTION_BYTES", 2 * group * slice_kv_bytes)
    check_against_reference(*random_qkv(batch, heads, kv_heads, q_len, kv_len, head_dim, torch.float16))
    ((tma, args),) = paths
    tiles = triton.cdiv(q_len, triton_attention.INTERPRETER_CONFIGS["forward"]["BLOCK_M"]) * batch * heads
    section_heads = args[triton_attention.KERNELS["forward"].arg_names.index("section_heads")]
    assert tma and tiles > 3 * triton_attention.INTERPRETER_PROGRAMS
    assert section_heads == 2 * group and (batch * heads) % section_heads != 0


# Float32 with large logits: q x5 and k x3 put the scaled scores at 30-60, where rounding a scaled
# logit costs about as much as eager's whole error (so the float32 kernels subtract before they scale;
# see triton_attention's docstring). (batch, heads, kv_heads, length, head_dim, checked): a gradient
# is left out of `checked` where the FlashAttention-2 backward still misses twice eager's error for
# some inputs, from two float32 quantities it keeps rather than from the exponent's form: the saved
# logsumexp, rounded to half an ulp of a 30-60 logit, is a relative error of P (dV) where eager's
# near one-hot rows are exact; and delta = rowsum(dO * O) is rounded apart from dP = dO . v, where
# eager's sum(P * dP) cancels with dP (dQ, dK, worst on rows that see a single key). With seeds
# 0-39, each check left out fails for 2 to 12 of the 40 inputs, each check kept for at most 1
# (before the float32 kernels subtracted first: up to 27, dV at length 97, head_dim 16).
LARGE_LOGIT_CASES = [
    (4, 8, 8, 2, 16, ("out",)),
    (4, 8, 8, 5, 16, ("out",)),
    (4, 8, 8, 2, 64, ("out", "dq", "dv")),
    (4, 8, 8, 5, 64, ("out", "dq", "dk", "dv")),
    (1, 4, 4, 97, 16, ("out", "dq", "dk", "dv")),
    (1, 2, 2, 97, 64, ("out", "dq", "dk", "dv")),
    (1, 4, 2, 97, 64, ("out", "dq", "dk", "dv")),
]


def large_logit_qkv(batch, heads, kv_heads, length, head_dim):
    q, k, v = random_qkv(batch, heads, kv_heads, length, length, head_dim, torch.float32)
    return leaf(q * 5), leaf(k * 3), v


@pytest.mark.parametrize("batch, heads, kv_heads, length, head_dim, checked", LARGE_LOGIT_CASES)
def test_large_logits_float32(batch, heads, kv_heads, length, head_dim, checked):
    q, k, v = large_logit_qkv(batch, heads, kv_heads, length, head_dim)
    keys = k.detach().repeat_interleave(heads // kv_heads, dim=1)
    assert (q.detach() @ keys.transpose(-2, -1)).abs().max() / math.sqrt(head_dim) > 30
    check_against_reference(q, k, v, names=checked)


def test_huge_logits_do_not_overflow():
    """Scores around +-1e4: the online softmax subtracts the running max before exponentiating, so
    the output matches the reference and every gradient is finite.

    The gradients cannot meet the 2x-eager rule here, by design of FlashAttention's backward: eager
    keeps P, which is exactly one-hot at this scale, while the kernel recomputes it from the saved
    logsumexp, and a probability recomputed from a float32 score of magnitude S is off by a few
    ulps of S (relative 4 * eps * S, ~1e-2 here). dV = P^T dO is held to that bound; dQ and dK are
    0 up to rounding noise of rowsum(dO * O) amplified by softmax_scale, so only finiteness is checked."""
    q, k, v = random_qkv(1, 2, 2, 50, 50, 64, torch.float32)
    scale = 1000.0
    max_score = (q.detach() @ k.detach().transpose(-2, -1)).abs().max().item() * scale
    assert max_score > 1e4
    out, dq, dk, dv = check_against_reference(q, k, v, softmax_scale=scale, names=("out",))
    for grad in (dq, dk, dv):
        assert torch.isfinite(grad).all()
    dout = torch.randn_like(out)
    out = fastgpt.causal_attention(q, k, v, softmax_scale=scale, backend="triton")
    (dv,) = torch.autograd.grad(out, v, dout)
    upcast = [leaf(t.double()) for t in (q, k, v)]
    out64 = reference.causal_attention(*upcast, softmax_scale=scale)
    (dv64,) = torch.autograd.grad(out64, upcast[2], dout.double())
    recompute_bound = 4 * torch.finfo(torch.float32).eps * max_score * dout.abs().max().item()
    assert (dv.double() - dv64).abs().max().item() <= recompute_bound


def test_nan_stays_in_its_row():
    """NaN in one query row makes that row's output and dq NaN and leaves every other row exact."""
    q, k, v = random_qkv(1, 2, 1, 40, 40, 16, torch.float32)
    with torch.no_grad():
        q[0, 1, 21] = float("nan")
    out, dq, *_ = check_against_reference(q, k, v, names=("out", "dq"))
    nan_rows = out.isnan().any(-1)
    assert nan_rows[0, 1, 21] and int(nan_rows.sum()) == 1
    assert int(dq.isnan().any(-1).sum()) == 1


@pytest.mark.parametrize(
    "shape_q, shape_kv", [((0, 2, 5, 16), (0, 1, 5, 16)), ((1, 2, 0, 16), (1, 2, 6, 16))]
)
def test_empty_inputs(shape_q, shape_kv):
    q = leaf(torch.randn(shape_q, device=DEVICE))
    k, v = leaf(torch.randn(shape_kv, device=DEVICE)), leaf(torch.randn(shape_kv, device=DEVICE))
    out = fastgpt.causal_attention(q, k, v, backend="triton")
    assert out.shape == q.shape
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert not dk.any() and not dv.any()  # no query sees any key


@pytest.mark.parametrize("kernels", triton_attention.FORWARD_CHOICES)
def test_backward_op_reads_a_strided_lse(kernels):
    """torch.ops.fastgpt.triton_attention_backward checks lse's shape, dtype and device but not its
    strides: a (B, H, Tq) view of a (B, Tq, H) buffer gives the gradients of the contiguous lse (every
    backward kernel indexes lse as contiguous rows). On an sm_90 GPU "gluon" takes the Gluon backward
    (float16, head_dim 64); elsewhere both take the Triton kernels."""
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 16, 16, 64, dtype))
    out, lse = torch.ops.fastgpt.triton_attention_forward(q, k, v, 0.125)
    dout = torch.randn_like(out)
    strided_lse = torch.empty(1, 16, 2, device=DEVICE).transpose(1, 2).copy_(lse)  # (B, H, Tq)
    assert not strided_lse.is_contiguous()
    args = (dout, q, k, v, out)
    expected = torch.ops.fastgpt.triton_attention_backward(*args, lse, 0.125, kernels)
    actual = torch.ops.fastgpt.triton_attention_backward(*args, strided_lse, 0.125, kernels)
    for name, got, want in zip(("dq", "dk", "dv"), actual, expected):  # equal but for the dQ atomics' order
        torch.testing.assert_close(
            got, want, rtol=1e-2, atol=1e-2, msg=lambda text, name=name: f"{name}: {text}"
        )


@pytest.mark.skipif(not triton_attention.INTERPRETER, reason="a limit of the CPU interpreter only")
def test_bfloat16_is_declined_under_the_interpreter():
    """The interpreter would compute bfloat16 on its raw bits; dispatch refuses it instead."""
    q = torch.randn(1, 1, 4, 16, dtype=torch.bfloat16)
    expected = r"supports dtypes \(float16, float32\) for causal_attention, got torch.bfloat16"
    with pytest.raises(TypeError, match=expected):
        fastgpt.causal_attention(q, q, q, backend="triton")


def test_rejects_head_dim_over_256():
    q = torch.randn(1, 1, 2, 257, device=DEVICE)
    with pytest.raises(ValueError, match=r"head_dim <= 256, got head_dim=257"):
        fastgpt.causal_attention(q, q, q, backend="triton")


def test_opcheck():
    q, k, v = random_qkv(1, 2, 1, 9, 12, 16, torch.float32)
    torch.library.opcheck(torch.ops.fastgpt.triton_attention_forward.default, (q, k, v, 0.3))
    out, lse = torch.ops.fastgpt.triton_attention_forward(q, k, v, 0.3)
    dout = torch.randn_like(out)
    args = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse)
    torch.library.opcheck(torch.ops.fastgpt.triton_attention_backward.default, (*args, 0.3, "tl"))
    _, expected_lse = reference.causal_attention(q.double(), k.double(), v.double(), 0.3, return_lse=True)
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph():
    def attention_block(q, k, v):
        return fastgpt.causal_attention(q, k, v, backend="triton").mul(2.0)

    q, k, v = random_qkv(1, 2, 1, 20, 20, 16, torch.float32)
    compiled = torch.compile(attention_block, fullgraph=True)
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected = attention_block(q, k, v)
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for actual, wanted in zip(grads, expected_grads):
        torch.testing.assert_close(actual, wanted, rtol=0, atol=0)


def test_forward_selector_rejects_unknown_kernels(monkeypatch):
    """FASTGPT_TRITON_ATTENTION is read on every call, on every device, and only "tl" and "gluon"
    are accepted; "gluon" off sm_90 (here: the CPU) keeps the tl kernel."""
    q, k, v = random_qkv(1, 2, 1, 20, 20, 32, torch.float32)
    monkeypatch.setenv("FASTGPT_TRITON_ATTENTION", "fa3")
    with pytest.raises(ValueError, match="FASTGPT_TRITON_ATTENTION must be one of"):
        fastgpt.causal_attention(q, k, v, backend="triton")
    monkeypatch.setenv("FASTGPT_TRITON_ATTENTION", "gluon")
    if DEVICE == "cpu":
        check_against_reference(q, k, v, names=("out",))


def test_backward_follows_the_kernel_choice_of_its_forward(monkeypatch):
    """The forward's FASTGPT_TRITON_ATTENTION travels with its autograd node: a forward made under
    "gluon" gets the "gluon" backward choice after the variable is unset (as the bench's
    fastgpt:triton[gluon] provider unsets it before torch.autograd.grad), and a "tl" forward keeps
    "tl" when the variable is set later. The gradients are right either way (off sm_90, both run the
    tl kernels)."""
    choices = []
    real_backward = triton_attention.attention_backward

    def recording_backward(*args):
        choices.append(args[-1])
        return real_backward(*args)

    monkeypatch.setattr(triton_attention, "attention_backward", recording_backward)
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 2, 1, 20, 20, 32, torch.float32))
    expected = torch.autograd.grad(reference.causal_attention(q, k, v).sum(), (q, k, v))
    for forward_choice, backward_env in (("gluon", None), ("tl", "gluon")):
        monkeypatch.setenv("FASTGPT_TRITON_ATTENTION", forward_choice)
        out = fastgpt.causal_attention(q, k, v, backend="triton")
        if backward_env is None:
            monkeypatch.delenv("FASTGPT_TRITON_ATTENTION")
        else:
            monkeypatch.setenv("FASTGPT_TRITON_ATTENTION", backward_env)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        for actual, wanted in zip(grads, expected):
            torch.testing.assert_close(actual, wanted, rtol=1e-4, atol=1e-5)
    assert choices == ["gluon", "tl"]


# ----------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "batch, heads, kv_heads, q_len, kv_len, head_dim",
    [
        (2, 8, 8, 1024, 1024, 128),
        (2, 8, 2, 1000, 1000, 64),
        (1, 4, 1, 300, 1337, 128),
        (1, 2, 2, 129, 129, 256),
        (1, 4, 4, 255, 255, 80),
    ],
)
def test_gpu_matches_reference(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype):
    inputs = random_qkv(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype, device="cuda")
    check_against_reference(*inputs)


@pytest.mark.gpu
def test_gpu_pointer_fallback_bf16():
    """Rows 136 bytes apart, which TMA cannot address: the pointer path on sm_90, as everywhere else."""
    q, k, v = (
        leaf(torch.randn(2, heads, 300, 68, device="cuda", dtype=torch.bfloat16)[..., :64])
        for heads in (4, 2, 2)
    )
    check_against_reference(q, k, v)


@pytest.mark.gpu
def test_gpu_packed_qkv_bf16():
    batch, seq, heads, head_dim = 2, 777, 12, 64
    qkv = torch.randn(batch, seq, 3, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    q, k, v = (leaf(qkv[:, :, i].permute(0, 2, 1, 3)) for i in range(3))
    check_against_reference(q, k, v, softmax_scale=1.0 / math.sqrt(head_dim))


@pytest.fixture
def gluon_forward(monkeypatch):
    """FASTGPT_TRITON_ATTENTION=gluon, and the list of the Gluon forward's calls (so a test fails if
    its shapes silently took the tl kernel instead)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon forward runs on sm_90 only")
    from fastgpt.ops import gluon_attention

    monkeypatch.setenv("FASTGPT_TRITON_ATTENTION", "gluon")
    calls = []
    original = gluon_attention.attention_forward

    def recording_forward(q, k, v, softmax_scale):
        calls.append(q.shape)
        return original(q, k, v, softmax_scale)

    monkeypatch.setattr(gluon_attention, "attention_forward", recording_forward)
    return calls


# (batch, heads, kv_heads, q_len, kv_len, head_dim): full tiles, GQA and MQA, q_len < kv_len, and
# lengths that are not multiples of the 128-row tiles (ragged last tiles and key blocks).
GLUON_SHAPES = [
    (2, 8, 8, 1024, 1024, 128),
    (2, 8, 2, 1000, 1000, 64),
    (1, 4, 1, 300, 1337, 128),
    (1, 6, 3, 129, 130, 64),
    (3, 2, 1, 77, 77, 128),
    (1, 2, 2, 1, 257, 64),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch, heads, kv_heads, q_len, kv_len, head_dim", GLUON_SHAPES)
def test_gpu_gluon_forward_matches_reference(
    gluon_forward, batch, heads, kv_heads, q_len, kv_len, head_dim, dtype
):
    """The Gluon forward's output and logsumexp against the float64 reference, then the backward
    (the Gluon one, where it serves the call) through the lse it saved."""
    q, k, v = random_qkv(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype, device="cuda")
    scale = 1.0 / math.sqrt(head_dim)
    out, lse = triton_attention.attention_forward(q.detach(), k.detach(), v.detach(), scale)
    assert gluon_forward, "the Gluon forward was not taken"
    out64, lse64 = reference.causal_attention(*(t.detach().double() for t in (q, k, v)), return_lse=True)
    out_eager, lse_eager = reference.causal_attention(*(t.detach() for t in (q, k, v)), return_lse=True)
    assert lse.dtype == torch.float32
    assert_close("out", out, out64, out_eager)
    assert_close("lse", lse, lse64, lse_eager)
    check_against_reference(q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_gluon_forward_reads_packed_qkv_views(gluon_forward, head_dim, dtype):
    """q, k, v as strided views of one fused (B, T, 3, H, D) projection, through TMA descriptors of
    their own strides, forward and backward."""
    batch, seq, heads = 2, 777, 6
    qkv = torch.randn(batch, seq, 3, heads, head_dim, device="cuda", dtype=dtype)
    q, k, v = (leaf(qkv[:, :, i].permute(0, 2, 1, 3)) for i in range(3))
    check_against_reference(q, k, v, softmax_scale=1.0 / math.sqrt(head_dim))
    assert gluon_forward, "the Gluon forward was not taken"


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_gluon_forward_walks_several_tiles_per_program(gluon_forward, monkeypatch, head_dim):
    """The persistent grid cut to 5 programs (the launcher's one per SM, patched) over 36 tiles of 2
    sections (KV_SECTION_BYTES patched down to one GQA group of 3 heads): every program walks 7 or 8
    tiles of 3 to 8 key blocks, so the Q buffer's and the K/V ring's mbarrier phases, the ping-pong
    token and the output staging carry from one tile to the next. (On a 132-SM GPU the shapes above
    give no program more than one tile.)"""
    from fastgpt.ops import gluon_attention

    monkeypatch.setattr(gluon_attention, "_multiprocessors", lambda device_index: 5)
    monkeypatch.setattr(triton_attention, "KV_SECTION_BYTES", 100_000)
    check_against_reference(*random_qkv(2, 3, 1, 700, 900, head_dim, torch.bfloat16, device="cuda"))
    assert gluon_forward, "the Gluon forward was not taken"


@pytest.mark.gpu
def test_gpu_gluon_selector_keeps_the_tl_kernel_elsewhere(gluon_forward):
    """Under FASTGPT_TRITON_ATTENTION=gluon, what the Gluon kernel does not serve (float32, head_dim
    80, rows TMA cannot address) still runs, on the tl kernel."""
    check_against_reference(*random_qkv(1, 2, 2, 100, 100, 64, torch.float32, device="cuda"))
    check_against_reference(*random_qkv(1, 2, 1, 100, 100, 80, torch.bfloat16, device="cuda"))
    q, k, v = (
        leaf(torch.randn(1, heads, 100, 68, device="cuda", dtype=torch.bfloat16)[..., :64])
        for heads in (2, 1, 1)
    )
    check_against_reference(q, k, v)
    assert not gluon_forward


@pytest.fixture
def gluon_backward(gluon_forward, monkeypatch):
    """FASTGPT_TRITON_ATTENTION=gluon (through gluon_forward), and the list of the Gluon backward's
    calls (so a test fails if its shapes silently took the Triton fused kernel instead)."""
    from fastgpt.ops import gluon_attention

    calls = []
    original = gluon_attention.attention_backward

    def recording_backward(dout, q, *args):
        calls.append(q.shape)
        return original(dout, q, *args)

    monkeypatch.setattr(gluon_attention, "attention_backward", recording_backward)
    return calls


# (batch, heads, kv_heads, q_len, kv_len), run at both head_dims of gluon_attention.BACKWARD_HEAD_DIMS
# (64: each consumer's dQ share over its own keys; 128: dQ split by columns across the consumers): full
# 128-key blocks, GQA and MQA (the kernel loops over a group's query heads),
# q_len < kv_len (the diagonal off the blocks' corners, blocks no query sees in part), and lengths that
# are not multiples of the 64-query steps or 128-key blocks (zero-filled rows and keys, masked stores).
GLUON_BACKWARD_SHAPES = [
    (2, 8, 8, 1024, 1024),
    (2, 8, 2, 1000, 1000),
    (1, 4, 1, 300, 1337),
    (1, 6, 3, 129, 130),
    (3, 2, 1, 77, 77),
    (1, 2, 2, 1, 257),
]


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch, heads, kv_heads, q_len, kv_len", GLUON_BACKWARD_SHAPES)
def test_gpu_gluon_backward_matches_reference(
    gluon_backward, gluon_forward, batch, heads, kv_heads, q_len, kv_len, dtype, head_dim
):
    """Forward and backward both in Gluon: out, dq, dk and dv against the float64 reference."""
    q, k, v = random_qkv(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype, device="cuda")
    check_against_reference(q, k, v)
    assert gluon_forward, "the Gluon forward was not taken"
    assert gluon_backward, "the Gluon backward was not taken"


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_gluon_backward_reads_packed_qkv_views(gluon_backward, dtype, head_dim):
    """q, k, v as strided views of one fused (B, T, 3, H, D) projection, and a dout that is a strided
    view too: the Gluon backward reads all four through descriptors of their own strides."""
    batch, seq, heads = 2, 777, 6
    qkv = torch.randn(batch, seq, 3, heads, head_dim, device="cuda", dtype=dtype)
    q, k, v = (leaf(qkv[:, :, i].permute(0, 2, 1, 3)) for i in range(3))
    scale = 1.0 / math.sqrt(head_dim)
    out = fastgpt.causal_attention(q, k, v, softmax_scale=scale, backend="triton")
    dout = torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=dtype).permute(0, 2, 1, 3)
    actual = torch.autograd.grad(out, (q, k, v), dout)
    assert gluon_backward, "the Gluon backward was not taken"
    upcast = [leaf(t.detach().double()) for t in (q, k, v)]
    expected = attention_and_grads(reference.causal_attention, *upcast, dout.double(), softmax_scale=scale)
    eager = attention_and_grads(
        reference.causal_attention, *(leaf(t.detach()) for t in (q, k, v)), dout, softmax_scale=scale
    )
    for name, got, want, same_dtype in zip(("dq", "dk", "dv"), actual, expected[1:], eager[1:]):
        assert_close(name, got, want.detach(), same_dtype.detach())


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_gluon_backward_leaves_deterministic_mode_to_triton(gluon_backward, head_dim):
    """Under FASTGPT_TRITON_ATTENTION=gluon the Triton kernels still take the backward in
    deterministic mode (the order-fixed dK/dV and dQ kernels: the Gluon backward adds dQ by atomics)
    at both head_dims the Gluon one serves otherwise; the gradients stay right."""
    with deterministic_algorithms():
        check_against_reference(*random_qkv(1, 4, 2, 300, 300, head_dim, torch.bfloat16, device="cuda"))
    assert not gluon_backward
