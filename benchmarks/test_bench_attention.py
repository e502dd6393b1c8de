"""pytest-benchmark: causal attention: fastgpt's backends against eager, SDPA, torch.compile and flash-attn.

Parametrised by provider and mode in conftest.py; the providers are fastgpt.bench's.
"""

OP = "attention"


def test_attention(run_provider, provider, mode):
    run_provider(OP, provider, mode)
