"""Bad input to every public entry point, on every backend available here.

Each case must raise TypeError or ValueError
- from fastgpt's own validation (the raising frame is in the fastgpt package, not in torch),
- whose message starts with the entry point's name and matches three regexes: the argument, what
  was expected and what was given,
- before any kernel runs. `no_kernels` proves it three ways: every backend's implementation of every
  op is replaced by a tripwire (dispatch re-resolves after forget_choices), Triton launches are
  tripwires, and a TorchDispatchMode records every torch operator that runs, allowing only the few
  that read index values (the CPU range check of targets and token ids). fastgpt's C++ operators
  (torch.ops.fastgpt.*) and the reference's compute would show up there.

Why the cpu (C++) backend's cases run in-process: the tripwires guarantee that no bad input reaches
the C++ kernels at all, so there is nothing that could crash; if validation ever let one through, the
tripwire fails the test before the kernel runs. (`make test` runs under pytest-xdist, which would
also report a crashed worker as a failure of the test it ran rather than hang.) The raw C++
operators' own TORCH_CHECKs are tested in test_cpu_integration.py.

Test ids are numbered: `c07-attention-mixed-dtype-cpu` is case 7 of CASES on the cpu backend.
"""

import importlib
import math
import re
import types
from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastgpt
from fastgpt import dispatch
from fastgpt.nn import GPT, MLP, Block, CausalSelfAttention, GPTConfig, LayerNorm

BACKENDS = fastgpt.available_backends()
HAS_CUDA = torch.cuda.is_available()
# Kernel backends run on CUDA tensors where there is a GPU; on CPU everything runs on CPU tensors.
DEVICE = {"reference": "cpu", "cpu": "cpu", "triton": "cuda" if HAS_CUDA else "cpu", "cuda": "cuda"}
OPS = {name: getattr(fastgpt, name) for name in dispatch.OPS}

# Operators validation may run: the range check of class indices / token ids on CPU tensors
# (dispatch.check_index_range). Anything else is compute that should not have started.
VALIDATION_OPS = {
    "aten.lt.Scalar", "aten.ge.Scalar", "aten.ne.Scalar", "aten.bitwise_or.Tensor",
    "aten.bitwise_and_.Tensor", "aten.any.default", "aten.is_nonzero.default",
    "aten._local_scalar_dense.default", "aten.index.Tensor", "aten.select.int", "aten.sum.default",
    "aten.__or__.Tensor", "aten.item.default",  # the same, as recorded under inference_mode (generate)
    "aten.aminmax.default",  # the one-pass range check of targets and token ids
}  # fmt: skip


def other_device(device):
    """A second device for mixed-device cases: cuda next to cpu when there is a GPU, else meta."""
    if device == "cuda":
        return "cpu"
    return "cuda" if HAS_CUDA else "meta"


# ----------------------------------------------------------------------------------------------
# Proof that no kernel runs


class OperatorRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.operators = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operators.append(str(func))
        return func(*args, **(kwargs or {}))


def _tripwire(what):
    def reached(*args, **kwargs):
        raise AssertionError(f"{what} ran on bad input: validation must raise before any kernel")

    return reached


@pytest.fixture
def no_kernels(monkeypatch):
    """Every backend implementation and every Triton launch becomes a tripwire; yields a recorder
    of the torch operators that run."""
    for op, modules in (
        (op, {b: dispatch.IMPLEMENTATIONS[b].get(op) for b in BACKENDS}) for op in dispatch.OPS
    ):
        for backend, module_name in modules.items():
            if module_name is not None:
                module = importlib.import_module(module_name)
                monkeypatch.setattr(module, op, _tripwire(f"the {backend} backend's {op}"))
    if "triton" in BACKENDS:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        monkeypatch.setattr(InterpretedFunction, "run", _tripwire("a Triton kernel (interpreter)"))
        monkeypatch.setattr(JITFunction, "run", _tripwire("a Triton kernel"))
    dispatch.forget_choices()  # so dispatch picks up the tripwires
    try:
        yield OperatorRecorder()
    finally:
        dispatch.forget_choices()  # the next call re-resolves to the real functions


def assert_rejected(call, no_kernels, error, entry, argument, expected, given):
    """call() (recorded by no_kernels) raises `error` from fastgpt, before any kernel, with a message
    starting with `entry` and matching the argument, expected and given regexes."""
    with pytest.raises((TypeError, ValueError)) as caught, no_kernels:
        call()
    message = str(caught.value)
    assert caught.type is error, f"{caught.type.__name__} instead of {error.__name__}: {message}"
    raised_in = caught.traceback[-1].path
    assert "fastgpt" in str(raised_in) and "torch" not in str(raised_in), f"raised in {raised_in}: {message}"
    assert message.startswith(f"{entry}:"), message
    for what, pattern in (("argument", argument), ("expected", expected), ("given", given)):
        assert re.search(pattern, message), f"the message does not name the {what} ({pattern!r}): {message}"
    unexpected = [name for name in no_kernels.operators if name not in VALIDATION_OPS]
    assert not unexpected, f"operators ran before the error: {unexpected}"


# ----------------------------------------------------------------------------------------------
# The ops


def standard_tensors(device):
    """Valid arguments of every op; each case breaks one thing."""
    return types.SimpleNamespace(
        q=torch.randn(2, 4, 5, 8, device=device),  # (B, H, Tq, D)
        k=torch.randn(2, 2, 5, 8, device=device),  # (B, Hkv, Tk, D)
        v=torch.randn(2, 2, 5, 8, device=device),
        x=torch.randn(3, 5, 8, device=device),  # (..., C)
        fc_weight=torch.randn(16, 8, device=device),  # (hidden, C)
        fc_bias=torch.randn(16, device=device),
        proj_weight=torch.randn(8, 16, device=device),  # (C_out, hidden)
        proj_bias=torch.randn(8, device=device),
        weight=torch.randn(8, device=device),
        bias=torch.randn(8, device=device),
        vocab_weight=torch.randn(11, 8, device=device),  # (V, C)
        vocab_bias=torch.randn(11, device=device),
        targets=torch.randint(0, 11, (3, 5), device=device),
        other=other_device(device),
    )


def attention(t, q=None, k=None, v=None, **kwargs):
    return (t.q if q is None else q, t.k if k is None else k, t.v if v is None else v), kwargs


def ffn(t, **overrides):
    names = ("x", "fc_weight", "fc_bias", "proj_weight", "proj_bias")
    args = tuple(overrides.pop(n) if n in overrides else getattr(t, n) for n in names)
    return args, overrides


def norm(t, **overrides):
    args = tuple(overrides.pop(n) if n in overrides else getattr(t, n) for n in ("x", "weight", "bias"))
    return args, overrides


