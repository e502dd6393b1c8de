"""A nanoGPT-style GPT-2 in plain eager PyTorch: the `torch.compile` baseline of the gpt benchmark,
and, in float64, the reference its errors are measured against.

It loads transformers GPT-2 weights (Conv1D's (in, out) weights transposed to nn.Linear's (out, in)),
so every model of the benchmark holds the same numbers. Attention is F.scaled_dot_product_attention.
Generation keeps a static KV cache (preallocated to prompt + new tokens, as in gpt-fast), so the
decode step has one shape and torch.compile compiles it once; the position is a device tensor, so
advancing it never recompiles or synchronises.
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

# transformers' GPT-2 stores these as Conv1D (in_features, out_features)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclasses.dataclass
class NanoGPTConfig:
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    block_size: int
    layer_norm_eps: float = 1e-5
    # nanoGPT's train.py pads GPT-2's vocabulary to a multiple of 64 (50257 -> 50304) for aligned
    # GEMMs; the padded logits take part in its loss (zero rows here: the loss rises by about
    # padded rows / vocab, 1e-3 at GPT-2). Generation reads the real vocabulary's logits only.
    vocab_multiple: int = 1

    @property
    def padded_vocab_size(self):
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.k_cache = self.v_cache = None  # (B, nh, T_max, hd) once setup_cache runs

    def forward(self, x, positions=None):
        batch, seq, channels = x.shape
        q, k, v = self.c_attn(x).split(channels, dim=2)
        head_dim = channels // self.n_head
        q, k, v = (
            t.view(batch, seq, self.n_head, head_dim).transpose(1, 2) for t in (q, k, v)
        )  # (B, nh, T, hd)
        if positions is None or seq > 1:
            if positions is not None:  # prefill from an empty cache
                self.k_cache.index_copy_(2, positions, k)
                self.v_cache.index_copy_(2, positions, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # one decode step: attend to every cached position up to this one
            self.k_cache.index_copy_(2, positions, k)
            self.v_cache.index_copy_(2, positions, v)
            visible = (torch.arange(self.k_cache.shape[2], device=x.device) <= positions)[
                None, :
            ]  # (1, T_max)
            y = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=visible)
        y = y.transpose(1, 2).contiguous().view(batch, seq, channels)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, positions=None):
        x = x + self.attn(self.ln_1(x), positions)
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.padded_vocab_size, config.n_embd),
                "wpe": nn.Embedding(config.block_size, config.n_embd),
                "h": nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                "ln_f": nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2

    def forward(self, idx, targets=None, positions=None):
        """idx (B, T). Training: targets (B, T) -> mean loss. Inference: positions (T,) in the KV cache
        -> logits of the last position (B, V)."""
        if positions is None:
            positions = torch.arange(idx.shape[1], device=idx.device)
            cached = None
        else:
            cached = positions
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, cached)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, -1])[:, : self.config.vocab_size]  # (B, V)
        logits = self.lm_head(x)  # (B, T, padded V)
        if logits.dtype != torch.float64:
            logits = logits.float()  # the loss in float32 at least, as transformers computes it
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def setup_cache(self, batch, max_len):
        weight = self.lm_head.weight
        for block in self.transformer.h:
            shape = (batch, self.config.n_head, max_len, self.config.n_embd // self.config.n_head)
            block.attn.k_cache = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
            block.attn.v_cache = torch.zeros(shape, device=weight.device, dtype=weight.dtype)

    @classmethod
    def from_hf(cls, hf_model, vocab_multiple=1):
        """The same weights as a transformers GPT2LMHeadModel, in nn.Linear layout; vocab_multiple > 1
        pads the tied embedding and LM head with zero rows (see NanoGPTConfig.vocab_multiple)."""
        hf_config = hf_model.config
        config = NanoGPTConfig(
            n_layer=hf_config.n_layer,
            n_head=hf_config.n_head,
            n_embd=hf_config.n_embd,
            vocab_size=hf_config.vocab_size,
            block_size=hf_config.n_positions,
            layer_norm_eps=hf_config.layer_norm_epsilon,
            vocab_multiple=vocab_multiple,
        )
        model = cls(config)
        weight = hf_model.lm_head.weight
        model.to(device=weight.device, dtype=weight.dtype)
        state = {}
        for name, value in hf_model.state_dict().items():
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # causal-mask buffers of older transformers
            state[name] = value.t() if name.endswith(CONV1D_WEIGHTS) else value
        padding = config.padded_vocab_size - config.vocab_size
        for name in ("transformer.wte.weight", "lm_head.weight"):
            state[name] = F.pad(state[name], (0, 0, 0, padding))  # (padded V, C), zero rows last
        model.load_state_dict(state, strict=True)
        return model


@torch.no_grad()
def generate_greedy(step, model, prompts, new_tokens):
    """Greedy decoding with the static KV cache. `step` is the model or its torch.compile;
    prompts (B, P) -> (B, P + new_tokens)."""
    batch, prompt_len = prompts.shape
    model.setup_cache(batch, prompt_len + new_tokens)
    logits = step(prompts, positions=torch.arange(prompt_len, device=prompts.device))  # (B, V)
    tokens = [prompts, logits.argmax(-1, keepdim=True)]
    position = torch.full((1,), prompt_len, device=prompts.device, dtype=torch.long)
    for _ in range(new_tokens - 1):
        logits = step(tokens[-1], positions=position)
        tokens.append(logits.argmax(-1, keepdim=True))
        position += 1
    return torch.cat(tokens, dim=1)
