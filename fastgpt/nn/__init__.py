"""Drop-in modules on fastgpt's fused ops, in nanoGPT's style and with nanoGPT's state-dict names."""

from fastgpt.nn.config import PRESETS, GPTConfig
from fastgpt.nn.layers import MLP, Block, CausalSelfAttention, KVCache, LayerNorm, Linear
from fastgpt.nn.model import GPT

__all__ = [
    "GPT",
    "MLP",
    "PRESETS",
    "Block",
    "CausalSelfAttention",
    "GPTConfig",
    "KVCache",
    "LayerNorm",
    "Linear",
]
