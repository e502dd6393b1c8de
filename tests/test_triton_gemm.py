"""The persistent Triton GEMM (triton_gemm.matmul) on the CPU interpreter against float64 torch: the
TMA-descriptor and pointer loads of each operand layout, more tiles than programs, every epilogue
(with whole and sliced epilogue tiles), the ones row, and split-K."""

import functools

import pytest
import torch
from tolerance import assert_close
from triton.runtime.autotuner import Autotuner

import fastgpt
from fastgpt.activations import activation_forward
from fastgpt.dispatch import triton_interpreter_enabled
from fastgpt.ops import triton_gemm

pytestmark = pytest.mark.skipif(
    "triton" not in fastgpt.available_backends(), reason="Triton backend unavailable"
)
interpreter_only = pytest.mark.skipif(
    not triton_interpreter_enabled(), reason="interpreter-sized tiles and program count"
)

# Ragged sizes that are multiples of 8, so fp16 rows are 16-byte aligned (TMA-describable): 72 rows
# and 104 columns leave partial 32 x 32 tiles, 40 leaves a partial K step; 3 x 4 = 12 output tiles
# for the interpreter's 2 programs.
M, K, N = 72, 40, 104
LOADS = {"pointer": triton_gemm.POINTER.value, "descriptor": triton_gemm.DESCRIPTOR.value}
LOADS["descriptor_t"] = triton_gemm.DESCRIPTOR_T.value


def matrix(rows, columns, layout, dtype, scale=1.0, device="cpu"):
    """A random (rows, columns) matrix: row-major, column-major, or rows one element longer than the
    matrix (an odd stride: TMA can describe neither it nor its transpose)."""
    if layout == "rows":
        return (torch.randn(rows, columns, device=device) * scale).to(dtype)
    if layout == "columns":
        return (torch.randn(columns, rows, device=device) * scale).to(dtype).t()
    return (torch.randn(rows, columns + 1, device=device) * scale).to(dtype)[:, :columns]


def load_modes(a, b, c):
    args = triton_gemm.matmul_arguments(a, b, c)
    args = triton_gemm.with_tensor_descriptors(args, *triton_gemm.INTERPRETER_CONFIG[:3])
    return args["A_LOAD"], args["B_LOAD"]


@interpreter_only
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


