"""Backend names, validation of arguments, and the choice of backend for each call.

Every public op goes through three steps here before any kernel runs:
1. `validate_*` checks types, ranks, shapes, dtypes and devices, and raises TypeError/ValueError whose
   message names the argument, what was expected and what was given;
2. `resolve` picks the backend (`auto` → cuda, triton on CUDA tensors; cpu, reference on CPU tensors;
   `FASTGPT_BACKEND` overrides `auto`);
3. the chosen backend module's function of the same name as the op is called.

Backends are imported lazily, so a missing compiler, Triton or GPU never breaks `import fastgpt`.
"""

import functools
import importlib
import math
import os

import torch

from fastgpt.activations import ACTIVATIONS

BACKENDS = ("reference", "triton", "cpu", "cuda")
OPS = ("causal_attention", "fused_ffn", "layer_norm", "linear_cross_entropy")
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# The module holding each backend's implementation of each op. A backend implements an op by
# exposing a function of the op's name that takes the validated arguments.
IMPLEMENTATIONS = {
    "reference": {op: "fastgpt.reference" for op in OPS},
    "triton": {
        "causal_attention": "fastgpt.ops.triton_attention",
        "fused_ffn": "fastgpt.ops.triton_ffn",
        "layer_norm": "fastgpt.ops.triton_layernorm",
        "linear_cross_entropy": "fastgpt.ops.triton_cross_entropy",
    },
    "cpu": {op: "fastgpt.ops.cpu" for op in OPS},
    "cuda": {op: "fastgpt.ops.cuda" for op in ("causal_attention", "fused_ffn", "layer_norm")},
}

# Modules whose import decides whether a backend exists at all on this machine.
BACKEND_PROBES = {"triton": "triton", "cpu": "fastgpt.ops.cpu", "cuda": "fastgpt.ops.cuda"}


# ----------------------------------------------------------------------------------------------
# Backend availability


def triton_interpreter_enabled():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def debug_checks_enabled():
    """FASTGPT_DEBUG=1 turns on value checks that synchronise the host on CUDA tensors."""
    return os.environ.get("FASTGPT_DEBUG", "0") == "1"


def _import_error(module_name):
    try:
        importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - a broken install can raise more than ImportError
        return f"{type(error).__name__}: {error}"
    return None


@functools.cache
def backend_status():
    """{backend: None if usable here, else the reason it is not}. Computed once per process: the
    environment it reads (TRITON_INTERPRET, the extension, the GPU) is fixed once fastgpt is imported."""
    status = {"reference": None}
    error = _import_error(BACKEND_PROBES["triton"])
    if error:
        status["triton"] = f"Triton is not importable ({error}); pip install triton"
    elif not torch.cuda.is_available() and not triton_interpreter_enabled():
        status["triton"] = "no CUDA GPU, and TRITON_INTERPRET=1 (the CPU interpreter) is not set"
    else:
        status["triton"] = None
    error = _import_error(BACKEND_PROBES["cpu"])
    status["cpu"] = f"the compiled extension fastgpt._C is missing ({error})" if error else None
    error = _import_error(BACKEND_PROBES["cuda"])
    if error:
        status["cuda"] = f"fastgpt._C has no CUDA kernels ({error})"
    elif not torch.cuda.is_available():
        status["cuda"] = "no CUDA GPU is visible to torch"
    else:
        status["cuda"] = None
    return status


def available_backends():
    """The backend names usable on this machine, in the order of BACKENDS."""
    status = backend_status()
    return [name for name in BACKENDS if status[name] is None]


def _runs_on(backend, device_type):
    if backend == "reference":
        return True
    if backend == "triton":
        return device_type == "cuda" or (device_type == "cpu" and triton_interpreter_enabled())
    return backend == device_type


def _backend_module(op, backend):
    module_name = IMPLEMENTATIONS[backend].get(op)
    if module_name is None:
        return None
    return importlib.import_module(module_name)


def _unsupported_reason(op, backend, device_type, dtype, facts):
    """Why `backend` cannot run this call, or None if it can."""
    if not _runs_on(backend, device_type):
        if backend == "triton" and device_type == "cpu":
            return "Triton runs on CPU tensors only with TRITON_INTERPRET=1 set before fastgpt is imported"
        return f"backend {backend!r} does not run on {device_type} tensors"
    reason = backend_status()[backend]
    if reason:
        return reason
    module = _backend_module(op, backend)
    if module is None:
        return f"backend {backend!r} does not implement {op}"
    supported = getattr(module, "SUPPORTED_DTYPES", FLOAT_DTYPES)
    if dtype not in supported:
        names = ", ".join(str(d).replace("torch.", "") for d in supported)
        return f"backend {backend!r} supports dtypes ({names}) for {op}, got {dtype}"
    check = getattr(module, "unsupported_reason", None)
    return check(op, **facts) if check else None


