"""GPT: a GPT-2-style decoder on fastgpt's fused ops, with KV-cache generation and GPT-2 weight import.

Mixed precision: the fused ops take tensors of one dtype, so the model runs in the dtype of its
parameters (convert with `model.to(torch.bfloat16)`); `forward` raises under torch.autocast.
"""

import math
import os

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastgpt import dispatch
from fastgpt.dispatch import BACKENDS, check_index_range, check_tensor, validate_targets
from fastgpt.functional import linear_cross_entropy
from fastgpt.nn import huge_pages, static_decode, weights
from fastgpt.nn.config import GPTConfig
from fastgpt.nn.generation import check_generate_arguments, sample_next_token, sample_next_token_on_device
from fastgpt.nn.layers import Block, KVCache, LayerNorm, Linear

IGNORE_INDEX = -100  # targets equal to this add nothing to the loss (torch's and transformers' convention)


def pad_prompts(prompts, device):
    """A list of prompts (1-D int64 tensors of token ids, generation.check_prompt_list's) -> (idx (B, T)
    int64, right-padded with id 0, T the longest length; lengths (B,) int64), both on `device`, which
    every prompt must be on (ValueError naming the one that is not, before any copy)."""
    for index, prompt in enumerate(prompts):
        if prompt.device != device:
            raise ValueError(
                f"GPT.generate: idx[{index}] must be on the model's device ({device}), got {prompt.device}"
            )
    lengths = [prompt.numel() for prompt in prompts]
    idx = torch.zeros(len(prompts), max(lengths), dtype=torch.int64, device=device)  # (B, T)
    for row, prompt in zip(idx, prompts):
        row[: prompt.numel()] = prompt
    return idx, torch.tensor(lengths, device=device)


