"""THE routing table, and the validation of every op's arguments.

Every public op (fastgpt/functional.py) makes two calls here before any kernel runs:
1. `validate_*` checks types, ranks, shapes, dtypes and devices, and raises TypeError/ValueError whose
   message names the argument, what was expected and what was given. It runs once per public call,
   and not at all while torch.compile traces or a CUDA graph captures (`skip_validation`). The C++
   operators repeat the shape checks, and the Triton operators (torch.ops.fastgpt.triton_*) run these
   validators again in their bodies (their fast paths: a few attribute reads), so a bad call fails
   before a kernel reads memory even then, and when an operator is called directly;
2. `resolve` returns the function that serves the call: the op of the chosen backend, or a variant of
   it (the split-KV decode kernel for one query that needs no gradient; the weight-streaming linear for
   at most 16 rows). The choice depends on the op, the `backend` argument (`auto`, or a name), the
   device, the dtype and a few facts of the call's shapes, and is made once per combination.

`auto` walks an order of backends per op, per device kind and GPU architecture (AUTO_ORDER below, each
order with the results file it comes from) and takes the first that runs the call; FASTGPT_BACKEND
overrides it. No other module chooses an implementation: fastgpt.nn and the transformers integration
call the public ops only. Backends are imported lazily, so a missing compiler, Triton or GPU never
breaks `import fastgpt`.
"""

import functools
import importlib
import math
import os
import warnings

import torch

from fastgpt.activations import ACTIVATIONS

BACKENDS = ("reference", "triton", "cpu", "cuda")
OPS = ("causal_attention", "fused_ffn", "layer_norm", "linear_cross_entropy", "linear")
REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# The module holding each backend's implementation of each op: a function of the op's name taking the
# op's arguments positionally, in fastgpt.functional's order.
IMPLEMENTATIONS = {
    "reference": {op: "fastgpt.reference" for op in OPS},
    "triton": {
        "causal_attention": "fastgpt.ops.triton_attention",
        "fused_ffn": "fastgpt.ops.triton_ffn",
        "layer_norm": "fastgpt.ops.triton_layernorm",
        "linear_cross_entropy": "fastgpt.ops.triton_cross_entropy",
    },
    "cpu": {op: "fastgpt.ops.compiled" for op in OPS},
    "cuda": {
        op: "fastgpt.ops.compiled"
        for op in ("causal_attention", "fused_ffn", "layer_norm", "linear_cross_entropy")
    },
}
# Decode kernels: causal_attention with one query that needs no gradient, by backend (module, function).
# The Triton one splits a long cache over the whole GPU instead of one program per head; the cpu and
# cuda kernels handle q_len == 1 themselves.
DECODE_KERNELS = {"triton": ("fastgpt.ops.triton_decode", "decode_attention_op")}
# Decode over a preallocated cache whose valid length (one, or one per sequence) is a tensor
# (GPT.generate's static step), by backend (module, function). Triton's kernel reads the lengths on the
# device, and `auto` takes it wherever Triton runs the call; the cpu kernel reads them on the host (CPU
# tensors). The cuda backend, and `auto` without Triton on CUDA, run the reference's masked attention over
# the whole cache (device ops only, so it can be captured too).
DEVICE_LENGTH_DECODE_KERNELS = {
    "triton": ("fastgpt.ops.triton_decode", "decode_attention_with_length_op"),
    "cpu": ("fastgpt.ops.compiled", "decode_attention_with_length"),
    "reference": ("fastgpt.reference", "decode_attention_with_length"),
}

# Causal attention over at most this many keys is "short" in the routing facts: the order of the CUDA
# backends flips there on the H200 (AUTO_ORDER).
SHORT_SEQUENCE = 512
# CUDA's limit on a grid's y and z dimensions, where the cuda backend's attention kernels run heads and
# the batch (csrc/cuda/api_cuda.inc's kMaxGridYZ): a call with more is a "wide_grid" in the routing
# facts, which those kernels decline and Triton's one-dimensional grids take.
MAX_GRID_YZ = 65535
# The most rows `linear` sends to the cpu backend's weight-streaming kernel (csrc/cpu/kernels.h's
# kSkinnyGemmMaxRows, which fastgpt._C exports as LINEAR_KERNEL_MAX_ROWS; a test checks they agree):
# 1.25-3.9x BLAS at 1-16 rows of GPT-2 projections, no faster beyond (benchmarks/cpu_linear.py).
LINEAR_KERNEL_MAX_ROWS = 16
# The FFN hidden width up to which the cuda backend leads on the H200 (AUTO_ORDER).
CUDA_FFN_MAX_HIDDEN = 3072


def kv_len_class(kv_len):
    """kv_len as the routing facts see it: SHORT_SEQUENCE for a short sequence, one more for a long one,
    so a decode loop's growing cache makes two choices, not one per length."""
    return SHORT_SEQUENCE if kv_len <= SHORT_SEQUENCE else SHORT_SEQUENCE + 1


