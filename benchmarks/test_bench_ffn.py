"""pytest-benchmark: the GPT-2 feed-forward block: fastgpt's backends against eager, F.linear/F.gelu and torch.compile.

Parametrised by provider and mode in conftest.py; the providers are fastgpt.bench's.
"""

OP = "ffn"


def test_ffn(run_provider, provider, mode):
    run_provider(OP, provider, mode)
