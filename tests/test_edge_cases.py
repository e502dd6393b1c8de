"""Valid edge cases give the reference's answer on every backend, through the public API.

One table of edge cases x every available backend x the dtypes each case names (where the backend
supports them): empty batches and zero tokens, length 1, sizes that are not powers of two, stride-0
(expanded) and non-contiguous inputs, huge scores and logits (no overflow), NaN/Inf confined to
their row, and requires_grad on only some inputs. Every output and every gradient is compared with
the reference backend run in float64 by tests/tolerance.assert_close; inputs that do not require a
gradient must get none. The per-backend test files cover each kernel's own corners (block
geometries, chunking, decode splits); this file holds every backend to the same list.
"""

import math
from dataclasses import dataclass

import pytest
import torch
from tolerance import assert_close

import fastgpt
from fastgpt import dispatch

BACKENDS = fastgpt.available_backends()
HAS_CUDA = torch.cuda.is_available()
DEVICE = {"reference": "cpu", "cpu": "cpu", "triton": "cuda" if HAS_CUDA else "cpu", "cuda": "cuda"}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
WIDE_RANGE = (F32, F16, BF16)  # huge-value cases run in every dtype a backend supports


@dataclass
class Edge:
    op: str
    name: str
    make: object  # dtype -> {name: leaf tensor}; float leaves in dtype, index leaves int64
    call: object  # (leaves, backend) -> the op's result
    grad: tuple = ()  # the leaves that require a gradient
    dtypes: tuple = (F32,)
    grad_factor: float = 2.0  # the tolerance factor for gradients (assert_close's `factor`)


def randn(*shape, dtype, scale=1.0):
    return torch.randn(*shape, dtype=torch.float64).mul(scale).to(dtype)


def strided(vector):
    """A view of `vector`'s values with stride 2 (interleaved with zeros); gradients reach vector."""
    return torch.stack((vector, torch.zeros_like(vector)), dim=1).view(-1)[::2]


def poison(tensor, index, value):
    tensor = tensor.clone()
    tensor[index] = value
    return tensor


# ----------------------------------------------------------------------------------------------
# The table


def attention_leaves(batch, heads, kv_heads, q_len, kv_len, head_dim, scale=1.0):
    def make(dtype):
        return {
            "q": randn(batch, heads, q_len, head_dim, dtype=dtype, scale=scale),
            "k": randn(batch, kv_heads, kv_len, head_dim, dtype=dtype, scale=scale),
            "v": randn(batch, kv_heads, kv_len, head_dim, dtype=dtype),
        }

    return make


def attention(transform=lambda q, k, v: (q, k, v), **kwargs):
    return lambda t, backend: fastgpt.causal_attention(
        *transform(t["q"], t["k"], t["v"]), backend=backend, **kwargs
    )


def scores_near(offset, batch=1, heads=2, kv_heads=1, length=8, head_dim=8):
    """q, k whose scores (at the default scale) are all about `offset` but differ by O(1) across keys:
    a softmax that overflows or underflows unless the row maximum is subtracted, yet is not one-hot,
    so every gradient is a well-conditioned number. (A one-hot softmax makes the exact gradients 0,
    and any kernel that recomputes P from a logsumexp of magnitude 1e4 is off by 1e4 * fp32 eps.)"""

    def make(dtype):
        level = offset / (head_dim * head_dim**-0.5)  # q . k ~ level * head_dim
        return {
            "q": (level + torch.randn(batch, heads, length, head_dim, dtype=torch.float64)).to(dtype),
            "k": (1.0 + 1e-3 * torch.randn(batch, kv_heads, length, head_dim, dtype=torch.float64)).to(dtype),
            "v": randn(batch, kv_heads, length, head_dim, dtype=dtype),
        }

    return make


