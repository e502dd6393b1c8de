"""fused_ffn on the triton backend (the CPU interpreter without a GPU) against float64 reference.py:
the output and every gradient, ragged shapes, each activation, residual and biases on and off,
strided inputs, empty and NaN inputs, the saved-activation memory, opcheck and torch.compile."""

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close

import fastgpt
from fastgpt import reference
from fastgpt.dispatch import triton_interpreter_enabled
from fastgpt.ops import triton_ffn, triton_gemm

pytestmark = pytest.mark.skipif(
    "triton" not in fastgpt.available_backends(), reason="Triton backend unavailable"
)

NAMES = ("x", "fc_weight", "fc_bias", "proj_weight", "proj_bias", "residual")


def make_inputs(lead, channels, hidden, out_features, dtype, *, biases=True, residual=True, device="cpu"):
    """Random inputs, scaled like nn.Linear's initialisation so activations stay O(1) in fp16."""
    x = torch.randn(*lead, channels, device=device)
    fc_weight = torch.randn(hidden, channels, device=device) / channels**0.5
    fc_bias = torch.randn(hidden, device=device) if biases else None
    proj_weight = torch.randn(out_features, hidden, device=device) / hidden**0.5
    proj_bias = torch.randn(out_features, device=device) if biases else None
    res = torch.randn(*lead, out_features, device=device) if residual else None
    return [
        t.to(dtype) if t is not None else None for t in (x, fc_weight, fc_bias, proj_weight, proj_bias, res)
    ]


