"""Property-based tests: random shapes, strides, dtypes, GQA ratios and lengths, on every backend
available here (reference, cpu, and triton under the CPU interpreter), compared with the reference
run in float64 by the FlashAttention tolerance rule (tests/tolerance.assert_close), outputs always
and gradients for about a third of the examples.

Profiles (registered in conftest.py): "ci", the default, runs at least 500 examples per op across
the backends, on tiny shapes (lengths <= 24, head_dim <= 32, features <= 48, vocab <= 67; smaller
for the Triton interpreter) so the file takes well under a minute on one core;
`--hypothesis-profile=long` runs ten times as many on larger shapes. Both are derandomized: a
failure reproduces with the same command.

Layouts: each tensor is drawn contiguous, fully transposed (a permuted view of the reversed shape),
strided in its last dimension (every other element), at a storage offset, or expanded along its
first dimension (stride 0). Expansion is drawn only for tensors with a batch or token dimension
first: a weight matrix expanded over its output rows, or a 1-D row expanded over its features, makes
an ill-conditioned problem (identical hidden units or classes, a zero-variance LayerNorm row) whose
exact answer is a cancellation to ~0, which eager computes exactly by luck of order and any other
order to within an ulp of the terms. Values are standard normal, scaled by a drawn magnitude.
"""

import math

import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tolerance import assert_close, max_error

import fastgpt
from fastgpt import dispatch

BACKENDS = fastgpt.available_backends()
HAS_CUDA = torch.cuda.is_available()
DEVICE = {"reference": "cpu", "cpu": "cpu", "triton": "cuda" if HAS_CUDA else "cpu", "cuda": "cuda"}
LONG = settings.get_current_profile_name() == "long"
# Each (op, backend) test runs this share of the profile's max_examples: 1.0 + 1.25 + 0.4 = 2.65 x
# 200 = 530 examples per op in the ci profile. The interpreted Triton kernels cost ~50x more per
# example than the others, so they get the smallest share (and shapes, see Bounds).
SHARE = {"reference": 1.0, "cpu": 1.25, "triton": 0.4, "cuda": 1.25}


class Bounds:
    """Largest sizes drawn. The interpreter pays ~1 ms of Python per program and launch, so the triton
    backend on CPU gets shapes of one or two blocks of its interpreter configurations (32 x 32 GEMM
    tiles, 16-32 attention rows)."""

    def __init__(self, length, head_dim, kv_heads, features, vocab, tokens):
        self.length, self.head_dim, self.kv_heads = length, head_dim, kv_heads
        self.features, self.vocab, self.tokens = features, vocab, tokens  # tokens: per leading dim


def bounds(backend):
    interpreted = backend == "triton" and not HAS_CUDA
    if LONG:
        return Bounds(80, 64, 3, 64, 200, 12) if interpreted else Bounds(160, 128, 4, 160, 600, 40)
    return Bounds(16, 32, 2, 32, 40, 5) if interpreted else Bounds(24, 32, 3, 48, 67, 6)


LAYOUTS = ("contiguous", "transposed", "strided", "offset", "expanded")


