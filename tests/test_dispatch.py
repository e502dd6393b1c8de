"""Backend choice and argument validation through the public API."""

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