def cross_entropy(t, x=None, weight=None, targets=None, **kwargs):
    args = (
        t.x if x is None else x,
        t.vocab_weight if weight is None else weight,
        t.targets if targets is None else targets,
    )
    return args, kwargs


@dataclass
class Case:
    op: str
    name: str
    build: object  # standard_tensors(device) -> (args, kwargs)
    error: type
    argument: str  # regexes the message must match
    expected: str
    given: str


FLOAT_DTYPES = r"floating-point tensor \(float16, bfloat16, float32 or float64\)"
BACKEND_NAMES = r"one of \('auto', 'reference', 'triton', 'cpu', 'cuda'\)"
SCALE_RANGE = r"finite positive float in \[2\*\*-64, 2\*\*64\]"
CASES = [
    # causal_attention
    Case("causal_attention", "q-rank-3", lambda t: attention(t, q=t.q[0]), ValueError, r": q must", r"4 dimensions", r"got 3"),
    Case("causal_attention", "k-rank-5", lambda t: attention(t, k=t.k[None]), ValueError, r": k must", r"4 dimensions", r"got 5"),
    Case("causal_attention", "v-shape", lambda t: attention(t, v=t.v[..., :4]), ValueError, r": v must", r"shape \(2, 2, 5, 8\)", r"got \(2, 2, 5, 4\)"),
    Case("causal_attention", "k-batch", lambda t: attention(t, k=t.k[:1], v=t.v[:1]), ValueError, r": k must", r"batch=2", r"got \(1, 2, 5, 8\)"),
    Case("causal_attention", "k-head-dim", lambda t: attention(t, k=t.k[..., :6], v=t.v[..., :6]), ValueError, r": k must", r"head_dim=8", r"got \(2, 2, 5, 6\)"),
    Case("causal_attention", "q-len-over-kv-len", lambda t: attention(t, k=t.k[:, :, :3], v=t.v[:, :, :3]), ValueError, r"q_len", r"<= kv_len", r"q_len=5, kv_len=3"),
    Case("causal_attention", "heads-not-divisible", lambda t: attention(t, k=t.k.repeat(1, 2, 1, 1)[:, :3], v=t.v.repeat(1, 2, 1, 1)[:, :3]), ValueError, r"q's heads", r"multiple of k's kv_heads", r"heads=4, kv_heads=3"),
    Case("causal_attention", "mixed-dtype", lambda t: attention(t, k=t.k.half()), TypeError, r": k must", r"dtype of q \(torch.float32\)", r"got torch.float16"),
    Case("causal_attention", "mixed-device", lambda t: attention(t, v=t.v.to(t.other)), ValueError, r": v must", r"device of q \((cpu|cuda:\d)\)", r"got (meta|cuda|cpu)"),
    Case("causal_attention", "int-tensors", lambda t: attention(t, q=t.q.long(), k=t.k.long(), v=t.v.long()), TypeError, r": q must", FLOAT_DTYPES, r"got dtype torch.int64"),
    Case("causal_attention", "bool-tensor", lambda t: attention(t, k=t.k > 0), TypeError, r": k must", FLOAT_DTYPES, r"got dtype torch.bool"),
    Case("causal_attention", "python-list", lambda t: attention(t, q=t.q.tolist()), TypeError, r": q must", r"torch.Tensor", r"got list"),
    Case("causal_attention", "sparse-tensor", lambda t: attention(t, q=t.q.cpu().to_sparse()), TypeError, r": q must", r"dense tensor \(layout torch.strided\)", r"got layout torch.sparse_coo"),
    Case("causal_attention", "head-dim-0", lambda t: attention(t, q=t.q[..., :0], k=t.k[..., :0], v=t.v[..., :0]), ValueError, r"head_dim", r"at least 1", r"got 0"),
    Case("causal_attention", "softmax-scale-str", lambda t: attention(t, softmax_scale="0.5"), TypeError, r"softmax_scale", r"float or None", r"got str '0.5'"),
    Case("causal_attention", "softmax-scale-tensor", lambda t: attention(t, softmax_scale=torch.tensor(0.5)), TypeError, r"softmax_scale", r"float or None", r"got a torch.float32 tensor"),
    Case("causal_attention", "softmax-scale-negative", lambda t: attention(t, softmax_scale=-0.5), ValueError, r"softmax_scale", r"finite positive", r"got -0.5"),
    Case("causal_attention", "softmax-scale-nan", lambda t: attention(t, softmax_scale=float("nan")), ValueError, r"softmax_scale", r"finite positive", r"got nan"),
    Case("causal_attention", "softmax-scale-zero", lambda t: attention(t, softmax_scale=0.0), ValueError, r"softmax_scale", SCALE_RANGE, r"got 0.0"),
    Case("causal_attention", "softmax-scale-float32-zero", lambda t: attention(t, softmax_scale=1e-46), ValueError, r"softmax_scale", SCALE_RANGE, r"got 1e-46"),
    Case("causal_attention", "softmax-scale-huge", lambda t: attention(t, softmax_scale=1e30), ValueError, r"softmax_scale", SCALE_RANGE, r"got 1e\+30"),
    Case("causal_attention", "softmax-scale-int-huge", lambda t: attention(t, softmax_scale=10**400), ValueError, r"softmax_scale", SCALE_RANGE, r"got 1000"),
    # fused_ffn
    Case("fused_ffn", "activation-unknown", lambda t: ffn(t, activation="tanh"), ValueError, r"activation", r"one of \('gelu_tanh', 'gelu', 'relu', 'silu'\)", r"got 'tanh'"),
    Case("fused_ffn", "activation-none", lambda t: ffn(t, activation=None), ValueError, r"activation", r"one of \('gelu_tanh'", r"got None"),
    Case("fused_ffn", "x-rank-0", lambda t: ffn(t, x=t.x[0, 0, 0]), ValueError, r": x must", r"at least 1 dimension", r"got 0"),
    Case("fused_ffn", "x-no-channels", lambda t: ffn(t, x=t.x[..., :0]), ValueError, r"x's last dimension", r"at least 1", r"got 0 \(shape \(3, 5, 0\)\)"),
    Case("fused_ffn", "fc-weight-rank-3", lambda t: ffn(t, fc_weight=t.fc_weight[None]), ValueError, r"fc_weight must", r"2 dimensions", r"got 3"),
    Case("fused_ffn", "fc-weight-shape", lambda t: ffn(t, fc_weight=t.fc_weight[:, :7]), ValueError, r"fc_weight must", r"\(hidden, 8\)", r"got \(16, 7\)"),
    Case("fused_ffn", "proj-weight-shape", lambda t: ffn(t, proj_weight=t.proj_weight[:, :15]), ValueError, r"proj_weight must", r"\(out_features, 16\)", r"got \(8, 15\)"),
    Case("fused_ffn", "fc-bias-shape", lambda t: ffn(t, fc_bias=t.fc_bias[:15]), ValueError, r"fc_bias must", r"shape \(16,\)", r"got \(15,\)"),
    Case("fused_ffn", "proj-bias-dtype", lambda t: ffn(t, proj_bias=t.proj_bias.double()), TypeError, r"proj_bias must", r"dtype of x \(torch.float32\)", r"got torch.float64"),
    Case("fused_ffn", "int-weight", lambda t: ffn(t, fc_weight=t.fc_weight.long()), TypeError, r"fc_weight must", FLOAT_DTYPES, r"got dtype torch.int64"),
    Case("fused_ffn", "residual-shape", lambda t: ffn(t, residual=t.x[:, :4]), ValueError, r"residual must", r"shape \(3, 5, 8\)", r"got \(3, 4, 8\)"),
    Case("fused_ffn", "residual-device", lambda t: ffn(t, residual=t.x.to(t.other)), ValueError, r"residual must", r"device of x", r"got (meta|cuda|cpu)"),
    Case("fused_ffn", "python-list-weight", lambda t: ffn(t, proj_weight=t.proj_weight.tolist()), TypeError, r"proj_weight must", r"torch.Tensor", r"got list"),
    # layer_norm
    Case("layer_norm", "weight-shape", lambda t: norm(t, weight=t.weight[:7]), ValueError, r"weight must", r"shape \(8,\)", r"got \(7,\)"),
    Case("layer_norm", "bias-rank-2", lambda t: norm(t, bias=t.bias[None]), ValueError, r"bias must", r"1 dimensions", r"got 2"),
    Case("layer_norm", "weight-dtype", lambda t: norm(t, weight=t.weight.half()), TypeError, r"weight must", r"dtype of x \(torch.float32\)", r"got torch.float16"),
    Case("layer_norm", "weight-device", lambda t: norm(t, weight=t.weight.to(t.other)), ValueError, r"weight must", r"device of x", r"got (meta|cuda|cpu)"),
    Case("layer_norm", "bool-x", lambda t: norm(t, x=t.x > 0), TypeError, r": x must", FLOAT_DTYPES, r"got dtype torch.bool"),
    Case("layer_norm", "x-no-channels", lambda t: norm(t, x=t.x[..., :0], weight=None, bias=None), ValueError, r"x's last dimension", r"at least 1", r"got 0"),
    Case("layer_norm", "eps-negative", lambda t: norm(t, eps=-1e-5), ValueError, r"eps", r"finite float >= 0", r"got -1e-05"),
    Case("layer_norm", "eps-inf", lambda t: norm(t, eps=float("inf")), ValueError, r"eps", r"finite float >= 0", r"got inf"),
    Case("layer_norm", "eps-str", lambda t: norm(t, eps="1e-5"), TypeError, r"eps", r"must be a float", r"got str '1e-5'"),
    Case("layer_norm", "residual-dtype", lambda t: norm(t, residual=t.x.half()), TypeError, r"residual must", r"dtype of x \(torch.float32\)", r"got torch.float16"),
    Case("layer_norm", "residual-shape", lambda t: norm(t, residual=t.x[:1]), ValueError, r"residual must", r"shape \(3, 5, 8\)", r"got \(1, 5, 8\)"),
    # linear_cross_entropy
    Case("linear_cross_entropy", "target-too-large", lambda t: cross_entropy(t, targets=t.targets.index_fill(1, torch.tensor([2], device=t.targets.device), 11)), ValueError, r"targets must", r"in \[0, 11\) or equal ignore_index=-100", r"got 11 \(3 out-of-range"),
    Case("linear_cross_entropy", "target-negative", lambda t: cross_entropy(t, targets=-t.targets - 1), ValueError, r"targets must", r"in \[0, 11\)", r"got -\d+ \(15 out-of-range"),
    Case("linear_cross_entropy", "targets-int32", lambda t: cross_entropy(t, targets=t.targets.int()), TypeError, r"targets must", r"int64 \(torch.long\)", r"got dtype torch.int32"),
    Case("linear_cross_entropy", "targets-float", lambda t: cross_entropy(t, targets=t.targets.float()), TypeError, r"targets must", r"int64 \(torch.long\)", r"got dtype torch.float32"),
    Case("linear_cross_entropy", "targets-shape", lambda t: cross_entropy(t, targets=t.targets[:, :4]), ValueError, r"targets must", r"shape \(3, 5\)", r"got \(3, 4\)"),
    Case("linear_cross_entropy", "targets-device", lambda t: cross_entropy(t, targets=t.targets.to(t.other)), ValueError, r"targets must", r"device of x", r"got (meta|cuda|cpu)"),
    Case("linear_cross_entropy", "targets-list", lambda t: cross_entropy(t, targets=t.targets.tolist()), TypeError, r"targets must", r"torch.Tensor", r"got list"),
    Case("linear_cross_entropy", "weight-shape", lambda t: cross_entropy(t, weight=t.vocab_weight[:, :7]), ValueError, r"weight must", r"\(vocab, 8\)", r"got \(11, 7\)"),
    Case("linear_cross_entropy", "weight-dtype", lambda t: cross_entropy(t, weight=t.vocab_weight.double()), TypeError, r"weight must", r"dtype of x \(torch.float32\)", r"got torch.float64"),
    Case("linear_cross_entropy", "bias-shape", lambda t: cross_entropy(t, bias=t.vocab_bias[:10]), ValueError, r"bias must", r"shape \(11,\)", r"got \(10,\)"),
    Case("linear_cross_entropy", "vocab-0", lambda t: cross_entropy(t, weight=t.vocab_weight[:0], targets=torch.full_like(t.targets, -100)), ValueError, r"weight must", r"vocab >= 1", r"got shape \(0, 8\)"),
    Case("linear_cross_entropy", "reduction-unknown", lambda t: cross_entropy(t, reduction="avg"), ValueError, r"reduction", r"one of \('mean', 'sum', 'none'\)", r"got 'avg'"),
    Case("linear_cross_entropy", "ignore-index-float", lambda t: cross_entropy(t, ignore_index=-100.0), TypeError, r"ignore_index", r"must be an int", r"got float -100.0"),
    Case("linear_cross_entropy", "ignore-index-beyond-int64", lambda t: cross_entropy(t, ignore_index=2**64), ValueError, r"ignore_index", r"fit in int64", r"got 18446744073709551616"),
    # any op: the backend argument
    Case("causal_attention", "backend-unknown", lambda t: attention(t, backend="fast"), ValueError, r"backend", BACKEND_NAMES, r"got 'fast'"),
    Case("layer_norm", "backend-not-str", lambda t: norm(t, backend=None), TypeError, r"backend", r"must be a str", r"got NoneType"),
    Case("fused_ffn", "backend-wrong-device", lambda t: ffn(t, backend="cuda" if t.x.device.type == "cpu" else "cpu"), ValueError, r"backend '(cuda|cpu)'", r"does not run on", r"(cpu|cuda) tensors"),
    Case("linear_cross_entropy", "backend-unsupported-dtype", lambda t: cross_entropy(t, x=t.x.double(), weight=t.vocab_weight.double(), backend="cpu" if t.x.device.type == "cpu" else "cuda"), TypeError, r"backend '(cpu|cuda)'", r"supports dtypes \(", r"got torch.float64"),
]  # fmt: skip
# Cases that name a backend themselves run once; the others run on every backend.
FIXED_BACKEND = {"backend-unknown", "backend-not-str", "backend-wrong-device", "backend-unsupported-dtype"}


