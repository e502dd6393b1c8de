"""Fused FFN, LayerNorm (+ residual) and linear cross-entropy on the `cpu` backend (fastgpt._C) against
the float64 reference: every output and every gradient, float32 and bfloat16, ragged shapes, every
activation and reduction, ignore_index, empty inputs, huge logits and NaN rows."""

import pytest
import torch

pytest.importorskip("fastgpt.ops.compiled", reason="fastgpt._C (the cpu backend) is not built")

from deterministic import intra_op_threads
from tolerance import assert_close

from fastgpt import functional, reference
from fastgpt.activations import ACTIVATIONS
from fastgpt.nn import Linear
from fastgpt.ops import compiled

DTYPES = [torch.float32, torch.bfloat16]


def run(fn, inputs, dtype, upstreams):
    """fn(*inputs) with the float tensors cast to dtype (None and integer tensors passed as they are);
    returns the outputs and the gradients of sum(out_i * upstream_i) w.r.t. every float input."""
    leaves = [
        t.detach().to(dtype).requires_grad_() if t is not None and t.is_floating_point() else t
        for t in inputs
    ]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    loss = sum((out.double() * upstream).sum() for out, upstream in zip(outputs, upstreams))
    loss.backward()
    grads = [leaf.grad if leaf is not None and leaf.is_floating_point() else None for leaf in leaves]
    return [out.detach() for out in outputs], grads


def check_against_reference(kernel_fn, reference_fn, inputs, dtype, upstreams):
    """The kernel's outputs and gradients in dtype vs float64, with eager in dtype setting the bound."""
    outs, grads = run(kernel_fn, inputs, dtype, upstreams)
    eager_outs, eager_grads = run(reference_fn, inputs, dtype, upstreams)
    ref_outs, ref_grads = run(reference_fn, inputs, torch.float64, upstreams)
    for index, (out, ref, eager) in enumerate(zip(outs, ref_outs, eager_outs)):
        assert_close(f"output {index}", out, ref, eager)
    checked = 0
    for index, (grad, ref, eager) in enumerate(zip(grads, ref_grads, eager_grads)):
        if ref is None:
            continue
        assert_close(f"grad of input {index}", grad, ref, eager)
        checked += 1
    return checked


def randn(*shape, scale=1.0):
    return torch.randn(*shape, dtype=torch.float64) * scale


# ----------------------------------------------------------------------------------------------
# FFN

