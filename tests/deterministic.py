"""Settings that determinism tests change for a block of a test, each restored after it:
torch.use_deterministic_algorithms(True), and the number of intra-op threads."""

import contextlib

import torch


@contextlib.contextmanager
def deterministic_algorithms(warn_only=True):
    """Deterministic algorithms on inside (fastgpt's backwards take their fixed-order paths), the previous
    mode and warn_only restored after. warn_only=True by default: the eager references' own ops only
    warn where torch has no deterministic version."""
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@contextlib.contextmanager
def intra_op_threads(count):
    """torch.set_num_threads(count) inside (the cpu kernels' OpenMP thread count too), the previous count
    restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
