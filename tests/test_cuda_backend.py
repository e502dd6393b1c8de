"""The 'cuda' backend (CUDA C++ kernels of csrc/cuda) through the public API: every output and every
gradient against float64 fastgpt.reference with FlashAttention's rule (tests/tolerance.py), eager torch in
the same dtype setting the bar. Needs a CUDA GPU (sm_80+) and fastgpt._C built with CUDA; all tests are
marked `gpu` and skip elsewhere. float32 is not a cuda-backend dtype (Triton runs it): checked to be
declined."""

import pytest
import torch
from tolerance import assert_close

import fastgpt
from fastgpt import dispatch, reference

pytestmark = pytest.mark.gpu

DTYPES = (torch.bfloat16, torch.float16)
DEVICE = "cuda"


def leaf(tensor):
    return tensor.detach().clone().requires_grad_(True)


def upcast(tensors):
    return [None if t is None else t.detach().double().requires_grad_(True) for t in tensors]


def same_dtype(tensors):
    return [None if t is None else leaf(t) for t in tensors]


def gradients(outputs, inputs, output_grads):
    wanted = [t for t in inputs if t is not None]
    return torch.autograd.grad(outputs, wanted, output_grads)


def check_against_reference(name, run_cuda, run_reference, inputs, output_grads):
    """Forward outputs and gradients of every non-None input: cuda vs float64 reference, eager as the bar."""
    kernel_inputs = same_dtype(inputs)
    eager_inputs = same_dtype(inputs)
    reference_inputs = upcast(inputs)
    outputs = run_cuda(*kernel_inputs)
    eager = run_reference(*eager_inputs)
    expected = run_reference(*reference_inputs)

    def as_tuple(value):
        return value if isinstance(value, tuple) else (value,)

    outputs, eager, expected = as_tuple(outputs), as_tuple(eager), as_tuple(expected)
    for index, (actual, bar, exact) in enumerate(zip(outputs, eager, expected)):
        assert actual.dtype == inputs[0].dtype
        assert_close(f"{name} output {index}", actual.detach(), exact.detach(), bar.detach())
    kernel_grads = gradients(outputs, kernel_inputs, output_grads)
    eager_grads = gradients(eager, eager_inputs, output_grads)
    reference_grads = gradients(expected, reference_inputs, [g.double() for g in output_grads])
    names = [f"grad {i}" for i, t in enumerate(inputs) if t is not None]
    for grad_name, actual, bar, exact in zip(names, kernel_grads, eager_grads, reference_grads):
        assert_close(f"{name} {grad_name}", actual, exact, bar)


def test_cuda_backend_is_available():
    assert "cuda" in fastgpt.available_backends(), dispatch.backend_status()["cuda"]


# ----------------------------------------------------------------------------------------------
# Causal attention