def attention_facts(batch, heads, head_dim, kv_len):
    """The routing facts of a causal_attention call: head_dim, kv_len_class(kv_len) and wide_grid,
    whether the batch or head count exceeds MAX_GRID_YZ. wide_grid is a plain bool: under
    torch.compile with dynamic shapes, bool() makes the comparison a guard, so the facts stay
    constants."""
    wide_grid = bool(batch > MAX_GRID_YZ or heads > MAX_GRID_YZ)
    return (("head_dim", head_dim), ("kv_len", kv_len_class(kv_len)), ("wide_grid", wide_grid))


class SizeSplit:
    """An auto order that depends on one fact of the call: `small` where facts[fact] <= limit (or is
    True, for a boolean fact), `large` otherwise, and where the fact is unknown."""

    def __init__(self, fact, limit, small, large):
        self.fact, self.limit, self.small, self.large = fact, limit, small, large

    def order(self, facts):
        value = facts.get(self.fact)
        return self.small if value is not None and value <= self.limit else self.large


# `auto`'s order of backends per op: the first that runs the call serves it.
CPU_ORDER = {op: ("cpu", "reference") for op in OPS}
# CUDA GPUs, from the H200 (sm_90) run benchmarks/results/2026-11-30-h200.json, bf16, median ms of
# forward+backward (fastgpt:cuda vs fastgpt:triton). No other architecture has been measured: they use
# the same order until one is (the cuda kernels are an sm_80 design, so that is where they stand best).
CUDA_ORDER = {
    # seq 512: 0.83 vs 1.26 (d64), 0.85 vs 1.17 (d128); seq 1024-16k Triton leads: 1.36 vs 1.17 at 1k,
    # 9.06 vs 6.08 at 8k (d64), 18.39 vs 12.37 at 16k (d128).
    "causal_attention": SizeSplit(
        "kv_len", SHORT_SEQUENCE, ("cuda", "triton", "reference"), ("triton", "cuda", "reference")
    ),
    # 8192x768x3072: 1.29 vs 1.83; 8192x1600x6400: 4.29 vs 3.08.
    "fused_ffn": SizeSplit(
        "hidden", CUDA_FFN_MAX_HIDDEN, ("cuda", "triton", "reference"), ("triton", "cuda", "reference")
    ),
    # 16384 rows of 768-4096 columns, with and without a residual: 0.47-0.54 vs 0.98-1.14.
    "layer_norm": ("cuda", "triton", "reference"),
    # Triton measured: 10.7 ms against F.cross_entropy's 17.2 (8192 x 768, V=50257). The cuda backend
    # (cuBLAS GEMMs around a one-read row kernel) is not measured yet: it comes second until it is.
    "linear_cross_entropy": ("triton", "cuda", "reference"),
    # No kernel backend has a CUDA linear: F.linear (cuBLAS).
    "linear": ("reference",),
}
AUTO_ORDER = {"cpu": CPU_ORDER, "cuda": CUDA_ORDER}


# ----------------------------------------------------------------------------------------------
# Backend availability


def triton_interpreter_enabled():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def env_switch(name):
    """An on/off environment variable: True for "1", False for "0", empty or unset. Any other value
    raises ValueError naming the variable, rather than leaving the switch silently off ("true", "on")."""
    value = os.environ.get(name, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"the environment variable {name} must be '1' (on) or '0' (off), got {value!r}")
    return value == "1"


def debug_checks_enabled():
    """FASTGPT_DEBUG=1 turns on value checks that synchronise the host on CUDA tensors."""
    return env_switch("FASTGPT_DEBUG")


def backend_override():
    """FASTGPT_BACKEND: the backend that `auto` stands for, "auto" where it is unset or empty. A value
    that names no backend raises ValueError naming the variable (the caller passed backend="auto")."""
    value = os.environ.get("FASTGPT_BACKEND") or "auto"
    if value != "auto" and value not in BACKENDS:
        raise ValueError(
            f"the environment variable FASTGPT_BACKEND must be one of {('auto',) + BACKENDS}, got {value!r}"
        )
    return value


def _import_error(module_name):
    """Why module_name cannot be imported, or None. A ValueError is raised, not reported: it is a
    setting the user got wrong (fastgpt._C refuses a FASTGPT_CPU_ISA that names no instruction set),
    not a backend missing here."""
    try:
        importlib.import_module(module_name)
    except ValueError:
        raise
    except Exception as error:  # noqa: BLE001 - a broken install can raise more than ImportError
        return f"{type(error).__name__}: {error}"
    return None


