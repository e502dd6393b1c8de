"""The `cpu` backend's operators as torch sees them: torch.library.opcheck on every operator,
torch.compile(fullgraph=True) over a transformer block built from the ops, the `fastgpt` operator
namespace shared with Python-defined custom ops, and backend selection."""

import subprocess
import sys

import pytest
import torch

compiled = pytest.importorskip("fastgpt.ops.compiled", reason="fastgpt._C (the cpu backend) is not built")

from fastgpt import _C, dispatch, functional

ops = torch.ops.fastgpt


def leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


def opcheck_cases():
    """(name, operator, args): every operator, forward and backward, with optional arguments present and
    absent, in float32 and bfloat16."""
    targets = torch.tensor([1, 2, -100, 4, 5, 19])
    q, k, v = leaf(1, 4, 9, 16), leaf(1, 2, 12, 16), leaf(1, 2, 12, 16)
    out, lse = ops.attention_forward(q, k, v, 0.25)
    x, h = torch.randn(7, 8), torch.randn(7, 12)
    return [
        ("linear", ops.linear, (leaf(3, 8), leaf(12, 8), leaf(12))),
        (
            "linear no bias bf16",
            ops.linear,
            (leaf(1, 8, dtype=torch.bfloat16), leaf(5, 8, dtype=torch.bfloat16), None),
        ),
        ("linear BLAS rows", ops.linear, (leaf(20, 8), leaf(6, 8), leaf(6))),
        ("attention_forward", ops.attention_forward, (q, k, v, 0.25)),
        (
            "attention_forward bf16",
            ops.attention_forward,
            (
                leaf(1, 2, 5, 8, dtype=torch.bfloat16),
                leaf(1, 1, 5, 8, dtype=torch.bfloat16),
                leaf(1, 1, 5, 8, dtype=torch.bfloat16),
                0.3,
            ),
        ),
        (
            "attention_backward",
            ops.attention_backward,
            (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), 0.25),
        ),
        (
            "ffn_forward",
            ops.ffn_forward,
            (leaf(7, 8), leaf(12, 8), leaf(12), leaf(8, 12), leaf(8), "gelu_tanh", leaf(7, 8)),
        ),
        (
            "ffn_forward no bias bf16",
            ops.ffn_forward,
            (
                leaf(7, 8, dtype=torch.bfloat16),
                leaf(12, 8, dtype=torch.bfloat16),
                None,
                leaf(5, 12, dtype=torch.bfloat16),
                None,
                "silu",
                None,
            ),
        ),
        (
            "ffn_backward",
            ops.ffn_backward,
            (torch.randn(7, 8), x, h, torch.randn(12, 8), torch.randn(8, 12), "gelu"),
        ),
        ("layer_norm_forward", ops.layer_norm_forward, (leaf(5, 10), leaf(10), leaf(10), leaf(5, 10), 1e-5)),
        ("layer_norm_forward plain", ops.layer_norm_forward, (leaf(5, 10), None, None, None, 1e-5)),
        (
            "layer_norm_backward",
            ops.layer_norm_backward,
            (
                torch.randn(5, 10),
                torch.randn(5, 10),
                torch.randn(5, 10),
                torch.randn(10),
                torch.randn(5),
                torch.rand(5) + 0.5,
            ),
        ),
        (
            "linear_cross_entropy_forward mean",
            ops.linear_cross_entropy_forward,
            (leaf(6, 8), leaf(20, 8), targets, leaf(20), -100, "mean", True),
        ),
        (
            "linear_cross_entropy_forward none",
            ops.linear_cross_entropy_forward,
            (leaf(6, 8), leaf(20, 8), targets, None, -100, "none", False),
        ),
        (
            "linear_cross_entropy_forward sum bf16",
            ops.linear_cross_entropy_forward,
            (
                leaf(6, 8, dtype=torch.bfloat16),
                leaf(20, 8, dtype=torch.bfloat16),
                targets,
                None,
                -100,
                "sum",
                True,
            ),
        ),
        (
            "linear_cross_entropy_backward",
            ops.linear_cross_entropy_backward,
            (torch.randn(6, 8), torch.randn(20, 8), targets, torch.randn(20), torch.randn(6), -100),
        ),
    ]


@pytest.mark.parametrize("index", range(len(opcheck_cases())), ids=[case[0] for case in opcheck_cases()])
def test_opcheck(index):
    _, operator, args = opcheck_cases()[index]
    torch.library.opcheck(operator, args)


