"""Who gets timed: fastgpt's backends and the baselines a user would otherwise run.

A provider is a name, a kind ("fastgpt" or "baseline") and a function taking the op's tensors by
the public API's argument names, or the reason it cannot run here. fastgpt's providers come from
`fastgpt.available_backends()`, so a backend appears in every benchmark as soon as it is installed;
`reference` is not among them, because calling it in the run's dtype is the "eager" baseline.
"""

import dataclasses
import fnmatch
import functools
import importlib

import torch

import fastgpt
from fastgpt import dispatch
from fastgpt.bench.records import BASELINE, FASTGPT, dtype_name

INTERPRETER_NOT_TIMED = (
    "interpreter: not timed (Triton on CPU runs under TRITON_INTERPRET=1, a correctness path)"
)
KERNEL_BACKENDS = {"cpu": ("triton", "cpu"), "cuda": ("triton", "cuda")}


@dataclasses.dataclass
class Provider:
    name: str
    kind: str  # FASTGPT or BASELINE
    fn: object = None  # fn(**tensors) -> output or tuple of outputs
    skip: str | None = None  # why it is not timed here


def fastgpt_providers(public_op, device):
    """One provider per fastgpt kernel backend that runs on this device type, bound to the public op.
    A backend that is missing or has no kernel for the op is skipped with the reason; one that declines
    the dtype or shape is reported when called."""
    device = torch.device(device)
    available = fastgpt.available_backends()
    op = public_op.__name__  # the public function's name is the dispatch op's
    providers = []
    for backend in KERNEL_BACKENDS[device.type]:
        name = f"fastgpt:{backend}"
        if backend == "triton" and device.type == "cpu":
            providers.append(Provider(name, FASTGPT, skip=INTERPRETER_NOT_TIMED))
        elif backend not in available:
            providers.append(Provider(name, FASTGPT, skip=dispatch.backend_report()[backend]))
        elif op not in dispatch.IMPLEMENTATIONS[backend]:
            providers.append(Provider(name, FASTGPT, skip=f"backend {backend!r} has no kernel for {op}"))
        else:
            providers.append(Provider(name, FASTGPT, functools.partial(public_op, backend=backend)))
    return providers


def optional_module(name):
    """The module, or None when it is not installed or fails to import."""
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a broken install (wrong CUDA, missing symbol) counts as missing
        return None


def compiled(fn):
    """torch.compile of an eager function, specialised to each shape (dynamic=False) like a training
    loop with a fixed shape. Each case resets dynamo first (see reset_compiled), so the
    recompilation limit is never reached across a sweep."""
    return torch.compile(fn, dynamic=False)


def reset_compiled():
    torch._dynamo.reset()


def matches(name, pattern):
    """Whether a provider name matches a glob, or is the pattern itself: names such as `sdpa[cudnn]` and
    `fastgpt:triton[gluon]` hold brackets, which fnmatch reads as a character class (`[cudnn]` matches
    one letter), so their own name would not select them."""
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def select(providers, include=None, exclude=None):
    """Keep providers whose name matches one of the `include` globs (all when None) and none of `exclude`."""

    def wanted(name):
        if include and not any(matches(name, pattern) for pattern in include):
            return False
        return not (exclude and any(matches(name, pattern) for pattern in exclude))

    return [provider for provider in providers if wanted(provider.name)]


def baseline(name, fn=None, skip=None):
    return Provider(name, BASELINE, fn, skip)


def gpu_only_baseline(name, module_name, device, dtype, make_fn, dtypes=(torch.float16, torch.bfloat16)):
    """A baseline from an optional GPU library (flash_attn, liger_kernel): skipped with the reason on
    CPU, when the library is missing, or for dtypes it does not support."""
    library = module_name.split(".")[0]
    if torch.device(device).type != "cuda":
        return baseline(name, skip=f"{library} runs on CUDA only")
    module = optional_module(module_name)
    if module is None:
        return baseline(name, skip=f"{library} is not installed")
    if dtype not in dtypes:
        return baseline(name, skip=f"{library} supports {', '.join(dtype_name(d) for d in dtypes)} only")
    return baseline(name, make_fn(module))