@functools.cache
def backend_status():
    """{backend: None if usable here, else the reason it is not}. Computed once per process: the
    environment it reads (TRITON_INTERPRET, the extension, the GPU) is fixed once fastgpt is imported."""
    status = {"reference": None}
    error = _import_error("triton")
    if error:
        status["triton"] = f"Triton is not importable ({error}); pip install triton"
    elif not torch.cuda.is_available() and not triton_interpreter_enabled():
        status["triton"] = "no CUDA GPU, and TRITON_INTERPRET=1 (the CPU interpreter) is not set"
    else:
        status["triton"] = None
    error = _import_error("fastgpt.ops.compiled")
    status["cpu"] = f"the compiled extension fastgpt._C is missing ({error})" if error else None
    if error:
        status["cuda"] = status["cpu"]
    elif not importlib.import_module("fastgpt.ops.compiled").HAS_CUDA_KERNELS:
        status["cuda"] = (
            "fastgpt._C was built without CUDA kernels (FASTGPT_CUDA=1 with nvcc and a CUDA torch)"
        )
    elif not torch.cuda.is_available():
        status["cuda"] = "no CUDA GPU is visible to torch"
    else:
        status["cuda"] = None
    return status


def backend_report():
    """backend_status(), and for a cuda backend it calls usable, whether this GPU's compute capability
    runs its kernels (before sm_80 they decline every call). Reading the capability initialises CUDA,
    which the routing of a call on CPU tensors must not do (a later fork could no longer use CUDA), so
    only what reports to the user asks this: available_backends() and `fastgpt info`."""
    status = dict(backend_status())
    if status["cuda"] is None:
        status["cuda"] = importlib.import_module("fastgpt.ops.compiled").cuda_capability_reason()
    return status


def available_backends():
    """The backend names usable on this machine, in the order of BACKENDS."""
    status = backend_report()
    return [name for name in BACKENDS if status[name] is None]


def _runs_on(backend, device_type):
    if backend == "reference":
        return True
    if backend == "triton":
        return device_type == "cuda" or (device_type == "cpu" and triton_interpreter_enabled())
    return backend == device_type


def _size_check(backend):
    """The backend's function saying which shapes its kernels decline: f(op, **facts) -> reason or None."""
    if backend in ("cpu", "cuda"):
        return getattr(importlib.import_module("fastgpt.ops.compiled"), f"{backend}_unsupported_reason")
    if backend == "triton":
        return _triton_unsupported_reason
    return lambda op, **facts: None


def _triton_unsupported_reason(op, **facts):
    """The Triton op module's own unsupported_reason, where it has one (a size limit of its kernels)."""
    check = getattr(importlib.import_module(IMPLEMENTATIONS["triton"][op]), "unsupported_reason", None)
    return check(op, **facts) if check else None


def _supported_dtypes(op, backend):
    """The dtypes the backend's kernels for `op` take, as the backend's module states them (a Triton
    module leaves bfloat16 out under the CPU interpreter, which cannot compute in it)."""
    if backend == "reference":
        return FLOAT_DTYPES
    if backend == "triton":
        return importlib.import_module(IMPLEMENTATIONS["triton"][op]).SUPPORTED_DTYPES
    return importlib.import_module("fastgpt.ops.compiled").SUPPORTED_DTYPES[backend]


def _unsupported_reason(op, backend, device_type, dtype, facts):
    """Why `backend` cannot run this call, or None if it can."""
    if not _runs_on(backend, device_type):
        if backend == "triton" and device_type == "cpu":
            return "Triton runs on CPU tensors only with TRITON_INTERPRET=1 set before fastgpt is imported"
        return f"backend {backend!r} does not run on {device_type} tensors"
    reason = backend_status()[backend]
    if reason:
        return reason
    if op not in IMPLEMENTATIONS[backend]:
        return f"backend {backend!r} does not implement {op}"
    dtypes = _supported_dtypes(op, backend)
    if dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        return f"backend {backend!r} supports dtypes ({names}) for {op}, got {dtype}"
    return _size_check(backend)(op, **facts)


# ----------------------------------------------------------------------------------------------
# The choice of implementation


class ImplementationSlot:
    """Holds the function serving one (op, backend, variant), filled by choose_backend on first use.

    The slots are created once, here, and never replaced: torch.compile snapshots a container the
    first time a trace reads it, so a dict filled during the trace would look stale, while the
    attribute of a fixed slot is read when the trace reaches it, after choose_backend filled it."""

    function = None


VARIANTS = (None, "decode")
IMPLEMENTATION_SLOTS = {
    (op, backend, variant): ImplementationSlot() for op in OPS for backend in BACKENDS for variant in VARIANTS
}

# (op, backend, device_type, dtype, facts) -> chosen backend name. A plain dict rather than
# functools.cache, whose wrapper torch.compile warns about and traces through.
_CHOICES = {}


