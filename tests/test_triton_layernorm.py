"""layer_norm on the triton backend (the CPU interpreter without a GPU) against float64 reference.py:
both outputs and every gradient, with and without residual, weight and bias, ragged and odd hidden
sizes, strided inputs, empty and NaN rows, determinism, the hidden-size limit, opcheck and
torch.compile(fullgraph=True)."""

import pytest
import torch
import triton
from tolerance import assert_close

import fastgpt
from fastgpt import reference
from fastgpt.ops import triton_layernorm  # also registers the fastgpt::triton_layer_norm ops

pytestmark = pytest.mark.skipif(
    "triton" not in fastgpt.available_backends(), reason="Triton backend unavailable"
)

NAMES = ("x", "weight", "bias", "residual")


def make_inputs(lead, hidden, dtype, *, weight=True, bias=True, residual=True, device="cpu"):
    tensors = (
        torch.randn(*lead, hidden, device=device) * 2 + 0.5,  # a nonzero mean, so centring matters
        torch.randn(hidden, device=device) if weight else None,
        torch.randn(hidden, device=device) if bias else None,
        torch.randn(*lead, hidden, device=device) if residual else None,
    )
    return [t.to(dtype) if t is not None else None for t in tensors]


def outputs_and_grads(inputs, backend, grad_outs=None, dtype=None):
    """The outputs (out, and the sum with a residual) and the gradients of every input given."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() if t is not None else None for t in inputs]
    x, weight, bias, res = leaves
    if backend == "reference":
        result = reference.layer_norm(x, weight, bias, 1e-5, res)
    else:
        result = fastgpt.layer_norm(x, weight, bias, 1e-5, residual=res, backend=backend)
    outputs = result if res is not None else (result,)
    if grad_outs is None:
        grad_outs = [torch.randn_like(o) for o in outputs]
    present = [t for t in leaves if t is not None]
    if x.numel():
        grads = torch.autograd.grad(outputs, present, [g.to(o.dtype) for g, o in zip(grad_outs, outputs)])
    else:
        outputs[0].sum().backward()
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in present]
    named = dict(zip([n for n, t in zip(NAMES, leaves) if t is not None], grads))
    return [o.detach() for o in outputs], named, grad_outs


def check_against_reference(inputs, grad_outs=None):
    outputs, grads, grad_outs = outputs_and_grads(inputs, "triton", grad_outs)
    outputs64, grads64, _ = outputs_and_grads(inputs, "reference", grad_outs, dtype=torch.float64)
    outputs_eager, grads_eager, _ = outputs_and_grads(inputs, "reference", grad_outs)
    for name, actual, expected, eager in zip(("out", "x+residual"), outputs, outputs64, outputs_eager):
        assert actual.dtype == inputs[0].dtype
        assert_close(name, actual, expected, eager)
    assert grads.keys() == grads64.keys()
    for name in grads:
        assert_close(f"d{name}", grads[name], grads64[name], grads_eager[name])
    return outputs, grads


@pytest.mark.parametrize(
    "dtype, lead, hidden, weight, bias, residual",
    [
        (torch.float32, (2, 35), 131, True, True, True),
        (torch.float32, (70,), 33, True, False, False),
        (torch.float32, (33,), 1, True, True, True),
        (torch.float32, (5,), 1000, False, True, False),
        (torch.float16, (3, 23), 70, True, True, True),
        (torch.float16, (131,), 33, False, False, False),
    ],
)
def test_matches_reference(dtype, lead, hidden, weight, bias, residual):
    check_against_reference(make_inputs(lead, hidden, dtype, weight=weight, bias=bias, residual=residual))


@pytest.mark.parametrize("hidden, lead", [(1025, (2, 13)), (4097, (9,))])
def test_gpu_tiles(monkeypatch, hidden, lead):
    """The GPU's tiles (whole rows, 8192 elements a forward program and 4096 a backward step), which the
    interpreter's 256-element tiles never run, at widths just above a power of two: 1025 is a 2048-wide
    block, 4 rows forward and 2 per backward step, and 4097 one 8192-wide row in both; with a residual."""
    monkeypatch.setattr(triton_layernorm, "triton_interpreter_enabled", lambda: False)
    block_n = triton.next_power_of_2(hidden)
    assert triton_layernorm._tile(hidden, triton_layernorm.FORWARD_TILE)[:2] == (
        max(1, 8192 // block_n),
        block_n,
    )
    check_against_reference(make_inputs(lead, hidden, torch.float32))
    check_against_reference(make_inputs(lead, hidden, torch.float16))


def test_one_row():
    check_against_reference(make_inputs((1,), 33, torch.float32))


@pytest.mark.parametrize("hidden", [64, 256])
def test_rows_far_from_zero(hidden):
    """Rows near 1e4 with unit spread (a large common offset, as late-training activations can have).
    The float32 mean is then off by up to half an ulp of 1e4 (5e-4) at best, which the tolerance rule
    allows eager twice over; a plain tree sum of the row is off by more. The upstream gradient pulls
    out toward its current value (as a squared-error loss on it would), so that dx is small and a dx
    formed from xhat shifted by the saved mean's error (eager's dx cancels the shift) is many times
    eager's error. Six independent draws."""
    for _ in range(6):
        x = torch.randn(4, hidden, dtype=torch.float64) + 1e4
        grad_out = reference.layer_norm(x, None, None) + 0.1 * torch.randn(4, hidden, dtype=torch.float64)
        check_against_reference(
            [x.float(), 1 + 0.1 * torch.randn(hidden), torch.randn(hidden), None], [grad_out]
        )