def drive_gpu_launcher(monkeypatch, trials):
    """Makes matmul take its sm_90 branch on the interpreter (tensor descriptors, a fresh autotuner)
    with a stand-in benchmark that runs each candidate `trials` times, pre-hooks included, and prefers
    the first (the largest tile). Returns the list the configuration each launch kept is appended to."""
    monkeypatch.setattr(triton_gemm, "triton_interpreter_enabled", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fresh = functools.cache(triton_gemm._autotuned_matmul.__wrapped__)  # no tuner from other tests
    monkeypatch.setattr(triton_gemm, "_autotuned_matmul", fresh)
    benchmarked = []

    def first_candidate_wins(kernel_call, quantiles):
        for _ in range(trials):
            kernel_call()
        benchmarked.append(kernel_call)
        return [float(len(benchmarked))] * len(quantiles)

    monkeypatch.setattr(Autotuner, "do_bench", property(lambda tuner: first_candidate_wins))
    chosen = []
    run = Autotuner.run

    def recording_run(tuner, *args, **kwargs):
        result = run(tuner, *args, **kwargs)
        chosen.append(tuner.best_config)
        return result

    monkeypatch.setattr(Autotuner, "run", recording_run)
    return chosen


@interpreter_only
def test_autotuned_choice_is_kept_per_operand_dtype(monkeypatch):
    """On the GPU branch a split-K GEMM whose fp32 partials and descriptor operands look the same to
    the autotuner's key in fp16 and fp32 must not reuse the fp16 choice for fp32 operands, whose
    pipeline would not fit shared memory."""
    chosen = drive_gpu_launcher(monkeypatch, trials=1)
    split_k = 2
    for dtype in (torch.float16, torch.float32):
        a, b = matrix(M, K, "rows", dtype), matrix(K, N, "columns", dtype, scale=K**-0.5)
        assert load_modes(a, b, torch.empty(M, N)) == (LOADS["descriptor"], LOADS["descriptor_t"])
        partials = torch.full((split_k, M, N), float("nan"))
        triton_gemm.matmul(a, b, partials, split_k=split_k)
        assert_close(f"c {dtype}", partials.sum(0), a.double() @ b.double(), (a @ b).float())
    fp16_config, fp32_config = (
        tuple(config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + (config.num_stages,)
        for config in chosen
    )
    assert fp16_config == triton_gemm.gpu_configs(90)[0][:4]
    assert triton_gemm.shared_memory_bytes(fp32_config, 4) <= triton_gemm.SHARED_MEMORY_BUDGET[90]


@interpreter_only
@pytest.mark.parametrize("name", ["accumulate, ones_row", "grad_and_activate, column_sums"])
def test_autotuner_trials_leave_no_trace(monkeypatch, name):
    """On the GPU branch every candidate runs three times before the first is kept: the bias gradient
    an ACCUMULATE launch reads and rewrites must be restored after each trial (restore_value), and the
    column-sum rows a 64-row candidate wrote must not stay behind for the kept 128-row one
    (reset_to_zero)."""
    chosen = drive_gpu_launcher(monkeypatch, trials=3)
    check_epilogue(EPILOGUES[name], torch.float16, "columns", "rows")
    assert [config.kwargs["BLOCK_M"] for config in chosen] == [triton_gemm.gpu_configs(90)[0][0]]


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


def run_epilogue(spec, dtype, a_layout, b_layout, shape, device):
    """Launch matmul with the epilogue `spec` on fresh random inputs; returns (inputs, outputs)."""
    rows, depth, columns = shape

    def poisoned(*size, dtype=dtype):
        return torch.full(size, float("nan"), dtype=dtype, device=device)

    def random(*size, dtype=dtype):
        return torch.randn(size, device=device).to(dtype)

    a = matrix(rows, depth, a_layout, dtype, device=device)
    b = matrix(depth, columns, b_layout, dtype, scale=depth**-0.5, device=device)
    inputs = {"a": a, "b": b}
    outputs = {"c": poisoned(rows, columns)}
    options = {"activation": spec.get("activation"), "epilogue": spec.get("epilogue", "plain")}
    if spec.get("bias"):
        inputs["bias"] = options["bias"] = random(columns)
    if spec.get("residual"):
        inputs["residual"] = options["residual"] = matrix(rows, columns, "odd", dtype, device=device)
    if spec.get("accumulate"):
        inputs["accumulate"] = options["accumulate"] = random(rows, columns, dtype=torch.float32)
    if spec.get("epilogue") == "store_preact":
        outputs["aux"] = options["aux"] = poisoned(rows, columns)
    if spec.get("epilogue") in ("grad_activation", "grad_and_activate"):
        inputs["aux"] = options["aux"] = random(rows, columns)
    if spec.get("epilogue") == "grad_and_activate":
        outputs["act_out"] = options["act_out"] = poisoned(rows, columns)
    if spec.get("column_sums"):
        partials = torch.zeros(triton_gemm.column_sums_rows(rows), columns, device=device)
        options["column_sums"] = partials
    if spec.get("ones_row"):
        if spec.get("accumulate"):
            inputs["bias_grad"] = random(columns, dtype=torch.float32)  # read and rewritten
            outputs["bias_grad"] = options["bias_grad"] = inputs["bias_grad"].clone()
        else:
            outputs["bias_grad"] = options["bias_grad"] = poisoned(columns)
    triton_gemm.matmul(a, b, outputs["c"], **options)
    if spec.get("column_sums"):
        outputs["column_sums"] = triton_gemm.sum_rows(partials, poisoned(columns))
    return inputs, outputs


def check_epilogue(spec, dtype, a_layout="rows", b_layout="columns", shape=(M, K, N), device="cpu"):
    inputs, outputs = run_epilogue(spec, dtype, a_layout, b_layout, shape, device)
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


@interpreter_only
@pytest.mark.parametrize("name", list(EPILOGUES))
@pytest.mark.parametrize(
    "dtype, a_layout, b_layout",
    [(torch.float32, "rows", "columns"), (torch.float16, "columns", "rows"), (torch.float32, "odd", "odd")],
)
def test_epilogues(name, dtype, a_layout, b_layout):
    """Every epilogue on descriptor loads (both orientations) and on pointer loads."""
    check_epilogue(EPILOGUES[name], dtype, a_layout, b_layout)


@interpreter_only
@pytest.mark.parametrize("subtiles", [1, 4])
@pytest.mark.parametrize("name", ["grad_and_activate, column_sums", "accumulate, ones_row", "bias, residual"])
def test_epilogue_slices(monkeypatch, subtiles, name):
    """The epilogue run on the whole tile and on column quarters (the default is halves)."""
    monkeypatch.setattr(triton_gemm, "INTERPRETER_CONFIG", triton_gemm.INTERPRETER_CONFIG[:5] + (subtiles,))
    check_epilogue(EPILOGUES[name], torch.float32)


@interpreter_only
@pytest.mark.parametrize(
    "config",
    [
        (128, 256, 64, 4),  # the sm_90 workhorse: its epilogue on column quarters
        (256, 128, 64, 2),  # tall tiles, halves
        # whole-tile epilogue; 584 rows make 10 tile rows: a full GROUP_M group and a short one
        (64, 128, 64, 1),
    ],
    ids=lambda config: "x".join(map(str, config[:3])) + f"-subtiles{config[3]}",
)
@pytest.mark.parametrize(
    "name, dtype, a_layout, b_layout",
    [
        pytest.param(  # the FFN's dH = dY @ Wproj
            "grad_and_activate, column_sums", torch.float16, "rows", "rows", id="fp16-grad_and_activate"
        ),
        pytest.param(  # cross-entropy's dW^T += x^T @ dlogits, B through pointers
            "accumulate, ones_row", torch.float32, "columns", "odd", id="fp32-accumulate-ones_row"
        ),
    ],
)
def test_gpu_tile_geometries(monkeypatch, config, name, dtype, a_layout, b_layout):
    """GPU configurations (BLOCK_M, BLOCK_N, BLOCK_K, EPILOGUE_SUBTILES) with the GPU's GROUP_M, which
    the interpreter's 32 x 32 x 32 tiles never run, on the epilogues with the most per-tile state, at
    sizes leaving partial tiles in every dimension (584 x 392 outputs, K = 136: two full K steps and
    a partial one)."""
    gpu_config = next(
        c for c in triton_gemm.GPU_CONFIGS[90] + triton_gemm.GPU_CONFIGS[80] if c[:3] == config[:3]
    )
    assert gpu_config[5] == config[3]
    monkeypatch.setattr(triton_gemm, "INTERPRETER_CONFIG", gpu_config)
    monkeypatch.setattr(triton_gemm, "INTERPRETER_GROUP_M", triton_gemm.GROUP_M)
    check_epilogue(EPILOGUES[name], dtype, a_layout, b_layout, shape=(584, 136, 392))


@interpreter_only
def test_ones_row_without_rows():
    """M = 0 with the ones row: the only output is the bias gradient, sum_k B[k, :]."""
    check_epilogue(EPILOGUES["ones_row"], torch.float32, shape=(0, K, N))


@interpreter_only
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


@pytest.mark.gpu
@pytest.mark.parametrize(
    "name, a_layout, b_layout",
    [
        ("store_preact", "rows", "columns"),  # the FFN's fc: x @ Wfc^T
        ("bias, residual", "rows", "columns"),  # its proj
        ("grad_and_activate, column_sums", "rows", "rows"),  # dH = dY @ Wproj
        ("ones_row", "columns", "rows"),  # dWproj^T = act(h)^T @ dY
        ("accumulate, ones_row", "columns", "rows"),  # cross-entropy's dW^T += x^T @ dlogits
        ("plain", "columns", "columns"),  # both operands described through their transposes
        ("activate", "odd", "odd"),  # pointer loads
        ("grad_activation, column_sums", "odd", "columns"),  # one of each
    ],
)
def test_bfloat16_on_gpu(name, a_layout, b_layout):
    """bf16 through TMA (both orientations, on sm_90) and pointers, autotuned, at a size with more
    tiles than SMs and partial tiles everywhere: 2056 x 3080 outputs, K = 776."""
    check_epilogue(
        EPILOGUES[name], torch.bfloat16, a_layout, b_layout, shape=(2056, 776, 3080), device="cuda"
    )


@pytest.mark.gpu
def test_split_k_on_gpu():
    a, b = (
        matrix(1536, 50304, "rows", torch.bfloat16, device="cuda"),
        matrix(50304, 768, "rows", torch.bfloat16, scale=50304**-0.5, device="cuda"),
    )
    split_k = triton_gemm.split_k_for(1536, 768, 50304, a.device)
    partials = torch.full((split_k, 1536, 768), float("nan"), device="cuda")
    triton_gemm.matmul(a, b, partials, split_k=split_k)
    c = partials.sum(0)
    assert_close("c", c, a.double() @ b.double(), (a @ b).float())