def resolve(op, backend, device_type, dtype, facts, variant=None):
    """The function serving this call. facts: a tuple of (name, value) pairs of the call's shapes that
    a backend's choice depends on (head_dim, kv_len, wide_grid, hidden, vocab, few_rows); variant: "decode" for
    causal_attention with one query and no gradient. Cheap after the first call with the same key."""
    name = choose_backend(op, backend, device_type, dtype, facts)
    if variant is not None and name in DECODE_KERNELS:
        return IMPLEMENTATION_SLOTS[(op, name, variant)].function
    return IMPLEMENTATION_SLOTS[(op, name, None)].function


@torch.compiler.assume_constant_result
def choose_backend(op, backend, device_type, dtype, facts):
    """The backend name for this call (a constant under torch.compile, which runs it once at trace time)."""
    key = (op, backend, device_type, dtype, facts)
    name = _CHOICES.get(key)
    if name is None:
        name = _choose_backend(op, backend, device_type, dtype, dict(facts))
        IMPLEMENTATION_SLOTS[(op, name, None)].function = getattr(
            importlib.import_module(IMPLEMENTATIONS[name][op]), op
        )
        if op == "causal_attention" and name in DECODE_KERNELS:
            module_name, function_name = DECODE_KERNELS[name]
            IMPLEMENTATION_SLOTS[(op, name, "decode")].function = getattr(
                importlib.import_module(module_name), function_name
            )
        _CHOICES[key] = name
    return name


def forget_choices():
    """Drop the cached backend choices, e.g. after changing FASTGPT_BACKEND."""
    _CHOICES.clear()
    _DEVICE_LENGTH_CHOICES.clear()


def _auto_order(op, device_type, facts):
    order = AUTO_ORDER.get(device_type, {}).get(op, ("reference",))
    return order.order(facts) if isinstance(order, SizeSplit) else order


@functools.cache
def _warn_missing_extension():
    warnings.warn(
        f"fastgpt: the compiled kernels are missing, so CPU tensors run on the slow `reference` backend "
        f"({backend_status()['cpu']}). Install with `pip install --no-build-isolation .` where torch is "
        "installed, then check `python -m fastgpt info`.",
        RuntimeWarning,
        stacklevel=4,
    )


def _choose_backend(op, backend, device_type, dtype, facts):
    if not isinstance(backend, str):
        raise TypeError(
            f"{op}: backend must be a str, one of {('auto',) + BACKENDS}, got {type(backend).__name__}"
        )
    # The backend named by FASTGPT_BACKEND, when the call left it to `auto`: its errors name the variable.
    source = ""
    if backend == "auto":
        backend = backend_override()
        source = "" if backend == "auto" else " (named by the environment variable FASTGPT_BACKEND)"
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend == "auto":
        for candidate in _auto_order(op, device_type, facts):
            if _unsupported_reason(op, candidate, device_type, dtype, facts) is None:
                if candidate == "reference" and device_type == "cpu" and backend_status()["cpu"] is not None:
                    _warn_missing_extension()
                return candidate
        raise RuntimeError(f"{op}: no backend can run {dtype} tensors on {device_type}")
    reason = _unsupported_reason(op, backend, device_type, dtype, facts)
    if reason is None:
        return backend
    if op == "linear":
        return "reference"  # a projection the chosen backend has no kernel for runs as F.linear
    if "dtypes" in reason:
        raise TypeError(f"{op}: {reason}{source}")
    if not _runs_on(backend, device_type) or backend_status()[backend] is None:
        raise ValueError(f"{op}: {reason}{source}")
    raise RuntimeError(f"{op}: backend {backend!r}{source} is not available here: {reason}")


def fused_decode_step(backend, device_type, dtype, head_dim, rows):
    """The function that runs all of a GPT's blocks for one decode step in one call, or None: the cpu
    backend's decode_blocks (fastgpt.ops.compiled), where every op of the step (attention, LayerNorm,
    the FFN and the few-row projections) would run on the cpu backend anyway. It runs the same kernels
    in the same order, without ~15 Python op calls per block."""
    if device_type != "cpu" or not 0 < rows <= LINEAR_KERNEL_MAX_ROWS:
        return None
    ops_facts = {
        "causal_attention": (("head_dim", head_dim), ("kv_len", SHORT_SEQUENCE)),
        "layer_norm": (),
        "fused_ffn": (),
        "linear": (("few_rows", True),),
    }
    if any(
        choose_backend(op, backend, device_type, dtype, facts) != "cpu" for op, facts in ops_facts.items()
    ):
        return None
    return importlib.import_module("fastgpt.ops.compiled").decode_blocks


_DEVICE_LENGTH_CHOICES = {}