def op_params():
    for number, case in enumerate(CASES, start=1):
        backends = ["reference"] if case.name in FIXED_BACKEND else BACKENDS
        for backend in backends:
            yield pytest.param(case, backend, id=f"c{number:02d}-{case.op}-{case.name}-{backend}")


@pytest.mark.parametrize("case, backend", list(op_params()))
def test_op_rejects_bad_input(case, backend, no_kernels, monkeypatch):
    device = DEVICE[backend]
    monkeypatch.setenv("FASTGPT_DEBUG", "1")  # CUDA targets are range-checked only in debug mode
    args, kwargs = case.build(standard_tensors(device))
    kwargs.setdefault("backend", backend)
    assert_rejected(
        lambda: OPS[case.op](*args, **kwargs),
        no_kernels,
        case.error,
        case.op,
        case.argument,
        case.expected,
        case.given,
    )


# ----------------------------------------------------------------------------------------------
# The modules, GPT.forward, GPT.generate, GPTConfig and fastgpt.patch


def small_config(backend="auto", **overrides):
    fields = {"block_size": 16, "vocab_size": 11, "n_layer": 1, "n_head": 2, "n_embd": 8, "backend": backend}
    return GPTConfig(**{**fields, **overrides})


def on(device, module):
    return module.to(device)


