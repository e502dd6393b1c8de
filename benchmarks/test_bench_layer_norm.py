"""pytest-benchmark: LayerNorm with the fused residual add: fastgpt's backends against eager, F.layer_norm, torch.compile and Liger.

Parametrised by provider and mode in conftest.py; the providers are fastgpt.bench's.
"""

OP = "layer_norm"


def test_layer_norm(run_provider, provider, mode):
    run_provider(OP, provider, mode)
