"""torch.use_deterministic_algorithms(True) for a block of a test, with the previous setting restored."""

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
