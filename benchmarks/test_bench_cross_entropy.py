"""pytest-benchmark: linear cross-entropy at GPT-2's vocabulary: fastgpt's backends against eager, F.cross_entropy(x @ W.T), torch.compile and Liger.

Parametrised by provider and mode in conftest.py; the providers are fastgpt.bench's.
"""

OP = "cross_entropy"


def test_cross_entropy(run_provider, provider, mode):
    run_provider(OP, provider, mode)
