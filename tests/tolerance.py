"""FlashAttention's tolerance rule, shared by every kernel test.

A kernel output in dtype d is compared with the float64 reference computed on the same (upcast)
inputs. Its largest error may be at most `factor` (2) times the largest error of the same
computation done by eager PyTorch in dtype d, plus a floor: twice the rounding error of storing the
reference in d (FlashAttention's `(ref + 0.3 - 0.3 - ref)` term), plus a tiny absolute slack so
exact-in-float32 results do not fail on summation order alone.
"""

import torch

ABSOLUTE_SLACK = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4, torch.float64: 1e-12}


def rounding_floor(reference64, dtype):
    stored = (reference64.to(dtype) + 0.3 - 0.3).double()
    finite = torch.isfinite(reference64)
    if not bool(finite.any()):
        return 0.0
    return 2.0 * float((stored - reference64)[finite].abs().max())


def max_error(actual, reference64):
    """Largest |actual - reference| over finite reference elements; NaN/Inf must agree elsewhere."""
    actual = actual.double()
    finite = torch.isfinite(reference64)
    expected_special, actual_special = reference64[~finite], actual[~finite]
    assert torch.equal(actual_special.isnan(), expected_special.isnan()), (
        "NaN positions differ from the reference"
    )
    infinite = ~expected_special.isnan()
    assert torch.equal(actual_special[infinite], expected_special[infinite]), (
        "Inf values differ from the reference"
    )
    if not bool(finite.any()):
        return 0.0
    return float((actual - reference64)[finite].abs().max())


def assert_close(name, actual, reference64, eager, *, factor=2.0):
    """Assert the FlashAttention rule for one output or gradient."""
    assert actual is not None, f"{name}: missing"
    assert actual.shape == reference64.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(reference64.shape)}"
    )
    assert not torch.isnan(actual[torch.isfinite(reference64)]).any(), (
        f"{name}: NaN where the reference is finite"
    )
    dtype = eager.dtype
    kernel_error = max_error(actual, reference64)
    eager_error = max_error(eager, reference64)
    bound = factor * eager_error + rounding_floor(reference64, dtype) + ABSOLUTE_SLACK[dtype]
    assert kernel_error <= bound, (
        f"{name}: max error {kernel_error:.3e} exceeds {factor}x eager {dtype} error {eager_error:.3e} + floor "
        f"(bound {bound:.3e})"
    )