def forward_and_grads(inputs, activation, backend, grad_out=None, dtype=None):
    """Output and gradients of every input that is not None, in `dtype` (default: the inputs')."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() if t is not None else None for t in inputs]
    x, fc_weight, fc_bias, proj_weight, proj_bias, res = leaves
    if backend == "reference":
        y = reference.fused_ffn(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, res)
    else:
        y = fastgpt.fused_ffn(
            x,
            fc_weight,
            fc_bias,
            proj_weight,
            proj_bias,
            activation=activation,
            residual=res,
            backend=backend,
        )
    if grad_out is None:
        grad_out = torch.randn_like(y)
    present = [t for t in leaves if t is not None]
    grads = (
        torch.autograd.grad(y, present, grad_out.to(y.dtype))
        if present and y.numel()
        else [torch.zeros_like(t) for t in present]
    )
    named = dict(zip([n for n, t in zip(NAMES, leaves) if t is not None], grads))
    return y.detach(), named, grad_out


def check_against_reference(inputs, activation):
    y, grads, grad_out = forward_and_grads(inputs, activation, "triton")
    y64, grads64, _ = forward_and_grads(inputs, activation, "reference", grad_out, dtype=torch.float64)
    y_eager, grads_eager, _ = forward_and_grads(inputs, activation, "reference", grad_out)
    assert y.dtype == inputs[0].dtype
    assert_close("y", y, y64, y_eager)
    assert grads.keys() == grads64.keys()
    for name in grads:
        assert_close(f"d{name}", grads[name], grads64[name], grads_eager[name])


@pytest.mark.parametrize(
    "dtype, activation, lead, channels, hidden, out_features, biases, residual",
    [
        (torch.float32, "gelu_tanh", (2, 33), 70, 131, 70, True, True),
        (torch.float32, "gelu", (1,), 33, 70, 131, False, False),
        (torch.float32, "relu", (70,), 131, 33, 1, True, False),
        (torch.float32, "silu", (33,), 1, 70, 33, False, True),
        (torch.float16, "gelu_tanh", (70,), 33, 131, 33, True, True),
        (torch.float16, "silu", (3, 11), 70, 33, 70, True, False),
    ],
)
def test_matches_reference(dtype, activation, lead, channels, hidden, out_features, biases, residual):
    inputs = make_inputs(lead, channels, hidden, out_features, dtype, biases=biases, residual=residual)
    check_against_reference(inputs, activation)


def test_inference_writes_no_preactivation():
    """Without autograd the forward skips h (one output write less) and still matches."""
    inputs = make_inputs((33,), 70, 131, 33, torch.float32)
    with torch.no_grad():
        y = fastgpt.fused_ffn(*inputs[:5], activation="silu", residual=inputs[5], backend="triton")
    y64 = reference.fused_ffn(*[t.double() for t in inputs[:5]], "silu", inputs[5].double())
    assert_close("y", y, y64, reference.fused_ffn(*inputs[:5], "silu", inputs[5]))
    _, h = torch.ops.fastgpt.triton_fused_ffn(*inputs[:5], "silu", inputs[5], False)
    assert h.numel() == 0


def test_strided_inputs_are_read_in_place():
    """x transposed in memory, a residual with a row stride of 3, and a column slice of a weight."""
    x = torch.randn(33, 70).t()  # (70, 33), column-major
    fc_weight = torch.randn(64, 40)[:, :33] / 33**0.5  # (64, 33), row stride 40
    proj_weight = torch.randn(33, 64) / 8
    res = torch.randn(70, 3, 33)[:, 1]  # (70, 33), row stride 99
    check_against_reference([x, fc_weight, torch.randn(64), proj_weight, torch.randn(33), res], "gelu_tanh")


def test_empty_batch():
    inputs = make_inputs((0,), 33, 70, 33, torch.float32)
    y, grads, _ = forward_and_grads(inputs, "gelu_tanh", "triton")
    assert y.shape == (0, 33)
    assert grads["x"].shape == (0, 33)
    for name in ("fc_weight", "fc_bias", "proj_weight", "proj_bias"):
        assert torch.equal(grads[name], torch.zeros_like(grads[name])), name


def test_nan_stays_in_its_row():
    inputs = make_inputs((33,), 33, 70, 33, torch.float32)
    inputs[0][5, 7] = float("nan")
    y, grads, _ = forward_and_grads(inputs, "gelu_tanh", "triton")
    rows_with_nan = y.isnan().any(dim=1).nonzero().flatten().tolist()
    assert rows_with_nan == [5]
    assert grads["x"].isnan().any(dim=1).nonzero().flatten().tolist() == [5]
    check_against_reference(inputs, "gelu_tanh")


def saved_activation_bytes(fn, parameters):
    """Bytes of the tensors autograd saves while running fn, parameters (and their views) excluded."""
    parameter_storages = {p.untyped_storage()._cdata for p in parameters}
    total = 0

    def pack(tensor):
        nonlocal total
        if tensor.untyped_storage()._cdata not in parameter_storages:
            total += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return total


def eager_ffn(x, fc_weight, fc_bias, proj_weight, proj_bias):
    return F.linear(F.gelu(F.linear(x, fc_weight, fc_bias), approximate="tanh"), proj_weight, proj_bias)


def assert_saves_at_most_0_6x_eager(lead, channels, run_kernel):
    x = torch.randn(*lead, channels, requires_grad=True)
    parameters = [
        torch.nn.Parameter(torch.randn(4 * channels, channels) / channels**0.5),
        torch.nn.Parameter(torch.randn(4 * channels)),
        torch.nn.Parameter(torch.randn(channels, 4 * channels) / (4 * channels) ** 0.5),
        torch.nn.Parameter(torch.randn(channels)),
    ]
    ours = saved_activation_bytes(lambda: run_kernel(x, *parameters), parameters)
    eager = saved_activation_bytes(lambda: eager_ffn(x, *parameters), parameters)
    element = x.element_size()
    tokens = x.numel() // channels
    assert eager == tokens * 9 * channels * element  # x, h and gelu(h)
    assert ours == tokens * 5 * channels * element  # x and h
    assert ours <= 0.6 * eager


def test_saved_activation_memory_real_run():
    def run(x, *parameters):
        return fastgpt.fused_ffn(x, *parameters, backend="triton")

    assert_saves_at_most_0_6x_eager((2, 16), 64, run)


def test_saved_activation_memory_at_gpt2_shapes():
    """GPT-2 small (1024 tokens, C 768, 4C hidden) under FakeTensorMode: autograd saves exactly what a
    real run saves, without the interpreter running 10^4 GEMM tiles."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def run(x, *parameters):
        return triton_ffn.fused_ffn(x, *parameters, activation="gelu_tanh")

    with FakeTensorMode():
        assert_saves_at_most_0_6x_eager((1, 1024), 768, run)