def device_length_decode(backend, device_type, dtype, head_dim):
    """The function serving decode attention with a device-held cache length,
    f(q, k_cache, v_cache, kv_len, softmax_scale): Triton's split-KV kernel where `backend` is "auto"
    or "triton" and Triton runs this call (auto: on CUDA tensors), else the reference (see
    DEVICE_LENGTH_DECODE_KERNELS)."""
    key = (backend, device_type, dtype, head_dim)
    function = _DEVICE_LENGTH_CHOICES.get(key)
    if function is None:
        facts = (("head_dim", head_dim), ("kv_len", SHORT_SEQUENCE))
        name = choose_backend("causal_attention", backend, device_type, dtype, facts)
        auto = backend == "auto" and backend_override() == "auto"
        if (
            name != "triton"
            and auto
            and device_type == "cuda"
            and _unsupported_reason("causal_attention", "triton", device_type, dtype, dict(facts)) is None
        ):
            name = "triton"
        module_name, function_name = DEVICE_LENGTH_DECODE_KERNELS.get(
            name, DEVICE_LENGTH_DECODE_KERNELS["reference"]
        )
        function = getattr(importlib.import_module(module_name), function_name)
        _DEVICE_LENGTH_CHOICES[key] = function
    return function


def device_type(tensor):
    """tensor.device.type, without building a torch.device for the usual two (a fifth of the time)."""
    if tensor.is_cuda:
        return "cuda"
    return "cpu" if tensor.is_cpu else tensor.device.type


def skip_validation(tensor):
    """Whether this call skips argument validation: while torch.compile traces (the checks would be
    traced) or a CUDA graph captures (host time only; nothing is replayed). `tensor` is the op's
    first input: only a CUDA tensor can be in a capture."""
    if torch.compiler.is_compiling():
        return True
    return isinstance(tensor, torch.Tensor) and tensor.is_cuda and torch.cuda.is_current_stream_capturing()


# ----------------------------------------------------------------------------------------------
# Argument validation


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def describe(value):
    """A short description of an argument's value for error messages."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    return (
        f"{type(value).__name__} {value!r}" if not isinstance(value, (list, tuple)) else type(value).__name__
    )


def check_tensor(op, name, value, *, ndim=None, min_ndim=None, floating=True):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {describe(value)}")
    if value.layout != torch.strided or value.is_nested:
        layout = "nested" if value.is_nested else value.layout
        raise TypeError(f"{op}: {name} must be a dense tensor (layout torch.strided), got layout {layout}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {value.dtype}"
        )
    if ndim is not None and value.dim() != ndim:
        raise ValueError(
            f"{op}: {name} must have {ndim} dimensions, got {value.dim()} (shape {tuple(value.shape)})"
        )
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(
            f"{op}: {name} must have at least {min_ndim} dimension(s), got {value.dim()} (shape {tuple(value.shape)})"
        )


def check_same_dtype_and_device(op, reference_name, reference, **others):
    for name, tensor in others.items():
        if tensor is None:
            continue
        if tensor.dtype != reference.dtype:
            raise TypeError(
                f"{op}: {name} must have the dtype of {reference_name} ({reference.dtype}), got {tensor.dtype}"
            )
        if tensor.device != reference.device:
            raise ValueError(
                f"{op}: {name} must be on the device of {reference_name} ({reference.device}), got {tensor.device}"
            )


def check_shape(op, name, tensor, expected, why=""):
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)}, got {tuple(tensor.shape)}{why}")


def check_kernel_dtype(op, name, tensor, dtypes):
    """A Triton operator's input in one of the dtypes its kernels take (the module's SUPPORTED_DTYPES)."""
    if tensor.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have one of the dtypes ({names}), got {tensor.dtype}")


def check_saved(op, name, tensor, shape, reference_name, reference, dtype=None):
    """A backward operator's saved or incoming tensor: dense, of `shape`, on reference's device, in
    `dtype` (reference's when None), or TypeError/ValueError naming it."""
    expected = reference.dtype if dtype is None else dtype
    if (
        isinstance(tensor, torch.Tensor)
        and tensor.layout is _STRIDED
        and not tensor.is_nested
        and tensor.dtype == expected
        and tensor.device == reference.device
        and tensor.shape == shape
    ):
        return  # the fast path of every backward call; the checks below name what is wrong
    check_tensor(op, name, tensor, floating=False)
    if tensor.dtype != expected:
        raise TypeError(f"{op}: {name} must have dtype {expected}, got {tensor.dtype}")
    if tensor.device != reference.device:
        raise ValueError(
            f"{op}: {name} must be on the device of {reference_name} ({reference.device}), got {tensor.device}"
        )
    check_shape(op, name, tensor, shape)


def check_channels(op, name, tensor):
    """The last dimension (the features a row is reduced over) must not be empty."""
    if tensor.shape[-1] == 0:
        raise ValueError(
            f"{op}: {name}'s last dimension (channels) must be at least 1, got 0 (shape {tuple(tensor.shape)})"
        )


def default_softmax_scale(head_dim):
    return 1.0 / math.sqrt(head_dim)


# The softmax scales every backend takes, in every entry point (the public op, the Triton operators,
# and the C++ operators' check_softmax_scale in csrc/api.cpp, which holds the same bounds). The kernels
# compute in float32: softmax_scale * log2(e) (every forward), lse / softmax_scale (the Triton float32
# backward: up to log(kv_len) / softmax_scale) and softmax_scale * dS must stay finite, non-zero
# float32 numbers. A scale that rounds to 0 in float32 (below about 7e-46) made the Gluon kernels return
# NaN, and near float32's limits lse / softmax_scale overflows. [2**-64, 2**64] keeps all of them clear
# of both ends for any kv_len below 2**31, and holds 1/sqrt(head_dim) of every head_dim.
SOFTMAX_SCALE_MIN = 2.0**-64
SOFTMAX_SCALE_MAX = 2.0**64


def check_softmax_scale(op, softmax_scale):
    """softmax_scale as a float, or TypeError/ValueError naming it (not a number, or outside
    [SOFTMAX_SCALE_MIN, SOFTMAX_SCALE_MAX], which also leaves out 0, negatives, inf and NaN)."""
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"{op}: softmax_scale must be a float or None, got {describe(softmax_scale)}")
    if not SOFTMAX_SCALE_MIN <= softmax_scale <= SOFTMAX_SCALE_MAX:
        raise ValueError(
            f"{op}: softmax_scale must be a finite positive float in [2**-64, 2**64], got {softmax_scale!r}"
        )
    return float(softmax_scale)


