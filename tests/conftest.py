"""Test configuration. Runs before any fastgpt module is imported, so the environment set here is
what the backends see: the Triton interpreter on machines without a GPU, and NaN-poisoned outputs."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTGPT_POISON_OUTPUTS", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

# Hypothesis profiles (tests/test_properties.py gives each backend a share of max_examples: 2.65x it
# per op). "ci" is the default; `pytest --hypothesis-profile=long` runs deeper, on larger shapes.
# Derandomized, so a failure reproduces with the same command; no deadline, as the first call of a
# kernel compiles it.
try:
    from hypothesis import settings
except ImportError:  # test_properties.py skips itself
    pass
else:
    settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True, print_blob=True)
    settings.register_profile("long", max_examples=2000, deadline=None, derandomize=True, print_blob=True)
    settings.load_profile("ci")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fresh_routes():
    """For a test that monkeypatches a backend's function: dispatch keeps the function it resolved,
    so the choices are dropped before the test (the next call resolves to the patch) and after it
    (the next test's calls resolve to the original again)."""
    from fastgpt import dispatch

    dispatch.forget_choices()
    yield
    dispatch.forget_choices()
