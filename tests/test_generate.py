"""GPT.generate: the KV cache against full recomputation, transformers parity, sampling filters, eos, errors."""

import contextlib
import copy
import mmap

import pytest
import torch
from host_reads import HostReadRecorder
from tolerance import assert_close

import fastgpt
from fastgpt import dispatch
from fastgpt.nn import GPT, GPTConfig, KVCache, huge_pages, static_decode
from fastgpt.nn.generation import (
    MIN_TEMPERATURE,
    filter_logits,
    sample_next_token,
    sample_next_token_on_device,
)

SMALL = {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 97, "block_size": 64}


def recompute_greedy(model, idx, steps):
    """Greedy decoding by running the whole sequence through forward at every step (no cache)."""
    with torch.no_grad():
        for _ in range(steps):
            idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("n_kv_head", [4, 1], ids=["mha", "mqa"])
def test_cached_greedy_equals_recomputation(n_kv_head):
    model = GPT(GPTConfig(**SMALL, n_kv_head=n_kv_head)).eval()
    prompt = torch.randint(0, 97, (3, 11))
    out = model.generate(prompt, 20, temperature=0)
    assert out.shape == (3, 31) and out.dtype == torch.long
    assert torch.equal(out[:, :11], prompt)
    assert torch.equal(out, recompute_greedy(model, prompt, 20))


def test_chunked_prefill_into_the_cache_equals_one_pass():
    """A chunk of several tokens appended to a filled cache (q_len < kv_len: the bottom-right mask)."""
    model = GPT(GPTConfig(**SMALL, n_kv_head=2)).eval()
    idx = torch.randint(0, 97, (2, 30))
    caches = [KVCache(2, 2, 30, 16, dtype=torch.float32, device="cpu") for _ in range(2)]
    with torch.no_grad():
        expected = model.hidden_states(idx)
        chunks = [model.hidden_states(idx[:, a:b], caches, a) for a, b in ((0, 11), (11, 12), (12, 30))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), expected, rtol=0, atol=1e-5)


def test_greedy_matches_transformers_generate():
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2,
            n_embd=64,
            n_head=4,
            vocab_size=97,
            n_positions=64,
            bos_token_id=None,
            eos_token_id=None,
        )
    ).eval()
    prompt = torch.randint(0, 97, (2, 7))
    expected = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False, pad_token_id=0
    )
    assert expected.shape == (2, 47)
    assert torch.equal(GPT.from_hf(hf).generate(prompt, 40, temperature=0), expected)


def test_sampling_is_reproducible_under_seed():
    model = GPT(GPTConfig(**SMALL))
    prompt = torch.randint(0, 97, (4, 5))
    torch.manual_seed(123)
    first = model.generate(prompt, 20, temperature=0.8, top_k=20, top_p=0.9)
    torch.manual_seed(123)
    again = model.generate(prompt, 20, temperature=0.8, top_k=20, top_p=0.9)
    other = model.generate(prompt, 20, temperature=0.8, top_k=20, top_p=0.9)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_filter_logits_keeps_exactly_top_k_and_nucleus():
    logits = torch.log(torch.tensor([[0.05, 0.40, 0.10, 0.30, 0.15], [0.90, 0.02, 0.03, 0.04, 0.01]]))
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, True, False], [True, False, False, True, False]]
    # Nucleus 0.8: 0.40 + 0.30 = 0.70 < 0.8, so 0.15 joins; row 2's 0.90 alone covers it.
    kept = torch.isfinite(filter_logits(logits, top_p=0.8))
    assert kept.tolist() == [[False, True, False, True, True], [True, False, False, False, False]]
    kept = torch.isfinite(
        filter_logits(logits, top_k=2, top_p=0.5)
    )  # top-k first, then the nucleus of the rest
    assert kept.tolist() == [[False, True, False, False, False], [True, False, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_k=97, top_p=1.0)).all()


@pytest.mark.parametrize("top_k, top_p", [(3, None), (None, 0.5)], ids=["top_k", "top_p"])
def test_sampled_tokens_respect_the_filter(top_k, top_p):
    """Every sampled token lies in the allowed set computed from a cache-free forward of its prefix."""
    model = GPT(GPTConfig(**SMALL))
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # peaked distributions: filters that matter, far from ties
    prompt = torch.randint(0, 97, (4, 6))
    out = model.generate(prompt, 25, temperature=0.7, top_k=top_k, top_p=top_p)
    with torch.no_grad():
        logits = model(out[:, :-1])[:, 5:] / 0.7  # (B, 25, V): the distributions the new tokens came from
    allowed = torch.isfinite(filter_logits(logits.flatten(0, 1), top_k, top_p)).view(4, 25, 97)
    chosen = allowed.gather(-1, out[:, 6:, None]).squeeze(-1)
    assert chosen.all()
    assert allowed.sum(-1).float().mean() < 97 / 2  # the filter removed most of the vocabulary