def _diagnose_attention(q, k, v, softmax_scale, op):
    check_tensor(op, "q", q, ndim=4)
    check_tensor(op, "k", k, ndim=4)
    check_tensor(op, "v", v, ndim=4)
    check_same_dtype_and_device(op, "q", q, k=k, v=v)
    batch, heads, q_len, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"{op}: k must have shape (batch={batch}, kv_heads, kv_len, head_dim={head_dim}) to match q, "
            f"got {tuple(k.shape)}"
        )
    check_shape(op, "v", v, k.shape)
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if head_dim == 0:
        raise ValueError(f"{op}: head_dim (q.shape[3]) must be at least 1, got 0")
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(
            f"{op}: q's heads must be a multiple of k's kv_heads (GQA/MQA), got heads={heads}, kv_heads={kv_heads}"
        )
    if q_len > kv_len:
        raise ValueError(
            f"{op}: q_len must be <= kv_len (bottom-right causal mask), got q_len={q_len}, kv_len={kv_len}"
        )
    if softmax_scale is None:
        return default_softmax_scale(head_dim)
    return check_softmax_scale(op, softmax_scale)


def check_optional_vector(op, name, tensor, size, reference_name, reference, why):
    if tensor is None:
        return
    check_tensor(op, name, tensor, ndim=1)
    check_same_dtype_and_device(op, reference_name, reference, **{name: tensor})
    check_shape(op, name, tensor, (size,), f" (it must match {why})")


def _diagnose_ffn(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual, op):
    check_tensor(op, "x", x, min_ndim=1)
    check_tensor(op, "fc_weight", fc_weight, ndim=2)
    check_tensor(op, "proj_weight", proj_weight, ndim=2)
    check_same_dtype_and_device(op, "x", x, fc_weight=fc_weight, proj_weight=proj_weight)
    check_channels(op, "x", x)
    channels = x.shape[-1]
    hidden, fc_in = fc_weight.shape
    out_features, proj_in = proj_weight.shape
    if fc_in != channels:
        raise ValueError(
            f"{op}: fc_weight must have shape (hidden, {channels}) for x's last dim {channels}, got {tuple(fc_weight.shape)}"
        )
    if proj_in != hidden:
        raise ValueError(
            f"{op}: proj_weight must have shape (out_features, {hidden}) to follow fc_weight's {hidden} outputs, "
            f"got {tuple(proj_weight.shape)}"
        )
    check_optional_vector(op, "fc_bias", fc_bias, hidden, "x", x, f"fc_weight's {hidden} outputs")
    check_optional_vector(
        op, "proj_bias", proj_bias, out_features, "x", x, f"proj_weight's {out_features} outputs"
    )
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if residual is not None:
        check_tensor(op, "residual", residual)
        check_same_dtype_and_device(op, "x", x, residual=residual)
        check_shape(op, "residual", residual, (*x.shape[:-1], out_features))


def _diagnose_linear(x, weight, bias):
    op = "linear"
    check_tensor(op, "x", x, min_ndim=1)
    check_tensor(op, "weight", weight, ndim=2)
    check_same_dtype_and_device(op, "x", x, weight=weight)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"{op}: weight must have shape (out_features, {x.shape[-1]}) for x's last dim, got {tuple(weight.shape)}"
        )
    check_optional_vector(op, "bias", bias, weight.shape[0], "x", x, f"weight's {weight.shape[0]} outputs")


