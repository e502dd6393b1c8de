"""Backend choice and argument validation through the public API."""

import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

import fastgpt
from fastgpt import dispatch


def test_reference_is_always_available():
    assert "reference" in fastgpt.available_backends()
    status = dispatch.backend_status()
    assert set(status) == set(dispatch.BACKENDS)
    for name, reason in status.items():
        assert reason is None or isinstance(reason, str) and reason, name


def test_unknown_backend_is_rejected():
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="backend must be one of .*got 'fast'"):
        fastgpt.causal_attention(q, q, q, backend="fast")


def test_env_override_picks_reference(monkeypatch):
    monkeypatch.setenv("FASTGPT_BACKEND", "reference")
    dispatch.forget_choices()
    q = torch.randn(1, 2, 5, 8)
    torch.testing.assert_close(
        fastgpt.causal_attention(q, q, q), fastgpt.causal_attention(q, q, q, backend="reference")
    )
    assert (
        dispatch.choose_backend("causal_attention", "auto", "cpu", torch.float32, (("head_dim", 8),))
        == "reference"
    )
    dispatch.forget_choices()


@pytest.mark.parametrize(
    "make_args, error, pattern",
    [
        (lambda q: (q[0], q, q), ValueError, r"q must have 4 dimensions, got 3"),
        (lambda q: (q.tolist(), q, q), TypeError, r"q must be a torch.Tensor, got list"),
        (
            lambda q: (q, q.half(), q),
            TypeError,
            r"k must have the dtype of q \(torch.float32\), got torch.float16",
        ),
        (
            lambda q: (q.long(), q.long(), q.long()),
            TypeError,
            r"q must be a floating-point tensor .*got dtype torch.int64",
        ),
        (lambda q: (q, q[:, :, :3], q[:, :, :3]), ValueError, r"q_len must be <= kv_len .*q_len=4, kv_len=3"),
        (lambda q: (q, q[:, :4], q[:, :4]), ValueError, r"multiple of k's kv_heads .*heads=6, kv_heads=4"),
        (lambda q: (q, q, q[..., :4]), ValueError, r"v must have shape \(2, 6, 4, 8\), got \(2, 6, 4, 4\)"),
    ],
)
def test_attention_bad_input(make_args, error, pattern):
    q = torch.randn(2, 6, 4, 8)
    with pytest.raises(error, match=pattern):
        fastgpt.causal_attention(*make_args(q), backend="reference")


