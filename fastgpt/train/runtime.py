"""Where a command runs: the device, the compute dtype, and, under torchrun, the process group."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastgpt.dispatch import BACKENDS
from fastgpt.train.errors import UserError

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # what the model computes in; parameters the optimizer updates stay float32
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self):
        """Only this process prints and writes files."""
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def resolve_device(name, index=0):
    if name not in DEVICES:
        raise UserError(f"--device must be one of {DEVICES}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was given, but torch sees no CUDA GPU (try --device cpu)")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", index)
    return torch.device("cpu")


def resolve_dtype(name, device, *, choices=("auto", "float32", "bfloat16")):
    """'auto' is bfloat16 on GPUs that have it, float32 elsewhere."""
    if name not in choices:
        raise UserError(f"--dtype must be one of {choices}, got {name!r}")
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return DTYPES[name]


def start(device_name, dtype_name):
    """The Runtime of this process. Under torchrun (RANK and WORLD_SIZE set) it joins the process
    group: nccl with one GPU per process (LOCAL_RANK) on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        device = resolve_device(device_name)
        return Runtime(device, resolve_dtype(dtype_name, device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return Runtime(device, resolve_dtype(dtype_name, device), rank, world_size)


def stop(runtime):
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def add_arguments(parser, dtypes=("auto", "float32", "bfloat16")):
    """--device, --dtype and --backend, shared by train, generate and eval."""
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: cuda when a GPU is visible")
    parser.add_argument(
        "--dtype",
        choices=dtypes,
        default="auto",
        help="compute dtype; auto: bfloat16 on GPUs that have it, else float32",
    )
    parser.add_argument(
        "--backend",
        choices=("auto",) + BACKENDS,
        default="auto",
        help="fastgpt kernels to run (auto: the fastest here)",
    )