# (x shape, hidden, out_features, bias, residual): ragged M/N/K, C_out != C, no biases, 1 token.
FFN_CASES = [
    ((2, 17, 48), 200, 48, True, True),
    ((97, 33), 130, 20, False, False),
    ((1, 16), 64, 16, True, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", FFN_CASES, ids=lambda c: f"x{c[0]}-hid{c[1]}-out{c[2]}")
def test_ffn_matches_reference(case, activation, dtype):
    x_shape, hidden, out_features, with_bias, with_residual = case
    channels = x_shape[-1]
    inputs = [
        randn(*x_shape),
        randn(hidden, channels, scale=channels**-0.5),
        randn(hidden) if with_bias else None,
        randn(out_features, hidden, scale=hidden**-0.5),
        randn(out_features) if with_bias else None,
        randn(*x_shape[:-1], out_features) if with_residual else None,
    ]

    def cpu_ffn(x, fc_weight, fc_bias, proj_weight, proj_bias, residual):
        return functional.fused_ffn(
            x,
            fc_weight,
            fc_bias,
            proj_weight,
            proj_bias,
            activation=activation,
            residual=residual,
            backend="cpu",
        )

    def reference_ffn(x, fc_weight, fc_bias, proj_weight, proj_bias, residual):
        return reference.fused_ffn(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual)

    upstream = randn(*x_shape[:-1], out_features)
    checked = check_against_reference(cpu_ffn, reference_ffn, inputs, dtype, [upstream])
    assert checked == 3 + 2 * with_bias + with_residual


def test_ffn_empty_batch():
    x = torch.randn(0, 5, 16, requires_grad=True)
    fc, proj = torch.randn(32, 16, requires_grad=True), torch.randn(16, 32, requires_grad=True)
    out = functional.fused_ffn(x, fc, None, proj, None, backend="cpu")
    assert out.shape == (0, 5, 16)
    out.sum().backward()
    assert torch.equal(fc.grad, torch.zeros_like(fc)) and torch.equal(proj.grad, torch.zeros_like(proj))


def test_ffn_nan_stays_in_its_row():
    x = torch.randn(9, 16)
    x[4, 2] = float("nan")
    out = functional.fused_ffn(
        x, torch.randn(40, 16), torch.randn(40), torch.randn(16, 40), None, backend="cpu"
    )
    assert torch.equal(out.isnan().any(dim=-1), torch.arange(9) == 4)


# ----------------------------------------------------------------------------------------------
# Linear (a decode step's projections): the skinny kernel up to 16 rows, BLAS beyond

# (x shape, out_features, bias, strided x, weight stored (in, out)): 1 row, rows that miss the register
# blocking, the largest kernel cases, the first BLAS cases, ragged N and K, an x whose rows are not
# contiguous, and weights given as the transposed view of an (in, out) tensor (transformers' Conv1D).
LINEAR_CASES = [
    ((1, 1, 768), 2304, True, False, False),
    ((3, 131), 70, False, False, False),
    ((2, 8, 33), 5, True, False, False),
    ((17, 64), 48, True, False, False),
    ((4, 96), 37, True, True, False),
    ((1, 768), 300, True, False, True),
    ((3, 131), 70, False, False, True),
    ((4, 40), 129, True, False, True),
    ((5, 40), 33, True, False, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "case", LINEAR_CASES, ids=lambda c: f"x{c[0]}-out{c[1]}-bias{c[2]}-strided{c[3]}-in_out{c[4]}"
)
def test_linear_matches_reference(case, dtype):
    x_shape, out_features, with_bias, strided, in_out_weight = case
    in_features = x_shape[-1]
    weight = (
        randn(in_features, out_features, scale=in_features**-0.5).t()
        if in_out_weight
        else randn(out_features, in_features, scale=in_features**-0.5)
    )
    inputs = [
        randn(*x_shape[:-1], 2 * in_features)[..., ::2] if strided else randn(*x_shape),
        weight,
        randn(out_features) if with_bias else None,
    ]
    upstream = randn(*x_shape[:-1], out_features)
    checked = check_against_reference(compiled.linear, torch.nn.functional.linear, inputs, dtype, [upstream])
    assert checked == 2 + with_bias


@pytest.mark.parametrize("in_out_weight", [False, True], ids=["out_in", "in_out"])
def test_linear_is_deterministic_across_thread_counts(in_out_weight):
    # 4 rows of a (the most either layout's kernel takes) and a weight large enough to split over
    # threads: 12 chunks of 64 weight rows when stored (in, out), 8 tasks of 64 rows when (out, in).
    x, bias = torch.randn(4, 768), torch.randn(512)
    weight = torch.randn(768, 512).t() if in_out_weight else torch.randn(512, 768)
    outputs = []
    for count in (2, 1):
        with intra_op_threads(count):
            outputs.append(compiled.linear(x, weight, bias))
    assert torch.equal(outputs[0], outputs[1])
    torch.testing.assert_close(outputs[0], torch.nn.functional.linear(x, weight, bias), rtol=1e-4, atol=1e-4)


def test_linear_module_takes_the_kernel_for_few_rows_only(monkeypatch, fresh_routes):
    layer = Linear(32, 24, backend="cpu")
    calls = []
    monkeypatch.setattr(
        compiled, "linear", lambda *args: calls.append(args) or torch.nn.functional.linear(*args)
    )
    for rows, expected_calls in (
        (1, 1),
        (compiled.LINEAR_KERNEL_MAX_ROWS, 2),
        (compiled.LINEAR_KERNEL_MAX_ROWS + 1, 2),
    ):
        x = torch.randn(rows, 32)
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        assert len(calls) == expected_calls, f"{rows} rows"
    layer.backend = "reference"
    layer(torch.randn(1, 32))
    assert len(calls) == 2


# ----------------------------------------------------------------------------------------------
# LayerNorm (+ fused residual)

# (shape, residual, weight, bias): widths 1 / 33 / 768 / 1025, ragged rows, affine or not.
LAYER_NORM_CASES = [
    ((17, 33), True, True, True),
    ((2, 97, 768), False, True, True),
    ((1, 1), True, False, False),
    ((5, 1025), True, True, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "case", LAYER_NORM_CASES, ids=lambda c: f"{c[0]}-res{int(c[1])}-w{int(c[2])}-b{int(c[3])}"
)
def test_layer_norm_matches_reference(case, dtype):
    shape, with_residual, with_weight, with_bias = case
    width = shape[-1]
    inputs = [
        randn(*shape) * 2 + 0.5,
        randn(width) * 0.3 + 1 if with_weight else None,
        randn(width) if with_bias else None,
        randn(*shape) if with_residual else None,
    ]

    def cpu_layer_norm(x, weight, bias, residual):
        return functional.layer_norm(x, weight, bias, eps=1e-5, residual=residual, backend="cpu")

    def reference_layer_norm(x, weight, bias, residual):
        return reference.layer_norm(x, weight, bias, 1e-5, residual)

    upstreams = [randn(*shape), randn(*shape)]  # for out, and for x + residual when returned
    checked = check_against_reference(cpu_layer_norm, reference_layer_norm, inputs, dtype, upstreams)
    assert checked == 1 + with_weight + with_bias + with_residual


@pytest.mark.parametrize("width", [16, 768])
def test_layer_norm_rows_far_from_zero(width):
    """Rows near 1e4 with unit spread (a large common offset, as late-training activations can have):
    the row mean must be as accurate as eager's, whose error (up to half an ulp of 1e4, 5e-4) the rule
    allows twice; a mean summed lane by lane in float32 is off by several times that in about a third
    of random draws. The upstream gradient pulls out toward its current value (as a squared-error
    loss on it would), so that dx is small and a dx formed from xhat shifted by the saved mean's error
    (eager's dx cancels the shift) is many times eager's error. Eight independent draws."""

    def cpu_layer_norm(x, weight, bias):
        return functional.layer_norm(x, weight, bias, backend="cpu")

    def reference_layer_norm(x, weight, bias):
        return reference.layer_norm(x, weight, bias)

    for _ in range(8):
        x = (randn(4, width) + 1e4).float().double()  # the float32 rows the kernel gets, exactly
        upstream = reference.layer_norm(x, None, None) + randn(4, width, scale=0.1)
        inputs = [x, randn(width, scale=0.1) + 1, randn(width)]
        check_against_reference(cpu_layer_norm, reference_layer_norm, inputs, torch.float32, [upstream])


def test_layer_norm_nan_stays_in_its_row_and_empty_rows_work():
    x = torch.randn(6, 40)
    x[3, 7] = float("nan")
    out = functional.layer_norm(x, torch.randn(40), torch.randn(40), backend="cpu")
    assert torch.equal(out.isnan().any(dim=-1), torch.arange(6) == 3)
    empty = torch.randn(0, 40, requires_grad=True)
    weight = torch.randn(40, requires_grad=True)
    functional.layer_norm(empty, weight, None, backend="cpu").sum().backward()
    assert torch.equal(weight.grad, torch.zeros(40))


def test_layer_norm_gradient_through_the_residual_sum_only():
    x, residual = torch.randn(4, 24, requires_grad=True), torch.randn(4, 24, requires_grad=True)
    weight = torch.randn(24, requires_grad=True)
    upstream = torch.randn(4, 24)
    _, summed = functional.layer_norm(x, weight, None, residual=residual, backend="cpu")
    (summed * upstream).sum().backward()
    assert torch.equal(x.grad, upstream) and torch.equal(residual.grad, upstream)
    assert torch.equal(weight.grad, torch.zeros(24))


def test_layer_norm_weight_grad_is_deterministic_across_thread_counts():
    x, dout = torch.randn(3000, 96), torch.randn(3000, 96)
    grads = []
    for count in (2, 1):
        with intra_op_threads(count):
            weight = torch.randn(96, generator=torch.Generator().manual_seed(1)).requires_grad_()
            (functional.layer_norm(x, weight, None, backend="cpu") * dout).sum().backward()
        grads.append(weight.grad)
    assert torch.equal(grads[0], grads[1])


# ----------------------------------------------------------------------------------------------
# Linear cross-entropy

# (tokens shape, channels, vocab, bias): more tokens than one chunk (64 rows), odd vocabularies.
CROSS_ENTROPY_CASES = [
    ((97,), 48, 1001, True),
    ((3, 17), 32, 5003, False),
    ((1,), 16, 7, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", CROSS_ENTROPY_CASES, ids=lambda c: f"tok{c[0]}-C{c[1]}-V{c[2]}")
def test_linear_cross_entropy_matches_reference(case, reduction, dtype):
    token_shape, channels, vocab, with_bias = case
    targets = torch.randint(0, vocab, token_shape)
    targets.view(-1)[1::5] = -100  # ignored rows
    inputs = [
        randn(*token_shape, channels),
        randn(vocab, channels, scale=0.5),
        targets,
        randn(vocab) if with_bias else None,
    ]

    def losses(fn, backend_reduction):
        def loss(x, weight, targets, bias):
            return fn(x, weight, targets, bias, backend_reduction)

        return loss

    def cpu_loss(x, weight, targets, bias, reduction):
        return functional.linear_cross_entropy(
            x, weight, targets, bias=bias, reduction=reduction, backend="cpu"
        )

    def reference_loss(x, weight, targets, bias, reduction):
        return reference.linear_cross_entropy(x, weight, targets, bias, reduction=reduction)

    upstream = randn(*token_shape) if reduction == "none" else randn(())
    outs, grads = run(losses(cpu_loss, reduction), inputs, dtype, [upstream])
    _, eager_grads = run(losses(reference_loss, reduction), inputs, dtype, [upstream])
    ref_outs, ref_grads = run(losses(reference_loss, reduction), inputs, torch.float64, [upstream])
    assert outs[0].dtype == torch.float32
    # The loss, row by row (every row's error bounded by eager's); a 'mean' or 'sum' then lies within the
    # mean or sum of eager's row errors. (2x eager's error on one reduced scalar would be a coin toss:
    # eager's own rounding errors may cancel in the sum by chance.)
    (rows,), _ = run(losses(cpu_loss, "none"), inputs, dtype, [upstream])
    (eager_rows,), _ = run(losses(reference_loss, "none"), inputs, dtype, [upstream])
    (ref_rows,), _ = run(losses(reference_loss, "none"), inputs, torch.float64, [upstream])
    assert_close("loss rows", rows, ref_rows, eager_rows)
    if reduction != "none":
        kept = int((targets != -100).sum())
        eager_row_errors = (eager_rows.double() - ref_rows).abs().sum() / (kept if reduction == "mean" else 1)
        assert float((outs[0].double() - ref_outs[0]).abs()) <= 2 * float(eager_row_errors) + 1e-6
    for name, index in (("dx", 0), ("dweight", 1), ("dbias", 3)):
        if ref_grads[index] is not None:
            assert_close(name, grads[index], ref_grads[index], eager_grads[index])
    assert (grads[3] is not None) == with_bias


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_linear_cross_entropy_spans_several_chunks(reduction):
    # 64 MiB of float32 logits per chunk: 128 rows of a 70001-token vocabulary, so 300 tokens take 3.
    tokens, channels, vocab = 300, 16, 70001
    targets = torch.randint(0, vocab, (tokens,))
    targets[::7] = -100
    inputs = [randn(tokens, channels), randn(vocab, channels, scale=0.5), targets, randn(vocab)]

    def cpu_loss(x, weight, targets, bias):
        return functional.linear_cross_entropy(
            x, weight, targets, bias=bias, reduction=reduction, backend="cpu"
        )

    def reference_loss(x, weight, targets, bias):
        return reference.linear_cross_entropy(x, weight, targets, bias, reduction=reduction)

    upstream = randn(tokens) if reduction == "none" else randn(())
    outs, grads = run(cpu_loss, inputs, torch.float32, [upstream])
    eager_outs, eager_grads = run(reference_loss, inputs, torch.float32, [upstream])
    ref_outs, ref_grads = run(reference_loss, inputs, torch.float64, [upstream])
    if reduction == "none":
        assert_close("loss rows", outs[0], ref_outs[0], eager_outs[0])
    for name, index in (("dx", 0), ("dweight", 1), ("dbias", 3)):
        assert_close(name, grads[index], ref_grads[index], eager_grads[index])


def test_linear_cross_entropy_loss_is_float32_and_follows_ignore_index():
    x, weight = torch.randn(10, 8, dtype=torch.bfloat16), torch.randn(30, 8, dtype=torch.bfloat16)
    targets = torch.randint(0, 30, (10,))
    targets[3] = 7
    loss = functional.linear_cross_entropy(
        x, weight, targets, ignore_index=7, reduction="none", backend="cpu"
    )
    assert loss.dtype == torch.float32 and loss[3] == 0 and (loss[targets != 7] > 0).all()


def test_linear_cross_entropy_huge_logits_do_not_overflow():
    x = torch.randn(70, 16, dtype=torch.float64) * 300  # logits ~ 1e3: exp overflows without the max
    inputs = [x, randn(50, 16), torch.randint(0, 50, (70,)), None]
    assert (inputs[0] @ inputs[1].T).abs().max() > 500

    def cpu_loss(x, weight, targets, bias):
        return functional.linear_cross_entropy(x, weight, targets, reduction="sum", backend="cpu")

    def reference_loss(x, weight, targets, bias):
        return reference.linear_cross_entropy(x, weight, targets, reduction="sum")

    check_against_reference(cpu_loss, reference_loss, inputs, torch.float32, [randn(())])


def test_linear_cross_entropy_nan_stays_in_its_row():
    x = torch.randn(12, 16)
    x[5, 0] = float("nan")
    loss = functional.linear_cross_entropy(
        x, torch.randn(40, 16), torch.randint(0, 40, (12,)), reduction="none", backend="cpu"
    )
    assert torch.equal(loss.isnan(), torch.arange(12) == 5)


def test_linear_cross_entropy_empty_and_all_ignored():
    weight = torch.randn(9, 4, requires_grad=True)
    empty = torch.randn(0, 4, requires_grad=True)
    no_targets = torch.zeros(0, dtype=torch.long)
    assert functional.linear_cross_entropy(
        empty, weight, no_targets, reduction="none", backend="cpu"
    ).shape == (0,)
    total = functional.linear_cross_entropy(empty, weight, no_targets, reduction="sum", backend="cpu")
    total.backward()
    assert total == 0 and torch.equal(weight.grad, torch.zeros_like(weight))
    ignored = torch.full((3,), -100)
    mean = functional.linear_cross_entropy(torch.randn(3, 4), weight, ignored, backend="cpu")
    assert torch.isnan(mean)  # 0 / 0, as torch's cross_entropy gives


def test_linear_cross_entropy_without_grad_skips_gradient_work():
    x, weight = torch.randn(20, 8), torch.randn(30, 8)
    targets = torch.randint(0, 30, (20,))
    loss, dx, dweight, dbias = torch.ops.fastgpt.linear_cross_entropy_forward(
        x, weight, targets, None, -100, "mean", False
    )
    assert dx.numel() == dweight.numel() == dbias.numel() == 0
    torch.testing.assert_close(loss, reference.linear_cross_entropy(x, weight, targets))


@pytest.mark.parametrize("op", ["layer_norm", "linear_cross_entropy"])
def test_double_backward_warns_and_never_passes_for_a_second_derivative(op):
    """The ops are differentiable once. Under create_graph=True the first derivative is right and a
    warning says the second is missing; differentiating again raises rather than returning zeros."""
    torch.manual_seed(0)
    x = torch.randn(4, 16, requires_grad=True)
    if op == "layer_norm":
        weight, bias = torch.randn(16), torch.randn(16)
        loss = (functional.layer_norm(x, weight, bias, backend="cpu") ** 2).sum()
        expected = (torch.nn.functional.layer_norm(x, (16,), weight, bias) ** 2).sum()
    else:
        weight, targets = torch.randn(8, 16), torch.randint(0, 8, (4,))
        loss = functional.linear_cross_entropy(x, weight, targets, backend="cpu")
        expected = torch.nn.functional.cross_entropy(x @ weight.t(), targets)
    (expected_grad,) = torch.autograd.grad(expected, x)

    def differentiate_twice():
        (grad,) = torch.autograd.grad(loss, x, create_graph=True)
        try:
            torch.autograd.grad(grad.sum(), x)
        except RuntimeError:
            return grad, True
        return grad, False

    with pytest.warns(UserWarning, match="differentiable once|autograd kernel was not registered"):
        grad, second_derivative_refused = differentiate_twice()
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)
    assert second_derivative_refused
