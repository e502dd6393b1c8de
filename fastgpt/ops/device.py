"""The GPU a Triton launch runs on.

Triton launches a kernel on the *current* CUDA device, on that device's current stream
(triton/runtime/jit.py, JITFunction.run: `device = driver.active.get_current_device()`), while torch
ops follow their tensors' device. An op called on tensors of cuda:1 while cuda:0 is current would have
its torch allocations on cuda:1 and its kernels launched on cuda:0, reading cuda:1 addresses there.
Torch's custom ops set no device guard of their own (the cuda backend's C++ ops do, with CUDAGuard), so
each Triton custom op enters its tensors' device here.
"""

import contextlib

import torch


def on_device_of(tensor):
    """A context in which launches go to `tensor`'s GPU: torch.cuda.device(tensor.device) when that is
    not the current device; nothing for CPU tensors (the interpreter) or the current device."""
    if tensor.is_cuda and tensor.get_device() != torch.cuda.current_device():
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