ATTENTION = [
    Edge("attention", "empty-batch", attention_leaves(0, 2, 1, 4, 4, 8), attention(), grad=("q", "k", "v")),
    Edge("attention", "zero-queries", attention_leaves(1, 2, 1, 0, 3, 8), attention(), grad=("q", "k", "v")),
    Edge("attention", "zero-queries-and-keys", attention_leaves(1, 2, 2, 0, 0, 8), attention(), grad=("q", "k", "v")),
    Edge("attention", "length-1", attention_leaves(2, 2, 2, 1, 1, 8), attention(), grad=("q", "k", "v")),
    Edge("attention", "one-query-over-a-cache", attention_leaves(1, 4, 2, 1, 9, 16), attention()),
    Edge("attention", "one-query-over-a-cache-grad", attention_leaves(1, 4, 2, 1, 9, 16), attention(), grad=("q", "k", "v")),
    Edge("attention", "head-dim-24", attention_leaves(1, 2, 2, 9, 9, 24), attention(), grad=("q", "k", "v")),
    Edge("attention", "head-dim-5", attention_leaves(1, 2, 1, 6, 11, 5), attention(), grad=("q", "k", "v")),
    Edge(
        "attention", "expanded-kv-stride-0",  # one key/value row shared by every batch and position
        attention_leaves(1, 1, 1, 1, 1, 16),
        attention(lambda q, k, v: (q.expand(2, 2, 7, 16), k.expand(2, 1, 7, 16), v.expand(2, 1, 7, 16))),
        grad=("q", "k", "v"),
    ),
    Edge(
        "attention", "transposed-and-strided-views",  # (B, T, H, D) transposed, every other feature
        lambda dtype: {"q": randn(2, 7, 4, 32, dtype=dtype), "k": randn(2, 7, 2, 32, dtype=dtype), "v": randn(2, 7, 2, 32, dtype=dtype)},
        attention(lambda q, k, v: (q.transpose(1, 2)[..., ::2], k.transpose(1, 2)[..., ::2], v.transpose(1, 2)[..., ::2])),
        grad=("q", "k", "v"),
    ),
    # The backward recomputes P = exp(s - lse) from two fp32 numbers of magnitude 1e4 (each rounded by
    # 1e4 * 2^-24 = 6e-4) where eager rounds s once: FlashAttention's recomputation costs up to ~3x
    # eager's gradient error at these magnitudes (measured 3.2x), hence factor 4 for the gradients.
    Edge("attention", "scores-near-plus-1e4", scores_near(1e4), attention(), grad=("q", "k", "v"), dtypes=WIDE_RANGE, grad_factor=4.0),
    Edge("attention", "scores-near-minus-1e4", scores_near(-1e4), attention(), grad=("q", "k", "v"), dtypes=WIDE_RANGE, grad_factor=4.0),
    # Scores 1e4 apart: a one-hot softmax, compared forward only (see scores_near).
    Edge("attention", "one-hot-softmax-from-huge-scores", attention_leaves(1, 2, 2, 8, 8, 8, scale=100.0), attention(), dtypes=WIDE_RANGE),
    Edge("attention", "nan-in-one-query", attention_leaves(1, 2, 1, 6, 6, 8), attention(lambda q, k, v: (poison(q, (0, 1, 3, 2), math.nan), k, v))),
    Edge("attention", "inf-in-one-query", attention_leaves(1, 2, 1, 6, 6, 8), attention(lambda q, k, v: (poison(q, (0, 0, 4, 1), math.inf), k, v))),
    Edge("attention", "grad-for-q-only", attention_leaves(1, 4, 2, 5, 7, 8), attention(), grad=("q",)),
    Edge("attention", "grad-for-k-and-v-only", attention_leaves(1, 4, 2, 5, 7, 8), attention(), grad=("k", "v")),
]  # fmt: skip