def resolve(op, backend, device, dtype, **facts):
    """The function implementing `op` for this call. `facts` (head_dim=..., hidden=...) let a backend
    decline shapes it has no kernel for; `auto` then moves on to the next backend."""
    name = choose_backend(op, backend, torch.device(device).type, dtype, tuple(sorted(facts.items())))
    return IMPLEMENTATION_SLOTS[(op, name)].function


class ImplementationSlot:
    """Holds one backend's function for one op, filled by choose_backend on first use.

    The slots are created once, here, and never replaced: torch.compile snapshots a container the
    first time a trace reads it, so a dict filled during the trace would look stale, while the
    attribute of a fixed slot is read when the trace reaches it, after choose_backend filled it."""

    function = None


IMPLEMENTATION_SLOTS = {(op, backend): ImplementationSlot() for op in OPS for backend in BACKENDS}


# (op, backend, device_type, dtype, facts) -> chosen backend name. A plain dict rather than
# functools.cache, whose wrapper torch.compile warns about and traces through.
_CHOICES = {}


@torch.compiler.assume_constant_result
def choose_backend(op, backend, device_type, dtype, facts):
    """The backend name for this call (a constant under torch.compile, which runs it once at trace time)."""
    key = (op, backend, device_type, dtype, facts)
    if key not in _CHOICES:
        name = _choose_backend(op, backend, device_type, dtype, dict(facts))
        IMPLEMENTATION_SLOTS[(op, name)].function = getattr(_backend_module(op, name), op)
        _CHOICES[key] = name
    return _CHOICES[key]


def forget_choices():
    """Drop the cached backend choices, e.g. after changing FASTGPT_BACKEND."""
    _CHOICES.clear()


def _choose_backend(op, backend, device_type, dtype, facts):
    if not isinstance(backend, str):
        raise TypeError(f"{op}: backend must be a str, one of {('auto',) + BACKENDS}, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get("FASTGPT_BACKEND", "auto")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend == "auto":
        for candidate in AUTO_ORDER.get(device_type, ("reference",)):
            if _unsupported_reason(op, candidate, device_type, dtype, facts) is None:
                return candidate
        raise RuntimeError(f"{op}: no backend can run {dtype} tensors on {device_type}")
    reason = _unsupported_reason(op, backend, device_type, dtype, facts)
    if reason is None:
        return backend
    if "dtypes" in reason:
        raise TypeError(f"{op}: {reason}")
    if not _runs_on(backend, device_type) or backend_status()[backend] is None:
        raise ValueError(f"{op}: {reason}")
    raise RuntimeError(f"{op}: backend {backend!r} is not available here: {reason}")


# ----------------------------------------------------------------------------------------------
# Argument validation


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def describe(value):
    """A short description of an argument's value for error messages."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (list, tuple)) else type(value).__name__


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
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got {value.dim()} (shape {tuple(value.shape)})")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(
            f"{op}: {name} must have at least {min_ndim} dimension(s), got {value.dim()} (shape {tuple(value.shape)})"
        )


def check_same_dtype_and_device(op, reference_name, reference, **others):
    for name, tensor in others.items():
        if tensor is None:
            continue
        if tensor.dtype != reference.dtype:
            raise TypeError(f"{op}: {name} must have the dtype of {reference_name} ({reference.dtype}), got {tensor.dtype}")
        if tensor.device != reference.device:
            raise ValueError(
                f"{op}: {name} must be on the device of {reference_name} ({reference.device}), got {tensor.device}"
            )


def check_shape(op, name, tensor, expected, why=""):
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)}, got {tuple(tensor.shape)}{why}")


def check_channels(op, name, tensor):
    """The last dimension (the features a row is reduced over) must not be empty."""
    if tensor.shape[-1] == 0:
        raise ValueError(f"{op}: {name}'s last dimension (channels) must be at least 1, got 0 (shape {tuple(tensor.shape)})")


def validate_attention(q, k, v, softmax_scale):
    """Checks causal_attention's arguments; returns the softmax scale as a float."""
    op = "causal_attention"
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
        raise ValueError(f"{op}: q_len must be <= kv_len (bottom-right causal mask), got q_len={q_len}, kv_len={kv_len}")
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"{op}: softmax_scale must be a float or None, got {describe(softmax_scale)}")
    if not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"{op}: softmax_scale must be a finite positive float, got {softmax_scale!r}")
    return float(softmax_scale)