class GPT(nn.Module):
    """GPT-2 architecture: token + position embeddings, n_layer pre-LN blocks, a final LayerNorm
    and an LM head (tied to the token embedding by default). State-dict names follow nanoGPT.

    Vocabulary padding: the token embedding and the LM head have config.padded_vocab_size rows
    (GPT-2's 50257 -> 50304), so the LM head GEMM and its logits have aligned row counts and strides.
    The padding is invisible: the padded rows start at zero, no token id reaches them, `forward`
    returns logits with config.vocab_size columns (a view of the padded GEMM output, row stride
    padded_vocab_size), `generate` samples among real ids only, the loss masks the padded rows out
    (loss_head), and the padded rows' gradients are exactly zero. num_params counts the real
    vocabulary. state_dict() holds the parameters as they are (padded, as nanoGPT's), and
    load_state_dict takes either padded or vocab_size-row vocabulary tensors (those are padded with
    zeros). save/load and from_hf work on vocab_size rows (GPT-2's and nanoGPT's shapes; checkpoints
    written before padding load unchanged). config.vocab_padding_multiple=1 turns padding off.
    """

    def __init__(self, config):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT: config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.padded_vocab_size, config.n_embd),
                "wpe": nn.Embedding(config.block_size, config.n_embd),
                "drop": nn.Dropout(config.dropout),
                "h": nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                "ln_f": LayerNorm(
                    config.n_embd, bias=config.bias, eps=config.layer_norm_eps, backend=config.backend
                ),
            }
        )
        self.lm_head = Linear(config.n_embd, config.padded_vocab_size, bias=False, backend=config.backend)
        if config.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections into the residual stream: std / sqrt(2 * n_layer).
        for name, parameter in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        with torch.no_grad():
            for weight in self.vocab_weights():
                weight[config.vocab_size :].zero_()  # (padded_vocab_size - vocab_size, C)
        self.activation_checkpointing = False  # set_activation_checkpointing

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def vocab_weights(self):
        """The distinct (padded_vocab_size, C) parameters: the token embedding, and the LM head
        unless it is tied to it."""
        wte, lm_head = self.transformer.wte.weight, self.lm_head.weight
        return [wte] if lm_head is wte else [wte, lm_head]

    def num_params(self, non_embedding=True):
        """Parameter count of the real vocabulary (the padded rows are left out); the position
        embedding is left out by default, as in nanoGPT."""
        total = sum(p.numel() for p in self.parameters())
        padded_rows = self.config.padded_vocab_size - self.config.vocab_size
        total -= padded_rows * self.config.n_embd * len(self.vocab_weights())
        return total - self.transformer.wpe.weight.numel() if non_embedding else total

    def set_backend(self, backend):
        """Runs every op of the model on `backend` ("auto", "reference", "triton", "cpu" or "cuda")."""
        if backend not in ("auto",) + BACKENDS:
            raise ValueError(
                f"GPT.set_backend: backend must be one of {('auto',) + BACKENDS}, got {backend!r}"
            )
        self.config.backend = backend
        for module in self.modules():
            if hasattr(module, "backend"):
                module.backend = backend
        return self

    def set_activation_checkpointing(self, enabled=True):
        """With enabled, a forward that builds a graph for backward keeps only each block's input: the
        backward runs each block's forward again (torch.utils.checkpoint, non-reentrant) to get what its
        own backward reads. Activation memory falls from every block's intermediates to one (B, T, C)
        tensor per block, for about one more forward pass of compute: the trade that lets a bigger model
        or batch train in the same memory (transformers' gradient_checkpointing_enable). Gradients are
        unchanged; with dropout in training mode the random state is saved and restored, so each
        block's recomputed masks are its first ones. Generation and no-grad forwards are unaffected."""
        if not isinstance(enabled, bool):
            raise TypeError(f"GPT.set_activation_checkpointing: enabled must be a bool, got {enabled!r}")
        self.activation_checkpointing = enabled
        return self

    # ------------------------------------------------------------------------------------------
    # Forward

    def check_tokens(self, op, idx):
        """Raises TypeError/ValueError unless idx is a (batch, seq_len) int64 (or int32) tensor of token
        ids in [0, vocab_size) on the model's device; see dispatch.check_index_range for when the ids'
        values are read."""
        check_tensor(op, "idx", idx, floating=False)
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                f"{op}: idx must be an int64 (torch.long) or int32 tensor of token ids, got dtype {idx.dtype}"
            )
        device = self.transformer.wte.weight.device
        if idx.device != device:
            raise ValueError(f"{op}: idx must be on the model's device ({device}), got {idx.device}")
        if idx.dim() != 2:
            raise ValueError(f"{op}: idx must have shape (batch, seq_len), got {tuple(idx.shape)}")
        check_index_range(op, "idx", idx, self.config.vocab_size)

    def hidden_states(self, idx, caches=None, start=0, block_params=None):
        """idx (B, T) int64 tokens at positions start .. start+T-1 -> final hidden states (B, T, C).
        block_params: decode_block_parameters(), gathered once per generate() call."""
        if idx.dim() != 2:
            raise ValueError(f"GPT: idx must have shape (batch, seq_len), got {tuple(idx.shape)}")
        if idx.shape[1] + start > self.config.block_size:
            raise ValueError(
                f"GPT: sequence length must be <= block_size={self.config.block_size}, got {start + idx.shape[1]}"
            )
        positions = torch.arange(start, start + idx.shape[1], device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))  # (B, T, C)
        decode_step = None if caches is None or block_params is None else self.fused_decode_step(x)
        if decode_step is not None:
            x = self.run_fused_decode_step(decode_step, x, block_params, caches, start)
        elif self.activation_checkpointing and caches is None and torch.is_grad_enabled():
            random_blocks = self.training and self.config.dropout > 0  # only dropout draws random numbers
            for block in self.transformer.h:
                x = checkpoint(block, x, use_reentrant=False, preserve_rng_state=random_blocks)  # (B, T, C)
        else:
            for layer, block in enumerate(self.transformer.h):
                x = block(x, None if caches is None else caches[layer], start)
        return self.transformer.ln_f(x)

    def fused_decode_step(self, x):
        """The function that runs every block over x (B, T, C) in one call (dispatch.fused_decode_step:
        the cpu backend's decode_blocks, for the few rows of a decode step), or None. Only outside
        autograd and without dropout, which that call does not do."""
        if torch.is_grad_enabled() or (self.training and self.config.dropout > 0):
            return None
        rows = x.shape[0] * x.shape[1]
        return dispatch.fused_decode_step(
            self.config.backend, dispatch.device_type(x), x.dtype, self.config.head_dim, rows
        )

    def run_fused_decode_step(self, decode_step, x, block_params, caches, start, positions=None):
        """decode_step (fused_decode_step's function) over x (B, T, C) with this model's attention and
        activation settings: every block, the new keys and values written into caches at start .. start+T-1,
        or at positions (B,) per sequence (T = 1). Returns the residual stream after the last block."""
        config = self.config
        return decode_step(
            x, block_params, [cache.keys for cache in caches], [cache.values for cache in caches], start,
            config.n_head, config.layer_norm_eps, 1.0 / math.sqrt(config.head_dim), config.activation, positions,
        )  # fmt: skip

    def decode_hidden_state(self, tokens, positions, caches, block_params):
        """One static decode step's final hidden state: tokens (B, 1), sequence b's at positions[b] (a
        (B,) int64 tensor on the model's device), written with their keys and values into caches at those
        positions, each attending to its own first positions[b] + 1 keys -> (B, C) after ln_f. One fused
        call where the cpu backend runs every op (fused_decode_step; it reads the positions on the host,
        which is the CPU's memory there), else each block's decode_at, which no host read stalls (a CUDA
        graph captures it). block_params: decode_block_parameters()."""
        transformer = self.transformer
        x = transformer.drop(transformer.wte(tokens) + transformer.wpe(positions)[:, None])  # (B, 1, C)
        decode_step = self.fused_decode_step(x)
        if decode_step is not None:
            x = self.run_fused_decode_step(decode_step, x, block_params, caches, 0, positions)
        else:
            lengths = positions + 1  # (B,): the keys cached once these tokens' are written
            for block, cache in zip(transformer.h, caches):
                x = block.decode_at(x, cache, positions, lengths)  # (B, 1, C)
        return transformer.ln_f(x)[:, -1]  # (B, C)

    def decode_block_parameters(self):
        """Every block's parameters in decode_blocks' order: per block, the weight and bias (or None)
        of ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc and mlp.c_proj."""
        block_params = []
        for block in self.transformer.h:
            for module in (
                block.ln_1,
                block.attn.c_attn,
                block.attn.c_proj,
                block.ln_2,
                block.mlp.c_fc,
                block.mlp.c_proj,
            ):
                block_params += (module.weight, module.bias)
        return block_params

    def logits(self, x):
        """x (..., C) -> logits (..., vocab_size): the LM head over all padded_vocab_size rows, whose
        output rows keep an aligned stride, viewed without the padded columns."""
        return self.lm_head(x)[..., : self.config.vocab_size]

    def forward(self, idx, targets=None):
        """idx (B, T) int64 -> logits (B, T, vocab_size), a view whose rows have stride
        padded_vocab_size; or, given targets (B, T) int64 (the next token of each position, already
        shifted as in nanoGPT; IGNORE_INDEX=-100 skips a position), the mean cross-entropy loss as a
        float32 scalar. The loss goes through linear_cross_entropy over the padded LM head with the
        padded rows masked out (loss_head), so the (B, T, vocab) logits are never built in training
        and the padded rows take no part in the softmax. Unlike nanoGPT, it returns only the loss."""
        self.check_tokens("GPT", idx)
        if targets is not None:
            validate_targets(
                "GPT", targets, idx.shape, idx.device, self.config.vocab_size, IGNORE_INDEX, device_of="idx"
            )
        if torch.is_autocast_enabled(idx.device.type):
            raise RuntimeError(
                "GPT: torch.autocast is not supported, the fused ops run in the parameters' dtype; "
                "convert the model instead, e.g. model.to(torch.bfloat16)"
            )
        x = self.hidden_states(idx)  # (B, T, C)
        if targets is None:
            return self.logits(x)  # (B, T, vocab_size)
        head, padding_bias = self.loss_head()
        return linear_cross_entropy(
            x, head, targets, bias=padding_bias, ignore_index=IGNORE_INDEX, backend=self.config.backend
        )

    def loss_head(self):
        """The LM head as the loss takes it: the whole padded weight (padded_vocab_size, C), so that the
        loss GEMMs run on aligned rows (at GPT-2's odd 50257, Triton's dW GEMM spills 2.2 KB and loses
        its 16-byte loads: fastgpt/ops/triton_cross_entropy.gpu_compile_cases), and a bias
        (padded_vocab_size,) of 0 on the real ids and -inf on the padded rows, which takes those out of
        the softmax (exp(-inf) = 0: no probability, exactly zero gradient). Without padding: (weight,
        None). The bias is built per call (two small ops): no buffer to keep in step with the
        parameters' device and dtype."""
        weight = self.lm_head.weight  # (padded_vocab_size, C)
        if self.config.padded_vocab_size == self.config.vocab_size:
            return weight, None
        padding_bias = torch.zeros(self.config.padded_vocab_size, dtype=weight.dtype, device=weight.device)
        padding_bias[self.config.vocab_size :] = float("-inf")
        return weight, padding_bias

    # ------------------------------------------------------------------------------------------
    # Generation

    @torch.inference_mode()
    def generate(
        self,
        idx,
        max_new_tokens,
        temperature=1.0,
        top_k=None,
        top_p=None,
        eos_token_id=None,
        callback=None,
        cuda_graph=False,
    ):
        """Extends idx (B, T) by up to max_new_tokens tokens each and returns (B, T + new) int64.

        idx may instead be a list of prompts of any lengths (1-D int64 tensors on the model's device):
        they are generated as one batch (right-padded; each sequence's positions, cache length and
        attention are its own, so each continues as it would alone) and the result is a list of 1-D
        tensors, each prompt followed by its new tokens, up to and including its first eos_token_id.
        That batch runs the static decode step described below (eagerly, or captured with
        cuda_graph=True), on any device.

        temperature=0 is greedy (a positive temperature is at least generation.MIN_TEMPERATURE,
        2**-100); otherwise tokens are drawn with torch's global
        generator after top-k and top-p filtering, so torch.manual_seed makes it reproducible. The
        prompt is prefilled into a preallocated KV cache per layer (B, n_kv_head, T + max_new_tokens,
        D), then each step runs causal_attention with one query against cache views. With
        eos_token_id, a sequence that produced it keeps emitting eos_token_id, and
        generation stops early once all have, so the result may be shorter than T + max_new_tokens.
        T + max_new_tokens may exceed block_size (for a (B, T) idx): then each token is predicted from
        the last block_size tokens, as nanoGPT's generate does; past the window each token costs a
        forward over block_size tokens, as every token does in nanoGPT (_generate_past_the_window).
        The model runs in eval mode during the call (no dropout) and its mode is restored after.
        callback, if given, is called with each step's new tokens (B,) as soon as they are chosen
        (to stream them; for a list of prompts, sequence b's i-th new token is element b of the i-th
        call). On CPU, the first call moves the parameters into one buffer of transparent
        huge pages (huge_pages.move_to_huge_pages: the Parameter objects stay, their .data moves), which
        the weight reads of every decode step stream faster.

        On CUDA, with cuda_graph=True, the decode steps after the prefill run as one static step
        (fastgpt.nn.static_decode): the position lives on the device, the attention reads the cache's
        valid length there, tokens are sampled on the device, and the step is captured in a CUDA graph
        and replayed per token. The graph, its KV caches and output buffer stay with the model, so a
        later call with the same batch size, prompt + new token count, sampling arguments and weights
        replays it from its first step without capturing again (release_decode_graph() frees them; a
        call that needs other shapes replaces them). Greedy tokens equal the uncaptured path's up
        to the attention's rounding (its splits are sized for the whole cache, not the current
        length), so a near-tie may break differently; sampling draws from the same distribution.
        With eos_token_id the host checks for the end every static_decode.EOS_CHECK_INTERVAL tokens
        instead of every token, and the callback gets the tokens at those checks (the same tokens as
        without the graph: none after the end). cuda_graph=False, the default, keeps the per-op loop
        (as on CPU) for a (B, T) idx: the captured path was written without a GPU, and becomes the default once its GPU tests
        (tests/test_generate.py -m gpu) pass and `fastgpt bench --ops gpt` shows it faster.
        """
        config = self.config
        check_generate_arguments(
            idx, max_new_tokens, temperature, top_k, top_p, eos_token_id,
            block_size=config.block_size, vocab_size=config.vocab_size, callback=callback,
        )  # fmt: skip
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"GPT.generate: cuda_graph must be a bool, got {cuda_graph!r}")
        lengths = None
        if isinstance(idx, (list, tuple)):
            idx, lengths = pad_prompts(idx, self.transformer.wte.weight.device)  # (B, T), (B,)
        self.check_tokens("GPT.generate", idx)
        if idx.device.type == "cpu":
            huge_pages.move_to_huge_pages(self)  # once: each decode step streams every weight from DRAM
        was_training = self.training
        self.eval()
        try:
            if lengths is not None:
                return self._generate_ragged(
                    idx, lengths, max_new_tokens, temperature, top_k, top_p, eos_token_id, callback,
                    capture=cuda_graph and idx.is_cuda,
                )  # fmt: skip
            if idx.shape[1] + max_new_tokens > config.block_size:
                return self._generate_past_the_window(
                    idx, max_new_tokens, temperature, top_k, top_p, eos_token_id, callback, cuda_graph
                )
            return self._generate_in_the_window(
                idx, max_new_tokens, temperature, top_k, top_p, eos_token_id, callback, cuda_graph
            )
        finally:
            self.train(was_training)

    def _generate_in_the_window(
        self, idx, max_new_tokens, temperature, top_k, top_p, eos_token_id, callback, cuda_graph
    ):
        """generate for idx (B, T) with T + max_new_tokens <= block_size: the cached loop, or the
        captured static step on CUDA with cuda_graph."""
        if cuda_graph and idx.is_cuda:
            return self._generate_static(
                idx, max_new_tokens, temperature, top_k, top_p, eos_token_id, callback, capture=True
            )
        return self._generate(idx, max_new_tokens, temperature, top_k, top_p, eos_token_id, callback)

    def _generate_past_the_window(
        self, idx, max_new_tokens, temperature, top_k, top_p, eos_token_id, callback, cuda_graph
    ):
        """generate for idx (B, T) with T + max_new_tokens > block_size, nanoGPT's way: every token is
        predicted from the last block_size tokens, at positions 0 .. block_size-1. The tokens that fit in
        the window come from the cached generate of the prompt's last (up to block_size) tokens; each
        one after that runs the model over the last block_size tokens, since with learned absolute
        positions no cached key stays valid once the window slides (nanoGPT, which keeps no cache,
        does that for every token). Returns (B, T + new) with the whole prompt."""
        block = self.config.block_size
        window = idx[:, -block:]  # (B, P): the prompt as the model sees it
        prompt_len = window.shape[1]
        in_window = block - prompt_len  # new tokens the cached generate can give
        out = self._generate_in_the_window(
            window, in_window, temperature, top_k, top_p, eos_token_id, callback, cuda_graph
        )  # (B, P + new)
        finished = None
        if eos_token_id is not None:
            finished = (out[:, prompt_len:] == eos_token_id).any(dim=1)  # (B,)
            if bool(finished.all()):  # every sequence ended inside the window
                return torch.cat([idx[:, :-block], out], dim=1)
        for _ in range(max_new_tokens - in_window):
            logits = self.logits(self.hidden_states(out[:, -block:])[:, -1])  # (B, vocab_size)
            next_token = sample_next_token(logits, temperature, top_k, top_p)  # (B,)
            if finished is not None:
                next_token = next_token.masked_fill(finished, eos_token_id)
                finished |= next_token == eos_token_id
            out = torch.cat([out, next_token[:, None]], dim=1)
            if callback is not None:
                callback(next_token)
            if finished is not None and bool(finished.all()):
                break
        return torch.cat([idx[:, :-block], out], dim=1)

    def _generation_buffers(self, batch, total, device):
        """(out, caches) of a generate call: out (B, total) int64, uninitialised, for the prompt and the
        new tokens, and one preallocated KVCache per layer (B, n_kv_head, total, D)."""
        out = torch.empty(batch, total, dtype=torch.long, device=device)  # (B, total)
        config, dtype = self.config, self.lm_head.weight.dtype
        caches = [
            KVCache(batch, config.n_kv_head, total, config.head_dim, dtype=dtype, device=device)
            for _ in range(config.n_layer)
        ]
        return out, caches

    def _generate(self, idx, max_new_tokens, temperature, top_k, top_p, eos_token_id, callback):
        batch, prompt_len = idx.shape
        out, caches = self._generation_buffers(batch, prompt_len + max_new_tokens, idx.device)
        out[:, :prompt_len] = idx
        if max_new_tokens == 0:
            return out
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)  # (B,)
        block_params = self.decode_block_parameters()
        position = 0
        tokens = idx  # the tokens not yet in the cache, (B, T) then (B, 1)
        for step in range(max_new_tokens):
            hidden = self.hidden_states(tokens, caches, position, block_params)[
                :, -1
            ]  # (B, C): only the last position
            logits = self.logits(hidden)  # (B, vocab_size): padded ids are never drawn
            next_token = sample_next_token(logits, temperature, top_k, top_p)  # (B,)
            position += tokens.shape[1]
            if eos_token_id is not None:
                next_token = next_token.masked_fill(finished, eos_token_id)
                finished |= next_token == eos_token_id
            out[:, position] = next_token
            if callback is not None:
                callback(next_token)
            if eos_token_id is not None and bool(finished.all()):
                return out[:, : position + 1]
            tokens = next_token[:, None]  # (B, 1)
        return out

    def _generate_static(
        self, idx, max_new_tokens, temperature, top_k, top_p, eos_token_id, callback, capture
    ):
        """_generate with the decode steps run by static_decode (captured in a CUDA graph with
        capture=True, CUDA only; eagerly otherwise, on any device): the prefill as in _generate, then
        max_new_tokens - 1 static steps. Tokens are sampled with sample_next_token_on_device. The
        buffers and the graph are static_decode.decoder_for's, kept for the next call that fits."""
        prompt_len = idx.shape[1]
        if max_new_tokens == 0:
            return idx.to(torch.long, copy=True)
        lengths = torch.full((idx.shape[0],), prompt_len, device=idx.device)  # (B,): every row is a prompt
        out, new_tokens = self._static_generation(
            idx, lengths, max_new_tokens, temperature, top_k, top_p, eos_token_id, callback, capture
        )
        return out[:, : prompt_len + new_tokens].clone()

    def _generate_ragged(
        self, idx, lengths, max_new_tokens, temperature, top_k, top_p, eos_token_id, callback, capture
    ):
        """generate for prompts of different lengths: idx (B, T) holds prompt b in its first lengths[b]
        columns (lengths: (B,) int64 on idx's device). Returns the list of 1-D tensors, each prompt and
        its new tokens, cut after its first eos_token_id."""
        if max_new_tokens == 0:
            new_tokens, out = 0, idx
        else:
            out, new_tokens = self._static_generation(
                idx, lengths, max_new_tokens, temperature, top_k, top_p, eos_token_id, callback, capture
            )
        rows = []
        for row, length in zip(out, lengths.tolist()):
            row = row[: length + new_tokens]  # (length + new,)
            if eos_token_id is not None:
                ends = (row[length:] == eos_token_id).nonzero()
                if len(ends):
                    row = row[: length + int(ends[0]) + 1]
            rows.append(row.clone())
        return rows

    def _static_generation(
        self, idx, lengths, max_new_tokens, temperature, top_k, top_p, eos_token_id, callback, capture
    ):
        """The prefill of idx (B, T) and max_new_tokens - 1 static decode steps (static_decode.decode).
        lengths: (B,) int64, the prompts' lengths in the right-padded idx (all T when every prompt fills
        its row): each sequence's first token is chosen from the hidden state of its last
        prompt position, and its decode steps start there (a causal prefill lets no prompt position see
        the padding after it, and each step overwrites the padding's cached keys before its sequence
        reads them). Returns (out, new_tokens): the decoder's (B, T + max_new_tokens) buffer, row b
        holding its prompt then new_tokens new tokens (refilled by the next call: copy them)."""
        batch, prompt_len = idx.shape
        sampling = (temperature, top_k, top_p)
        step = static_decode.decoder_for(
            self, batch, prompt_len + max_new_tokens, sampling, eos_token_id, idx.device
        )
        out, caches = step.out, step.caches
        out[:, :prompt_len] = idx
        hidden = self.hidden_states(idx, caches, 0)  # (B, T, C)
        last_hidden = hidden[torch.arange(batch, device=idx.device), lengths - 1]  # (B, C)
        next_token = sample_next_token_on_device(self.logits(last_hidden), *sampling)  # (B,)
        out.scatter_(1, lengths[:, None], next_token[:, None])  # each sequence's first new token
        step.start(lengths, next_token, max_new_tokens)
        if callback is not None:
            callback(next_token)
        if max_new_tokens == 1 or (eos_token_id is not None and bool(step.finished.all())):
            return out, 1
        return out, static_decode.decode(self, step, max_new_tokens - 1, callback, capture)

    def release_decode_graph(self):
        """Frees the output buffer, KV caches and CUDA graph that generate(cuda_graph=True) keeps for
        the next call of the same batch, total length and sampling (static_decode.decoder_for)."""
        static_decode.release(self)

    # ------------------------------------------------------------------------------------------
    # Weights

    def tie_weights(self):
        if self.config.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """nn.Module.load_state_dict, all or nothing: names (with strict) and shapes are checked
        first, so a state dict that does not fit raises weights.CheckpointError (a ValueError and a
        RuntimeError) and leaves every parameter unchanged, where torch would copy the tensors that
        fit before raising. The vocabulary tensors may have padded_vocab_size rows (state_dict()'s)
        or vocab_size rows (a checkpoint's, nanoGPT's): those get zero padded rows."""
        state_dict = weights.pad_vocab_rows(state_dict, self.config)
        weights.check_state_dict(self, state_dict, "load_state_dict: the state dict", strict=strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def _from_state_dict(cls, config, state, source, configuration):
        """A GPT holding exactly the given tensors (no random init, no second copy of the weights).
        Every tensor is checked against the config before the model exists; `source` names the
        tensors' origin and `configuration` the config's, for error messages."""
        with torch.device("meta"):
            model = cls(config)
        state = weights.pad_vocab_rows(state, config)
        weights.check_state_dict(model, state, source, configuration=configuration)
        model.load_state_dict(state, strict=True, assign=True)
        model.tie_weights()
        return model

    @classmethod
    def from_hf(cls, model_or_dir, **overrides):
        """A GPT with the weights of a transformers GPT-2 (GPT2LMHeadModel or GPT2Model), given as a
        model object or as a local directory holding config.json and model.safetensors or
        pytorch_model.bin, or either's index (model.safetensors.index.json) and shards. HF's Conv1D
        weights, (in, out), are transposed into nn.Linear's layout.
        The result has the dtype and device of the source weights and does not share storage with
        a source model. `overrides` set GPTConfig fields (dropout, backend, ...); dropout defaults to 0."""
        if isinstance(model_or_dir, (str, os.PathLike)):
            hf_config, hf_state = weights.read_hf_directory(model_or_dir)
            copy = False
        elif isinstance(model_or_dir, nn.Module) and hasattr(model_or_dir, "config"):
            hf_config, hf_state = model_or_dir.config.to_dict(), model_or_dir.state_dict()
            copy = True
        else:
            raise TypeError(
                "GPT.from_hf: model_or_dir must be a transformers GPT-2 model or a directory path, "
                f"got {type(model_or_dir).__name__}"
            )
        config = weights.config_from_hf(hf_config, **overrides)
        state = weights.state_dict_from_hf(hf_state, tie_weights=config.tie_weights, copy=copy)
        if copy:
            source, configuration = f"the {type(model_or_dir).__name__}'s weights", "its config"
        else:
            source, configuration = (
                os.path.join(model_or_dir, ""),
                os.path.join(model_or_dir, weights.CONFIG_FILE),
            )
        return cls._from_state_dict(config, state, f"GPT.from_hf: {source}", configuration)

    @classmethod
    def from_nanogpt(cls, path, **overrides):
        """A GPT with the weights of nanoGPT's checkpoint file (train.py's ckpt.pt, from a compiled model or
        not): the same state-dict names, its model_args as the config (the exact GELU of nanoGPT's MLP).
        `overrides` set GPTConfig fields (backend, dropout, ...); dropout defaults to 0. Read with
        torch.load(weights_only=True); a checkpoint that does not fit raises weights.CheckpointError."""
        model_args, state = weights.read_nanogpt_checkpoint(path)
        config = weights.config_from_nanogpt(model_args, **{"dropout": 0.0, **overrides})
        return cls._from_state_dict(config, state, f"GPT.from_nanogpt: {path}", f"{path}'s model_args")

    def save(self, directory):
        """Writes config.json and model.safetensors into directory: the vocabulary tensors with
        vocab_size rows (the padding is not saved), a tied LM head stored once."""
        weights.save(self, directory)

    def save_hf(self, directory, eos_token_id=None):
        """Writes the model as a transformers GPT-2 directory (config.json and model.safetensors), which
        `GPT2LMHeadModel.from_pretrained(directory)` loads into a model computing the same logits, and
        from_hf reads back. transformers need not be installed. Grouped-query attention is written as
        multi-head attention with each key/value head repeated, a model without biases gets zero biases,
        and dropout becomes resid_pdrop and embd_pdrop (attn_pdrop 0): see weights.hf_config.
        eos_token_id: the tokenizer's end-of-text id for the config (None: GPT-2's 50256 when vocab_size
        is GPT-2's 50257, else none). Tokenizer files are not written (`fastgpt export` writes them)."""
        weights.save_hf(self, directory, eos_token_id)

    @classmethod
    def load(cls, directory, *, device="cpu", **overrides):
        """The GPT saved by `save` in directory, on device; `overrides` set GPTConfig fields. A
        missing, corrupt or mismatched file raises weights.CheckpointError (a ValueError) naming the
        file and tensor, and no model is made."""
        config, state = weights.read_directory(directory, device, **overrides)
        return cls._from_state_dict(
            config,
            state,
            os.path.join(directory, weights.WEIGHTS_FILE),
            os.path.join(directory, weights.CONFIG_FILE),
        )