def call(function, *args, **kwargs):
    """The call to make, with its module and inputs built now, before the operator recorder starts."""
    return lambda: function(*args, **kwargs)


def tokens(device, *shape, high=11):
    return torch.randint(0, high, shape, device=device)


MODULE_CASES = [
    # (entry, name, build(backend, device) -> the call, error, argument, expected, given)
    Case("LayerNorm", "x-channels", lambda b, d: call(on(d, LayerNorm(8, backend=b)), torch.randn(2, 6, device=d)), ValueError, r": x must", r"shape \(\.\.\., 8\)", r"shape \(2, 6\)"),
    Case("LayerNorm", "x-dtype", lambda b, d: call(on(d, LayerNorm(8, backend=b)), torch.randn(2, 8, device=d).double()), TypeError, r": x must", r"parameters \(torch.float32\)", r"got torch.float64"),
    Case("LayerNorm", "residual-channels", lambda b, d: call(on(d, LayerNorm(8, backend=b)), torch.randn(2, 8, device=d), residual=torch.randn(2, 7, device=d)), ValueError, r": residual must", r"shape \(\.\.\., 8\)", r"shape \(2, 7\)"),
    Case("LayerNorm", "eps-negative", lambda b, d: call(LayerNorm, 8, eps=-1.0, backend=b), ValueError, r"eps", r"finite float >= 0", r"got -1.0"),
    Case("CausalSelfAttention", "x-rank-2", lambda b, d: call(on(d, CausalSelfAttention(small_config(b))), torch.randn(5, 8, device=d)), ValueError, r": x must", r"\(batch, seq_len, 8\)", r"shape \(5, 8\)"),
    Case("CausalSelfAttention", "x-channels", lambda b, d: call(on(d, CausalSelfAttention(small_config(b))), torch.randn(1, 5, 6, device=d)), ValueError, r": x must", r"\(batch, seq_len, 8\)", r"shape \(1, 5, 6\)"),
    Case("CausalSelfAttention", "x-int", lambda b, d: call(on(d, CausalSelfAttention(small_config(b))), tokens(d, 1, 5, 8)), TypeError, r": x must", FLOAT_DTYPES, r"got dtype torch.int64"),
    Case("CausalSelfAttention", "x-device", lambda b, d: call(on(d, CausalSelfAttention(small_config(b))), torch.randn(1, 5, 8, device=other_device(d))), ValueError, r": x must", r"device of the module's parameters", r"got (meta|cuda|cpu)"),
    Case("MLP", "x-channels", lambda b, d: call(on(d, MLP(small_config(b))), torch.randn(1, 5, 6, device=d)), ValueError, r": x must", r"shape \(\.\.\., 8\)", r"shape \(1, 5, 6\)"),
    Case("MLP", "residual-shape", lambda b, d: call(on(d, MLP(small_config(b, dropout=0.1))), torch.randn(1, 5, 8, device=d), residual=torch.randn(1, 4, 8, device=d)), ValueError, r": residual must", r"shape \(1, 5, 8\)", r"got \(1, 4, 8\)"),
    Case("MLP", "x-dtype", lambda b, d: call(on(d, MLP(small_config(b))), torch.randn(1, 5, 8, device=d).half()), TypeError, r": x must", r"parameters \(torch.float32\)", r"got torch.float16"),
    Case("Block", "x-rank-2", lambda b, d: call(on(d, Block(small_config(b))), torch.randn(5, 8, device=d)), ValueError, r": x must", r"\(batch, seq_len, 8\)", r"shape \(5, 8\)"),
    Case("Block", "x-list", lambda b, d: call(on(d, Block(small_config(b))), [[0.0] * 8]), TypeError, r": x must", r"torch.Tensor", r"got list"),
    Case("GPT", "idx-float", lambda b, d: call(on(d, GPT(small_config(b))), torch.zeros(1, 4, device=d)), TypeError, r": idx must", r"int64 \(torch.long\) or int32", r"got dtype torch.float32"),
    Case("GPT", "idx-list", lambda b, d: call(on(d, GPT(small_config(b))), [[1, 2]]), TypeError, r": idx must", r"torch.Tensor", r"got list"),
    Case("GPT", "idx-rank-1", lambda b, d: call(on(d, GPT(small_config(b))), tokens(d, 5)), ValueError, r": idx must", r"\(batch, seq_len\)", r"got \(5,\)"),
    Case("GPT", "idx-token-out-of-range", lambda b, d: call(on(d, GPT(small_config(b))), tokens(d, 2, 4).index_fill(1, torch.tensor([1], device=d), 11)), ValueError, r": idx must", r"in \[0, 11\)", r"got 11 \(2 out-of-range"),
    Case("GPT", "idx-negative", lambda b, d: call(on(d, GPT(small_config(b))), -1 - tokens(d, 1, 3)), ValueError, r": idx must", r"in \[0, 11\)", r"got -\d+"),
    Case("GPT", "idx-device", lambda b, d: call(on(d, GPT(small_config(b))), tokens(d, 1, 4).to(other_device(d))), ValueError, r": idx must", r"model's device", r"got (meta|cuda|cpu)"),
    Case("GPT", "idx-longer-than-block", lambda b, d: call(on(d, GPT(small_config(b))), tokens(d, 1, 17)), ValueError, r"sequence length", r"<= block_size=16", r"got 17"),
    Case("GPT", "targets-shape", lambda b, d: call(on(d, GPT(small_config(b))), tokens(d, 2, 4), tokens(d, 2, 3)), ValueError, r": targets must", r"shape \(2, 4\)", r"got \(2, 3\)"),
    Case("GPT", "targets-int32", lambda b, d: call(on(d, GPT(small_config(b))), tokens(d, 2, 4), tokens(d, 2, 4).int()), TypeError, r": targets must", r"int64", r"got dtype torch.int32"),
    Case("GPT", "targets-out-of-range", lambda b, d: call(on(d, GPT(small_config(b))), tokens(d, 2, 4), tokens(d, 2, 4) + 11), ValueError, r": targets must", r"in \[0, 11\) or equal ignore_index=-100", r"got 1\d \(8 out-of-range"),
    Case("GPT.generate", "idx-token-out-of-range", lambda b, d: call(on(d, GPT(small_config(b))).generate, tokens(d, 1, 3) + 11, 2), ValueError, r": idx must", r"in \[0, 11\)", r"got 1\d"),
    Case("GPT.generate", "idx-device", lambda b, d: call(on(d, GPT(small_config(b))).generate, tokens(d, 1, 3).to(other_device(d)), 2), ValueError, r": idx must", r"model's device", r"got (meta|cuda|cpu)"),
    Case("GPT.generate", "idx-list-of-lists", lambda b, d: call(on(d, GPT(small_config(b))).generate, [[1, 2]], 2), TypeError, r": idx\[0\] must", r"1-D int64 tensor", r"got list"),
    Case("GPT.generate", "idx-dict", lambda b, d: call(on(d, GPT(small_config(b))).generate, {"ids": [1, 2]}, 2), TypeError, r": idx must", r"torch.Tensor", r"got dict"),
    Case("GPT.generate", "too-many-tokens-for-a-list", lambda b, d: call(on(d, GPT(small_config(b))).generate, [tokens(d, 1, 10)[0], tokens(d, 1, 3)[0]], 7), ValueError, r"prompt_len \+ max_new_tokens", r"<= block_size", r"got 10 \+ 7 = 17 > 16"),
    Case("GPT.generate", "temperature-nan", lambda b, d: call(on(d, GPT(small_config(b))).generate, tokens(d, 1, 3), 2, temperature=float("nan")), ValueError, r"temperature", r"float >= 0 and finite", r"got nan"),
    Case("GPT.generate", "top-p-zero", lambda b, d: call(on(d, GPT(small_config(b))).generate, tokens(d, 1, 3), 2, top_p=0.0), ValueError, r"top_p", r"float in \(0, 1\]", r"got 0.0"),
    Case("GPT.generate", "callback-not-callable", lambda b, d: call(on(d, GPT(small_config(b))).generate, tokens(d, 1, 3), 2, callback="print"), TypeError, r"callback", r"callable", r"got 'print'"),
    Case("GPT.set_backend", "backend-unknown", lambda b, d: call(GPT(small_config(b)).set_backend, "gpu"), ValueError, r"backend", BACKEND_NAMES, r"got 'gpu'"),
]  # fmt: skip