def test_strided_inputs_are_read_in_place():
    x = torch.randn(33, 40).t() + 1  # (40, 33), column-major
    res = torch.randn(40, 2, 33)[:, 1]  # (40, 33), row stride 66
    check_against_reference([x, torch.randn(33), torch.randn(33), res])


def test_empty_rows():
    outputs, grads = check_against_reference(make_inputs((0,), 33, torch.float32))
    assert outputs[0].shape == (0, 33)
    assert torch.equal(grads["weight"], torch.zeros(33)) and torch.equal(grads["bias"], torch.zeros(33))


def test_nan_stays_in_its_row():
    inputs = make_inputs((40,), 33, torch.float32)
    inputs[0][7, 3] = float("nan")
    outputs, grads = check_against_reference(inputs)
    for tensor in (outputs[0], outputs[1], grads["x"], grads["residual"]):
        assert tensor.isnan().any(dim=1).nonzero().flatten().tolist() == [7]


def test_weight_gradients_are_deterministic():
    inputs = make_inputs((70,), 33, torch.float32)
    _, first, grad_outs = outputs_and_grads(inputs, "triton")
    _, second, _ = outputs_and_grads(inputs, "triton", grad_outs)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_hidden_size_limit():
    x = torch.randn(2, 16385)
    with pytest.raises(ValueError, match="hidden sizes up to 16384, got 16385"):
        fastgpt.layer_norm(x, None, None, backend="triton")


def test_opcheck():
    x, weight, bias, res = [t.requires_grad_() for t in make_inputs((3, 5), 8, torch.float32)]
    forward = torch.ops.fastgpt.triton_layer_norm.default
    torch.library.opcheck(forward, (x, weight, bias, 1e-5, res))
    torch.library.opcheck(forward, (x, None, None, 1e-5, None))
    _, summed, mean, rstd = forward(x, weight, bias, 1e-5, res)
    backward = torch.ops.fastgpt.triton_layer_norm_backward.default
    dout, dsum = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    torch.library.opcheck(backward, (dout, summed.detach(), weight.detach(), mean, rstd, dsum, True, True))


def test_torch_compile_fullgraph():
    """The op traces without a graph break; forward and backward match eager."""

    def block(x, weight, bias, res):
        out, summed = fastgpt.layer_norm(x, weight, bias, residual=res, backend="triton")
        return (out * summed).sum()

    inputs = [t.requires_grad_() for t in make_inputs((2, 9), 33, torch.float32)]
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    loss = compiled(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    eager_loss = block(*inputs)
    eager_grads = torch.autograd.grad(eager_loss, inputs)
    torch.testing.assert_close(loss, eager_loss)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [768, 1600, 16384])
def test_bfloat16_on_gpu(hidden):
    check_against_reference(make_inputs((4, 1023), hidden, torch.bfloat16, device="cuda"))
