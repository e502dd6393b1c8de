"""A recorder of the aten ops that read tensor values on the host, shared by the tests of what a CUDA
graph captures (the decode step, the training step).

Reading a device value on the host synchronises with the GPU, which a CUDA graph capture forbids: the
.item()/bool()/int() of a tensor, and ops whose output shape depends on the values. The tests run the
captured code on CPU tensors under HostReadRecorder and require that it records nothing.
"""

import inspect

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HOST_READING_OPS = {
    "aten::_local_scalar_dense",
    "aten::is_nonzero",
    "aten::equal",
    "aten::nonzero",
    "aten::masked_select",
    "aten::multinomial",
    "aten::repeat_interleave.Tensor",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
}


class HostReadRecorder(TorchDispatchMode):
    """Records the HOST_READING_OPS called under it, and indexing by a boolean mask (a nonzero), except
    the reads made inside the functions in `allowed` (those that read CPU values only, by design)."""

    def __init__(self, allowed=()):
        super().__init__()
        self.allowed_code = {function.__code__ for function in allowed}
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        masks = name == "aten::index.Tensor" and any(
            index is not None and index.dtype == torch.bool for index in args[1]
        )
        if (name in HOST_READING_OPS or masks) and not self._inside_allowed():
            self.reads.append(name)
        return func(*args, **(kwargs or {}))

    def _inside_allowed(self):
        return bool(self.allowed_code) and any(
            frame_info.frame.f_code in self.allowed_code for frame_info in inspect.stack()
        )