def test_cross_entropy_target_checks():
    x, weight = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 10\) or equal ignore_index=-100, got 10"):
        fastgpt.linear_cross_entropy(x, weight, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(TypeError, match=r"targets must be an int64 .*got dtype torch.int32"):
        fastgpt.linear_cross_entropy(x, weight, torch.tensor([0, 1, 2, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"reduction must be one of .*got 'avg'"):
        fastgpt.linear_cross_entropy(x, weight, torch.tensor([0, 1, 2, 3]), reduction="avg")


def test_ffn_and_layer_norm_checks():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"activation must be one of .*got 'tanh'"):
        fastgpt.fused_ffn(x, torch.randn(16, 8), None, torch.randn(8, 16), None, activation="tanh")
    with pytest.raises(ValueError, match=r"proj_weight must have shape \(out_features, 16\)"):
        fastgpt.fused_ffn(x, torch.randn(16, 8), None, torch.randn(8, 15), None)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\), got \(7,\)"):
        fastgpt.layer_norm(x, torch.randn(7), None)


# ----------------------------------------------------------------------------------------------
# The routing table


def test_cuda_auto_order_follows_the_h200_measurements():
    """The orders of dispatch.CUDA_ORDER, as its comments cite them from 2026-11-30-h200.json."""
    short, long = dispatch.kv_len_class(512), dispatch.kv_len_class(513)
    assert dispatch._auto_order("causal_attention", "cuda", {"kv_len": short})[0] == "cuda"
    assert dispatch._auto_order("causal_attention", "cuda", {"kv_len": long})[0] == "triton"
    assert dispatch._auto_order("fused_ffn", "cuda", {"hidden": 3072})[0] == "cuda"
    assert dispatch._auto_order("fused_ffn", "cuda", {"hidden": 6400})[0] == "triton"
    assert dispatch._auto_order("layer_norm", "cuda", {"hidden": 768})[0] == "cuda"
    assert dispatch._auto_order("linear_cross_entropy", "cuda", {})[0] == "triton"
    assert dispatch._auto_order("linear", "cuda", {}) == ("reference",)
    for op in dispatch.OPS:
        assert dispatch._auto_order(op, "cpu", {}) == ("cpu", "reference")
        assert dispatch._auto_order(op, "cuda", {})[-1] == "reference"


def test_every_backend_in_an_auto_order_implements_the_op():
    """A backend `auto` may choose, or a caller may name, has a module for the op: the cuda backend's
    linear_cross_entropy (csrc/cuda/cross_entropy.cu) was in CUDA_ORDER and tested with backend="cuda"
    while IMPLEMENTATIONS left it out, so every such call raised "does not implement" on a GPU."""
    for device_type, orders in dispatch.AUTO_ORDER.items():
        for op in dispatch.OPS:
            order = orders.get(op, ("reference",))
            orders_by_size = (order.small, order.large) if isinstance(order, dispatch.SizeSplit) else (order,)
            for candidates in orders_by_size:
                for backend in candidates:
                    assert op in dispatch.IMPLEMENTATIONS[backend], (device_type, op, backend)


def test_kv_len_classes_are_two():
    """A decode loop's growing cache resolves twice, not once per length."""
    assert {dispatch.kv_len_class(n) for n in range(1, 2000)} == {
        dispatch.SHORT_SEQUENCE,
        dispatch.SHORT_SEQUENCE + 1,
    }


@pytest.mark.skipif("cpu" not in fastgpt.available_backends(), reason="fastgpt._C is not built")
def test_linear_routes_few_rows_to_the_kernel_and_the_rest_to_f_linear():
    from fastgpt import reference
    from fastgpt.ops import compiled

    assert dispatch.LINEAR_KERNEL_MAX_ROWS == compiled.LINEAR_KERNEL_MAX_ROWS
    few, many = (("few_rows", True),), (("few_rows", False),)
    assert dispatch.resolve("linear", "auto", "cpu", torch.float32, few) is compiled.linear
    assert dispatch.resolve("linear", "auto", "cpu", torch.float32, many) is reference.linear
    assert dispatch.resolve("linear", "cpu", "cpu", torch.float32, many) is reference.linear
    assert dispatch.resolve("linear", "auto", "cpu", torch.float64, few) is reference.linear
    weight = torch.randn(24, 32)
    for rows in (1, 16, 17):
        x = torch.randn(rows, 32)
        torch.testing.assert_close(fastgpt.linear(x, weight), torch.nn.functional.linear(x, weight))


def test_auto_warns_once_when_the_extension_is_missing(monkeypatch, fresh_routes):
    status = dict(dispatch.backend_status(), cpu="the compiled extension fastgpt._C is missing (test)")
    monkeypatch.setattr(dispatch, "backend_status", lambda: status)
    dispatch._warn_missing_extension.cache_clear()
    x, weight = torch.randn(3, 8), torch.ones(8)
    with pytest.warns(RuntimeWarning, match=r"no-build-isolation.*fastgpt info"):
        fastgpt.layer_norm(x, weight, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastgpt.layer_norm(x, weight, None)  # once per process
        fastgpt.layer_norm(x.double(), weight.double(), None)  # float64 is the reference's anyway
    dispatch._warn_missing_extension.cache_clear()


def test_validation_runs_when_not_compiling():
    assert not dispatch.skip_validation(torch.randn(2))
    assert not dispatch.skip_validation([1.0])


class PretendCudaTensor(torch.Tensor):
    """A CPU tensor that reports itself as a CUDA one, so a host-side check takes its CUDA branch here."""

    is_cuda = True
    is_cpu = False


def test_debug_index_check_reads_no_cuda_values_while_a_graph_captures(monkeypatch):
    """FASTGPT_DEBUG=1 range-checks CUDA indices by reading them, which a CUDA graph capture forbids (a
    synchronising copy invalidates it): GPT.forward checks its tokens and targets on every call, so the
    captured training step (--step-mode cuda-graph) would fail at its capture in debug mode."""
    monkeypatch.setenv("FASTGPT_DEBUG", "1")
    capturing = False
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    targets = torch.tensor([[0, 5], [99, 2]]).as_subclass(PretendCudaTensor)  # (2, 2), 99 out of range
    with pytest.raises(ValueError, match=r"targets must be in \[0, 10\), got 99"):
        dispatch.check_index_range("op", "targets", targets, 10)
    capturing = True
    dispatch.check_index_range("op", "targets", targets, 10)  # not read: nothing raised


# ----------------------------------------------------------------------------------------------
# The environment variables that change what runs


def test_a_mistyped_debug_switch_raises_instead_of_leaving_the_checks_off(monkeypatch):
    """FASTGPT_DEBUG was on only for "1": "true" or "on" left the CUDA target checks silently off."""
    targets = torch.tensor([[0, 5], [99, 2]]).as_subclass(PretendCudaTensor)  # (2, 2), 99 out of range
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setenv("FASTGPT_DEBUG", "true")
    with pytest.raises(ValueError, match=r"environment variable FASTGPT_DEBUG must be '1' .*got 'true'"):
        dispatch.check_index_range("op", "targets", targets, 10)
    for off in ("0", ""):
        monkeypatch.setenv("FASTGPT_DEBUG", off)
        dispatch.check_index_range("op", "targets", targets, 10)  # not read: nothing raised
    from fastgpt.ops.memory import new_output

    monkeypatch.setenv("FASTGPT_POISON_OUTPUTS", "yes")  # the Triton launchers' NaN-filled outputs
    with pytest.raises(ValueError, match=r"FASTGPT_POISON_OUTPUTS must be '1' .*got 'yes'"):
        new_output((2,), torch.float32, "cpu")


def in_fresh_process(variable, value, *arguments):
    """python *arguments in a new process with the environment variable set to value (fastgpt._C reads
    its variables once per process) and FASTGPT_BACKEND emptied."""
    environment = {**os.environ, variable: value, "FASTGPT_BACKEND": ""}
    return subprocess.run(
        [sys.executable, *arguments],
        check=False,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_cpu_isa_that_names_no_set_is_refused_before_any_kernel():
    """fastgpt._C reads FASTGPT_CPU_ISA once per process, so fresh processes: a mistyped set ('avx-512')
    makes every op raise a ValueError naming the variable (the extension refuses it at import, rather
    than a kernel inside an OpenMP region) and `fastgpt info` says so in one line, where the kernels
    used to run on the best set silently; a set that exists is taken."""
    pytest.importorskip("fastgpt.ops.compiled", reason="fastgpt._C is not built")
    call = (
        "import torch\nimport fastgpt\n"
        "try:\n"
        "    fastgpt.layer_norm(torch.randn(3, 8), None, None)\n"
        "    from fastgpt import _C\n"
        "    print(_C.cpu_isa())\n"
        "except ValueError as error:\n"
        "    print('ValueError', error)\n"
    )
    refusal = (
        "the environment variable FASTGPT_CPU_ISA must be 'baseline', 'avx2' or 'avx512' (or unset), got"
    )
    mistyped = in_fresh_process("FASTGPT_CPU_ISA", "avx-512", "-c", call)
    assert mistyped.returncode == 0, mistyped.stderr
    assert mistyped.stdout.strip().splitlines()[-1] == f"ValueError {refusal} 'avx-512'"
    baseline = in_fresh_process("FASTGPT_CPU_ISA", "baseline", "-c", call)
    assert baseline.stdout.strip().splitlines()[-1] == "baseline", baseline.stderr
    info = in_fresh_process("FASTGPT_CPU_ISA", "avx-512", "-m", "fastgpt", "info")
    # its one line closes stderr (torch may warn before it, e.g. a CUDA build on a machine without CUDA)
    assert (
        info.returncode == 1
        and info.stderr.strip().splitlines()[-1] == f"fastgpt info: error: {refusal} 'avx-512'"
    )
    assert "Traceback" not in info.stderr


def test_the_cpu_operators_read_the_poison_switch_as_python_does():
    """fastgpt._C reads FASTGPT_POISON_OUTPUTS once per process, at its first output, so a fresh process:
    a mistyped value raises the ValueError dispatch.env_switch gives, where it used to leave the
    poisoning silently off; "0" computes normally."""
    pytest.importorskip("fastgpt.ops.compiled", reason="fastgpt._C is not built")
    call = (
        "import torch\nimport fastgpt.ops.compiled\n"
        "x = torch.randn(3, 8)\n"
        "try:\n"
        "    print(torch.ops.fastgpt.layer_norm_forward(x, None, None, None, 1e-5)[0].isfinite().all().item())\n"
        "except ValueError as error:\n"
        "    print('ValueError', error)\n"
    )
    for value, expected in (
        (
            "yes",
            "ValueError the environment variable FASTGPT_POISON_OUTPUTS must be '1' (on) or '0' (off), got 'yes'",
        ),
        ("0", "True"),
    ):
        result = in_fresh_process("FASTGPT_POISON_OUTPUTS", value, "-c", call)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines()[-1] == expected


def test_backend_override_is_validated_and_named(monkeypatch, fresh_routes):
    """A FASTGPT_BACKEND that names no backend is reported as the variable's fault (the call passed
    backend="auto"), and an empty one means auto, as for the other variables."""
    q = torch.randn(1, 2, 5, 8)
    monkeypatch.setenv("FASTGPT_BACKEND", "Triton")
    with pytest.raises(
        ValueError, match=r"environment variable FASTGPT_BACKEND must be one of .*got 'Triton'"
    ):
        fastgpt.causal_attention(q, q, q)
    monkeypatch.setenv("FASTGPT_BACKEND", "cuda")  # a backend, but none for CPU tensors
    with pytest.raises(ValueError, match=r"does not run on cpu tensors \(named by .*FASTGPT_BACKEND\)"):
        fastgpt.causal_attention(q, q, q)
    dispatch.forget_choices()
    monkeypatch.setenv("FASTGPT_BACKEND", "")
    facts = (("head_dim", 8), ("kv_len", dispatch.kv_len_class(5)))
    assert dispatch.choose_backend("causal_attention", "auto", "cpu", torch.float64, facts) == "reference"
    torch.testing.assert_close(
        fastgpt.causal_attention(q, q, q), fastgpt.causal_attention(q, q, q, backend="reference")
    )


def test_an_empty_triton_attention_selector_means_the_default(monkeypatch):
    from fastgpt.ops import triton_attention

    monkeypatch.setenv("FASTGPT_TRITON_ATTENTION", "")
    assert triton_attention.forward_kernel_choice() == "tl"
    monkeypatch.setenv("FASTGPT_TRITON_ATTENTION", "Gluon")
    with pytest.raises(ValueError, match=r"FASTGPT_TRITON_ATTENTION must be one of .*got 'Gluon'"):
        triton_attention.forward_kernel_choice()


# ----------------------------------------------------------------------------------------------
# The routing table on a simulated GPU


def emulated_cuda_gates(op, size, dtype):
    """fastgpt::cuda_unsupported_reason's answers, as csrc/cuda's *_unsupported_reason gate the kernels
    (attention_fwd.cu, layernorm.cu, cross_entropy.cu; gemm.cu takes any size): the query this CPU-only
    build does not register."""
    if op == "causal_attention" and (size % 8 or size > 128):
        return "head_dim: a multiple of 8 up to 128"
    if op == "layer_norm" and (size > 16384 or (size > 4096 and size % 8)):
        return "at most 16384 columns, a multiple of 8 above 4096"
    if op == "linear_cross_entropy" and size > 2**31 - 1 - 8:
        return "a vocabulary below 2^31 - 8"
    return ""


@pytest.fixture
def simulated_gpu(monkeypatch, fresh_routes):
    """A GPU of a chosen compute capability with the cuda and triton backends available, as dispatch
    sees it; returns a function that sets the capability and the backends' status."""
    compiled = pytest.importorskip("fastgpt.ops.compiled", reason="fastgpt._C is not built")
    from fastgpt.ops import triton_attention, triton_cross_entropy, triton_ffn, triton_layernorm

    gpu_dtypes = (torch.float16, torch.bfloat16, torch.float32)  # the Triton modules' off the interpreter
    for module in (triton_attention, triton_ffn, triton_layernorm, triton_cross_entropy):
        monkeypatch.setattr(module, "SUPPORTED_DTYPES", gpu_dtypes)
    monkeypatch.setattr(compiled, "HAS_CUDA_KERNELS", True)
    monkeypatch.setattr(torch.ops.fastgpt, "cuda_unsupported_reason", emulated_cuda_gates, raising=False)

    def simulate(capability, **status):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        statuses = {name: None for name in dispatch.BACKENDS} | status
        monkeypatch.setattr(dispatch, "backend_status", lambda: statuses)
        dispatch.forget_choices()

    return simulate


def auto_choice(op, dtype, **facts):
    return dispatch.choose_backend(op, "auto", "cuda", dtype, tuple(facts.items()))


def test_auto_on_hopper_takes_the_first_backend_whose_kernels_take_the_call(simulated_gpu):
    bf16, fp32 = torch.bfloat16, torch.float32
    short, long = dispatch.kv_len_class(512), dispatch.kv_len_class(513)
    simulated_gpu((9, 0))
    attention = {
        (bf16, 64, short): "cuda",
        (bf16, 64, long): "triton",
        (torch.float16, 80, short): "cuda",  # padded to 96 by the CUDA kernels
        (fp32, 64, short): "triton",  # the CUDA kernels take 16-bit inputs only
        (bf16, 256, short): "triton",  # beyond the CUDA kernels' 128
        (bf16, 100, short): "triton",  # not a multiple of 8
        (bf16, 320, short): "reference",  # beyond Triton's 256
        (torch.float64, 64, short): "reference",
    }
    for (dtype, head_dim, kv_len), expected in attention.items():
        got = auto_choice("causal_attention", dtype, head_dim=head_dim, kv_len=kv_len)
        assert got == expected, (dtype, head_dim, kv_len)
    assert auto_choice("fused_ffn", bf16, hidden=3072) == "cuda"
    assert auto_choice("fused_ffn", bf16, hidden=6400) == "triton"
    assert auto_choice("fused_ffn", fp32, hidden=3072) == "triton"
    assert auto_choice("layer_norm", bf16, hidden=768) == "cuda"
    assert auto_choice("layer_norm", bf16, hidden=4100) == "triton"  # odd width past the scalar path
    assert auto_choice("layer_norm", bf16, hidden=20000) == "reference"  # past both kernels' rows
    assert auto_choice("layer_norm", fp32, hidden=768) == "triton"
    assert auto_choice("linear_cross_entropy", bf16, vocab=50257) == "triton"
    assert auto_choice("linear_cross_entropy", torch.float64, vocab=50257) == "reference"
    assert auto_choice("linear", bf16, few_rows=True) == "reference"


def test_auto_sends_a_batch_beyond_the_cuda_grid_to_triton(simulated_gpu, monkeypatch):
    """A batch (or head count) above CUDA's 65535-block grid y/z limit at most 512 keys: `auto` took the
    cuda backend, whose operator then refused the call, for an input Triton's one-dimensional grids take.
    causal_attention's routing facts carry it, and the cuda backend declines it."""
    bf16, short = torch.bfloat16, dispatch.kv_len_class(512)
    simulated_gpu((9, 0))
    facts = {"head_dim": 64, "kv_len": short}
    assert auto_choice("causal_attention", bf16, **facts, wide_grid=False) == "cuda"
    assert auto_choice("causal_attention", bf16, **facts, wide_grid=True) == "triton"
    with pytest.raises(ValueError, match=r"batch and heads up to 65535"):
        dispatch.choose_backend(
            "causal_attention", "cuda", "cuda", bf16, (*facts.items(), ("wide_grid", True))
        )
    routed = []
    monkeypatch.setattr(dispatch, "resolve", lambda *args: routed.append(dict(args[4])) or (lambda *_: None))
    limit = dispatch.MAX_GRID_YZ
    for batch, heads, kv_heads, wide in (
        (limit, 1, 1, False),
        (limit + 1, 1, 1, True),
        (1, limit + 1, 1, True),
    ):
        q = torch.randn(batch, heads, 2, 8)
        kv = torch.randn(batch, kv_heads, 2, 8)
        fastgpt.causal_attention(q, kv, kv)
        assert routed[-1]["wide_grid"] is wide, (batch, heads)


def test_decode_runs_the_chosen_backends_decode_kernel(simulated_gpu):
    """One query without gradient: Triton's split-KV kernel where Triton serves the call, the cuda
    backend's attention (which handles q_len 1 itself) where it does."""
    from fastgpt.ops import compiled, triton_decode

    simulated_gpu((9, 0))
    for kv_len, expected in ((513, triton_decode.decode_attention_op), (512, compiled.causal_attention)):
        facts = (("head_dim", 64), ("kv_len", dispatch.kv_len_class(kv_len)))
        got = dispatch.resolve("causal_attention", "auto", "cuda", torch.bfloat16, facts, "decode")
        assert got is expected, kv_len


def test_auto_without_triton_or_before_sm80(simulated_gpu):
    bf16, short, long = torch.bfloat16, dispatch.kv_len_class(512), dispatch.kv_len_class(513)
    simulated_gpu((8, 6), triton="Triton is not importable (test)")
    assert auto_choice("causal_attention", bf16, head_dim=64, kv_len=long) == "cuda"
    assert auto_choice("causal_attention", bf16, head_dim=256, kv_len=short) == "reference"
    assert auto_choice("causal_attention", torch.float32, head_dim=64, kv_len=short) == "reference"
    assert auto_choice("linear_cross_entropy", bf16, vocab=50257) == "cuda"
    simulated_gpu((7, 5))  # mma.sync and bfloat16 need sm_80: the cuda backend declines every call
    assert auto_choice("causal_attention", bf16, head_dim=64, kv_len=short) == "triton"
    assert auto_choice("layer_norm", bf16, hidden=768) == "triton"


def test_the_cuda_backend_is_reported_missing_on_a_gpu_before_sm80(monkeypatch):
    """`fastgpt info` and available_backends() said the cuda backend was usable on an sm_75 GPU, where it
    declines every call. The routing's own status does not read the capability (that initialises CUDA)."""
    pytest.importorskip("fastgpt.ops.compiled", reason="fastgpt._C is not built")

    def no_cuda_initialisation(device=None):
        raise AssertionError("backend_status read the compute capability")

    monkeypatch.setattr(torch.cuda, "get_device_capability", no_cuda_initialisation)
    dispatch.backend_status.__wrapped__()  # uncached, so it runs here
    capability = (7, 5)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    status = dict(dispatch.backend_status(), cuda=None)  # as on a GPU with the CUDA extension
    monkeypatch.setattr(dispatch, "backend_status", lambda: status)
    assert "compute capability 8.0 or newer, this GPU has 7.5" in dispatch.backend_report()["cuda"]
    assert "cuda" not in fastgpt.available_backends()
    capability = (8, 9)
    assert dispatch.backend_report()["cuda"] is None
    assert "cuda" in fastgpt.available_backends()


def test_info_reports_the_hopper_kernels_the_extension_holds(monkeypatch):
    """The `fastgpt info` line came from the CUTLASS headers found when it ran, not from the build:
    headers installed after the build (or a TORCH_CUDA_ARCH_LIST without 9.0) made it claim kernels the
    extension lacks. fastgpt._C now says itself."""
    compiled = pytest.importorskip("fastgpt.ops.compiled", reason="fastgpt._C is not built")
    from fastgpt import _C, info

    key = "sm_90a attention (_C)"
    if not compiled.HAS_CUDA_KERNELS:  # this machine's CPU-only build
        assert _C.SM90_ATTENTION_KERNELS == 0
        assert info.package_versions()[key] == "not built (a CPU-only _C)"
    monkeypatch.setattr(compiled, "HAS_CUDA_KERNELS", True)
    for built, line in ((True, "built"), (False, "not built")):
        monkeypatch.setattr(compiled, "HAS_SM90_ATTENTION_KERNELS", built)
        assert info.package_versions()[key] == line


def test_info_names_the_variables_set_that_change_what_runs(monkeypatch, capsys):
    """`fastgpt info` prints a `set:` line with each routing variable that is set (the cpu backend's
    FASTGPT_CPU_ISA among them), and leaves out those that are not."""
    from fastgpt.cli import main

    monkeypatch.setenv("FASTGPT_BACKEND", "reference")
    monkeypatch.setenv("FASTGPT_CPU_ISA", "baseline")
    monkeypatch.delenv("FASTGPT_CUDA_FFN", raising=False)
    assert main(["info"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # rich wraps a long line at the terminal's width
    assert re.search(r"set: FASTGPT_BACKEND=reference, (\S+, )*FASTGPT_CPU_ISA=baseline\b", text), text
    assert "FASTGPT_CUDA_FFN" not in text