def test_compiled_block_matches_eager_without_graph_breaks():
    channels, heads = 32, 4
    generator = torch.Generator().manual_seed(3)
    params = {
        "ln_weight": torch.randn(channels, generator=generator),
        "ln_bias": torch.randn(channels, generator=generator),
        "qkv": torch.randn(3 * channels, channels, generator=generator) * 0.2,
        "fc": torch.randn(4 * channels, channels, generator=generator) * 0.2,
        "fc_bias": torch.randn(4 * channels, generator=generator),
        "proj": torch.randn(channels, 4 * channels, generator=generator) * 0.2,
        "proj_bias": torch.randn(channels, generator=generator),
        "head": torch.randn(50, channels, generator=generator) * 0.2,
    }
    for p in params.values():
        p.requires_grad_()

    def block(x, residual, targets):
        batch, seq, _ = x.shape
        h, summed = functional.layer_norm(
            x, params["ln_weight"], params["ln_bias"], residual=residual, backend="cpu"
        )
        q, k, v = (h @ params["qkv"].T).view(batch, seq, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
        attended = (
            functional.causal_attention(q, k, v, backend="cpu").transpose(1, 2).reshape(batch, seq, channels)
        )
        y = functional.fused_ffn(
            attended,
            params["fc"],
            params["fc_bias"],
            params["proj"],
            params["proj_bias"],
            residual=summed,
            backend="cpu",
        )
        return functional.linear_cross_entropy(y, params["head"], targets, backend="cpu")

    x, residual = torch.randn(2, 9, channels), torch.randn(2, 9, channels)
    targets = torch.randint(0, 50, (2, 9))

    def loss_and_grads(fn):
        for p in params.values():
            p.grad = None
        loss = fn(x, residual, targets)
        loss.backward()
        return loss.detach(), [p.grad for p in params.values()]

    # One eager call first: dispatch.resolve's cache of implementations must be warm before dynamo traces
    # it (a cold cache breaks the trace on the second op; see the report on dispatch.py).
    eager_loss, eager_grads = loss_and_grads(block)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(block, fullgraph=True))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=0, atol=0)
    for compiled, eager in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


def test_fastgpt_namespace_is_shared_with_python_custom_ops():
    # fastgpt._C defines the namespace with TORCH_LIBRARY; the Triton backend adds ops to it with
    # torch.library.custom_op, imported before or after the extension. After: here, in this process.
    @torch.library.custom_op("fastgpt::cpu_test_namespace_probe", mutates_args=())
    def probe(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    q = torch.randn(1, 1, 3, 8)
    assert torch.equal(torch.ops.fastgpt.cpu_test_namespace_probe(q), q * 2)
    # Before: in a fresh interpreter.
    script = """
import torch

@torch.library.custom_op("fastgpt::triton_namespace_probe", mutates_args=())
def probe(x: torch.Tensor) -> torch.Tensor:
    return x * 2

import fastgpt.ops.compiled
q = torch.randn(1, 1, 3, 8)
assert torch.equal(torch.ops.fastgpt.triton_namespace_probe(q), q * 2)
assert torch.ops.fastgpt.attention_forward(q, q, q, 0.5)[0].shape == q.shape
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr


def test_auto_picks_cpu_for_cpu_tensors_and_reports_it(monkeypatch):
    monkeypatch.delenv("FASTGPT_BACKEND", raising=False)
    assert "cpu" in dispatch.available_backends()
    assert dispatch.backend_status()["cpu"] is None
    for op in dispatch.OPS:
        assert dispatch.choose_backend(op, "auto", "cpu", torch.float32, ()) == "cpu"
        assert dispatch.choose_backend(op, "auto", "cpu", torch.bfloat16, ()) == "cpu"
        assert dispatch.choose_backend(op, "auto", "cpu", torch.float64, ()) == "reference"
    assert _C.cpu_isa() in ("avx512", "avx2", "baseline")
    assert compiled.SUPPORTED_DTYPES["cpu"] == (torch.float32, torch.bfloat16)


def test_operator_checks_name_the_argument():
    q = torch.randn(1, 4, 5, 8)
    with pytest.raises(RuntimeError, match="multiple of k's kv_heads"):
        ops.attention_forward(q, torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8), 0.3)
    with pytest.raises(RuntimeError, match="activation must be one of"):
        ops.ffn_forward(torch.randn(2, 4), torch.randn(8, 4), None, torch.randn(4, 8), None, "tanh", None)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(out_features, 4\)"):
        ops.linear(torch.randn(2, 4), torch.randn(6, 5), None)
    with pytest.raises(RuntimeError, match="float32 and bfloat16"):
        ops.layer_norm_forward(torch.randn(2, 4, dtype=torch.float64), None, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="targets must have shape"):
        ops.linear_cross_entropy_forward(
            torch.randn(3, 4), torch.randn(6, 4), torch.zeros(2, dtype=torch.long), None, -100, "mean", False
        )