def ffn_leaves(lead, channels, hidden, out_features, x_scale=1.0, fc_scale=0.3, proj_scale=0.3):
    def make(dtype):
        return {
            "x": randn(*lead, channels, dtype=dtype, scale=x_scale),
            "fc_weight": randn(hidden, channels, dtype=dtype, scale=fc_scale),
            "fc_bias": randn(hidden, dtype=dtype),
            "proj_weight": randn(out_features, hidden, dtype=dtype, scale=proj_scale),
            "proj_bias": randn(out_features, dtype=dtype),
            "residual": randn(*lead, out_features, dtype=dtype),
        }

    return make


def ffn(transform=lambda t: t, activation="gelu_tanh", residual=True):
    def call(t, backend):
        t = transform(dict(t))
        return fastgpt.fused_ffn(
            t["x"], t["fc_weight"], t["fc_bias"], t["proj_weight"], t["proj_bias"],
            activation=activation, residual=t["residual"] if residual else None, backend=backend,
        )  # fmt: skip

    return call


ALL_FFN = ("x", "fc_weight", "fc_bias", "proj_weight", "proj_bias", "residual")
FFN = [
    Edge("ffn", "empty-batch", ffn_leaves((0,), 8, 16, 8), ffn(), grad=ALL_FFN),
    Edge("ffn", "zero-tokens-3d", ffn_leaves((2, 0), 8, 16, 8), ffn(), grad=ALL_FFN),
    Edge("ffn", "one-token", ffn_leaves((1,), 8, 16, 8), ffn(), grad=ALL_FFN),
    Edge("ffn", "odd-sizes", ffn_leaves((5,), 24, 40, 12), ffn(activation="silu"), grad=ALL_FFN),
    Edge(
        "ffn", "expanded-x-stride-0",  # one token repeated: rows of stride 0
        ffn_leaves((1,), 16, 32, 16),
        ffn(lambda t: t | {"x": t["x"].expand(6, 16), "residual": t["residual"].expand(6, 16)}),
        grad=ALL_FFN,
    ),
    Edge(
        "ffn", "transposed-weights-and-strided-rows",
        ffn_leaves((12,), 16, 32, 16),
        ffn(lambda t: t | {
            "x": t["x"][::2], "residual": t["residual"][::2],
            "fc_weight": t["fc_weight"].t().contiguous().t(), "proj_weight": t["proj_weight"].t().contiguous().t(),
            "fc_bias": strided(t["fc_bias"]), "proj_bias": strided(t["proj_bias"]),
        }),
        grad=ALL_FFN,
    ),
    *[
        Edge("ffn", f"huge-preactivations-{activation}", ffn_leaves((3,), 16, 32, 16, x_scale=10.0, fc_scale=100.0, proj_scale=1e-3),
             ffn(activation=activation, residual=False), grad=ALL_FFN[:-1], dtypes=WIDE_RANGE)
        for activation in ("gelu_tanh", "gelu", "relu", "silu")
    ],
    Edge("ffn", "nan-in-one-row", ffn_leaves((5,), 8, 16, 8), ffn(lambda t: t | {"x": poison(t["x"], (2, 3), math.nan)})),
    Edge("ffn", "inf-in-one-row", ffn_leaves((5,), 8, 16, 8), ffn(lambda t: t | {"x": poison(t["x"], (1, 0), math.inf)})),
    Edge("ffn", "grad-for-weights-only", ffn_leaves((2, 3), 8, 16, 8), ffn(), grad=("fc_weight", "proj_bias")),
    Edge("ffn", "grad-for-x-only", ffn_leaves((2, 3), 8, 16, 8), ffn(residual=False), grad=("x",)),
]  # fmt: skip


def norm_leaves(lead, channels, x_scale=1.0, x_offset=0.0):
    def make(dtype):
        return {
            "x": (torch.randn(*lead, channels, dtype=torch.float64) * x_scale + x_offset).to(dtype),
            "weight": randn(channels, dtype=dtype),
            "bias": randn(channels, dtype=dtype),
            "residual": randn(*lead, channels, dtype=dtype),
        }

    return make


def norm(transform=lambda t: t, residual=True):
    def call(t, backend):
        t = transform(dict(t))
        return fastgpt.layer_norm(
            t["x"], t["weight"], t["bias"], residual=t["residual"] if residual else None, backend=backend
        )

    return call


