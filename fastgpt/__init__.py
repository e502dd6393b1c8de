"""fastgpt: fused Triton and CUDA C++ kernels for GPT models, with a CPU path behind the same API."""

from fastgpt.compile_cache import tag_compile_caches
from fastgpt.dispatch import available_backends
from fastgpt.functional import causal_attention, fused_ffn, layer_norm, linear, linear_cross_entropy

tag_compile_caches()  # so that torch.compile never reuses a graph compiled against other fastgpt code

__version__ = "0.1.0"


def patch(model, *, attention=True, mlp=True, layer_norm=True, projections=True, loss=True, backend="auto"):
    """Runs a transformers GPT-2 model on fastgpt's fused ops, in place; see fastgpt.integrations.transformers.
    transformers is imported on the first call, so `import fastgpt` works without it."""
    from fastgpt.integrations.transformers import patch as patch_transformers

    return patch_transformers(
        model,
        attention=attention,
        mlp=mlp,
        layer_norm=layer_norm,
        projections=projections,
        loss=loss,
        backend=backend,
    )


__all__ = [
    "available_backends",
    "causal_attention",
    "fused_ffn",
    "layer_norm",
    "linear",
    "linear_cross_entropy",
    "patch",
]
