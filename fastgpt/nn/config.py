"""GPTConfig: the hyperparameters of a GPT, with the GPT-2 family as presets."""

import dataclasses
from dataclasses import dataclass

from fastgpt.activations import ACTIVATIONS
from fastgpt.dispatch import BACKENDS

GPT2_VOCAB_SIZE = 50257  # GPT-2's BPE vocabulary (50,000 merges + 256 bytes + <|endoftext|>)
# The embedding and LM head get their rows rounded up to a multiple of this (GPT-2's 50257 -> 50304,
# as nanoGPT does): a row count, and so a logits row stride, that GEMMs can tile and vectorise.
VOCAB_PADDING_MULTIPLE = 64

# name -> the fields that differ from GPTConfig's defaults (GPT-2 small).
PRESETS = {
    "tiny": {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 256},
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768},  # 124M
    "gpt2-medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024},  # 350M
    "gpt2-large": {"n_layer": 36, "n_head": 20, "n_embd": 1280},  # 774M
    "gpt2-xl": {"n_layer": 48, "n_head": 25, "n_embd": 1600},  # 1558M
}


@dataclass
class GPTConfig:
    """Hyperparameters of `fastgpt.nn.GPT`. The defaults are GPT-2 small (124M).

    n_kv_head: key/value heads (GQA/MQA); None means n_head (plain multi-head attention).
    n_inner: the MLP's hidden width; None means 4 * n_embd.
    dropout: applied to the embeddings and to the output of each residual branch (attention and
        MLP) in training mode. The fused attention kernels have no dropout on the attention
        probabilities, so, unlike nanoGPT, attention-probability dropout is not applied.
    bias: biases in the Linear layers and LayerNorms, as in GPT-2.
    tie_weights: the LM head shares the token embedding matrix, as in GPT-2.
    activation: the MLP's activation, one of fastgpt's fused activations (gelu_tanh is GPT-2's gelu_new).
    backend: the fastgpt backend every op of the model runs on ("auto" picks per device).
    vocab_padding_multiple: the token embedding and the LM head are allocated with
        `padded_vocab_size` rows, vocab_size rounded up to a multiple of this (64: GPT-2's 50257
        becomes 50304, as in nanoGPT); 1 turns padding off. vocab_size stays the real vocabulary:
        the padded rows start at zero, no token id reaches them, the logits and the loss cover the
        vocab_size real rows only, and their gradients are exactly zero (see fastgpt.nn.GPT).
        Checkpoints hold vocab_size rows whatever this is.
    """

    block_size: int = 1024
    vocab_size: int = GPT2_VOCAB_SIZE
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None
    n_inner: int | None = None
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True
    activation: str = "gelu_tanh"
    layer_norm_eps: float = 1e-5
    backend: str = "auto"
    vocab_padding_multiple: int = VOCAB_PADDING_MULTIPLE

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_inner is None:
            self.n_inner = 4 * self.n_embd
        for name in (
            "block_size", "vocab_size", "n_layer", "n_head", "n_embd", "n_kv_head", "n_inner",
            "vocab_padding_multiple",
        ):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig: {name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig: n_embd must be divisible by n_head, got n_embd={self.n_embd}, n_head={self.n_head}"
            )
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"GPTConfig: n_head must be a multiple of n_kv_head (GQA), got n_head={self.n_head}, n_kv_head={self.n_kv_head}"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise TypeError(f"GPTConfig: dropout must be a float in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig: dropout must be in [0, 1), got {self.dropout!r}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= eps < float("inf"):
            raise ValueError(f"GPTConfig: layer_norm_eps must be a finite float >= 0, got {eps!r}")
        for name in ("bias", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"GPTConfig: {name} must be a bool, got {getattr(self, name)!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GPTConfig: activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.backend not in ("auto",) + BACKENDS:
            raise ValueError(
                f"GPTConfig: backend must be one of {('auto',) + BACKENDS}, got {self.backend!r}"
            )

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self):
        """The rows of the token embedding and the LM head: vocab_size rounded up to a multiple of
        vocab_padding_multiple."""
        multiple = self.vocab_padding_multiple
        return -(-self.vocab_size // multiple) * multiple

    @classmethod
    def preset(cls, name, **overrides):
        """A preset by name (tiny, gpt2, gpt2-medium, gpt2-large, gpt2-xl), with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"GPTConfig.preset: name must be one of {tuple(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self):
        return dataclasses.asdict(self)