ALL_NORM = ("x", "weight", "bias", "residual")
NORM = [
    Edge("layer_norm", "empty-rows", norm_leaves((0,), 8), norm(), grad=ALL_NORM),
    Edge("layer_norm", "one-column", norm_leaves((4,), 1), norm(), grad=ALL_NORM),
    Edge("layer_norm", "one-row-24-columns", norm_leaves((1,), 24), norm(), grad=ALL_NORM),
    Edge(
        "layer_norm", "expanded-x-and-weight-stride-0",
        norm_leaves((1,), 16),
        norm(lambda t: t | {"x": t["x"].expand(5, 16), "weight": t["weight"][:1].expand(16), "residual": t["residual"].expand(5, 16)}),
        grad=ALL_NORM,
    ),
    Edge(
        "layer_norm", "strided-columns-and-transposed-residual",
        norm_leaves((6,), 32),
        norm(lambda t: t | {"x": t["x"][:, ::2], "weight": t["weight"][::2], "bias": t["bias"][::2],
                            "residual": t["residual"][:, ::2].t().contiguous().t()}),
        grad=ALL_NORM,
    ),
    Edge("layer_norm", "huge-values", norm_leaves((4,), 16, x_scale=1e4), norm(residual=False), grad=ALL_NORM[:-1], dtypes=WIDE_RANGE),
    Edge("layer_norm", "large-mean-small-variance", norm_leaves((4,), 16, x_offset=1e4), norm(residual=False), grad=ALL_NORM[:-1]),
    Edge("layer_norm", "nan-in-one-row", norm_leaves((5,), 8), norm(lambda t: t | {"residual": poison(t["residual"], (3, 1), math.nan)})),
    Edge("layer_norm", "inf-in-one-row", norm_leaves((5,), 8), norm(lambda t: t | {"x": poison(t["x"], (0, 7), -math.inf)}, residual=False)),
    Edge("layer_norm", "grad-for-weight-only", norm_leaves((3,), 8), norm(), grad=("weight",)),
    Edge("layer_norm", "grad-for-x-only", norm_leaves((3,), 8), norm(residual=False), grad=("x",)),
]  # fmt: skip


def ce_leaves(lead, channels, vocab, x_scale=1.0, weight_scale=1.0, ignored=0):
    def make(dtype):
        targets = torch.randint(0, vocab, lead)
        targets.view(-1)[:ignored] = -100
        return {
            "x": randn(*lead, channels, dtype=dtype, scale=x_scale),
            "weight": randn(vocab, channels, dtype=dtype, scale=weight_scale),
            "bias": randn(vocab, dtype=dtype),
            "targets": targets,
        }

    return make


def ce(transform=lambda t: t, reduction="mean", bias=True):
    def call(t, backend):
        t = transform(dict(t))
        return fastgpt.linear_cross_entropy(
            t["x"],
            t["weight"],
            t["targets"],
            bias=t["bias"] if bias else None,
            reduction=reduction,
            backend=backend,
        )

    return call