def check_optional_vector(op, name, tensor, size, reference_name, reference, why):
    if tensor is None:
        return
    check_tensor(op, name, tensor, ndim=1)
    check_same_dtype_and_device(op, reference_name, reference, **{name: tensor})
    check_shape(op, name, tensor, (size,), f" (it must match {why})")


def validate_ffn(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual):
    op = "fused_ffn"
    check_tensor(op, "x", x, min_ndim=1)
    check_tensor(op, "fc_weight", fc_weight, ndim=2)
    check_tensor(op, "proj_weight", proj_weight, ndim=2)
    check_same_dtype_and_device(op, "x", x, fc_weight=fc_weight, proj_weight=proj_weight)
    check_channels(op, "x", x)
    channels = x.shape[-1]
    hidden, fc_in = fc_weight.shape
    out_features, proj_in = proj_weight.shape
    if fc_in != channels:
        raise ValueError(f"{op}: fc_weight must have shape (hidden, {channels}) for x's last dim {channels}, got {tuple(fc_weight.shape)}")
    if proj_in != hidden:
        raise ValueError(
            f"{op}: proj_weight must have shape (out_features, {hidden}) to follow fc_weight's {hidden} outputs, "
            f"got {tuple(proj_weight.shape)}"
        )
    check_optional_vector(op, "fc_bias", fc_bias, hidden, "x", x, f"fc_weight's {hidden} outputs")
    check_optional_vector(op, "proj_bias", proj_bias, out_features, "x", x, f"proj_weight's {out_features} outputs")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if residual is not None:
        check_tensor(op, "residual", residual)
        check_same_dtype_and_device(op, "x", x, residual=residual)
        check_shape(op, "residual", residual, (*x.shape[:-1], out_features))


def validate_layer_norm(x, weight, bias, eps, residual):
    op = "layer_norm"
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


def validate_cross_entropy(x, weight, targets, bias, ignore_index, reduction):
    op = "linear_cross_entropy"
    check_tensor(op, "x", x, min_ndim=1)
    check_tensor(op, "weight", weight, ndim=2)
    check_same_dtype_and_device(op, "x", x, weight=weight)
    check_channels(op, "x", x)
    vocab, channels = weight.shape
    if channels != x.shape[-1]:
        raise ValueError(f"{op}: weight must have shape (vocab, {x.shape[-1]}) for x's last dim, got {tuple(weight.shape)}")
    check_optional_vector(op, "bias", bias, vocab, "x", x, f"weight's vocab {vocab}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if vocab == 0:
        raise ValueError(f"{op}: weight must have at least one row (vocab >= 1), got shape {tuple(weight.shape)}")
    validate_targets(op, targets, x.shape[:-1], x.device, vocab, ignore_index)


def validate_targets(op, targets, shape, device, vocab, ignore_index, *, device_of="x"):
    """Class-index targets of a cross-entropy: int64, `shape`, on `device` (that of `device_of`), each
    in [0, vocab) or equal to ignore_index (values are read as check_index_range says)."""
    check_tensor(op, "targets", targets, floating=False)
    if targets.dtype != torch.int64:
        raise TypeError(f"{op}: targets must be an int64 (torch.long) tensor of class indices, got dtype {targets.dtype}")
    if targets.device != device:
        raise ValueError(f"{op}: targets must be on the device of {device_of} ({device}), got {targets.device}")
    check_shape(op, "targets", targets, shape)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {describe(ignore_index)}")
    if not INT64_MIN <= ignore_index <= INT64_MAX:
        raise ValueError(f"{op}: ignore_index must fit in int64 (targets' dtype), got {ignore_index}")
    check_index_range(op, "targets", targets, vocab, ignore_index)


def check_index_range(op, name, indices, size, ignore_index=None):
    """Checks that every index is in [0, size) (or equals ignore_index). It reads tensor values: always
    on CPU tensors; on CUDA only with FASTGPT_DEBUG=1, because reading them synchronises the host.
    Never on meta tensors (no values) nor under torch.compile. fastgpt's kernels never index memory
    with a target, so an unchecked out-of-range target gives a wrong loss, not an out-of-bounds access."""
    if indices.numel() == 0 or torch.compiler.is_compiling():
        return
    if not (indices.device.type == "cpu" or (indices.device.type == "cuda" and debug_checks_enabled())):
        return
    bad = (indices < 0) | (indices >= size)
    if ignore_index is not None:
        bad &= indices != ignore_index
    if bool(bad.any()):
        first = indices[bad][0].item()
        allowed = f"[0, {size})" + ("" if ignore_index is None else f" or equal ignore_index={ignore_index}")
        raise ValueError(f"{op}: {name} must be in {allowed}, got {first} ({int(bad.sum())} out-of-range value(s))")
