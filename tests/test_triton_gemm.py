"""The persistent Triton GEMM (triton_gemm.matmul) on the CPU interpreter against float64 torch: the
TMA-descriptor and pointer loads of each operand layout, more tiles than programs, every epilogue
(with whole and sliced epilogue tiles), the ones row, and split-K."""

import pytest
import torch
from tolerance import assert_close

import fastgpt
from fastgpt.activations import activation_forward
from fastgpt.dispatch import triton_interpreter_enabled
from fastgpt.ops import triton_gemm

pytestmark = [
    pytest.mark.skipif("triton" not in fastgpt.available_backends(), reason="Triton backend unavailable"),
    pytest.mark.skipif(not triton_interpreter_enabled(), reason="interpreter-sized tiles and program count"),
]

# Ragged sizes that are multiples of 8, so fp16 rows are 16-byte aligned (TMA-describable): 72 rows
# and 104 columns leave partial 32 x 32 tiles, 40 leaves a partial K step; 3 x 4 = 12 output tiles
# for the interpreter's 2 programs.
M, K, N = 72, 40, 104
LOADS = {"pointer": triton_gemm.POINTER.value, "descriptor": triton_gemm.DESCRIPTOR.value}
LOADS["descriptor_t"] = triton_gemm.DESCRIPTOR_T.value


def matrix(rows, columns, layout, dtype, scale=1.0):
    """A random (rows, columns) matrix: row-major, column-major, or rows one element longer than the
    matrix (an odd stride: TMA can describe neither it nor its transpose)."""
    if layout == "rows":
        return (torch.randn(rows, columns) * scale).to(dtype)
    if layout == "columns":
        return (torch.randn(columns, rows) * scale).to(dtype).t()
    return (torch.randn(rows, columns + 1) * scale).to(dtype)[:, :columns]


def load_modes(a, b, c):
    args = triton_gemm.matmul_arguments(a, b, c)
    args = triton_gemm.with_tensor_descriptors(args, *triton_gemm.INTERPRETER_CONFIG[:3])
    return args["A_LOAD"], args["B_LOAD"]


