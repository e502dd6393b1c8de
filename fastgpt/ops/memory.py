"""Output allocation shared by the kernel launchers.

With FASTGPT_POISON_OUTPUTS=1 (the test suite sets it), every output buffer starts filled with NaN,
so an element a kernel forgets to write shows up as NaN instead of as stale memory that happens to
look right.
"""

import torch

from fastgpt.dispatch import env_switch


def poison_enabled():
    return env_switch("FASTGPT_POISON_OUTPUTS")


def new_output(shape, dtype, device):
    """torch.empty, or NaN-filled under FASTGPT_POISON_OUTPUTS=1."""
    if poison_enabled():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