def test_opcheck():
    x, fc_weight, fc_bias, proj_weight, proj_bias, res = [
        t.requires_grad_() for t in make_inputs((2, 3), 8, 16, 8, torch.float32)
    ]
    forward = torch.ops.fastgpt.triton_fused_ffn.default
    torch.library.opcheck(forward, (x, fc_weight, fc_bias, proj_weight, proj_bias, "gelu", res, True))
    inference = (x.detach(), fc_weight.detach(), None, proj_weight.detach(), None, "relu", None, False)
    torch.library.opcheck(forward, inference)
    _, h = forward(x, fc_weight, fc_bias, proj_weight, proj_bias, "gelu", res, True)
    backward = torch.ops.fastgpt.triton_fused_ffn_backward.default
    dy = torch.randn(2, 3, 8)
    torch.library.opcheck(
        backward, (dy, x.detach(), h.detach(), fc_weight.detach(), proj_weight.detach(), "gelu", True, False)
    )


def test_rejects_float64_and_checks_shapes():
    inputs = make_inputs((3,), 8, 16, 8, torch.float64)
    with pytest.raises(TypeError, match="backend 'triton' supports dtypes .* got torch.float64"):
        fastgpt.fused_ffn(*inputs[:5], backend="triton")
    inputs = make_inputs((3,), 8, 16, 8, torch.float32)
    with pytest.raises(ValueError, match=r"fc_bias must have shape \(16,\), got \(15,\)"):
        fastgpt.fused_ffn(inputs[0], inputs[1], inputs[2][:15], inputs[3], inputs[4], backend="triton")
    with pytest.raises(ValueError, match=r"residual must have shape \(3, 8\), got \(3, 7\)"):
        fastgpt.fused_ffn(*inputs[:5], residual=inputs[5][:, :7], backend="triton")


@pytest.mark.skipif(not triton_interpreter_enabled(), reason="only the interpreter declines bfloat16 GEMMs")
def test_interpreter_declines_bfloat16():
    inputs = make_inputs((3,), 8, 16, 8, torch.bfloat16)
    with pytest.raises(
        TypeError, match=r"supports dtypes \(float16, float32\) for fused_ffn, got torch.bfloat16"
    ):
        fastgpt.fused_ffn(*inputs[:5], backend="triton")


@pytest.mark.skipif(not triton_interpreter_enabled(), reason="the interpreter runs the descriptor path")
def test_every_gemm_loads_through_descriptors(monkeypatch):
    """With rows 16-byte aligned (as at GPT-2 sizes), all six GEMMs of the forward and backward read
    both operands through TMA descriptors: act(h)^T for dWproj is a stored operand, like the others."""
    loads = []
    describe = triton_gemm.with_tensor_descriptors

    def recording(args, *blocks):
        described = describe(args, *blocks)
        loads.append((described["A_LOAD"], described["B_LOAD"]))
        return described

    monkeypatch.setattr(triton_gemm, "with_tensor_descriptors", recording)
    check_against_reference(make_inputs((2, 24), 32, 96, 40, torch.float32), "gelu_tanh")
    gemm_count = 2 + 4  # forward, then backward (the reference runs no Triton)
    assert len(loads) == gemm_count
    assert all(triton_gemm.POINTER.value not in pair for pair in loads), loads


@pytest.mark.gpu
@pytest.mark.parametrize("channels", [768, 1600])  # GPT-2 small and XL
@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu", "relu", "silu"])
def test_bfloat16_on_gpu(activation, channels):
    inputs = make_inputs((4, 257), channels, 4 * channels, channels, torch.bfloat16, device="cuda")
    check_against_reference(inputs, activation)