ALL_CE = ("x", "weight", "bias")
CE = [
    *[Edge("cross_entropy", f"empty-batch-{r}", ce_leaves((0,), 8, 11), ce(reduction=r), grad=ALL_CE) for r in ("mean", "sum", "none")],
    *[Edge("cross_entropy", f"every-target-ignored-{r}", ce_leaves((2, 3), 8, 11, ignored=6), ce(reduction=r), grad=ALL_CE) for r in ("mean", "sum", "none")],
    Edge("cross_entropy", "one-token-vocab-1", ce_leaves((1,), 8, 1), ce(), grad=ALL_CE),
    Edge("cross_entropy", "odd-sizes-3d", ce_leaves((2, 5), 24, 67, ignored=3), ce(reduction="none"), grad=ALL_CE),
    Edge(
        "cross_entropy", "expanded-x-and-targets-stride-0",
        ce_leaves((1,), 16, 13),
        ce(lambda t: t | {"x": t["x"].expand(7, 16), "targets": t["targets"].expand(7)}),
        grad=ALL_CE,
    ),
    Edge(
        "cross_entropy", "transposed-weight-and-strided-x",
        ce_leaves((10,), 16, 13),
        ce(lambda t: t | {"x": t["x"][::2, ::2], "weight": t["weight"][:, ::2].t().contiguous().t(), "targets": t["targets"][::2],
                          "bias": strided(t["bias"])}),
        grad=ALL_CE,
    ),
    Edge("cross_entropy", "huge-logits", ce_leaves((6,), 16, 13, x_scale=25.0, weight_scale=25.0), ce(bias=False), grad=ALL_CE[:-1], dtypes=WIDE_RANGE),
    Edge("cross_entropy", "nan-in-one-row", ce_leaves((5,), 8, 11), ce(lambda t: t | {"x": poison(t["x"], (2, 4), math.nan)}, reduction="none")),
    Edge("cross_entropy", "inf-in-one-row", ce_leaves((5,), 8, 11), ce(lambda t: t | {"x": poison(t["x"], (1, 0), math.inf)}, reduction="none")),
    Edge("cross_entropy", "grad-for-weight-only", ce_leaves((6,), 8, 11), ce(), grad=("weight",)),
    Edge("cross_entropy", "grad-for-x-only", ce_leaves((6,), 8, 11), ce(reduction="sum"), grad=("x",)),
]  # fmt: skip

OP_NAMES = {
    "attention": "causal_attention",
    "ffn": "fused_ffn",
    "layer_norm": "layer_norm",
    "cross_entropy": "linear_cross_entropy",
}
EDGES = ATTENTION + FFN + NORM + CE


def supported(edge, backend, dtype):
    reason = dispatch._unsupported_reason(
        OP_NAMES[edge.op], backend, torch.device(DEVICE[backend]).type, dtype, {}
    )
    return reason is None


def on_gpu_at_extremes(edge, backend):
    """The huge-value cases that are also GPU tests, so that benchmarks/gpu_check.sh's areas (`-m gpu
    -k <op>`) run them, not only a full `pytest`: every one on the cuda backend, and on the triton
    backend those of layer_norm, whose kernels compile in seconds (the other ops' would take most of
    an area's test time) and whose float32 rows take a path of their own (the re-centred backward)."""
    extreme = edge.dtypes == WIDE_RANGE or edge.name == "large-mean-small-variance"
    return extreme and (backend == "cuda" or (backend == "triton" and HAS_CUDA and edge.op == "layer_norm"))


def params():
    for edge in EDGES:
        for backend in BACKENDS:
            for dtype in edge.dtypes:
                if not supported(edge, backend, dtype):
                    continue
                dtype_id = "" if len(edge.dtypes) == 1 else f"-{str(dtype).removeprefix('torch.')}"
                marks = (pytest.mark.gpu,) if on_gpu_at_extremes(edge, backend) else ()
                yield pytest.param(
                    edge, backend, dtype, id=f"{edge.op}-{edge.name}{dtype_id}-{backend}", marks=marks
                )


# ----------------------------------------------------------------------------------------------
# The check


def as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


def leaves_for(base, dtype, device, grad):
    """Fresh leaves: float ones converted to dtype, each requiring a gradient only if named in grad."""
    leaves = {}
    for name, tensor in base.items():
        tensor = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        leaves[name] = tensor.detach().clone().requires_grad_(name in grad)
    return leaves


def run(edge, base, backend, dtype, device, upstream):
    """The op's outputs and the gradient of every leaf (None for those without requires_grad)."""
    leaves = leaves_for(base, dtype, device, edge.grad)
    outputs = as_tuple(edge.call(leaves, backend))
    if edge.grad:
        pairs = [
            (o, g.to(device=device, dtype=o.dtype))
            for o, g in zip(outputs, upstream, strict=True)
            if o.requires_grad
        ]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return outputs, {name: leaf.grad for name, leaf in leaves.items()}


