"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling,
and the argument checks of GPT.generate."""

import torch

# The smallest positive temperature. The logits are divided by it in float32, which torch does through
# its reciprocal: below 1 / 3.4e38 (float32's largest) that is inf (below 1.4e-45 the temperature is 0
# itself), the logits become +-inf and their softmax NaN, so torch.multinomial raised and the on-device
# draw (argmax of NaN) returned an arbitrary token. At 2**-100 logits up to 2.7e8 stay finite, and any
# two logits further apart than about 1e-28 already sample as greedy decoding would.
MIN_TEMPERATURE = 2.0**-100


def check_prompt_list(prompts, op="GPT.generate"):
    """Raises TypeError/ValueError unless prompts is a non-empty list (or tuple) of 1-D int64 tensors of
    at least one token id each, naming the one that is not; returns the longest length."""
    if not prompts:
        raise ValueError(
            f"{op}: idx, a list of prompts, must hold at least one, got an empty {type(prompts).__name__}"
        )
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, torch.Tensor) or prompt.dtype != torch.int64:
            raise TypeError(
                f"{op}: idx[{index}] must be a 1-D int64 tensor of token ids, got "
                f"{prompt.dtype if isinstance(prompt, torch.Tensor) else type(prompt).__name__}"
            )
        if prompt.dim() != 1 or prompt.numel() == 0:
            raise ValueError(
                f"{op}: idx[{index}] must be a 1-D tensor of at least one token id, got shape {tuple(prompt.shape)}"
            )
    return max(prompt.numel() for prompt in prompts)


def check_generate_arguments(
    idx, max_new_tokens, temperature, top_k, top_p, eos_token_id, *, block_size, vocab_size, callback=None
):
    """Raises TypeError/ValueError for bad GPT.generate arguments, before any compute (the model
    checks idx's device and token values with GPT.check_tokens). idx: (B, T) int64, or a list of 1-D
    prompts, which must fit the context window with max_new_tokens (a (B, T) idx may go past it)."""
    op = "GPT.generate"
    is_list = isinstance(idx, (list, tuple))
    if is_list:
        prompt_len = check_prompt_list(idx, op)
    elif not isinstance(idx, torch.Tensor):
        raise TypeError(
            f"{op}: idx must be a torch.Tensor of token ids (or a list of 1-D prompts), got {type(idx).__name__}"
        )
    elif idx.dtype != torch.int64:
        raise TypeError(f"{op}: idx must be an int64 (torch.long) tensor, got dtype {idx.dtype}")
    elif idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(
            f"{op}: idx must have shape (batch, prompt_len) with prompt_len >= 1, got {tuple(idx.shape)}"
        )
    else:
        prompt_len = idx.shape[1]
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"{op}: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    total = prompt_len + max_new_tokens
    if total > block_size and is_list:
        raise ValueError(
            f"{op}: for a list of prompts, the longest prompt_len + max_new_tokens must be <= block_size (a "
            f"(batch, prompt_len) idx may go past it), got {prompt_len} + {max_new_tokens} = {total} > {block_size}"
        )
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (temperature == 0 or MIN_TEMPERATURE <= temperature < float("inf"))
    ):
        raise ValueError(
            f"{op}: temperature must be a float >= 0 and finite (0 is greedy, a positive one at least "
            f"2**-100), got {temperature!r}"
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"{op}: top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1
    ):
        raise ValueError(f"{op}: top_p must be None or a float in (0, 1], got {top_p!r}")
    if eos_token_id is not None and (
        isinstance(eos_token_id, bool)
        or not isinstance(eos_token_id, int)
        or not 0 <= eos_token_id < vocab_size
    ):
        raise ValueError(
            f"{op}: eos_token_id must be None or an int in [0, {vocab_size}), got {eos_token_id!r}"
        )
    if callback is not None and not callable(callback):
        raise TypeError(
            f"{op}: callback must be None or a callable taking the new tokens (B,), got {callback!r}"
        )


def filter_logits(logits, top_k=None, top_p=None):
    """logits (B, V) with every token outside the top-k, then outside the top-p nucleus, set to -inf.

    The nucleus is the smallest set of highest-probability tokens whose probabilities sum to at
    least top_p; the most likely token always stays. The order (top-k, then top-p) is transformers'.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_above = (
            torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        )  # mass of the strictly more likely tokens
        outside_sorted = mass_above >= top_p
        outside = outside_sorted.scatter(-1, order, outside_sorted)  # back to vocabulary order
        logits = logits.masked_fill(outside, float("-inf"))
    return logits


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None):
    """logits (B, V) -> next token ids (B,). temperature=0 is greedy (argmax); otherwise the logits
    are divided by the temperature, filtered by top-k and top-p, and one token is drawn from the
    softmax with torch's global generator (reproducible under torch.manual_seed)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1).squeeze(-1)


def sample_next_token_on_device(logits, temperature=1.0, top_k=None, top_p=None):
    """sample_next_token with no host synchronisation, so a CUDA graph can capture it: logits (B, V)
    -> (B,). Greedy is the same argmax. A draw is torch.multinomial's one-sample algorithm written out
    (argmax of probs / q, q ~ Exp(1) from torch's default generator: the exponential-race form of the
    Gumbel-max trick), without multinomial's check of the probabilities, which reads them on the
    host. Same distribution as sample_next_token; the same draws where torch.multinomial runs this
    algorithm on the same generator state (its one-sample path does), which the tests do not assert."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    race = torch.empty_like(probs).exponential_()  # (B, V), Exp(1)
    return (probs / race).argmax(dim=-1)