def _diagnose_layer_norm(x, weight, bias, eps, residual, op):
    check_tensor(op, "x", x, min_ndim=1)
    check_channels(op, "x", x)
    channels = x.shape[-1]
    check_optional_vector(op, "weight", weight, channels, "x", x, f"x's last dim {channels}")
    check_optional_vector(op, "bias", bias, channels, "x", x, f"x's last dim {channels}")
    if residual is not None:
        check_tensor(op, "residual", residual)
        check_same_dtype_and_device(op, "x", x, residual=residual)
        check_shape(op, "residual", residual, x.shape)
    check_eps(op, eps)


def check_eps(op, eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{op}: eps must be a float, got {describe(eps)}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{op}: eps must be a finite float >= 0, got {eps!r}")


def _diagnose_cross_entropy(x, weight, targets, bias, ignore_index, reduction, op):
    check_tensor(op, "x", x, min_ndim=1)
    check_tensor(op, "weight", weight, ndim=2)
    check_same_dtype_and_device(op, "x", x, weight=weight)
    check_channels(op, "x", x)
    vocab, channels = weight.shape
    if channels != x.shape[-1]:
        raise ValueError(
            f"{op}: weight must have shape (vocab, {x.shape[-1]}) for x's last dim, got {tuple(weight.shape)}"
        )
    check_optional_vector(op, "bias", bias, vocab, "x", x, f"weight's vocab {vocab}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if vocab == 0:
        raise ValueError(
            f"{op}: weight must have at least one row (vocab >= 1), got shape {tuple(weight.shape)}"
        )
    validate_targets(op, targets, x.shape[:-1], x.device, vocab, ignore_index, check_values=False)


def validate_targets(op, targets, shape, device, vocab, ignore_index, *, device_of="x", check_values=True):
    """Class-index targets of a cross-entropy: int64, `shape`, on `device` (that of `device_of`), each
    in [0, vocab) or equal to ignore_index (with check_values, values are read as check_index_range says)."""
    check_tensor(op, "targets", targets, floating=False)
    if targets.dtype != torch.int64:
        raise TypeError(
            f"{op}: targets must be an int64 (torch.long) tensor of class indices, got dtype {targets.dtype}"
        )
    if targets.device != device:
        raise ValueError(
            f"{op}: targets must be on the device of {device_of} ({device}), got {targets.device}"
        )
    check_shape(op, "targets", targets, shape)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {describe(ignore_index)}")
    if not INT64_MIN <= ignore_index <= INT64_MAX:
        raise ValueError(f"{op}: ignore_index must fit in int64 (targets' dtype), got {ignore_index}")
    if check_values:
        check_index_range(op, "targets", targets, vocab, ignore_index)


def check_index_range(op, name, indices, size, ignore_index=None):
    """Checks that every index is in [0, size) (or equals ignore_index). It reads tensor values: always
    on CPU tensors; on CUDA only with FASTGPT_DEBUG=1, because reading them synchronises the host, and
    not while a CUDA graph captures (the read, a device-to-host copy and a stream synchronisation, is
    not permitted there: it would invalidate the capture). Never on meta tensors (no values) nor under
    torch.compile. fastgpt's kernels read a target's logit only when the target lies in the row, so an
    unchecked out-of-range target gives a wrong loss, not an out-of-bounds access."""
    if indices.numel() == 0 or torch.compiler.is_compiling():
        return
    if indices.is_cuda:
        if not debug_checks_enabled() or torch.cuda.is_current_stream_capturing():
            return
    elif not indices.is_cpu:
        return
    extremes = torch.aminmax(indices)
    if extremes.min.item() >= 0 and extremes.max.item() < size:
        return  # one pass over the values; the masks below only when some index needs a closer look
    bad = (indices < 0) | (indices >= size)
    if ignore_index is not None:
        bad &= indices != ignore_index
    if bool(bad.any()):
        first = indices[bad][0].item()
        allowed = f"[0, {size})" + ("" if ignore_index is None else f" or equal ignore_index={ignore_index}")
        raise ValueError(
            f"{op}: {name} must be in {allowed}, got {first} ({int(bad.sum())} out-of-range value(s))"
        )


# ----------------------------------------------------------------------------------------------
# The validators each op calls: a fast check of the valid case (a few attribute reads per tensor),
# and, only when it fails, the detailed checks above, which raise the error naming the argument.

_STRIDED = torch.strided


# dtypes and layouts are singletons: `is` compares them without a rich comparison.
def _is_float_tensor(t):
    return (
        isinstance(t, torch.Tensor) and t.layout is _STRIDED and t.dtype in FLOAT_DTYPES and not t.is_nested
    )


def _is_companion(t, x):
    """t is a dense tensor with x's dtype and device."""
    return (
        isinstance(t, torch.Tensor)
        and t.dtype is x.dtype
        and t.layout is _STRIDED
        and t.device == x.device
        and not t.is_nested
    )


def _is_vector_or_none(t, size, x):
    return t is None or (_is_companion(t, x) and t.shape == (size,))


def _is_finite_nonnegative_float(value):
    return type(value) is float and math.isfinite(value) and value >= 0


def validate_attention(q, k, v, softmax_scale, op="causal_attention"):
    """Checks causal_attention's arguments; returns the softmax scale as a float. op: the entry point
    the error messages name (the Triton operators, torch.ops.fastgpt.triton_*, check with these too)."""
    if (
        _is_float_tensor(q)
        and _is_companion(k, q)
        and _is_companion(v, q)
        and q.dim() == 4
        and k.dim() == 4
        and v.shape == k.shape
        and k.shape[0] == q.shape[0]
        and k.shape[3] == q.shape[3] > 0
        and k.shape[1] > 0
        and q.shape[1] % k.shape[1] == 0
        and q.shape[2] <= k.shape[2]
    ):
        if softmax_scale is None:
            return default_softmax_scale(q.shape[3])
        if type(softmax_scale) is float and SOFTMAX_SCALE_MIN <= softmax_scale <= SOFTMAX_SCALE_MAX:
            return softmax_scale
    return _diagnose_attention(q, k, v, softmax_scale, op)


def validate_decode_with_length(q, k, v, kv_len, softmax_scale, op="decode_attention_with_length"):
    """Checks decode_attention_with_length's arguments (causal_attention's, one query, and an integer
    kv_len tensor of 1 or batch elements on q's device, whose values are never read); returns the softmax
    scale."""
    scale = validate_attention(q, k, v, softmax_scale, op)
    if q.shape[2] != 1:
        raise ValueError(f"{op}: q must have shape (batch, heads, 1, head_dim), got {tuple(q.shape)}")
    if not isinstance(kv_len, torch.Tensor) or kv_len.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: kv_len must be an int32/int64 torch.Tensor, got {describe(kv_len)}")
    if kv_len.numel() not in (1, q.shape[0]):
        raise ValueError(
            f"{op}: kv_len must have 1 or batch ({q.shape[0]}) elements, got shape {tuple(kv_len.shape)}"
        )
    if kv_len.device != q.device:
        raise ValueError(f"{op}: kv_len must be on q's device ({q.device}), got {kv_len.device}")
    return scale


def validate_ffn(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual, op="fused_ffn"):
    if not (
        _is_float_tensor(x)
        and _is_companion(fc_weight, x)
        and _is_companion(proj_weight, x)
        and x.dim() >= 1
        and fc_weight.dim() == 2
        and proj_weight.dim() == 2
        and 0 < x.shape[-1] == fc_weight.shape[1]
        and proj_weight.shape[1] == fc_weight.shape[0]
        and _is_vector_or_none(fc_bias, fc_weight.shape[0], x)
        and _is_vector_or_none(proj_bias, proj_weight.shape[0], x)
        and activation in ACTIVATIONS
        and (
            residual is None
            or (_is_companion(residual, x) and residual.shape == (*x.shape[:-1], proj_weight.shape[0]))
        )
    ):
        _diagnose_ffn(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual, op)


def validate_linear(x, weight, bias):
    if not (
        _is_float_tensor(x)
        and _is_companion(weight, x)
        and x.dim() >= 1
        and weight.dim() == 2
        and weight.shape[1] == x.shape[-1]
        and _is_vector_or_none(bias, weight.shape[0], x)
    ):
        _diagnose_linear(x, weight, bias)


def validate_layer_norm(x, weight, bias, eps, residual, op="layer_norm"):
    if not (
        _is_float_tensor(x)
        and x.dim() >= 1
        and x.shape[-1] > 0
        and _is_vector_or_none(weight, x.shape[-1], x)
        and _is_vector_or_none(bias, x.shape[-1], x)
        and (residual is None or (_is_companion(residual, x) and residual.shape == x.shape))
        and _is_finite_nonnegative_float(eps)
    ):
        _diagnose_layer_norm(x, weight, bias, eps, residual, op)


def validate_cross_entropy(
    x, weight, targets, bias, ignore_index, reduction, op="linear_cross_entropy", check_values=True
):
    """check_values=False leaves out the range check of the targets (check_index_range), for the
    Triton operators: their kernels read a target's logit only when it lies in the row."""
    if not (
        _is_float_tensor(x)
        and _is_companion(weight, x)
        and x.dim() >= 1
        and weight.dim() == 2
        and 0 < x.shape[-1] == weight.shape[1]
        and weight.shape[0] > 0
        and _is_vector_or_none(bias, weight.shape[0], x)
        and reduction in REDUCTIONS
        and isinstance(targets, torch.Tensor)
        and targets.dtype is torch.int64
        and targets.device == x.device
        and targets.layout is _STRIDED
        and targets.shape == x.shape[:-1]
        and type(ignore_index) is int
        and INT64_MIN <= ignore_index <= INT64_MAX
    ):
        _diagnose_cross_entropy(x, weight, targets, bias, ignore_index, reduction, op)
    if check_values:
        check_index_range(op, "targets", targets, weight.shape[0], ignore_index)