@pytest.fixture(autouse=True)
def one_thread():
    """Every example is tiny: intra-op threads only add wake-up latency (4x the time of the cpu
    backend's examples on a busy 2-core machine). The threaded partitioning of the C++ kernels is
    tested at sizes that split, in test_cpu_*.py."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def examples(backend):
    return max(1, round(settings.default.max_examples * SHARE[backend]))


def check_property(body, backend):
    """Runs body(backend, draw) for this backend's share of the profile's examples."""

    # The decorated source seeds hypothesis's derandomized examples: reformatting it draws other ones.
    # fmt: off
    @settings(max_examples=examples(backend), suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def property_holds(data):
        body(backend, data.draw)
    # fmt: on

    property_holds()


def dtypes_for(op, backend):
    device_type = torch.device(DEVICE[backend]).type
    candidates = (torch.float32, torch.float16, torch.bfloat16)
    return [d for d in candidates if dispatch._unsupported_reason(op, backend, device_type, d, {}) is None]


# ----------------------------------------------------------------------------------------------
# Tensors in random layouts


def make(shape, layout, dtype, magnitude=1.0):
    """A float64 tensor of `shape` viewed through `layout`, its values already rounded to dtype (so
    the float64 reference sees exactly the inputs the kernel sees). Returns (base, view): gradients
    flow from the view to the base."""
    shape = tuple(shape)
    if not shape or (layout == "expanded" and (len(shape) < 2 or shape[0] == 0)):
        layout = "contiguous"
    if layout == "transposed":
        base_shape = shape[::-1]
    elif layout == "strided":
        base_shape = (*shape[:-1], 2 * shape[-1]) if shape else shape
    elif layout == "offset":
        base_shape = (shape[0] + 1, *shape[1:]) if shape else shape
    elif layout == "expanded":
        base_shape = (1, *shape[1:])
    else:
        base_shape = shape
    base = (torch.randn(base_shape, dtype=torch.float64) * magnitude).to(dtype).double()
    return base, lambda b: view(b, shape, layout)


def view(base, shape, layout):
    if layout == "transposed":
        return base.permute(*reversed(range(base.dim())))
    if layout == "strided" and shape:
        return base[..., ::2]
    if layout == "offset" and shape:
        return base[1:]
    if layout == "expanded" and shape and shape[0] > 0:
        return base.expand(shape)
    return base


class Inputs:
    """Named inputs, each a float64 base (values representable in the test dtype) plus its view, so
    the same tensors can be run in any dtype with or without requires_grad."""

    def __init__(self, draw, dtype):
        self.draw, self.dtype = draw, dtype
        self.bases, self.views, self.fixed = {}, {}, {}

    def tensor(self, name, shape, magnitude=1.0, expandable=True):
        layouts = LAYOUTS if expandable else LAYOUTS[:-1]
        layout = self.draw(st.sampled_from(layouts), label=f"{name} layout")
        self.bases[name], self.views[name] = make(shape, layout, self.dtype, magnitude)

    def optional(self, name, shape, expandable=True):
        if self.draw(st.booleans(), label=f"has {name}"):
            self.tensor(name, shape, expandable=expandable)

    def materialise(self, dtype, device, requires_grad):
        """({name: view}, {name: leaf}) in dtype on device; leaves require grad when asked."""
        leaves = {
            name: base.to(device=device, dtype=dtype, copy=True).requires_grad_(requires_grad)
            for name, base in self.bases.items()
        }
        tensors = {name: self.views[name](leaf) for name, leaf in leaves.items()}
        return tensors | {name: t.to(device) for name, t in self.fixed.items()}, leaves


def compare(op_call, inputs, backend, dtype, with_grad):
    """Runs op_call(tensors, backend) on `backend` in dtype, on the reference in float64 and in dtype
    (the eager baseline); asserts the tolerance rule on every output and, with_grad, every gradient."""
    device = DEVICE[backend]
    runs = {}
    for name, run_backend, run_dtype, run_device in (
        ("actual", backend, dtype, device),
        ("expected", "reference", torch.float64, "cpu"),
        ("eager", "reference", dtype, "cpu"),
    ):
        tensors, leaves = inputs.materialise(run_dtype, run_device, with_grad)
        outputs = op_call(tensors, run_backend)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        runs[name] = (outputs, leaves)
    if with_grad:
        upstream = [torch.randn(o.shape, dtype=torch.float64) for o in runs["expected"][0]]
        for outputs, _ in runs.values():
            torch.autograd.backward(outputs, [g.to(o.device, o.dtype) for o, g in zip(outputs, upstream)])
    (actual, actual_leaves), (expected, expected_leaves), (eager, eager_leaves) = runs.values()
    pairs = [
        (f"output {i}", a, r, e) for i, (a, r, e) in enumerate(zip(actual, expected, eager, strict=True))
    ]
    if with_grad:
        pairs += [
            (f"d{n}", leaf.grad, expected_leaves[n].grad, eager_leaves[n].grad)
            for n, leaf in actual_leaves.items()
        ]
    for name, a, r, e in pairs:
        assert_within_rule(name, a.detach().cpu(), r.detach(), e.detach(), dtype)


# The tolerance rule's floor, 2 x the rounding of `ref + 0.3 - 0.3`, is about one ulp at magnitude 0.3:
# made for FlashAttention's large O(1) tensors, where the max error over thousands of elements is a
# stable statistic. Tiny random tensors (a handful of elements, a scalar loss) make it a noisy one: the
# eager baseline can land within a tenth of an ulp by chance while the kernel, rounding the same
# intermediates in another order, is 2-4 ulps off (measured up to 4.5 ulps of the largest output
# over ~3000 comparisons, with no pattern by backend). So each comparison also allows this many ulps,
# of the test dtype, at the reference's largest magnitude; on large tensors the 2x-eager term dominates.
ULPS_OF_LARGEST = 8


def assert_within_rule(name, actual, reference64, eager, dtype):
    """tolerance.assert_close, unless the kernel's error is within ULPS_OF_LARGEST ulps of the largest
    reference magnitude (NaN/Inf positions must agree either way)."""
    assert actual.shape == reference64.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(reference64.shape)}"
    )
    finite = reference64[torch.isfinite(reference64)]
    largest = float(finite.abs().max()) if finite.numel() else 0.0
    if max_error(actual, reference64) <= ULPS_OF_LARGEST * torch.finfo(dtype).eps * largest:
        return
    assert_close(name, actual, reference64, eager)


# ----------------------------------------------------------------------------------------------
# Causal attention


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_matches_float64(backend):
    check_property(attention_property, backend)


def attention_property(backend, draw):
    torch.manual_seed(draw(st.integers(0, 2**32 - 1), label="seed"))
    dtype = draw(st.sampled_from(dtypes_for("causal_attention", backend)), label="dtype")
    limit = bounds(backend)
    batch = draw(st.integers(0, 2), label="batch")
    kv_heads = draw(st.integers(1, limit.kv_heads), label="kv_heads")
    group = draw(st.integers(1, 3), label="heads per kv head")
    kv_len = draw(st.integers(0, limit.length), label="kv_len")
    q_len = draw(st.integers(0, kv_len), label="q_len")
    head_dim = draw(st.integers(1, limit.head_dim), label="head_dim")
    scale = draw(st.none() | st.floats(0.05, 2.0), label="softmax_scale")
    inputs = Inputs(draw, dtype)
    inputs.tensor("q", (batch, kv_heads * group, q_len, head_dim))
    inputs.tensor("k", (batch, kv_heads, kv_len, head_dim))
    inputs.tensor("v", (batch, kv_heads, kv_len, head_dim))
    with_grad = draw(st.integers(0, 2), label="gradients when 0") == 0

    def call(t, backend):
        return fastgpt.causal_attention(t["q"], t["k"], t["v"], softmax_scale=scale, backend=backend)

    compare(call, inputs, backend, dtype, with_grad)


# ----------------------------------------------------------------------------------------------
# FFN


def leading_shape(draw, limit):
    dims = draw(st.integers(1, 3), label="x dims")
    return tuple(draw(st.integers(0, limit.tokens), label="leading size") for _ in range(dims - 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ffn_matches_float64(backend):
    check_property(ffn_property, backend)


def ffn_property(backend, draw):
    torch.manual_seed(draw(st.integers(0, 2**32 - 1), label="seed"))
    dtype = draw(st.sampled_from(dtypes_for("fused_ffn", backend)), label="dtype")
    limit = bounds(backend)
    lead = leading_shape(draw, limit)
    channels, hidden, out_features = (
        draw(st.integers(1, limit.features), label=n) for n in ("C", "hidden", "C_out")
    )
    activation = draw(st.sampled_from(("gelu_tanh", "gelu", "relu", "silu")), label="activation")
    inputs = Inputs(draw, dtype)
    inputs.tensor("x", (*lead, channels))
    inputs.tensor("fc_weight", (hidden, channels), magnitude=1 / math.sqrt(channels), expandable=False)
    inputs.optional("fc_bias", (hidden,))
    inputs.tensor("proj_weight", (out_features, hidden), magnitude=1 / math.sqrt(hidden), expandable=False)
    inputs.optional("proj_bias", (out_features,))
    inputs.optional("residual", (*lead, out_features))
    with_grad = draw(st.integers(0, 2), label="gradients when 0") == 0

    def call(t, backend):
        return fastgpt.fused_ffn(
            t["x"], t["fc_weight"], t.get("fc_bias"), t["proj_weight"], t.get("proj_bias"),
            activation=activation, residual=t.get("residual"), backend=backend,
        )  # fmt: skip

    compare(call, inputs, backend, dtype, with_grad)


# ----------------------------------------------------------------------------------------------
# LayerNorm


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_matches_float64(backend):
    check_property(layer_norm_property, backend)


def layer_norm_property(backend, draw):
    torch.manual_seed(draw(st.integers(0, 2**32 - 1), label="seed"))
    dtype = draw(st.sampled_from(dtypes_for("layer_norm", backend)), label="dtype")
    limit = bounds(backend)
    lead = leading_shape(draw, limit)
    hidden = draw(st.integers(1, limit.features * 2), label="hidden")
    eps = draw(st.sampled_from((1e-5, 1e-3, 0.5)), label="eps")
    magnitude = draw(st.sampled_from((1.0, 30.0)), label="magnitude")
    inputs = Inputs(draw, dtype)
    inputs.tensor("x", (*lead, hidden), magnitude=magnitude)
    inputs.optional("weight", (hidden,))
    inputs.optional("bias", (hidden,))
    inputs.optional("residual", (*lead, hidden))
    with_grad = draw(st.integers(0, 2), label="gradients when 0") == 0

    def call(t, backend):
        return fastgpt.layer_norm(
            t["x"], t.get("weight"), t.get("bias"), eps, residual=t.get("residual"), backend=backend
        )

    compare(call, inputs, backend, dtype, with_grad)


# ----------------------------------------------------------------------------------------------
# Linear cross-entropy


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_matches_float64(backend):
    check_property(cross_entropy_property, backend)


def cross_entropy_property(backend, draw):
    torch.manual_seed(draw(st.integers(0, 2**32 - 1), label="seed"))
    dtype = draw(st.sampled_from(dtypes_for("linear_cross_entropy", backend)), label="dtype")
    limit = bounds(backend)
    lead = leading_shape(draw, limit)
    channels = draw(st.integers(1, limit.features), label="C")
    vocab = draw(st.integers(1, limit.vocab), label="vocab")
    reduction = draw(st.sampled_from(("mean", "sum", "none")), label="reduction")
    ignore_index = draw(st.sampled_from((-100, 0)), label="ignore_index")
    ignored = draw(st.floats(0.0, 1.0), label="ignored fraction")
    inputs = Inputs(draw, dtype)
    inputs.tensor("x", (*lead, channels))
    inputs.tensor(
        "weight",
        (vocab, channels),
        magnitude=draw(st.sampled_from((0.3, 3.0)), label="weight scale"),
        expandable=False,
    )
    inputs.optional("bias", (vocab,))
    targets = torch.randint(0, vocab, lead)
    targets[torch.rand(lead) < ignored] = ignore_index
    target_layout = draw(st.sampled_from(LAYOUTS), label="targets layout")
    inputs.fixed["targets"] = view(*_targets_base(targets, target_layout))
    with_grad = draw(st.integers(0, 2), label="gradients when 0") == 0

    def call(t, backend):
        return fastgpt.linear_cross_entropy(
            t["x"], t["weight"], t["targets"], bias=t.get("bias"), ignore_index=ignore_index,
            reduction=reduction, backend=backend,
        )  # fmt: skip

    compare(call, inputs, backend, dtype, with_grad)


def _targets_base(targets, layout):
    """(base, shape, layout) whose view holds `targets` (expanded targets repeat the first row)."""
    shape = tuple(targets.shape)
    if layout == "transposed" and shape:
        return targets.permute(*reversed(range(targets.dim()))).contiguous(), shape, layout
    if layout == "strided" and shape:
        return targets.repeat_interleave(2, dim=-1), shape, layout
    if layout == "offset" and shape:
        return torch.cat((targets[:1], targets)), shape, layout
    if layout == "expanded" and shape and shape[0] > 0:
        return targets[:1].clone(), shape, layout
    return targets, shape, "contiguous"