def test_eos_stops_and_pads_finished_sequences():
    model = GPT(GPTConfig(**SMALL)).eval()
    prompt = torch.randint(0, 97, (2, 4))
    free = model.generate(prompt, 20, temperature=0)
    eos = int(free[0, 6])  # the third token sequence 0 generates
    out = model.generate(prompt, 20, temperature=0, eos_token_id=eos)
    first_eos = [int((row[4:] == eos).nonzero()[0]) if (row[4:] == eos).any() else None for row in free]
    assert first_eos[0] is not None and first_eos[0] <= 2
    stop = first_eos[0]
    assert torch.equal(out[0, : 4 + stop + 1], free[0, : 4 + stop + 1])
    assert (out[0, 4 + stop :] == eos).all()  # finished: keeps emitting eos
    end = 4 + first_eos[1] + 1 if first_eos[1] is not None else 24
    assert torch.equal(out[1, :end], free[1, :end])
    assert out.shape[1] == max(4 + stop + 1, end)  # stops once every sequence has finished

    single = model.generate(prompt[:1], 20, temperature=0, eos_token_id=eos)
    assert single.shape == (1, 4 + stop + 1)


def test_generate_modes_and_edge_cases():
    model = GPT(GPTConfig(**SMALL, dropout=0.5)).train()
    prompt = torch.randint(0, 97, (2, 63))
    out = model.generate(prompt, 1, temperature=0)  # fills the block exactly; dropout off while generating
    assert model.training
    assert torch.equal(out, recompute_greedy(model.eval(), prompt, 1))
    assert torch.equal(model.generate(prompt, 0), prompt)
    assert model.generate(torch.randint(0, 97, (1, 1)), 5, top_k=1).shape == (1, 6)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"max_new_tokens": -1}, ValueError, "max_new_tokens must be an int >= 0, got -1"),
        ({"temperature": -0.5}, ValueError, "temperature must be a float >= 0 .*got -0.5"),
        ({"temperature": 1e-40}, ValueError, r"temperature must be .* at least 2\*\*-100\), got 1e-40"),
        ({"top_k": 0}, ValueError, "top_k must be None or an int >= 1, got 0"),
        ({"top_p": 1.5}, ValueError, r"top_p must be None or a float in \(0, 1\], got 1.5"),
        ({"eos_token_id": 97}, ValueError, r"eos_token_id must be None or an int in \[0, 97\), got 97"),
        ({"idx": torch.zeros(2, 10)}, TypeError, "idx must be an int64 .*got dtype torch.float32"),
        (
            {"idx": torch.zeros(10, dtype=torch.long)},
            ValueError,
            r"idx must have shape \(batch, prompt_len\)",
        ),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, error, pattern):
    model = GPT(GPTConfig(**SMALL))
    arguments = {"idx": torch.zeros(2, 10, dtype=torch.long), "max_new_tokens": 5} | kwargs
    with pytest.raises(error, match=pattern):
        model.generate(**arguments)