@pytest.mark.parametrize("edge, backend, dtype", list(params()))
def test_edge_case_matches_reference(edge, backend, dtype):
    device = DEVICE[backend]
    base = edge.make(dtype)
    with torch.no_grad():
        shapes = [
            o.shape for o in as_tuple(edge.call(leaves_for(base, torch.float64, "cpu", ()), "reference"))
        ]
    upstream = [torch.randn(shape, dtype=torch.float64) for shape in shapes]

    actual, actual_grads = run(edge, base, backend, dtype, device, upstream)
    expected, expected_grads = run(edge, base, "reference", torch.float64, "cpu", upstream)
    eager, eager_grads = eager_baseline(edge, base, dtype, upstream, expected, expected_grads)

    for index, (a, r, e) in enumerate(zip(actual, expected, eager, strict=True)):
        name = f"{edge.name} output {index}"
        assert_close(name, a.detach().cpu(), r.detach(), e.detach())
        finite = torch.isfinite(r)
        assert torch.isfinite(a.detach().cpu()[finite]).all(), (
            f"{name}: overflow where the reference is finite"
        )
    for leaf, grad in actual_grads.items():
        if leaf not in edge.grad:
            assert grad is None, f"{leaf} does not require grad but got one"
            continue
        name = f"{edge.name} d{leaf}"
        assert_close(name, grad.cpu(), expected_grads[leaf], eager_grads[leaf], factor=edge.grad_factor)
        assert torch.isfinite(grad.cpu()[torch.isfinite(expected_grads[leaf])]).all(), f"{name}: overflow"


HUGE_FFN = [edge for edge in FFN if edge.name.startswith("huge-preactivations")]


@pytest.mark.gpu
@pytest.mark.skipif("cuda" not in BACKENDS, reason="the cuda backend is not available here")
@pytest.mark.parametrize("ffn_path", ["cublaslt", "mma"])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
@pytest.mark.parametrize("edge", HUGE_FFN, ids=lambda edge: edge.name)
def test_cuda_ffn_paths_at_huge_preactivations(edge, dtype, ffn_path, monkeypatch):
    """Both CUDA FFN implementations (FASTGPT_CUDA_FFN, read per call) at |h| in the thousands: the
    cuBLASLt path's forward takes gelu_tanh from cuBLASLt's own GELU epilogue, whose behaviour at such
    inputs only a GPU shows; the table above runs the default path only."""
    monkeypatch.setenv("FASTGPT_CUDA_FFN", ffn_path)
    test_edge_case_matches_reference(edge, "cuda", dtype)


def eager_baseline(edge, base, dtype, upstream, expected, expected_grads):
    """Eager PyTorch (the reference backend) in dtype: the error baseline of the tolerance rule. Where
    it overflows although the float64 result is finite (float16 at huge values), the rule would be
    vacuous (bound inf or NaN); the baseline is then the float32 computation rounded to dtype."""
    eager, eager_grads = run(edge, base, "reference", dtype, "cpu", upstream)
    pairs = list(zip(eager, expected)) + [(eager_grads[n], expected_grads[n]) for n in edge.grad]
    if dtype == torch.float32 or all(torch.isfinite(e[torch.isfinite(r)]).all() for e, r in pairs):
        return eager, eager_grads
    wide, wide_grads = run(edge, base, "reference", torch.float32, "cpu", upstream)
    eager = tuple(w.to(e.dtype) for w, e in zip(wide, eager, strict=True))
    return eager, {n: None if g is None else g.to(dtype) for n, g in wide_grads.items()}


def test_table_covers_every_op_and_backend():
    ops = {edge.op for edge in EDGES}
    assert ops == set(OP_NAMES)
    covered = {(p.values[0].op, p.values[1]) for p in params()}
    assert covered == {(op, backend) for op in ops for backend in BACKENDS}
