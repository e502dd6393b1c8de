"""pytest-benchmark: GPT-2 training step and greedy generation: fastgpt.nn and patched transformers against transformers (sdpa) and a nanoGPT-style model (eager and torch.compile).

Parametrised by provider and mode in conftest.py; the providers are fastgpt.bench's.
"""

OP = "gpt"


def test_gpt(run_provider, provider, mode):
    run_provider(OP, provider, mode)