CONFIG_CASES = [
    # (fields, error, argument, expected, given)
    Case("GPTConfig", "n-embd-not-divisible", {"n_embd": 10, "n_head": 4}, ValueError, r"n_embd", r"divisible by n_head", r"n_embd=10, n_head=4"),
    Case("GPTConfig", "heads-not-divisible", {"n_embd": 12, "n_head": 6, "n_kv_head": 4}, ValueError, r"n_head", r"multiple of n_kv_head", r"n_head=6, n_kv_head=4"),
    Case("GPTConfig", "activation-unknown", {"activation": "gelu_new"}, ValueError, r"activation", r"one of \('gelu_tanh'", r"got 'gelu_new'"),
    Case("GPTConfig", "backend-unknown", {"backend": "gpu"}, ValueError, r"backend", BACKEND_NAMES, r"got 'gpu'"),
    Case("GPTConfig", "dropout-str", {"dropout": "0.1"}, TypeError, r"dropout", r"float in \[0, 1\)", r"got '0.1'"),
    Case("GPTConfig", "layer-norm-eps-nan", {"layer_norm_eps": float("nan")}, ValueError, r"layer_norm_eps", r"finite float >= 0", r"got nan"),
    Case("GPTConfig", "bias-not-bool", {"bias": "yes"}, TypeError, r"bias", r"must be a bool", r"got 'yes'"),
]  # fmt: skip

PATCH_CASES = [
    # (arguments given the HF model, error, argument, expected, given)
    Case("fastgpt.patch", "model-not-gpt2", lambda hf: ((torch.nn.Linear(2, 2),), {}), TypeError, r"model must", r"GPT2PreTrainedModel", r"got Linear"),
    Case("fastgpt.patch", "backend-unknown", lambda hf: ((hf,), {"backend": "gpu"}), ValueError, r"backend", BACKEND_NAMES, r"got 'gpu'"),
    Case("fastgpt.patch", "backend-none", lambda hf: ((hf,), {"backend": None}), ValueError, r"backend", BACKEND_NAMES, r"got None"),
    Case("fastgpt.patch", "flag-not-bool", lambda hf: ((hf,), {"mlp": "no"}), TypeError, r"mlp", r"must be a bool", r"got 'no'"),
]  # fmt: skip


def numbered(cases, start, backends):
    for number, case in enumerate(cases, start=start):
        for backend in backends:
            suffix = f"-{backend}" if backend else ""
            yield pytest.param(case, backend, id=f"c{number:02d}-{case.op}-{case.name}{suffix}")


FIRST_MODULE_CASE = len(CASES) + 1
FIRST_CONFIG_CASE = FIRST_MODULE_CASE + len(MODULE_CASES)
FIRST_PATCH_CASE = FIRST_CONFIG_CASE + len(CONFIG_CASES)


@pytest.mark.parametrize("case, backend", list(numbered(MODULE_CASES, FIRST_MODULE_CASE, BACKENDS)))
def test_module_rejects_bad_input(case, backend, no_kernels):
    call = case.build(backend, DEVICE[backend])
    assert_rejected(call, no_kernels, case.error, case.op, case.argument, case.expected, case.given)


