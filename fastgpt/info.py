"""`fastgpt info`: versions, the device, and the status of every backend."""

import importlib.metadata
import os
import platform

import torch
from rich.console import Console
from rich.table import Table

from fastgpt import dispatch
from fastgpt._cutlass_paths import cutlass_version, find_cutlass_include

PACKAGES = ("fastgpt", "torch", "triton", "transformers", "flash-attn", "liger-kernel")


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
    versions["cutlass"] = cutlass_header_version()
    return versions


def cutlass_header_version():
    """The version of the CUTLASS/CuTe headers that the CUDA extension's Hopper attention kernel is built
    with (from the nvidia-cutlass wheel or $FASTGPT_CUTLASS_INCLUDE), or None where there are none."""
    include = find_cutlass_include()
    return None if include is None else cutlass_version(include)


def device_description():
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, no CUDA GPU"


def add_arguments(parser):
    del parser  # no options


def run(args):
    del args
    console = Console()
    versions = Table(title="versions", show_header=False)
    for name, version in package_versions().items():
        versions.add_row(name, version or "[dim]not installed[/dim]")
    console.print(versions)
    console.print(f"device: {device_description()}")
    backends = Table(title="backends")
    backends.add_column("backend")
    backends.add_column("available")
    backends.add_column("why not")
    for name, reason in dispatch.backend_status().items():
        backends.add_row(name, "[green]yes[/green]" if reason is None else "[red]no[/red]", reason or "")
    console.print(backends)
    return 0