def crop_greedy(model, idx, steps):
    """nanoGPT's generate, greedy: each token from a full forward over the last block_size tokens."""
    with torch.no_grad():
        for _ in range(steps):
            context = idx[:, -model.config.block_size :]
            idx = torch.cat([idx, model(context)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("prompt_len", [5, 16, 23], ids=["short", "full-window", "longer-than-the-window"])
def test_generation_past_the_window_is_nanogpts(prompt_len):
    """prompt_len + max_new_tokens past block_size (16 here): the tokens nanoGPT's generate picks, each
    predicted from the last block_size tokens, with the whole prompt in the result; the callback gets
    every new token; with eos each sequence stops as inside the window, and the batch ends once all have."""
    model = GPT(GPTConfig(**{**SMALL, "block_size": 16})).eval()
    with torch.no_grad():  # weights large enough that the context decides the greedy tokens
        for parameter in model.parameters():
            torch.nn.init.normal_(parameter, std=0.1)
    prompt = torch.randint(0, 97, (3, prompt_len))
    streamed = []
    out = model.generate(prompt, 30, temperature=0, callback=streamed.append)
    assert torch.equal(out, crop_greedy(model, prompt, 30))
    assert torch.equal(torch.stack(streamed, dim=1), out[:, prompt_len:])
    eos = int(out[1, prompt_len + 20])  # sequence 1's 21st new token: past the window
    stopped = model.generate(prompt, 30, temperature=0, eos_token_id=eos)
    ends = []  # each row's length up to its first eos
    for row, free in zip(stopped, out):
        hits = (free[prompt_len:] == eos).nonzero()
        ends.append(prompt_len + int(hits[0]) + 1 if len(hits) else len(free))
        assert torch.equal(row[: ends[-1]], free[: ends[-1]]) and (row[ends[-1] :] == eos).all()
    assert stopped.shape[1] == max(ends)  # the batch ends once every row has
    torch.manual_seed(3)
    sampled = model.generate(prompt, 30, temperature=0.9, top_k=10)
    torch.manual_seed(3)
    assert torch.equal(model.generate(prompt, 30, temperature=0.9, top_k=10), sampled)


def test_generate_moves_the_parameters_into_one_huge_page_buffer_once():
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        pytest.skip("no transparent huge pages on this platform")
    model = GPT(GPTConfig(**SMALL, n_kv_head=2)).eval()
    parameters = dict(model.named_parameters())
    before = {name: p.detach().clone() for name, p in parameters.items()}
    prompt = torch.randint(0, 97, (2, 5))
    out = model.generate(prompt, 4, temperature=0)
    assert huge_pages.in_one_buffer(huge_pages.unique_parameters(model))
    assert dict(model.named_parameters()) == parameters  # the same Parameter objects
    assert all(torch.equal(p, before[name]) for name, p in parameters.items())
    assert model.lm_head.weight is model.transformer.wte.weight
    storage = model.lm_head.weight.untyped_storage().data_ptr()
    assert torch.equal(model.generate(prompt, 4, temperature=0), out)
    assert model.lm_head.weight.untyped_storage().data_ptr() == storage  # not moved a second time
    # Still an ordinary trainable model: autograd and the optimizer work on the moved parameters.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = out.clone()  # generate returns an inference tensor
    loss = model.train()(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    assert not torch.equal(model.lm_head.weight, before["transformer.wte.weight"])


def test_without_huge_pages_the_parameters_stay_where_they_are(monkeypatch):
    monkeypatch.delattr(mmap, "MADV_HUGEPAGE", raising=False)
    model = GPT(GPTConfig(**SMALL)).eval()
    pointers = [p.data_ptr() for p in model.parameters()]
    assert huge_pages.huge_page_buffer(1 << 20) is None
    assert huge_pages.move_to_huge_pages(model) is False
    model.generate(torch.randint(0, 97, (1, 3)), 2, temperature=0)
    assert [p.data_ptr() for p in model.parameters()] == pointers


EAGER_KERNEL_BACKENDS = (["cpu"] if "cpu" in fastgpt.available_backends() else []) + (
    ["triton"] if "triton" in fastgpt.available_backends() and not torch.cuda.is_available() else []
)


@pytest.mark.parametrize("backend", EAGER_KERNEL_BACKENDS)
def test_generate_tokens_equal_across_backends(backend):
    """generate's per-op loop on a kernel backend in float32 (cpu: its fused decode step; Triton under
    the interpreter: its attention for the prefill, the split-KV decode kernel for the steps, its
    LayerNorm and FFN) chooses the tokens the reference backend chooses: greedy ones equal to the
    float64 model's, with one row stopping at eos while the other goes on, and seeded draws through
    top-k and top-p equal to the float32 reference's. One block keeps the interpreter's time low."""
    model = GPT(GPTConfig(**{**SMALL, "n_layer": 1}, n_kv_head=2)).eval()
    prompt = torch.randint(0, 97, (2, 11))
    float64 = copy.deepcopy(model).double().set_backend("reference")
    eos = int(float64.generate(prompt, 3, temperature=0)[0, 12])  # row 0's second new token
    expected = float64.generate(prompt, 3, temperature=0, eos_token_id=eos)
    kernels = copy.deepcopy(model).set_backend(backend)
    assert torch.equal(kernels.generate(prompt, 3, temperature=0, eos_token_id=eos), expected)
    sampling = {"temperature": 1.0, "top_k": 30, "top_p": 0.9}
    torch.manual_seed(5)
    drawn = model.set_backend("reference").generate(prompt, 3, **sampling)
    torch.manual_seed(5)
    assert torch.equal(kernels.generate(prompt, 3, **sampling), drawn)


def cached_step_logits(model, idx, prompt_len):
    """The logits generate's per-op loop samples from, computed as _generate computes them: idx[:, :prompt_len]
    prefilled into its preallocated KV caches, then the rest one token per step -> (B, T - prompt_len + 1,
    vocab_size), the predictions at positions prompt_len - 1 .. T - 1."""
    batch, total = idx.shape
    with torch.inference_mode():
        _, caches = model._generation_buffers(batch, total, idx.device)
        block_params = model.decode_block_parameters()
        hidden = [model.hidden_states(idx[:, :prompt_len], caches, 0, block_params)[:, -1]]  # (B, C)
        for position in range(prompt_len, total):
            tokens = idx[:, position : position + 1]  # (B, 1)
            hidden.append(model.hidden_states(tokens, caches, position, block_params)[:, -1])
        return model.logits(torch.stack(hidden, dim=1))  # (B, T - prompt_len + 1, vocab_size)


def check_cached_steps_against_float64(model, idx, prompt_len):
    """cached_step_logits of model against the float64 model's uncached forward under the 2x rule, the
    model in its own dtype on the reference backend (uncached) setting the error budget."""
    exact = copy.deepcopy(model).double().set_backend("reference")
    eager = copy.deepcopy(model).set_backend("reference")
    with torch.inference_mode():
        expected = exact.logits(exact.hidden_states(idx)[:, prompt_len - 1 :])
        bar = eager.logits(eager.hidden_states(idx)[:, prompt_len - 1 :])
    actual = cached_step_logits(model, idx, prompt_len)
    assert actual.dtype == bar.dtype and actual.shape == expected.shape
    assert_close("logits", actual, expected, bar)


@pytest.mark.skipif("cpu" not in fastgpt.available_backends(), reason="needs fastgpt._C")
def test_cached_bfloat16_steps_match_the_float64_model():
    """The prefill and the one-token steps on the cpu backend in bfloat16 (the fused decode step, a
    cache longer than the prompt read through views), against the float64 model."""
    model = GPT(GPTConfig(**SMALL, n_kv_head=2)).to(torch.bfloat16).eval()
    check_cached_steps_against_float64(model, torch.randint(0, 97, (2, 30)), prompt_len=21)


# GPT-2's vocabulary (50257, padded to 50304) and head size 64, which every GPU backend serves.
GPU_CONFIG = {"n_layer": 2, "n_embd": 256, "n_head": 4, "n_kv_head": 2, "block_size": 1024}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_generate_cached_steps_match_the_float64_model(dtype):
    """generate's per-op loop on CUDA (cuda_graph=False, the default): a 500-token prefill into the
    preallocated caches, then one-token steps whose cache grows past 512 keys, where auto's 16-bit
    attention switches from the cuda backend's kernel (when built) to Triton's split-KV decode kernel
    (float32 runs every op on Triton); two different prompts (GQA). Every step's logits over the
    padded LM head against the float64 model."""
    model = GPT(GPTConfig(**GPU_CONFIG)).to("cuda", dtype).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 530), device="cuda")
    for kv_len in (500, 530):  # the steps run kernels, not the reference (the test's bar)
        facts = (("head_dim", 64), ("kv_len", dispatch.kv_len_class(kv_len)))
        assert dispatch.choose_backend("causal_attention", "auto", "cuda", dtype, facts) != "reference"
    check_cached_steps_against_float64(model, idx, prompt_len=500)


def first_eos_end(row, prompt_len, eos):
    """The length of `row` up to and including its first eos after the prompt, or its whole length."""
    hits = (row[prompt_len:] == eos).nonzero()
    return prompt_len + int(hits[0]) + 1 if len(hits) else row.shape[0]


@pytest.mark.gpu
def test_gpu_generate_samples_real_ids_reproducibly_and_stops_rows_at_eos():
    """generate's per-op loop on CUDA in bfloat16, with padded LM-head rows that would win every draw
    were they read: greedy and top-k/top-p draws stay among the real ids, draws repeat under the same
    seed (torch.multinomial on the CUDA generator), and each row stops at eos on its own."""
    model = GPT(GPTConfig(**GPU_CONFIG)).to("cuda", torch.bfloat16).eval()
    vocab = model.config.vocab_size
    with torch.no_grad():
        model.lm_head.weight[vocab:].normal_(0.0, 30.0)  # (padded - vocab, C): never a token id
    prompt = torch.randint(0, vocab, (3, 500), device="cuda")
    free = model.generate(prompt, 24, temperature=0)
    assert free.shape == (3, 524) and torch.equal(free[:, :500], prompt)
    assert int(free.max()) < vocab
    sampling = {"temperature": 1.0, "top_k": 50, "top_p": 0.9}
    torch.manual_seed(7)
    drawn = model.generate(prompt, 24, **sampling)
    torch.manual_seed(7)
    assert torch.equal(model.generate(prompt, 24, **sampling), drawn)
    assert int(drawn.max()) < vocab
    eos = int(free[0, 502])  # row 0's third new token
    stopped = model.generate(prompt, 24, temperature=0, eos_token_id=eos)
    ends = [first_eos_end(row, 500, eos) for row in free]
    assert ends[0] <= 503 and stopped.shape[1] == max(ends)
    for row, end in enumerate(ends):
        assert torch.equal(stopped[row, :end], free[row, :end])
        assert (stopped[row, end:] == eos).all()


@pytest.mark.gpu
def test_gpu_generate_cli_streams_a_reproducible_continuation(tmp_path, capsys):
    """`fastgpt generate --device cuda` (bfloat16 by default there): a saved byte-vocabulary model
    (257 ids padded to 320) loaded onto the GPU, its continuation streamed token by token."""
    from fastgpt.cli import main

    GPT(GPTConfig(n_layer=2, n_embd=128, n_head=2, vocab_size=257, block_size=256)).save(tmp_path)
    args = ["generate", "hello", "--checkpoint", str(tmp_path), "--tokenizer", "byte", "--device", "cuda"]
    args += ["--max-new-tokens", "40", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("hello") and first.endswith("\n")
    assert main(args) == 0
    assert capsys.readouterr().out == first


# ----------------------------------------------------------------------------------------------
# The static decode step (fastgpt.nn.static_decode): run eagerly here, captured in a CUDA graph on a GPU.


def generate_static(
    model, prompt, max_new_tokens, *, capture=False, temperature=0, top_k=None, top_p=None, eos=None
):
    """GPT.generate through the static decode step (eagerly unless capture)."""
    with torch.inference_mode():
        return model._generate_static(prompt, max_new_tokens, temperature, top_k, top_p, eos, None, capture)


STATIC_BACKENDS = ["reference"] + (
    ["triton"] if "triton" in fastgpt.available_backends() and not torch.cuda.is_available() else []
)


@pytest.mark.parametrize("backend", STATIC_BACKENDS)
@pytest.mark.parametrize("n_kv_head", [4, 1], ids=["mha", "mqa"])
def test_static_step_gives_the_tokens_of_generate(backend, n_kv_head):
    """Greedy: the device-position step (cache writes by index_copy_, attention over the whole cache
    with the length on the device) chooses the tokens of today's loop. Under the Triton interpreter the
    cache of 19 keys spans several splits, and the early steps leave whole splits empty."""
    model = GPT(GPTConfig(**SMALL, n_kv_head=n_kv_head, backend=backend)).eval()
    prompt = torch.randint(0, 97, (2, 11))
    new_tokens = 8
    expected = model.generate(prompt, new_tokens, temperature=0)
    assert torch.equal(generate_static(model, prompt, new_tokens), expected)
    eos = int(expected[0, 13])  # sequence 0's third new token: it stops there, sequence 1 may not
    stopped = model.generate(prompt[:1], new_tokens, temperature=0, eos_token_id=eos)
    assert stopped.shape[1] <= 14
    assert torch.equal(generate_static(model, prompt[:1], new_tokens, eos=eos), stopped)
    assert torch.equal(
        generate_static(model, prompt, new_tokens, eos=eos),
        model.generate(prompt, new_tokens, temperature=0, eos_token_id=eos),
    )


def test_static_step_sampling_is_reproducible_and_respects_the_filter():
    model = GPT(GPTConfig(**SMALL))
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # peaked distributions: filters that matter, far from ties
    prompt = torch.randint(0, 97, (4, 6))
    torch.manual_seed(123)
    first = generate_static(model, prompt, 25, temperature=0.7, top_k=3)
    torch.manual_seed(123)
    again = generate_static(model, prompt, 25, temperature=0.7, top_k=3)
    assert torch.equal(first, again)
    with torch.no_grad():
        logits = model(first[:, :-1])[:, 5:] / 0.7  # (B, 25, V)
    # The forward's logits differ from the static step's in rounding (another attention kernel), so
    # the check allows one more token than top_k for a tie at the boundary.
    allowed = torch.isfinite(filter_logits(logits.flatten(0, 1), 4, None)).view(4, 25, 97)
    assert allowed.gather(-1, first[:, 6:, None]).all()


def kept_decoder(model):
    """The StaticDecodeStep that static_decode keeps for model, or None."""
    kept = static_decode._DECODERS.get(model)
    return None if kept is None else kept[1]


def test_static_decoder_is_kept_and_refilled_by_calls_that_fit():
    """A second call of the same batch and total length (another prompt length, other prompts) runs on
    the first call's buffers and gives the tokens of generate; results are copies that later calls do
    not overwrite; in-place weight changes are seen; other shapes, sampling, eos or moved weights get a
    new decoder, and release_decode_graph frees it."""
    model = GPT(GPTConfig(**SMALL)).eval()
    prompt = torch.randint(0, 97, (2, 11))
    expected = model.generate(prompt, 8, temperature=0)  # first, as it moves the weights (huge pages)
    first = generate_static(model, prompt, 8)
    decoder = kept_decoder(model)
    assert decoder is not None and torch.equal(first, expected)
    kept_first = first.clone()
    shorter = torch.randint(0, 97, (2, 5))  # 5 + 14 = 11 + 8 tokens: the same buffers
    second = generate_static(model, shorter, 14)
    assert kept_decoder(model) is decoder
    assert torch.equal(second, model.generate(shorter, 14, temperature=0))
    assert torch.equal(first, kept_first)
    eos = int(second[1, 7])
    stopped = generate_static(model, shorter, 14, eos=eos)
    assert kept_decoder(model) is not decoder
    assert torch.equal(stopped, model.generate(shorter, 14, temperature=0, eos_token_id=eos))
    with_eos = kept_decoder(model)
    assert torch.equal(
        generate_static(model, prompt, 8, eos=eos), model.generate(prompt, 8, temperature=0, eos_token_id=eos)
    )
    assert kept_decoder(model) is with_eos
    with torch.no_grad():
        model.lm_head.weight.mul_(-3.0)  # in place: the kept buffers (and a graph) read the new weights
    assert torch.equal(
        generate_static(model, prompt, 8, eos=eos), model.generate(prompt, 8, temperature=0, eos_token_id=eos)
    )
    assert kept_decoder(model) is with_eos
    model.double()  # new parameter storage: a graph captured against the old one must not be replayed
    assert torch.equal(
        generate_static(model, prompt, 8, eos=eos), model.generate(prompt, 8, temperature=0, eos_token_id=eos)
    )
    assert kept_decoder(model) is not with_eos and kept_decoder(model).caches[0].keys.dtype == torch.float64
    model.release_decode_graph()
    assert kept_decoder(model) is None


class EmulatedStream:
    def wait_stream(self, other):
        pass


class EmulatedGraph:
    """torch.cuda.CUDAGraph's contract, emulated on the CPU for static_decode's bookkeeping: the decode
    steps run inside a capture are recorded, not run; replay() runs what was recorded, and raises before
    a successful capture, as torch's does. `fail` makes the next capture raise (an op that cannot be
    captured)."""

    capturing = None  # the graph whose capture is under way
    fail = False

    def __init__(self):
        self.recorded = None  # [(step, model)] once captured
        self.pending = []
        self.replays = 0

    def replay(self):
        if self.recorded is None:
            raise RuntimeError("Called CUDAGraph::replay without a preceding successful capture.")
        for step, model in self.recorded:
            RUN_STATIC_STEP(step, model)
        self.replays += 1


RUN_STATIC_STEP = static_decode.StaticDecodeStep.run


class EmulatedCapture:
    def __init__(self, graph):
        self.graph = graph

    def __enter__(self):
        EmulatedGraph.capturing = self.graph

    def __exit__(self, *error):
        EmulatedGraph.capturing = None
        if error[0] is None:
            self.graph.recorded = self.graph.pending


def run_or_record(step, model):
    graph = EmulatedGraph.capturing
    if graph is None:
        return RUN_STATIC_STEP(step, model)
    if EmulatedGraph.fail:
        EmulatedGraph.fail = False
        raise RuntimeError("operation not permitted when stream is capturing (emulated)")
    graph.pending.append((step, model))
    return None


@pytest.fixture
def emulated_cuda_graphs(monkeypatch):
    """static_decode's CUDA calls on the CPU: streams that order nothing (one CPU stream) and EmulatedGraph."""
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: EmulatedStream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: EmulatedStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", EmulatedGraph)
    monkeypatch.setattr(torch.cuda, "graph", EmulatedCapture)
    monkeypatch.setattr(static_decode.StaticDecodeStep, "run", run_or_record)
    monkeypatch.setattr(EmulatedGraph, "fail", False)


def test_captured_decode_warms_up_captures_once_and_replays(emulated_cuda_graphs):
    """decode(capture=True) with the graph emulated: WARMUP_STEPS eager steps, one capture, a replay per
    later step, the tokens (streamed too) of the eager static step; the next call replays only."""
    model = GPT(GPTConfig(**SMALL)).eval()
    prompt = torch.randint(0, 97, (2, 7))
    new_tokens = 9
    expected = generate_static(model, prompt, new_tokens)
    streamed = []
    with torch.inference_mode():
        captured = model._generate_static(prompt, new_tokens, 0, None, None, None, streamed.append, True)
    assert torch.equal(captured, expected)
    assert torch.equal(torch.stack(streamed, dim=1), expected[:, 7:])
    graph = kept_decoder(model).graph
    assert len(graph.recorded) == 1 and graph.replays == new_tokens - 1 - static_decode.WARMUP_STEPS
    assert torch.equal(generate_static(model, prompt, new_tokens, capture=True), expected)
    assert (
        kept_decoder(model).graph is graph
        and graph.replays == 2 * (new_tokens - 1) - static_decode.WARMUP_STEPS
    )


def test_a_failed_capture_leaves_no_graph_to_replay(emulated_cuda_graphs):
    """A capture that raises keeps no graph: the next call warms up and captures again instead of
    replaying a graph that recorded nothing."""
    model = GPT(GPTConfig(**SMALL)).eval()
    prompt = torch.randint(0, 97, (2, 7))
    expected = generate_static(model, prompt, 9)
    EmulatedGraph.fail = True
    with pytest.raises(RuntimeError, match="not permitted when stream is capturing"):
        generate_static(model, prompt, 9, capture=True)
    assert kept_decoder(model).graph is None
    assert torch.equal(generate_static(model, prompt, 9, capture=True), expected)
    assert len(kept_decoder(model).graph.recorded) == 1


@pytest.mark.parametrize("path", ["per-op", "static", "captured"])
def test_streamed_tokens_are_the_returned_tokens_when_eos_ends_early(path, emulated_cuda_graphs):
    """The callback gets each step's new tokens in order, exactly the columns generate returns: with
    eos ending the generation a few steps in, the static step (eager, or replayed from the emulated
    graph) runs on to its next end check but streams nothing past the end, as the per-op loop does.
    Sampled tokens (a seed per run) vary, unlike a small random model's greedy ones, and a run with eos
    draws those of the run without it up to the end."""
    model = GPT(GPTConfig(**SMALL)).eval()
    prompt = torch.randint(0, 97, (1, 7))
    new_tokens = 3 * static_decode.EOS_CHECK_INTERVAL

    def run(eos, callback):
        torch.manual_seed(2024)
        with torch.inference_mode():
            if path == "per-op":
                return model._generate(prompt, new_tokens, 1.0, None, None, eos, callback)
            capture = path == "captured"
            return model._generate_static(prompt, new_tokens, 1.0, None, None, eos, callback, capture)

    unstopped = []
    full = run(None, unstopped.append)
    assert torch.equal(torch.stack(unstopped, dim=1), full[:, 7:])
    eos = int(full[0, 9])
    end = 7 + int((full[0, 7:] == eos).nonzero()[0]) + 1  # the column after the first eos
    streamed = []
    stopped = run(eos, streamed.append)
    assert end <= 10 and torch.equal(stopped, full[:, :end])
    assert torch.equal(torch.stack(streamed, dim=1), stopped[:, 7:])


@pytest.mark.parametrize("backend", STATIC_BACKENDS)
@pytest.mark.parametrize(
    "sampling", [(0, None, None, 5), (0.8, 7, 0.9, None)], ids=["greedy-eos", "top-k-top-p"]
)
def test_static_step_reads_nothing_on_the_host(backend, sampling):
    """The step a CUDA graph captures (StaticDecodeStep.run: embeddings at the device position, every
    block's decode_at, sampling on the device, the eos bookkeeping) calls no op that reads tensor values
    on the host. The CPU sees the aten ops (not .tolist() or .cpu(), nor a Triton launcher's host code)."""
    temperature, top_k, top_p, eos = sampling
    model = GPT(GPTConfig(**SMALL, n_kv_head=2, backend=backend)).eval()
    prompt = torch.randint(0, 97, (2, 5))
    with torch.inference_mode():
        step = static_decode.decoder_for(model, 2, 12, (temperature, top_k, top_p), eos, prompt.device)
        step.out[:, :5] = prompt
        first_token = torch.tensor([3, eos or 4])  # (B,): sequence 1 starts finished when eos is given
        step.out[:, 5] = first_token
        model.hidden_states(prompt, step.caches, 0)
        step.start(torch.tensor([5, 5]), first_token, 7)
        with HostReadRecorder() as recorder:
            for _ in range(3):
                step.run(model)
    assert recorder.reads == []
    assert step.position.tolist() == [8, 8]


def test_on_device_sampling_draws_what_multinomial_draws_on_cpu():
    """sample_next_token_on_device is multinomial's one-sample algorithm: the same draws from the same
    generator state on the CPU (on CUDA the same is expected, not asserted)."""
    logits = torch.randn(8, 97)
    for kwargs in ({"temperature": 0.8}, {"temperature": 1.3, "top_k": 20, "top_p": 0.9}):
        torch.manual_seed(7)
        expected = sample_next_token(logits, **kwargs)
        torch.manual_seed(7)
        assert torch.equal(sample_next_token_on_device(logits, **kwargs), expected)


@pytest.mark.parametrize(
    "sample", [sample_next_token, sample_next_token_on_device], ids=["host", "on_device"]
)
def test_the_smallest_temperature_samples_the_largest_logit(sample):
    """MIN_TEMPERATURE, the smallest positive temperature check_generate_arguments takes, still samples
    (1e-40, refused, made the largest logit 0 * inf = NaN: torch.multinomial raised and the on-device
    draw returned an arbitrary token), and is greedy decoding."""
    logits = torch.randn(8, 97) * 30
    for kwargs in (
        {"temperature": MIN_TEMPERATURE},
        {"temperature": MIN_TEMPERATURE, "top_k": 5, "top_p": 0.9},
    ):
        assert torch.equal(sample(logits, **kwargs), logits.argmax(dim=-1)), kwargs


def test_cuda_graph_must_be_a_bool():
    model = GPT(GPTConfig(**SMALL))
    with pytest.raises(TypeError, match="cuda_graph must be a bool, got 'yes'"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, cuda_graph="yes")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_captured_generate_equals_the_uncaptured_static_step(dtype):
    """The CUDA graph replays exactly the eager static step: bitwise the same greedy tokens."""
    model = GPT(GPTConfig(**SMALL, n_kv_head=2)).to("cuda", dtype).eval()
    prompt = torch.randint(0, 97, (3, 9), device="cuda")
    captured = model.generate(prompt, 40, temperature=0, cuda_graph=True)
    graph = kept_decoder(model).graph
    assert graph is not None
    assert torch.equal(model.generate(prompt, 40, temperature=0, cuda_graph=True), captured)
    assert kept_decoder(model).graph is graph  # replayed, not captured again
    assert torch.equal(captured, generate_static(model, prompt, 40, capture=False))
    if dtype == torch.float32:  # today's loop differs only in the attention's rounding: no near-tie in fp32
        assert torch.equal(captured, model.generate(prompt, 40, temperature=0, cuda_graph=False))


@pytest.mark.gpu
def test_gpu_captured_sampling_is_reproducible_under_seed_and_eos_stops():
    model = GPT(GPTConfig(**SMALL)).to("cuda").eval()
    prompt = torch.randint(0, 97, (4, 5), device="cuda")
    sampling = {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "cuda_graph": True}
    torch.manual_seed(123)
    first = model.generate(prompt, 30, **sampling)
    torch.manual_seed(123)
    again = model.generate(prompt, 30, **sampling)
    assert torch.equal(first, again)
    assert not torch.equal(first, model.generate(prompt, 30, **sampling))
    torch.manual_seed(123)  # the graph captured by the first call, replayed from its first step
    assert torch.equal(model.generate(prompt, 30, **sampling), first)
    free = model.generate(prompt[:1], 30, temperature=0, cuda_graph=True)
    eos = int(free[0, 7])
    stopped = model.generate(prompt[:1], 30, temperature=0, eos_token_id=eos, cuda_graph=True)
    assert torch.equal(
        stopped, model.generate(prompt[:1], 30, temperature=0, eos_token_id=eos, cuda_graph=False)
    )
    assert stopped.shape[1] <= 8


# ----------------------------------------------------------------------------------------------
# Prompts of different lengths in one batch (GPT.generate given a list)


def ragged_prompts(lengths, device="cpu"):
    return [torch.randint(0, 97, (length,), device=device) for length in lengths]


RAGGED_BACKENDS = ["auto", "reference"] + (
    ["triton"] if "triton" in fastgpt.available_backends() and not torch.cuda.is_available() else []
)


@pytest.mark.parametrize("backend", RAGGED_BACKENDS)
@pytest.mark.parametrize("n_kv_head", [4, 1], ids=["mha", "mqa"])
def test_ragged_prompts_continue_as_each_would_alone(backend, n_kv_head):
    """Greedy: each prompt of a batch of lengths 1 to 17 gets the tokens it gets generated alone (its own
    positions and cache length; the padding after the shorter prompts is never attended to). With eos,
    each sequence is cut after its own first eos. On CPU the auto backend runs each step as one
    decode_blocks call with per-sequence positions; the others run each block's decode_at."""
    model = GPT(GPTConfig(**SMALL, n_kv_head=n_kv_head, backend=backend)).eval()
    with torch.no_grad():  # weights large enough that the attended keys decide the greedy tokens (at
        for parameter in model.parameters():  # GPT-2's init the current token alone mostly does)
            torch.nn.init.normal_(parameter, std=0.1)
    prompts = ragged_prompts([5, 17, 1, 9])
    new_tokens = 10
    alone = [model.generate(prompt[None], new_tokens, temperature=0)[0] for prompt in prompts]
    together = model.generate(prompts, new_tokens, temperature=0)
    assert isinstance(together, list) and len(together) == 4
    for row, expected, prompt in zip(together, alone, prompts):
        assert row.dtype == torch.long and torch.equal(row, expected)
        assert torch.equal(row[: len(prompt)], prompt)
    eos = int(alone[1][17 + 2])  # sequence 1's third new token
    stopped = model.generate(prompts, new_tokens, temperature=0, eos_token_id=eos)
    for row, expected, prompt in zip(stopped, alone, prompts):
        hits = (expected[len(prompt) :] == eos).nonzero()
        end = len(prompt) + int(hits[0]) + 1 if len(hits) else len(expected)
        assert torch.equal(row, expected[:end])
    assert len(stopped[1]) <= 17 + 3


def test_ragged_generation_streams_each_steps_tokens_and_samples_reproducibly():
    """The callback gets each step's new tokens (B,), element b being sequence b's; sampling under a seed
    repeats; max_new_tokens=0 returns copies of the prompts; equal lengths in a list still give a list."""
    model = GPT(GPTConfig(**SMALL)).eval()
    prompts = ragged_prompts([3, 12, 7])
    streamed = []
    torch.manual_seed(11)
    first = model.generate(prompts, 8, temperature=0.9, top_k=20, callback=streamed.append)
    torch.manual_seed(11)
    assert all(
        torch.equal(a, b) for a, b in zip(first, model.generate(prompts, 8, temperature=0.9, top_k=20))
    )
    new = torch.stack(streamed, dim=1)  # (B, 8)
    for row, prompt, tokens in zip(first, prompts, new):
        assert torch.equal(row, torch.cat([prompt, tokens]))
    unchanged = model.generate(prompts, 0)
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in zip(unchanged, prompts))
    same = ragged_prompts([6, 6])
    assert [len(row) for row in model.generate(same, 4, temperature=0)] == [10, 10]


def test_ragged_generation_in_the_captured_step(emulated_cuda_graphs):
    """The list path's decode steps captured (on a CUDA graph emulated on the CPU): the tokens of the
    uncaptured run, from the call that captures and from the next, which only replays, its per-sequence
    positions refilled."""
    model = GPT(GPTConfig(**SMALL, backend="reference")).eval()
    prompts = ragged_prompts([4, 13, 8])
    expected = model.generate(prompts, 12, temperature=0)
    padded = torch.zeros(3, 13, dtype=torch.long)
    for row, prompt in zip(padded, prompts):
        row[: len(prompt)] = prompt
    lengths = torch.tensor([4, 13, 8])
    for _ in range(2):
        with torch.inference_mode():
            captured = model._generate_ragged(padded, lengths, 12, 0, None, None, None, None, True)
        assert all(torch.equal(a, b) for a, b in zip(captured, expected))
    graph = kept_decoder(model).graph
    assert len(graph.recorded) == 1 and graph.replays == 2 * 11 - static_decode.WARMUP_STEPS


@pytest.mark.parametrize(
    "prompts, error, pattern",
    [
        ([], ValueError, r"idx, a list of prompts, must hold at least one, got an empty list"),
        (
            [torch.tensor([1, 2]), [3, 4]],
            TypeError,
            r"idx\[1\] must be a 1-D int64 tensor of token ids, got list",
        ),
        ([torch.tensor([1, 2], dtype=torch.int32)], TypeError, r"idx\[0\] must be .* got torch.int32"),
        (
            [torch.tensor([1]), torch.zeros(2, 2, dtype=torch.long)],
            ValueError,
            r"idx\[1\] must be a 1-D tensor .* got shape \(2, 2\)",
        ),
        (
            [torch.tensor([], dtype=torch.long)],
            ValueError,
            r"idx\[0\] must be a 1-D tensor of at least one token id",
        ),
        (
            [torch.tensor([1], device="meta")],
            ValueError,
            r"idx\[0\] must be on the model's device \(cpu\), got meta",
        ),
        ([torch.tensor([1]), torch.tensor([97])], ValueError, r"idx must be in \[0, 97\), got 97"),
        ([torch.tensor([1]), torch.zeros(60, dtype=torch.long)], ValueError, r"got 60 \+ 5 = 65 > 64"),
    ],
    ids=["empty", "not-a-tensor", "int32", "2-d", "no-token", "device", "id-past-vocab", "too-long"],
)
def test_ragged_generation_rejects_bad_prompts(prompts, error, pattern):
    model = GPT(GPTConfig(**SMALL))
    with pytest.raises(error, match=pattern):
        model.generate(prompts, 5)


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "captured"])
def test_gpu_ragged_prompts_continue_as_each_would_alone(cuda_graph):
    """On CUDA (Triton's decode kernel reading one length per sequence on the device, index_put_ cache
    writes), eagerly and replayed from a CUDA graph: each prompt's greedy tokens are those of the same
    step run for it alone (fp32: no near-tie between the two)."""
    model = GPT(GPTConfig(**SMALL, n_kv_head=2)).to("cuda").eval()
    with torch.no_grad():
        for parameter in model.parameters():
            torch.nn.init.normal_(parameter, std=0.1)
    prompts = ragged_prompts([5, 30, 1, 17], device="cuda")
    together = model.generate(prompts, 24, temperature=0, cuda_graph=cuda_graph)
    for row, prompt in zip(together, prompts):
        alone = model.generate([prompt], 24, temperature=0, cuda_graph=cuda_graph)[0]
        assert torch.equal(row, alone)