@pytest.mark.parametrize("case, _", list(numbered(CONFIG_CASES, FIRST_CONFIG_CASE, [None])))
def test_config_rejects_bad_fields(case, _, no_kernels):
    fields = {"block_size": 16, "vocab_size": 11, "n_layer": 1, "n_head": 2, "n_embd": 8} | case.build
    assert_rejected(
        lambda: GPTConfig(**fields), no_kernels, case.error, case.op, case.argument, case.expected, case.given
    )


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=11, n_positions=16, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("case, backend", list(numbered(PATCH_CASES, FIRST_PATCH_CASE, [None])))
def test_patch_rejects_bad_arguments_and_changes_nothing(case, backend, hf_model, no_kernels):
    args, kwargs = case.build(hf_model)
    assert_rejected(
        lambda: fastgpt.patch(*args, **kwargs),
        no_kernels,
        case.error,
        case.op,
        case.argument,
        case.expected,
        case.given,
    )
    assert hf_model.config._attn_implementation != "fastgpt"
    for module in hf_model.modules():
        assert "forward" not in vars(module) and not hasattr(module, "fastgpt_backend"), type(module).__name__


# ----------------------------------------------------------------------------------------------
# The raw operators: torch.ops.fastgpt.* can be called directly, past fastgpt.functional's checks, so
# each checks its own arguments before any kernel. The C++ ones (csrc/api.cpp, on every device) raise
# ValueError for the checks below; the Triton ones (torch.ops.fastgpt.triton_*) run dispatch's validators.

INF, NAN = float("inf"), float("nan")
SCALES_OUTSIDE = (
    math.nextafter(dispatch.SOFTMAX_SCALE_MIN, 0.0),
    math.nextafter(dispatch.SOFTMAX_SCALE_MAX, INF),
    1e-46,  # rounds to 0 in float32: the Gluon kernels returned NaN for it
    0.0,
    -0.125,
    INF,
    NAN,
)


def softmax_scale_entry_points():
    """(name, f(q, k, v, softmax_scale) -> out) for every entry point that takes a softmax scale here."""
    entries = [("causal_attention", lambda q, k, v, s: fastgpt.causal_attention(q, k, v, softmax_scale=s))]
    if "cpu" in BACKENDS:
        entries.append(
            (
                "fastgpt::attention_forward",
                lambda q, k, v, s: torch.ops.fastgpt.attention_forward(q, k, v, s)[0],
            )
        )
    if "triton" in BACKENDS:
        from fastgpt.ops import triton_attention, triton_decode

        entries.append(
            (
                "fastgpt::triton_attention_forward",
                lambda q, k, v, s: triton_attention.attention_forward_op(q, k, v, s)[0],
            )
        )
        entries.append(
            (
                "fastgpt::triton_decode_attention",
                lambda q, k, v, s: triton_decode.decode_attention_op(q[:, :, -1:], k, v, s),
            )
        )
    return [pytest.param(name, attend, id=name) for name, attend in entries]  # fmt: skip


@pytest.mark.parametrize("name, attend", softmax_scale_entry_points())
def test_every_entry_point_takes_the_same_softmax_scales(name, attend):
    """dispatch.SOFTMAX_SCALE_MIN and _MAX, the bounds csrc/api.cpp repeats, agree: each entry point takes
    both bounds and refuses the next float beyond each, zero, negatives, inf and NaN with a ValueError
    naming softmax_scale. At each bound, q and k scaled by 2**+-32 (exact) make the scores those of
    softmax_scale 1: the same output shows float32 holds the kernels' constants there."""
    device = (
        "cpu"
        if name.startswith("fastgpt::attention")
        else DEVICE["triton" if "triton" in name else "reference"]
    )
    q, k, v = (torch.randn(1, 2, 3, 8, device=device) for _ in range(3))
    expected = attend(q, k, v, 1.0)
    for scale, factor in ((dispatch.SOFTMAX_SCALE_MIN, 2.0**32), (dispatch.SOFTMAX_SCALE_MAX, 2.0**-32)):
        actual = attend(q * factor, k * factor, v, scale)
        torch.testing.assert_close(
            actual, expected, rtol=1e-5, atol=1e-6, msg=f"{name} at softmax_scale={scale}"
        )
    for scale in SCALES_OUTSIDE:
        with pytest.raises(
            ValueError,
            match=rf"^{name}: softmax_scale must be a finite positive float in \[2\*\*-64, 2\*\*64\], got",
        ):
            attend(q, q, q, scale)


def softmax_scale_backward_entry_points():
    """(name, f(dout, q, k, v, softmax_scale) -> (dq, dk, dv)) for the backward operators here."""
    entries = []
    if "cpu" in BACKENDS:
        ops = torch.ops.fastgpt

        def cpu_backward(dout, q, k, v, scale):
            out, lse = ops.attention_forward(q, k, v, scale)
            return ops.attention_backward(dout, q, k, v, out, lse, scale)

        entries.append(("fastgpt::attention_backward", cpu_backward))
    if "triton" in BACKENDS:
        from fastgpt.ops import triton_attention

        def triton_backward(dout, q, k, v, scale):
            out, lse = triton_attention.attention_forward_op(q, k, v, scale)
            return triton_attention.attention_backward_op(dout, q, k, v, out, lse, scale, "tl")

        entries.append(("fastgpt::triton_attention_backward", triton_backward))
    return [pytest.param(name, backward, id=name) for name, backward in entries]


@pytest.mark.parametrize("name, backward", softmax_scale_backward_entry_points())
def test_the_backward_operators_hold_at_the_softmax_scale_bounds(name, backward):
    """The gradients at each bound, with q and k scaled by 2**+-32 so that the scores are softmax_scale
    1's, are softmax_scale 1's rescaled (dq and dk by 2**-+32, dv unchanged): the float32 backward
    (lse / softmax_scale among its terms) stays finite and exact there."""
    device = "cpu" if name == "fastgpt::attention_backward" else DEVICE["triton"]
    dout, q, k, v = (torch.randn(1, 2, 3, 8, device=device) for _ in range(4))
    dq, dk, dv = backward(dout, q, k, v, 1.0)
    for scale, factor in ((dispatch.SOFTMAX_SCALE_MIN, 2.0**32), (dispatch.SOFTMAX_SCALE_MAX, 2.0**-32)):
        dq_at, dk_at, dv_at = backward(dout, q * factor, k * factor, v, scale)
        for grad, actual, expected in (
            ("dq", dq_at * factor, dq),
            ("dk", dk_at * factor, dk),
            ("dv", dv_at, dv),
        ):
            torch.testing.assert_close(
                actual, expected, rtol=1e-5, atol=1e-6, msg=f"{name} {grad} at {scale}"
            )