@pytest.mark.parametrize(
    "a_layout, b_layout, a_load, b_load",
    [
        ("rows", "columns", "descriptor", "descriptor_t"),  # x @ W^T
        ("columns", "rows", "descriptor_t", "descriptor"),  # dH^T @ x
        ("rows", "rows", "descriptor", "descriptor"),  # dY @ W
        ("odd", "odd", "pointer", "pointer"),
        ("odd", "columns", "pointer", "descriptor_t"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_operand_loads(a_layout, b_layout, a_load, b_load, dtype):
    """Each operand goes through TMA when its layout allows, through pointers otherwise, and the
    product is right either way, with more output tiles than persistent programs."""
    a = matrix(M, K, a_layout, dtype)
    b = matrix(K, N, b_layout, dtype, scale=K**-0.5)
    c = torch.full((M, N), float("nan"), dtype=dtype)
    assert load_modes(a, b, c) == (LOADS[a_load], LOADS[b_load])
    block_m, block_n = triton_gemm.INTERPRETER_CONFIG[:2]
    assert (M // block_m + 1) * (N // block_n + 1) > triton_gemm.multiprocessor_count(a.device)
    triton_gemm.matmul(a, b, c)
    assert_close("c", c, a.double() @ b.double(), a @ b)


def test_descriptor_rules():
    """TMA needs a unit last stride, 16-byte aligned rows and base, and no empty dimension."""
    x = torch.randn(8, 12)  # 48-byte rows
    c = torch.empty(8, 8)
    assert load_modes(x, x.t()[:, :8], c)[0] == triton_gemm.DESCRIPTOR.value
    assert load_modes(x[:, 1:], torch.randn(11, 8), c)[0] == triton_gemm.POINTER.value  # base 4 bytes in
    assert load_modes(torch.randn(8, 3), torch.randn(3, 8), c)[0] == triton_gemm.POINTER.value  # 12-byte rows
    broadcast = torch.randn(1, 12).expand(8, 12)  # row stride 0
    assert load_modes(broadcast, x.t()[:, :8], c)[0] == triton_gemm.POINTER.value
    assert load_modes(torch.randn(8, 0), torch.randn(0, 8), c) == (triton_gemm.POINTER.value,) * 2


def test_autotune_hook_sets_descriptor_blocks():
    """On a GPU each autotune configuration's pre-hook gives the descriptors its own tile shapes."""
    a, b = torch.randn(256, 128), torch.randn(512, 128).t()
    args = triton_gemm.with_tensor_descriptors(
        triton_gemm.matmul_arguments(a, b, torch.empty(256, 512)), 16, 16, 16
    )
    args.update(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64)
    triton_gemm._set_descriptor_blocks(args)
    assert args["a"].block_shape == [128, 64]  # A (M, K) tiles
    assert args["b"].block_shape == [256, 64]  # tiles of B^T (N, K)


def _grad(h, activation):
    h = h.detach().requires_grad_()
    (grad,) = torch.autograd.grad(activation_forward(h, activation).sum(), h)
    return grad


def epilogue_reference(inputs, spec, dtype):
    """Every output of one GEMM launch, computed by torch in `dtype` from the inputs."""
    t = {name: value.to(dtype) for name, value in inputs.items()}
    activation = spec.get("activation")
    acc = t["a"] @ t["b"]
    if "accumulate" in t:
        acc = acc + t["accumulate"]
    if "bias" in t:
        acc = acc + t["bias"]
    out = {}
    c = acc
    if spec.get("epilogue") == "store_preact":
        out["aux"] = acc
        c = activation_forward(acc, activation)
    elif spec.get("epilogue") == "activate":
        c = activation_forward(acc, activation)
    elif spec.get("epilogue") in ("grad_activation", "grad_and_activate"):
        c = acc * _grad(t["aux"], activation)
        if spec["epilogue"] == "grad_and_activate":
            out["act_out"] = activation_forward(t["aux"], activation)
    if "residual" in t:
        c = c + t["residual"]
    out["c"] = c
    if spec.get("column_sums"):
        out["column_sums"] = c.sum(0)
    if spec.get("ones_row"):
        out["bias_grad"] = t["b"].sum(0) + t.get("bias_grad", 0)
    return out


def run_epilogue(spec, dtype, a_layout, b_layout, rows=M):
    """Launch matmul with the epilogue `spec` on fresh random inputs; returns (inputs, outputs)."""
    a = matrix(rows, K, a_layout, dtype)
    b = matrix(K, N, b_layout, dtype, scale=K**-0.5)
    inputs = {"a": a, "b": b}
    outputs = {"c": torch.full((rows, N), float("nan"), dtype=dtype)}
    options = {"activation": spec.get("activation"), "epilogue": spec.get("epilogue", "plain")}
    if spec.get("bias"):
        inputs["bias"] = options["bias"] = torch.randn(N).to(dtype)
    if spec.get("residual"):
        inputs["residual"] = options["residual"] = matrix(rows, N, "odd", dtype)
    if spec.get("accumulate"):
        inputs["accumulate"] = options["accumulate"] = torch.randn(rows, N)  # fp32
    if spec.get("epilogue") == "store_preact":
        outputs["aux"] = options["aux"] = torch.full((rows, N), float("nan"), dtype=dtype)
    if spec.get("epilogue") in ("grad_activation", "grad_and_activate"):
        inputs["aux"] = options["aux"] = torch.randn(rows, N).to(dtype)
    if spec.get("epilogue") == "grad_and_activate":
        outputs["act_out"] = options["act_out"] = torch.full((rows, N), float("nan"), dtype=dtype)
    if spec.get("column_sums"):
        partials = torch.zeros(triton_gemm.column_sums_rows(rows), N)
        options["column_sums"] = partials
    if spec.get("ones_row"):
        if spec.get("accumulate"):
            inputs["bias_grad"] = torch.randn(N)  # fp32, read and rewritten
            outputs["bias_grad"] = options["bias_grad"] = inputs["bias_grad"].clone()
        else:
            outputs["bias_grad"] = options["bias_grad"] = torch.full((N,), float("nan"), dtype=dtype)
    triton_gemm.matmul(a, b, outputs["c"], **options)
    if spec.get("column_sums"):
        outputs["column_sums"] = triton_gemm.sum_rows(partials, torch.full((N,), float("nan"), dtype=dtype))
    return inputs, outputs


def check_epilogue(spec, dtype, a_layout="rows", b_layout="columns", rows=M):
    inputs, outputs = run_epilogue(spec, dtype, a_layout, b_layout, rows)
    expected = epilogue_reference(inputs, spec, torch.float64)
    eager = epilogue_reference(inputs, spec, dtype)
    assert outputs.keys() == expected.keys()
    for name, value in outputs.items():
        assert_close(name, value, expected[name], eager[name].to(value.dtype))


EPILOGUES = {
    "plain": {},
    "bias": {"bias": True},
    "store_preact": {"bias": True, "epilogue": "store_preact", "activation": "gelu_tanh"},
    "activate": {"bias": True, "epilogue": "activate", "activation": "silu"},
    "grad_activation, column_sums": {
        "epilogue": "grad_activation",
        "activation": "gelu",
        "column_sums": True,
    },
    "grad_and_activate, column_sums": {
        "epilogue": "grad_and_activate",
        "activation": "gelu_tanh",
        "column_sums": True,
    },
    "bias, residual": {"bias": True, "residual": True},
    "ones_row": {"ones_row": True},
    "accumulate, ones_row": {"accumulate": True, "ones_row": True},
}


@pytest.mark.parametrize("name", list(EPILOGUES))
@pytest.mark.parametrize(
    "dtype, a_layout, b_layout",
    [(torch.float32, "rows", "columns"), (torch.float16, "columns", "rows"), (torch.float32, "odd", "odd")],
)
def test_epilogues(name, dtype, a_layout, b_layout):
    """Every epilogue on descriptor loads (both orientations) and on pointer loads."""
    check_epilogue(EPILOGUES[name], dtype, a_layout, b_layout)


@pytest.mark.parametrize("subtiles", [1, 4])
@pytest.mark.parametrize("name", ["grad_and_activate, column_sums", "accumulate, ones_row", "bias, residual"])
def test_epilogue_slices(monkeypatch, subtiles, name):
    """The epilogue run on the whole tile and on column quarters (the default is halves)."""
    monkeypatch.setattr(triton_gemm, "INTERPRETER_CONFIG", triton_gemm.INTERPRETER_CONFIG[:5] + (subtiles,))
    check_epilogue(EPILOGUES[name], torch.float32)


def test_ones_row_without_rows():
    """M = 0 with the ones row: the only output is the bias gradient, sum_k B[k, :]."""
    check_epilogue(EPILOGUES["ones_row"], torch.float32, rows=0)


@pytest.mark.parametrize("split_k", [2, 3])
def test_split_k(split_k):
    """fp32 partials over ranges of K (with 3 splits of 2 K steps the last range is empty: zeros),
    added up by sum_rows."""
    a, b = matrix(M, K, "rows", torch.float16), matrix(K, N, "columns", torch.float16, scale=K**-0.5)
    partials = torch.full((split_k, M, N), float("nan"))
    triton_gemm.matmul(a, b, partials, split_k=split_k)
    c = triton_gemm.sum_rows(partials.view(split_k, M * N), torch.full((M * N,), float("nan"))).view(M, N)
    assert_close("c", c, a.double() @ b.double(), (a @ b).float())
    with pytest.raises(ValueError, match="split-K partials"):
        triton_gemm.matmul(a, b, partials, split_k=split_k + 1)
