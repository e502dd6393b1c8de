"""A model's parameters in transparent huge pages, for decoding on CPU.

A batch-1 decode step reads every weight once (495 MB for GPT-2 small), so its speed is the rate at
which the weights stream from DRAM. On 4 KiB pages that stream needs a new TLB entry every 4 KiB; on
Linux's 2 MiB transparent huge pages, 512x fewer. Reading GPT-2 small's weights through fastgpt's cpu
linear kernel on the 2-core development machine: 31.3 GB/s on huge pages against 29.2 GB/s on 4 KiB
pages in the committed run (benchmarks/results/2026-11-29-gpt-targets-cpu.json); unrecorded runs saw
45-50 against 33 GB/s when the memory bus was quiet (benchmarks/gpt_targets.py --only bandwidth reports
both page sizes). torch's allocator leaves parameters on 4 KiB pages unless the process sets
THP_MEM_ALLOC_ENABLE=1 before its first allocation. The move costs one copy of the weights, once: 0.77 s
for GPT-2 small's 495 MB on that machine (the kernel zeroes, and may first compact, the huge pages),
paid by the first GPT.generate call.
"""

import mmap

import torch

# Every parameter starts on a cache line (64 bytes), as with torch's allocator.
PARAMETER_ALIGNMENT = 64


def huge_page_buffer(nbytes):
    """An uninitialised (nbytes,) uint8 CPU tensor on an anonymous private mapping advised MADV_HUGEPAGE
    (the kernel backs its 2 MiB-aligned ranges with huge pages when it has them free), or None where
    the platform offers no such advice (not Linux)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mapping, dtype=torch.uint8)  # the tensor keeps the mapping alive


def unique_parameters(module):
    """module's parameters, a shared (tied) one once."""
    return list({id(p): p for p in module.parameters()}.values())


def in_one_buffer(parameters):
    """Whether every parameter lies in the same storage (where move_to_huge_pages put them)."""
    storages = {p.untyped_storage().data_ptr() for p in parameters}
    return len(storages) == 1


def move_to_huge_pages(module):
    """Moves module's CPU parameters, each shared parameter once, into one huge-page buffer, unless they
    already share one storage. Only each Parameter's .data moves: the objects stay the same, so tied
    weights stay tied and optimizers, hooks and state dicts keep working (a state dict taken before no
    longer aliases the parameters). Values, shapes and dtypes are unchanged; a non-contiguous parameter
    becomes contiguous. Returns whether the parameters are in one buffer afterwards (False where huge
    pages are not offered or a parameter is not on the CPU)."""
    parameters = unique_parameters(module)
    if not parameters or any(p.device.type != "cpu" for p in parameters):
        return False
    if in_one_buffer(parameters):
        return True
    offsets, total = [], 0
    for p in parameters:
        offsets.append(total)
        total += -(-p.numel() * p.element_size() // PARAMETER_ALIGNMENT) * PARAMETER_ALIGNMENT
    # Outside inference mode, so the moved parameters stay usable for training after generate().
    with torch.inference_mode(False), torch.no_grad():
        buffer = huge_page_buffer(total)
        if buffer is None:
            return False
        for p, offset in zip(parameters, offsets):
            nbytes = p.numel() * p.element_size()
            moved = buffer[offset : offset + nbytes].view(p.dtype).view(p.shape)
            moved.copy_(p)
            p.data = moved
    return True