def decode_blocks_arguments():
    """Valid arguments of torch.ops.fastgpt.decode_blocks: one block, n_embd 8, 2 heads, a 4-slot cache."""
    x = torch.randn(1, 1, 8)
    shapes = [(8,), (8,), (24, 8), (24,), (8, 8), (8,), (8,), (8,), (16, 8), (16,), (8, 16), (8,)]
    params = [torch.randn(shape) for shape in shapes]
    keys, values = [torch.zeros(1, 2, 4, 4)], [torch.zeros(1, 2, 4, 4)]
    return x, params, keys, values


def raw_cpu_cases():
    q = torch.randn(1, 2, 3, 8)
    out, lse = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3)
    x = torch.randn(2, 8)
    targets, no_classes = torch.tensor([0, 1]), torch.randn(0, 8)
    ops = torch.ops.fastgpt
    return [
        ("attention-backward-scale-zero", lambda: ops.attention_backward(out, q, q, q, out, lse, 0.0), r"^fastgpt::attention_backward: softmax_scale must be a finite positive float in \[2\*\*-64, 2\*\*64\], got 0"),
        ("attention-head-dim-0", lambda: ops.attention_forward(q[..., :0], q[..., :0], q[..., :0], 1.0), r"^fastgpt::attention_forward: head_dim \(q.shape\[3\]\) must be at least 1, got 0"),
        ("layer-norm-eps-negative", lambda: ops.layer_norm_forward(x, None, None, None, -1e-5), r"^fastgpt::layer_norm_forward: eps must be a finite float >= 0, got -1e-05"),
        ("layer-norm-eps-nan", lambda: ops.layer_norm_forward(x, None, None, None, NAN), r"^fastgpt::layer_norm_forward: eps must be a finite float >= 0, got nan"),
        # No class at all: the chunking loop doubled its row count forever (a hang) before this check.
        ("cross-entropy-vocab-0", lambda: ops.linear_cross_entropy_forward(x, no_classes, targets, None, -100, "sum", True), r"^fastgpt::linear_cross_entropy_forward: weight must have at least one row \(vocab >= 1\), got shape \[0, 8\]"),
        ("cross-entropy-backward-vocab-0", lambda: ops.linear_cross_entropy_backward(x, no_classes, targets, None, torch.ones(2), -100), r"^fastgpt::linear_cross_entropy_backward: weight must have at least one row"),
    ]  # fmt: skip


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the compiled extension fastgpt._C is missing")
@pytest.mark.parametrize("name, call, message", [pytest.param(*case, id=case[0]) for case in raw_cpu_cases()])
def test_cpu_operator_rejects_bad_scalars(name, call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the compiled extension fastgpt._C is missing")
@pytest.mark.parametrize(
    "override, message",
    [
        (
            {"softmax_scale": 0.0},
            r"softmax_scale must be a finite positive float in \[2\*\*-64, 2\*\*64\], got 0",
        ),
        ({"eps": -1.0}, r"eps must be a finite float >= 0, got -1"),
        ({"activation": "tanh"}, r"activation must be one of gelu_tanh, gelu, relu, silu, got 'tanh'"),
    ],
    ids=["softmax-scale", "eps", "activation"],
)
def test_decode_blocks_checks_its_scalars_before_writing_a_cache(override, message):
    """decode_blocks writes layer 0's cache before its attention runs: a bad scalar must be refused
    before that, not by the op that would read it afterwards."""
    x, params, keys, values = decode_blocks_arguments()
    arguments = {
        "start": 0,
        "heads": 2,
        "eps": 1e-5,
        "softmax_scale": 0.5,
        "activation": "gelu_tanh",
    } | override
    with pytest.raises((ValueError, RuntimeError), match=f"^fastgpt::decode_blocks: {message}"):
        torch.ops.fastgpt.decode_blocks(x, params, keys, values, *arguments.values())
    assert not keys[0].any() and not values[0].any(), "a cache was written before the error"


def raw_triton_cases(device):
    """(name, call, error, message) for the Triton operators, each breaking one argument."""
    from fastgpt.ops import (
        triton_attention,
        triton_cross_entropy,
        triton_decode,
        triton_ffn,
        triton_layernorm,
    )

    t = standard_tensors(device)
    out, lse = torch.randn_like(t.q), torch.randn(2, 4, 5, device=device)
    h = torch.randn(3, 5, 16, device=device)
    mean, rstd = torch.zeros(15, device=device), torch.ones(15, device=device)
    kv_len = torch.tensor([3], device=device)
    attention_backward, decode = triton_attention.attention_backward_op, triton_decode.decode_attention_op
    ffn_forward, ffn_backward = triton_ffn._fused_ffn_op, triton_ffn._fused_ffn_backward_op
    norm_forward, norm_backward = triton_layernorm._layer_norm_op, triton_layernorm._layer_norm_backward_op
    ce_forward, ce_backward = (
        triton_cross_entropy._linear_cross_entropy_op,
        triton_cross_entropy._linear_cross_entropy_backward_op,
    )
    return [
        ("attention-k-head-dim", lambda: triton_attention.attention_forward_op(t.q, t.k[..., :6], t.v[..., :6], 0.3), ValueError, r"^fastgpt::triton_attention_forward: k must have shape \(batch=2, kv_heads, kv_len, head_dim=8\)"),
        ("attention-backward-lse-shape", lambda: attention_backward(out, t.q, t.k, t.v, out, lse[:, :, :4], 0.3, "tl"), ValueError, r"^fastgpt::triton_attention_backward: lse must have shape \(2, 4, 5\), got \(2, 4, 4\)"),
        ("attention-backward-lse-dtype", lambda: attention_backward(out, t.q, t.k, t.v, out, lse.half(), 0.3, "tl"), TypeError, r"^fastgpt::triton_attention_backward: lse must have dtype torch.float32, got torch.float16"),
        ("attention-backward-dout-shape", lambda: attention_backward(out[:, :2], t.q, t.k, t.v, out, lse, 0.3, "tl"), ValueError, r"^fastgpt::triton_attention_backward: dout must have shape \(2, 4, 5, 8\), got \(2, 2, 5, 8\)"),
        ("attention-backward-scale", lambda: attention_backward(out, t.q, t.k, t.v, out, lse, 1e-46, "tl"), ValueError, r"^fastgpt::triton_attention_backward: softmax_scale must be a finite positive float"),
        ("attention-backward-kernels", lambda: attention_backward(out, t.q, t.k, t.v, out, lse, 0.3, "cuda"), ValueError, r"^fastgpt::triton_attention_backward: kernels must be one of \('tl', 'gluon'\), got 'cuda'"),
        ("attention-float64", lambda: triton_attention.attention_forward_op(t.q.double(), t.k.double(), t.v.double(), 0.3), TypeError, r"^fastgpt::triton_attention_forward: q must have one of the dtypes \(float16, .*float32\), got torch.float64"),
        ("layer-norm-float64", lambda: norm_forward(t.x.double(), None, None, 1e-5, None), TypeError, r"^fastgpt::triton_layer_norm: x must have one of the dtypes \(.*\), got torch.float64"),
        ("decode-two-queries", lambda: decode(t.q[:, :, :2], t.k, t.v, 0.3), ValueError, r"^fastgpt::triton_decode_attention: q must have shape \(batch, heads, 1, head_dim\), got \(2, 4, 2, 8\)"),
        ("decode-with-length-kv-len-float", lambda: triton_decode.decode_attention_with_length_op(t.q[:, :, :1], t.k, t.v, kv_len.float(), 0.3), TypeError, r"^fastgpt::triton_decode_attention_with_length: kv_len must be an int32/int64 torch.Tensor, got a torch.float32 tensor"),
        ("decode-with-length-scale", lambda: triton_decode.decode_attention_with_length_op(t.q[:, :, :1], t.k, t.v, kv_len, 0.0), ValueError, r"^fastgpt::triton_decode_attention_with_length: softmax_scale must be a finite positive float"),
        ("ffn-fc-weight-shape", lambda: ffn_forward(t.x, t.fc_weight[:, :7], None, t.proj_weight, None, "relu", None, False), ValueError, r"^fastgpt::triton_fused_ffn: fc_weight must have shape \(hidden, 8\)"),
        ("ffn-backward-h-shape", lambda: ffn_backward(t.x, t.x, h[..., :15], t.fc_weight, t.proj_weight, "relu", True, True), ValueError, r"^fastgpt::triton_fused_ffn_backward: h must have shape \(3, 5, 16\), got \(3, 5, 15\)"),
        ("ffn-backward-dy-dtype", lambda: ffn_backward(t.x.half(), t.x, h, t.fc_weight, t.proj_weight, "relu", True, True), TypeError, r"^fastgpt::triton_fused_ffn_backward: dy must have dtype torch.float32, got torch.float16"),
        ("layer-norm-eps-negative", lambda: norm_forward(t.x, t.weight, t.bias, -1e-5, None), ValueError, r"^fastgpt::triton_layer_norm: eps must be a finite float >= 0, got -1e-05"),
        ("layer-norm-backward-mean-shape", lambda: norm_backward(t.x, t.x, t.weight, mean[:14], rstd, None, True, True), ValueError, r"^fastgpt::triton_layer_norm_backward: mean must have shape \(15,\), got \(14,\)"),
        ("layer-norm-backward-rstd-dtype", lambda: norm_backward(t.x, t.x, t.weight, mean, rstd.half(), None, True, True), TypeError, r"^fastgpt::triton_layer_norm_backward: rstd must have dtype torch.float32"),
        ("layer-norm-backward-dsum-shape", lambda: norm_backward(t.x, t.x, t.weight, mean, rstd, t.x[:1], True, True), ValueError, r"^fastgpt::triton_layer_norm_backward: dsum must have shape \(3, 5, 8\), got \(1, 5, 8\)"),
        ("cross-entropy-targets-shape", lambda: ce_forward(t.x, t.vocab_weight, t.targets[:, :4], None, -100, "mean", False), ValueError, r"^fastgpt::triton_linear_cross_entropy: targets must have shape \(3, 5\), got \(3, 4\)"),
        ("cross-entropy-backward-grad-loss-shape", lambda: ce_backward(lse[0, 0], t.x, t.vocab_weight, t.targets, None, lse.reshape(-1)[:14], -100), ValueError, r"^fastgpt::triton_linear_cross_entropy_backward: grad_loss must have shape \(3, 5\)"),
        ("cross-entropy-backward-lse", lambda: ce_backward(torch.ones(3, 5, device=device), t.x, t.vocab_weight, t.targets, None, lse.reshape(-1)[:14], -100), ValueError, r"^fastgpt::triton_linear_cross_entropy_backward: lse must have shape \(15,\), got \(14,\)"),
    ]  # fmt: skip


RAW_TRITON_CASE_NAMES = [
    "attention-k-head-dim", "attention-backward-lse-shape", "attention-backward-lse-dtype",
    "attention-backward-dout-shape", "attention-backward-scale", "attention-backward-kernels",
    "attention-float64", "layer-norm-float64",
    "decode-two-queries", "decode-with-length-kv-len-float", "decode-with-length-scale",
    "ffn-fc-weight-shape", "ffn-backward-h-shape", "ffn-backward-dy-dtype", "layer-norm-eps-negative",
    "layer-norm-backward-mean-shape", "layer-norm-backward-rstd-dtype", "layer-norm-backward-dsum-shape",
    "cross-entropy-targets-shape", "cross-entropy-backward-grad-loss-shape", "cross-entropy-backward-lse",
]  # fmt: skip


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton does not run here")
@pytest.mark.parametrize("name", RAW_TRITON_CASE_NAMES)
def test_triton_operator_rejects_bad_input(name, monkeypatch):
    """torch.ops.fastgpt.triton_* called directly: the error names the operator and the argument,
    and comes before any Triton launch (a tripwire)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    cases = {case[0]: case[1:] for case in raw_triton_cases(DEVICE["triton"])}
    assert list(cases) == RAW_TRITON_CASE_NAMES
    call, error, message = cases[name]
    monkeypatch.setattr(InterpretedFunction, "run", _tripwire("a Triton kernel (interpreter)"))
    monkeypatch.setattr(JITFunction, "run", _tripwire("a Triton kernel"))
    with pytest.raises((TypeError, ValueError)) as caught:
        call()
    assert caught.type is error, f"{caught.type.__name__} instead of {error.__name__}: {caught.value}"
    assert re.search(message, str(caught.value)), str(caught.value)


def test_case_count():
    """The issue asks for at least 30 distinct bad-input cases; each runs on every backend it concerns."""
    assert len(CASES) + len(MODULE_CASES) + len(CONFIG_CASES) + len(PATCH_CASES) >= 30


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_tripwires_fire_on_valid_input(backend, no_kernels):
    """The harness itself: a valid call does reach a tripwire, so a case passing above means its
    error came first."""
    t = standard_tensors(DEVICE[backend])
    with pytest.raises(AssertionError, match=f"the {backend} backend's causal_attention ran"), no_kernels:
        fastgpt.causal_attention(t.q, t.k, t.v, backend=backend)
    if backend == "cpu":  # and fastgpt's C++ operators are seen by the recorder
        with no_kernels:
            torch.ops.fastgpt.layer_norm_forward(t.x.reshape(-1, 8), None, None, None, 1e-5)
        assert "fastgpt.layer_norm_forward.default" in no_kernels.operators
