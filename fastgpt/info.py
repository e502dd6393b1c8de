"""`fastgpt info`: versions, the device, and the status of every backend."""

import importlib
import importlib.metadata
import os
import platform

import torch
from rich.console import Console
from rich.table import Table

from fastgpt import dispatch
from fastgpt._cutlass_paths import cutlass_version, find_cutlass_include
from fastgpt.train.errors import UserError

PACKAGES = ("fastgpt", "torch", "triton", "transformers", "flash-attn", "liger-kernel")
# The environment variables that change what runs: the backend `auto` stands for (dispatch.py), the
# kernels inside the cuda backend (csrc/cuda/api_cuda.inc), the triton backend's attention
# (fastgpt/ops/triton_attention.py) and the cpu backend's instruction set (csrc/cpu/isa.h), and the
# host-synchronising value checks (dispatch.py).
ROUTING_VARIABLES = (
    "FASTGPT_BACKEND",
    "FASTGPT_CUDA_ATTENTION",
    "FASTGPT_CUDA_FFN",
    "FASTGPT_TRITON_ATTENTION",
    "FASTGPT_CPU_ISA",
    "FASTGPT_DEBUG",
    "TRITON_INTERPRET",
)


def package_versions():
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    # The running build's version with its local tag (PyPI's CUDA wheel says 2.11.0 in its metadata
    # but 2.11.0+cu130 here; the CPU wheel +cpu in both).
    versions["torch"] = torch.__version__
    versions["cuda (torch)"] = torch.version.cuda
    versions["cutlass headers"] = cutlass_header_version()
    versions["sm_90a attention (_C)"] = sm90_attention_kernels()
    return versions


def cutlass_header_version():
    """The version of the CUTLASS/CuTe headers a build here would use (the nvidia-cutlass wheel or
    $FASTGPT_CUTLASS_INCLUDE), or None where there are none. Whether the running _C was built with them
    is the next line's question."""
    include = find_cutlass_include()
    return None if include is None else cutlass_version(include)


def sm90_attention_kernels():
    """Whether the CUDA extension holds its Hopper attention kernels (csrc/cuda/*_sm90.cu), as fastgpt._C
    itself reports it: setup.py builds them only with the CUTLASS headers and a 9.0 entry in
    TORCH_CUDA_ARCH_LIST, so headers found now say nothing of the build. None without a _C."""
    if dispatch.backend_status()["cpu"] is not None:
        return None  # no fastgpt._C at all
    compiled = importlib.import_module("fastgpt.ops.compiled")
    if not compiled.HAS_CUDA_KERNELS:
        return "not built (a CPU-only _C)"
    if compiled.HAS_SM90_ATTENTION_KERNELS is None:
        return "unknown (fastgpt._C predates this report: rebuild it)"
    return "built" if compiled.HAS_SM90_ATTENTION_KERNELS else "not built"


def routing_overrides():
    """{variable: value} of the environment variables that change which backend or kernel runs, for
    those that are set."""
    return {name: os.environ[name] for name in ROUTING_VARIABLES if name in os.environ}


def device_description():
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, no CUDA GPU"


def add_arguments(parser):
    del parser  # no options


def run(args):
    del args
    try:
        dispatch.backend_status()
    except ValueError as error:  # a variable set to a value that names nothing (FASTGPT_CPU_ISA)
        raise UserError(str(error)) from error
    console = Console()
    versions = Table(title="versions", show_header=False)
    for name, version in package_versions().items():
        versions.add_row(name, version or "[dim]not installed[/dim]")
    console.print(versions)
    console.print(f"device: {device_description()}")
    overrides = routing_overrides()
    if overrides:
        console.print("set: " + ", ".join(f"{name}={value}" for name, value in overrides.items()))
    backends = Table(title="backends")
    backends.add_column("backend")
    backends.add_column("available")
    backends.add_column("why not")
    for name, reason in dispatch.backend_report().items():
        backends.add_row(name, "[green]yes[/green]" if reason is None else "[red]no[/red]", reason or "")
    console.print(backends)
    return 0