ATTENTION_SHAPES = [
    # (batch, heads, kv_heads, q_len, kv_len, head_dim)
    (2, 4, 4, 1, 1, 64),
    (2, 4, 4, 17, 17, 64),
    (2, 4, 4, 97, 97, 64),
    (2, 4, 4, 257, 257, 64),
    (1, 4, 4, 97, 97, 16),
    (1, 4, 4, 97, 97, 32),
    (1, 4, 4, 97, 97, 80),
    (1, 4, 4, 97, 97, 96),
    (1, 4, 4, 257, 257, 128),
    (2, 6, 2, 97, 97, 64),  # GQA
    (1, 4, 1, 130, 130, 128),  # MQA
    (1, 4, 2, 17, 300, 64),  # q_len < kv_len (prefill after a KV cache)
    (2, 2, 2, 1, 257, 128),  # one query over a long cache
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_matches_reference(shape, dtype):
    batch, heads, kv_heads, q_len, kv_len, head_dim = shape
    q = torch.randn(batch, heads, q_len, head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, device=DEVICE, dtype=dtype)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, device=DEVICE, dtype=dtype)
    grad = torch.randn(batch, heads, q_len, head_dim, device=DEVICE, dtype=dtype)
    check_against_reference(
        "attention",
        lambda q, k, v: fastgpt.causal_attention(q, k, v, backend="cuda"),
        lambda q, k, v: reference.causal_attention(q, k, v),
        [q, k, v],
        [grad],
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_packed_qkv_views(dtype):
    """q, k, v as strided views of one fused projection output, with a non-default softmax scale."""
    batch, seq, heads, head_dim = 2, 150, 4, 64
    qkv = torch.randn(batch, seq, 3, heads, head_dim, device=DEVICE, dtype=dtype)
    grad = torch.randn(batch, heads, seq, head_dim, device=DEVICE, dtype=dtype)

    def split(packed):
        return [packed[:, :, i].transpose(1, 2) for i in range(3)]  # (B, H, T, D) views

    check_against_reference(
        "attention packed",
        lambda packed: fastgpt.causal_attention(*split(packed), softmax_scale=0.2, backend="cuda"),
        lambda packed: reference.causal_attention(*split(packed), softmax_scale=0.2),
        [qkv],
        [grad],
    )


def test_attention_backward_is_deterministic():
    q, k, v = (
        torch.randn(2, 4, 300, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    grad = torch.randn_like(q)
    first = torch.autograd.grad(fastgpt.causal_attention(q, k, v, backend="cuda"), (q, k, v), grad)
    second = torch.autograd.grad(fastgpt.causal_attention(q, k, v, backend="cuda"), (q, k, v), grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_attention_empty_batch():
    q = torch.randn(0, 4, 16, 64, device=DEVICE, dtype=torch.float16, requires_grad=True)
    out = fastgpt.causal_attention(q, q, q, backend="cuda")
    assert out.shape == q.shape
    (grad,) = torch.autograd.grad(out.sum(), q)
    assert grad.shape == q.shape


def test_attention_backward_op_checks_the_lse_shape():
    """The kernels index lse by (batch, head, row): the CUDA op refuses one of another shape, as the CPU op
    does, instead of reading past its end."""
    import fastgpt.ops.compiled  # noqa: F401  (loads fastgpt._C: torch.ops.fastgpt.*)

    q = torch.randn(1, 2, 16, 64, device=DEVICE, dtype=torch.bfloat16)
    out, lse = torch.ops.fastgpt.attention_forward(q, q, q, 0.125)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        torch.ops.fastgpt.attention_backward(out, q, q, q, out, lse[:, :, :-1], 0.125)


def test_attention_ops_check_the_softmax_scale_and_head_dim():
    """The CUDA operators, called directly, take the softmax scales every entry point takes,
    [dispatch.SOFTMAX_SCALE_MIN, dispatch.SOFTMAX_SCALE_MAX] = [2**-64, 2**64], and refuse the next
    float beyond each bound, 0 (which float32 kernels turn into NaN) and NaN with a ValueError, as the
    CPU operators do (tests/test_bad_input.py); and head_dim 0. At each bound, q and k scaled by
    2**-+32 make the scores those of softmax_scale 1 (powers of two, exact in bfloat16): the same
    output, and gradients scaled by 2**+-32, show the kernels' float32 constants hold there."""
    import math

    import fastgpt.ops.compiled  # noqa: F401  (loads fastgpt._C: torch.ops.fastgpt.*)

    ops = torch.ops.fastgpt
    q, k, v, dout = (torch.randn(1, 2, 16, 64, device=DEVICE, dtype=torch.bfloat16) for _ in range(4))
    out, lse = ops.attention_forward(q, k, v, 1.0)
    dq, dk, dv = ops.attention_backward(dout, q, k, v, out, lse, 1.0)
    for scale, factor in ((dispatch.SOFTMAX_SCALE_MIN, 2.0**32), (dispatch.SOFTMAX_SCALE_MAX, 2.0**-32)):
        q_at, k_at = q * factor, k * factor  # (q_at . k_at) * scale == q . k
        out_at, lse_at = ops.attention_forward(q_at, k_at, v, scale)
        torch.testing.assert_close(out_at, out, rtol=2**-7, atol=1e-3, msg=f"out at softmax_scale={scale}")
        torch.testing.assert_close(lse_at, lse, rtol=1e-5, atol=1e-5, msg=f"lse at softmax_scale={scale}")
        dq_at, dk_at, dv_at = ops.attention_backward(dout, q_at, k_at, v, out_at, lse_at, scale)
        for name, actual, expected in (
            ("dq", dq_at * factor, dq),
            ("dk", dk_at * factor, dk),
            ("dv", dv_at, dv),
        ):
            torch.testing.assert_close(
                actual, expected, rtol=2**-7, atol=1e-3, msg=f"{name} at softmax_scale={scale}"
            )
    outside = (
        math.nextafter(dispatch.SOFTMAX_SCALE_MIN, 0.0),
        math.nextafter(dispatch.SOFTMAX_SCALE_MAX, math.inf),
        0.0,
        float("nan"),
    )
    for scale in outside:
        with pytest.raises(
            ValueError, match=r"attention_forward \(CUDA\): softmax_scale must be a finite positive"
        ):
            ops.attention_forward(q, k, v, scale)
        with pytest.raises(
            ValueError, match=r"attention_backward \(CUDA\): softmax_scale must be a finite positive"
        ):
            ops.attention_backward(dout, q, k, v, out, lse, scale)
    empty = q[..., :0]
    with pytest.raises(ValueError, match=r"head_dim \(q.shape\[3\]\) must be at least 1, got 0"):
        ops.attention_forward(empty, empty, empty, 1.0)


def test_attention_ops_refuse_a_grid_they_cannot_launch():
    """The kernels' grids run heads along y and the batch along z, at most 65535 each: a larger batch is
    refused by name before any launch (it failed at the launch, the backward's after its first kernel)."""
    import fastgpt.ops.compiled  # noqa: F401  (loads fastgpt._C: torch.ops.fastgpt.*)

    q = torch.randn(65536, 1, 1, 8, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"batch and heads up to 65535, got batch 65536 and heads 1"):
        torch.ops.fastgpt.attention_forward(q, q, q, 0.5)
    lse = torch.zeros(65536, 1, 1, device=DEVICE)
    with pytest.raises(ValueError, match=r"batch and heads up to 65535, got batch 65536"):
        torch.ops.fastgpt.attention_backward(q, q, q, q, q, lse, 0.5)
    torch.ops.fastgpt.attention_forward(q[:65535], q[:65535], q[:65535], 0.5)  # the limit itself runs


def test_auto_attention_serves_a_batch_beyond_the_cuda_grid():
    """At most 512 keys `auto` prefers the cuda backend, but a batch above its grid's 65535 goes to
    Triton (dispatch's wide_grid fact): output and gradients against the float64 reference."""
    batch = dispatch.MAX_GRID_YZ + 1
    q, k, v = (torch.randn(batch, 1, 16, 32, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    check_against_reference(
        "attention batch 65536",
        lambda q, k, v: fastgpt.causal_attention(q, k, v),
        lambda q, k, v: reference.causal_attention(q, k, v),
        [q, k, v],
        [torch.randn_like(q)],
    )


def test_attention_declines_what_it_has_no_kernel_for():
    q = torch.randn(1, 2, 8, 256, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head_dim up to 128"):
        fastgpt.causal_attention(q, q, q, backend="cuda")
    q12 = torch.randn(1, 2, 8, 12, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 8"):
        fastgpt.causal_attention(q12, q12, q12, backend="cuda")
    assert (
        dispatch.choose_backend("causal_attention", "auto", "cuda", torch.bfloat16, (("head_dim", 256),))
        != "cuda"
    )
    short = (("head_dim", 128), ("kv_len", dispatch.kv_len_class(512)))
    assert dispatch.choose_backend("causal_attention", "auto", "cuda", torch.bfloat16, short) == "cuda"
    with pytest.raises(TypeError, match="float32"):
        q32 = torch.randn(1, 2, 8, 64, device=DEVICE)
        fastgpt.causal_attention(q32, q32, q32, backend="cuda")


# ----------------------------------------------------------------------------------------------
# Fused FFN: both CUDA implementations, the mma.sync GEMM (the default) and cuBLASLt epilogues, chosen
# per call by FASTGPT_CUDA_FFN (csrc/cuda/api_cuda.inc).

FFN_PATHS = ("cublaslt", "mma")


@pytest.fixture(params=FFN_PATHS)
def ffn_path(request, monkeypatch):
    monkeypatch.setenv("FASTGPT_CUDA_FFN", request.param)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu", "relu", "silu"])
@pytest.mark.parametrize(
    "leading, channels, bias, residual",
    [
        ((1,), 64, True, False),
        ((2, 33), 64, True, True),
        ((70,), 128, False, True),
        ((3, 11), 131, True, False),  # hidden 524: cuBLASLt's GELU aux rule (hidden % 8) fails
        ((5, 51), 96, False, False),
    ],
    ids=["one-token", "bias-residual", "no-bias", "odd-width", "no-bias-no-residual"],
)
def test_fused_ffn_matches_reference(leading, channels, bias, residual, activation, dtype, ffn_path):
    hidden = 4 * channels
    x = torch.randn(*leading, channels, device=DEVICE, dtype=dtype)
    fc_weight = torch.randn(hidden, channels, device=DEVICE, dtype=dtype) / channels**0.5
    proj_weight = torch.randn(channels, hidden, device=DEVICE, dtype=dtype) / hidden**0.5
    fc_bias = torch.randn(hidden, device=DEVICE, dtype=dtype) if bias else None
    proj_bias = torch.randn(channels, device=DEVICE, dtype=dtype) if bias else None
    res = torch.randn(*leading, channels, device=DEVICE, dtype=dtype) if residual else None
    grad = torch.randn(*leading, channels, device=DEVICE, dtype=dtype)

    def run(function, **options):
        return lambda x, w1, b1, w2, b2, r: function(
            x, w1, b1, w2, b2, activation=activation, residual=r, **options
        )

    check_against_reference(
        f"ffn {activation}",
        run(fastgpt.fused_ffn, backend="cuda"),
        run(reference.fused_ffn),
        [x, fc_weight, fc_bias, proj_weight, proj_bias, res],
        [grad],
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_ffn_strided_operands(dtype, ffn_path):
    """Weights given as transposed views (dense, so the leaf clones keep their strides): the cuBLASLt
    path reads them in place with the opposite transpose flag."""
    channels, hidden = 64, 256
    x = torch.randn(97, channels, device=DEVICE, dtype=dtype)
    fc_weight = (torch.randn(channels, hidden, device=DEVICE, dtype=dtype) / channels**0.5).t()
    proj_weight = (torch.randn(hidden, channels, device=DEVICE, dtype=dtype) / hidden**0.5).t()
    fc_bias = torch.randn(hidden, device=DEVICE, dtype=dtype)
    proj_bias = torch.randn(channels, device=DEVICE, dtype=dtype)
    res = torch.randn(97, channels, device=DEVICE, dtype=dtype)
    grad = torch.randn(97, channels, device=DEVICE, dtype=dtype)

    def run(function, **options):
        return lambda x, w1, b1, w2, b2, r: function(x, w1, b1, w2, b2, residual=r, **options)

    check_against_reference(
        "ffn strided",
        run(fastgpt.fused_ffn, backend="cuda"),
        run(reference.fused_ffn),
        [x, fc_weight, fc_bias, proj_weight, proj_bias, res],
        [grad],
    )


def test_fused_ffn_rejects_an_unknown_path(monkeypatch):
    monkeypatch.setenv("FASTGPT_CUDA_FFN", "cutlass")
    x = torch.randn(4, 64, device=DEVICE, dtype=torch.bfloat16)
    w1 = torch.randn(256, 64, device=DEVICE, dtype=torch.bfloat16)
    w2 = torch.randn(64, 256, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="FASTGPT_CUDA_FFN must be 'cublaslt' or 'mma', got 'cutlass'"):
        fastgpt.fused_ffn(x, w1, None, w2, None, backend="cuda")


def test_fused_ffn_backward_op_checks_shapes():
    """The GEMMs read dy and h as x's rows and the weights at x's and h's widths: the CUDA op refuses
    other shapes, as the CPU op does, instead of reading past their ends."""
    import fastgpt.ops.compiled  # noqa: F401  (loads fastgpt._C: torch.ops.fastgpt.*)

    x = torch.randn(2, 4, 64, device=DEVICE, dtype=torch.bfloat16)
    w1 = torch.randn(256, 64, device=DEVICE, dtype=torch.bfloat16)
    w2 = torch.randn(64, 256, device=DEVICE, dtype=torch.bfloat16)
    y, h = torch.ops.fastgpt.ffn_forward(x, w1, None, w2, None, "gelu_tanh", None)
    backward = torch.ops.fastgpt.ffn_backward
    with pytest.raises(RuntimeError, match="dout must have shape"):  # the schema's name for dy
        backward(y[:, :3], x, h, w1, w2, "gelu_tanh")
    with pytest.raises(RuntimeError, match="h must have shape"):
        backward(y, x, h[:, :3], w1, w2, "gelu_tanh")
    with pytest.raises(RuntimeError, match="fc_weight must be"):
        backward(y, x, h, w1[:, :32], w2, "gelu_tanh")
    with pytest.raises(RuntimeError, match="proj_weight must be"):
        backward(y, x, h[..., :128], w1[:128], w2, "gelu_tanh")


@pytest.mark.usefixtures("ffn_path")
def test_fused_ffn_no_tokens():
    x = torch.randn(0, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w1 = torch.randn(256, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w2 = torch.randn(64, 256, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    b1 = torch.randn(256, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    y = fastgpt.fused_ffn(x, w1, b1, w2, None, backend="cuda")
    assert y.shape == (0, 64)
    grads = torch.autograd.grad(y.sum(), (x, w1, b1, w2))
    assert all(g is not None and not g.any() for g in grads[1:])


# ----------------------------------------------------------------------------------------------
# LayerNorm


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape",
    [(33, 64), (4, 17, 768), (70, 1000), (5, 1001), (9, 2048), (3, 16384)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize(
    "affine, residual",
    [(True, False), (True, True), (False, True), (False, False)],
    ids=["affine", "affine-residual", "residual", "plain"],
)
def test_layer_norm_matches_reference(shape, affine, residual, dtype):
    cols = shape[-1]
    x = torch.randn(*shape, device=DEVICE, dtype=dtype)
    weight = torch.randn(cols, device=DEVICE, dtype=dtype) if affine else None
    bias = torch.randn(cols, device=DEVICE, dtype=dtype) if affine else None
    res = torch.randn(*shape, device=DEVICE, dtype=dtype) if residual else None
    grads = [torch.randn(*shape, device=DEVICE, dtype=dtype) for _ in range(2 if residual else 1)]

    check_against_reference(
        "layer_norm",
        lambda x, w, b, r: fastgpt.layer_norm(x, w, b, 1e-5, residual=r, backend="cuda"),
        lambda x, w, b, r: reference.layer_norm(x, w, b, 1e-5, residual=r),
        [x, weight, bias, res],
        grads,
    )


def test_layer_norm_gradient_through_residual_sum_only():
    """Only x + residual feeds the loss: the normalised output gets no gradient at all."""
    x, residual = (
        torch.randn(6, 256, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)
    )
    _, summed = fastgpt.layer_norm(x, None, None, residual=residual, backend="cuda")
    grad = torch.randn_like(summed)
    dx, dresidual = torch.autograd.grad(summed, (x, residual), grad)
    assert torch.equal(dx, grad) and torch.equal(dresidual, grad)


def test_layer_norm_backward_op_checks_the_weight_length():
    """The kernel reads one weight per column: the CUDA op refuses a shorter weight, as the CPU op does,
    instead of reading past its end."""
    import fastgpt.ops.compiled  # noqa: F401  (loads fastgpt._C: torch.ops.fastgpt.*)

    x = torch.randn(8, 64, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.randn(64, device=DEVICE, dtype=torch.bfloat16)
    out, _, mean, rstd = torch.ops.fastgpt.layer_norm_forward(x, weight, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="weight must have 64 elements"):
        torch.ops.fastgpt.layer_norm_backward(out, None, x, weight[:32], mean, rstd)


def test_layer_norm_backward_op_checks_where_mean_and_rstd_are():
    """The kernel reads mean and rstd through raw pointers on the input's device: the CUDA operator
    refuses CPU ones (which it would read at a host address) instead of launching."""
    import fastgpt.ops.compiled  # noqa: F401  (loads fastgpt._C: torch.ops.fastgpt.*)

    x = torch.randn(8, 64, device=DEVICE, dtype=torch.bfloat16)
    out, _, mean, rstd = torch.ops.fastgpt.layer_norm_forward(x, None, None, None, 1e-5)
    with pytest.raises(ValueError, match=r"mean and rstd must be on the input's device \(cuda:\d\), got cpu"):
        torch.ops.fastgpt.layer_norm_backward(out, None, x, None, mean.cpu(), rstd)
    with pytest.raises(ValueError, match=r"mean and rstd must be on the input's device"):
        torch.ops.fastgpt.layer_norm_backward(out, None, x, None, mean, rstd.cpu())


def test_layer_norm_forward_op_checks_eps():
    """A negative or non-finite eps makes every rstd NaN: the CUDA operator refuses it, as the CPU one does."""
    import fastgpt.ops.compiled  # noqa: F401  (loads fastgpt._C: torch.ops.fastgpt.*)

    x = torch.randn(8, 64, device=DEVICE, dtype=torch.bfloat16)
    for eps in (-1e-5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"layer_norm_forward \(CUDA\): eps must be a finite float >= 0"):
            torch.ops.fastgpt.layer_norm_forward(x, None, None, None, eps)


def test_layer_norm_no_rows():
    x = torch.randn(0, 768, device=DEVICE, dtype=torch.float16, requires_grad=True)
    w = torch.randn(768, device=DEVICE, dtype=torch.float16, requires_grad=True)
    b = torch.randn(768, device=DEVICE, dtype=torch.float16, requires_grad=True)
    out = fastgpt.layer_norm(x, w, b, backend="cuda")
    assert out.shape == x.shape
    _, dw, db = torch.autograd.grad(out.sum(), (x, w, b))
    assert not dw.any() and not db.any()


# ----------------------------------------------------------------------------------------------
# Linear cross-entropy

CE_IGNORE = -100
CROSS_ENTROPY_SHAPES = [
    # (tokens, channels, vocab): one row; a vocabulary not a multiple of 8; GPT-2's odd 50257; three
    # chunks (16 MiB of logits per chunk at vocab 1000), the last one ragged; a row wider than shared
    # memory (the streamed path).
    (1, 64, 8),
    (37, 64, 1001),
    (64, 128, 50257),
    (20000, 64, 1000),
    (64, 32, 120000),
]


def cross_entropy_inputs(tokens, channels, vocab, dtype, bias):
    x = torch.randn(tokens, channels, device=DEVICE)
    weight = torch.randn(vocab, channels, device=DEVICE) / channels**0.5 * 3  # logits spread over a few units
    bias_vector = torch.randn(vocab, device=DEVICE) if bias else None
    targets = torch.randint(0, vocab, (tokens,), device=DEVICE)
    targets[torch.randperm(tokens, device=DEVICE)[: tokens // 10]] = CE_IGNORE
    return [t.to(dtype) if t is not None else None for t in (x, weight, bias_vector)], targets


def cross_entropy_loss_and_grads(tensors, targets, reduction, backend, grad_out, dtype=None):
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]
    x, weight, bias = leaves
    if backend == "reference":
        loss = reference.linear_cross_entropy(x, weight, targets, bias, CE_IGNORE, reduction)
    else:
        loss = fastgpt.linear_cross_entropy(
            x, weight, targets, bias=bias, ignore_index=CE_IGNORE, reduction=reduction, backend=backend
        )
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None], grad_out.to(loss.dtype))
    return loss.detach(), grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", CROSS_ENTROPY_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_cross_entropy_matches_reference(shape, reduction, dtype):
    tokens, channels, vocab = shape
    # a bias on the odd vocabularies and on the three-chunk case (dbias accumulated over chunks)
    tensors, targets = cross_entropy_inputs(
        tokens, channels, vocab, dtype, bias=vocab % 2 == 1 or tokens > 10000
    )
    grad_out = torch.rand(() if reduction != "none" else (tokens,), device=DEVICE) + 0.5
    loss, grads = cross_entropy_loss_and_grads(tensors, targets, reduction, "cuda", grad_out)
    loss64, grads64 = cross_entropy_loss_and_grads(
        tensors, targets, reduction, "reference", grad_out, torch.float64
    )
    loss_eager, grads_eager = cross_entropy_loss_and_grads(tensors, targets, reduction, "reference", grad_out)
    assert loss.dtype == torch.float32
    assert_close("loss", loss, loss64, loss_eager)
    for name, actual, exact, bar in zip(("x", "weight", "bias"), grads, grads64, grads_eager):
        assert actual.dtype == dtype
        assert_close(f"grad {name}", actual, exact, bar)


def test_linear_cross_entropy_every_target_ignored():
    tensors, targets = cross_entropy_inputs(16, 64, 100, torch.bfloat16, bias=False)
    x, weight, _ = (None if t is None else t.requires_grad_() for t in tensors)
    targets.fill_(CE_IGNORE)
    loss = fastgpt.linear_cross_entropy(x, weight, targets, ignore_index=CE_IGNORE, backend="cuda")
    assert torch.isnan(loss)  # 0 / 0, as torch's mean over no rows
    total = fastgpt.linear_cross_entropy(
        x, weight, targets, ignore_index=CE_IGNORE, reduction="sum", backend="cuda"
    )
    dx, dweight = torch.autograd.grad(total, (x, weight))
    assert total.item() == 0.0 and not dx.any() and not dweight.any()


def test_linear_cross_entropy_no_tokens():
    x = torch.randn(0, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(100, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.long, device=DEVICE)
    loss = fastgpt.linear_cross_entropy(x, weight, targets, reduction="sum", backend="cuda")
    dx, dweight = torch.autograd.grad(loss, (x, weight))
    assert loss.item() == 0.0 and dx.shape == x.shape and not dweight.any()


def test_linear_cross_entropy_is_deterministic():
    tensors, targets = cross_entropy_inputs(20000, 64, 1000, torch.bfloat16, bias=True)
    runs = [
        cross_entropy_loss_and_grads(tensors, targets, "mean", "cuda", torch.ones((), device=DEVICE))
        for _ in range(2)
    ]
    assert torch.equal(runs[0][0], runs[1][0])
    for first, second in zip(runs[0][1], runs[1][1]):
        assert torch.equal(first, second)


# ----------------------------------------------------------------------------------------------
# Custom-op plumbing


def cuda_operator_calls():
    """{name: (operator, arguments)}: a valid call of each CUDA operator, bf16 on the GPU."""
    dtype, ops = torch.bfloat16, torch.ops.fastgpt
    q = torch.randn(1, 2, 16, 64, device=DEVICE, dtype=dtype)  # (B, H, T, D), also k, v, out, dout
    lse = torch.zeros(1, 2, 16, device=DEVICE)  # (B, H, T)
    x = torch.randn(2, 5, 64, device=DEVICE, dtype=dtype)  # (..., C)
    fc_weight, proj_weight = (
        torch.randn(shape, device=DEVICE, dtype=dtype) for shape in ((128, 64), (64, 128))
    )
    h = torch.randn(2, 5, 128, device=DEVICE, dtype=dtype)  # (..., hidden)
    vector = torch.randn(64, device=DEVICE, dtype=dtype)
    stats = torch.ones(10, device=DEVICE)  # a mean or rstd per row
    weight, targets = (
        torch.randn(100, 64, device=DEVICE, dtype=dtype),
        torch.randint(0, 100, (2, 5), device=DEVICE),
    )
    row_grad = torch.ones(2, 5, device=DEVICE)
    return {
        "attention_forward": (ops.attention_forward, {"q": q, "k": q, "v": q, "softmax_scale": 0.125}),
        "attention_backward": (ops.attention_backward, {"dout": q, "q": q, "k": q, "v": q, "out": q, "lse": lse, "softmax_scale": 0.125}),
        "ffn_forward": (ops.ffn_forward, {"x": x, "fc_weight": fc_weight, "fc_bias": None, "proj_weight": proj_weight, "proj_bias": vector, "activation": "relu", "residual": x}),
        "ffn_backward": (ops.ffn_backward, {"dout": x, "x": x, "h": h, "fc_weight": fc_weight, "proj_weight": proj_weight, "activation": "relu"}),
        "layer_norm_forward": (ops.layer_norm_forward, {"x": x, "weight": vector, "bias": vector, "residual": x, "eps": 1e-5}),
        "layer_norm_backward": (ops.layer_norm_backward, {"dout": x, "dresidual_out": x, "input": x, "weight": vector, "mean": stats, "rstd": stats}),
        "linear_cross_entropy_forward": (ops.linear_cross_entropy_forward, {"x": x, "weight": weight, "targets": targets, "bias": weight[:, 0], "ignore_index": -100, "reduction": "sum", "compute_grad": True}),
        "linear_cross_entropy_backward": (ops.linear_cross_entropy_backward, {"x": x, "weight": weight, "targets": targets, "bias": None, "row_grad": row_grad, "ignore_index": -100}),
    }  # fmt: skip


# Every tensor argument of each CUDA operator (ids carry the op's name, so each gpu_check.sh area's -k
# expression picks its own).
CPU_ARGUMENT_CASES = [
    ("attention_forward", "q"), ("attention_forward", "k"), ("attention_forward", "v"),
    ("attention_backward", "dout"), ("attention_backward", "out"), ("attention_backward", "lse"),
    ("ffn_forward", "fc_weight"), ("ffn_forward", "proj_bias"), ("ffn_forward", "residual"),
    ("ffn_backward", "dout"), ("ffn_backward", "h"), ("ffn_backward", "proj_weight"),
    ("layer_norm_forward", "weight"), ("layer_norm_forward", "bias"), ("layer_norm_forward", "residual"),
    ("layer_norm_backward", "dout"), ("layer_norm_backward", "dresidual_out"), ("layer_norm_backward", "weight"),
    ("layer_norm_backward", "mean"), ("layer_norm_backward", "rstd"),
    ("linear_cross_entropy_forward", "weight"), ("linear_cross_entropy_forward", "targets"),
    ("linear_cross_entropy_forward", "bias"), ("linear_cross_entropy_backward", "row_grad"),
]  # fmt: skip


@pytest.mark.parametrize("op, argument", CPU_ARGUMENT_CASES, ids=lambda value: value)
def test_cuda_operator_refuses_a_cpu_tensor(op, argument):
    """A CPU tensor among CUDA ones dispatches to the CUDA operator (CUDA outranks CPU), whose kernels
    would read it at a host address: each operator refuses it, naming it, before any launch. The valid
    call itself runs."""
    import fastgpt.ops.compiled  # noqa: F401  (loads fastgpt._C: torch.ops.fastgpt.*)

    operator, arguments = cuda_operator_calls()[op]
    operator(*arguments.values())
    arguments[argument] = arguments[argument].cpu()
    with pytest.raises((RuntimeError, ValueError), match=rf"{argument}\b.*(CUDA tensor|on cuda|device)"):
        operator(*arguments.values())
    torch.cuda.synchronize()  # nothing was launched that could fail later


@pytest.mark.parametrize("op", list(dict.fromkeys(op for op, _ in CPU_ARGUMENT_CASES)))
def test_cuda_operator_names_a_dtype_it_does_not_take(op):
    """float32 (or any dtype but bfloat16 and float16) handed to a CUDA operator directly: a TypeError
    that names the dtype given, not only the float32 the capability query describes."""
    import fastgpt.ops.compiled  # noqa: F401  (loads fastgpt._C: torch.ops.fastgpt.*)

    operator, arguments = cuda_operator_calls()[op]
    as_float32 = {
        name: value.float() if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16 else value
        for name, value in arguments.items()
    }
    with pytest.raises(
        TypeError, match=r"must be bfloat16 or float16 \(float32 runs on the Triton backend\), got Float"
    ):
        operator(*as_float32.values())


def test_opcheck():
    """The CUDA kernels under the ops' one schema each (the same operators as the cpu backend's), with
    the C++ Meta kernels and the C++ autograd shared by both devices."""
    import fastgpt.ops.compiled  # noqa: F401  (loads fastgpt._C: torch.ops.fastgpt.*)

    dtype = torch.bfloat16
    q, k, v = (torch.randn(1, 2, 70, 64, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.fastgpt.attention_forward.default, (q, k, v, 0.125))
    x = torch.randn(2, 5, 64, device=DEVICE, dtype=dtype, requires_grad=True)
    w1 = torch.randn(256, 64, device=DEVICE, dtype=dtype, requires_grad=True)
    w2 = torch.randn(64, 256, device=DEVICE, dtype=dtype, requires_grad=True)
    b1 = torch.randn(256, device=DEVICE, dtype=dtype, requires_grad=True)
    torch.library.opcheck(
        torch.ops.fastgpt.ffn_forward.default, (x, w1, b1, w2, None, "gelu_tanh", x.detach().clone())
    )
    w = torch.randn(64, device=DEVICE, dtype=dtype, requires_grad=True)
    torch.library.opcheck(
        torch.ops.fastgpt.layer_norm_forward.default, (x, w, None, x.detach().clone(), 1e-5)
    )
    weight = torch.randn(1001, 64, device=DEVICE, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 1001, (2, 5), device=DEVICE)
    for reduction in ("mean", "none"):
        torch.library.opcheck(
            torch.ops.fastgpt.linear_cross_entropy_forward.default,
            (x, weight, targets, None, -100, reduction, False),
        )


def test_torch_compile_fullgraph():
    dtype = torch.bfloat16
    x = torch.randn(2, 40, 128, device=DEVICE, dtype=dtype)
    w1 = torch.randn(512, 128, device=DEVICE, dtype=dtype) / 128**0.5
    w2 = torch.randn(128, 512, device=DEVICE, dtype=dtype) / 512**0.5
    ln_w = torch.ones(128, device=DEVICE, dtype=dtype)

    def block(x):
        h = fastgpt.layer_norm(x, ln_w, None, backend="cuda")
        q = h.view(2, 40, 2, 64).transpose(1, 2)
        a = fastgpt.causal_attention(q, q, q, backend="cuda").transpose(1, 2).reshape(2, 40, 128)
        return fastgpt.fused_ffn(a, w1, None, w2, None, residual=x, backend="cuda")

    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(x), block(x))


def test_float32_is_declined_to_triton_or_reference():
    for op, facts in (
        ("causal_attention", (("head_dim", 64),)),
        ("fused_ffn", (("hidden", 256),)),
        ("layer_norm", (("hidden", 768),)),
        ("linear_cross_entropy", (("vocab", 50257),)),
    ):
        assert dispatch.choose_backend(op, "auto", "cuda", torch.float32, facts) != "cuda"
