"""The CPU targets of fastgpt.nn.GPT against transformers' GPT-2 (sdpa), measured in one run.

    python benchmarks/gpt_targets.py [--rounds 5] [--threads N] [--only generation|training|bandwidth]
                                     [--json out.json]

Both models have GPT-2 small's shape and the same random weights (GPT.from_hf of the transformers
model). The providers are timed in interleaved rounds, one call each per round in an order that
rotates from round to round (fastgpt.bench.timing.measure_interleaved), so that load from other
processes hits them alike, and the median of each is reported with the ratio of the medians.

- generation: greedy decoding, GPT.generate(temperature=0) and a fastgpt.patch-ed transformers model
  against GPT2LMHeadModel.generate(do_sample=False), tokens generated per second;
- ragged generation: the same, for a batch of prompts of different lengths (RAGGED_CASE):
  GPT.generate given the list of prompts, against transformers' left-padded batch with its attention
  mask (a patched model runs that attention on SDPA), and against GPT.generate of one prompt at a time,
  which is what a user without a ragged batch would do;
- training: one step of forward (loss) + backward + AdamW (the same optimizer settings for both),
  tokens per second;
- bandwidth: what bounds decoding at batch 1, where every token reads all the weights once (the
  lm_head's 50257 x 768 included), each on 4 KiB pages (torch's allocator) and on transparent huge
  pages (where GPT.generate moves its parameters on CPU, fastgpt/nn/huge_pages.py): the DRAM bandwidth
  of a 256 MiB copy (bytes read + written per second) and of a 256 MiB read (a sum), the bandwidth the
  model's weight GEMVs reach alone (F.linear over every Linear weight and the lm_head, batch 1, in the
  model's order, so they stream from DRAM; the same products with each weight stored transposed, (in,
  out), the layout of transformers' GPT-2 Conv1D, for which BLAS runs a different GEMV; and through
  fastgpt's cpu kernel, which fastgpt.nn.Linear and the decode step use for up to 16 rows, on both
  layouts: the (in, out) one is what fastgpt.patch-ed transformers models pass it), and the
  weight bandwidth each provider reaches end to end at batch 1 (weight bytes per token x tokens per
  second). A GEMV is a read stream, so the read rate over the weight bytes bounds batch-1 tokens per
  second for any fp32 implementation on the same threads.

Targets (issue 6): generation >= 2x and training >= 1.2x transformers. The fastgpt backend each
op resolves to is printed: on CPU it is `cpu` when the C++ extension is built, else `reference`.
"""

import argparse
import copy
import functools
import json
import platform
import statistics

import torch
from torch.nn import functional as F

import fastgpt
from fastgpt import dispatch
from fastgpt.bench.timing import measure_interleaved, saved_for_backward, single_call_plan
from fastgpt.nn import GPT, huge_pages

# (batch, prompt length, new tokens). The last case decodes 256 tokens, so that the per-step cost of
# the growing KV cache (transformers re-concatenates it each step) weighs more.
GENERATION_CASES = ((1, 32, 64), (8, 128, 64), (8, 128, 256))
# Prompt lengths of the ragged batch (8 prompts, spread over 16-128 tokens) and its new tokens.
RAGGED_CASE = ((16, 128, 40, 96, 64, 24, 112, 80), 64)
TRAINING_CASES = ((4, 256),)  # (batch, sequence length)
BASELINE = "transformers sdpa"  # the provider every speedup is relative to
TARGETS = {"generation": 2.0, "ragged generation": 2.0, "training": 1.2}


def transformers_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(bos_token_id=None, eos_token_id=None, attn_implementation="sdpa")
    model = GPT2LMHeadModel(config).eval()
    model.loss_type = "ForCausalLM"
    return model


def resolved_backends(dtype=torch.float32):
    facts = {
        "causal_attention": ("head_dim", 64),
        "fused_ffn": ("hidden", 3072),
        "layer_norm": ("hidden", 768),
        "linear_cross_entropy": ("vocab", 50257),
    }
    return {op: dispatch.choose_backend(op, "auto", "cpu", dtype, (fact,)) for op, fact in facts.items()}


def interleaved(providers, rounds, warmup_calls=1):
    """{name: [seconds per round]}: one call of each provider per round, each timed alone, in an order
    that rotates from round to round (timing.measure_interleaved), after warmup_calls untimed calls each."""
    plan = single_call_plan(rounds, warmup_calls)
    timings = measure_interleaved(providers, "cpu", plan)
    return {name: [ms / 1e3 for ms in result.round_ms] for name, result in timings.items()}


def report(kind, case, work, times):
    medians = {name: statistics.median(values) for name, values in times.items()}
    rates = {name: work / seconds for name, seconds in medians.items()}
    speedups = {name: rate / rates[BASELINE] for name, rate in rates.items() if name != BASELINE}
    print(
        f"{kind} {case}: "
        + ", ".join(f"{name} {rate:,.1f} tok/s" for name, rate in rates.items())
        + " -> "
        + ", ".join(f"{name} {speedup:.2f}x" for name, speedup in speedups.items())
        + f" (target {TARGETS[kind]}x for fastgpt GPT)"
    )
    return {
        "kind": kind,
        "case": case,
        "tokens_per_s": rates,
        "median_s": medians,
        "speedup": speedups["fastgpt GPT"],
        "speedups": speedups,
        "target": TARGETS[kind],
    }


def generate_hf(hf, prompt, new_tokens):
    mask = torch.ones_like(prompt)
    return hf.generate(
        prompt,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )


def generate_gpt(gpt, prompt, new_tokens):
    return gpt.generate(prompt, new_tokens, temperature=0)


def bench_generation(hf, gpt, rounds):
    results = []
    patched = fastgpt.patch(copy.deepcopy(hf))
    for batch, prompt_len, new_tokens in GENERATION_CASES:
        prompt = torch.randint(0, hf.config.vocab_size, (batch, prompt_len))
        providers = {
            "fastgpt GPT": functools.partial(generate_gpt, gpt, prompt, new_tokens),
            "transformers + fastgpt.patch": functools.partial(generate_hf, patched, prompt, new_tokens),
            BASELINE: functools.partial(generate_hf, hf, prompt, new_tokens),
        }
        with torch.inference_mode():
            tokens = [run() for run in providers.values()]
            assert all(torch.equal(tokens[0], other) for other in tokens[1:]), (
                "greedy tokens differ between models"
            )
            times = interleaved(providers, rounds, warmup_calls=0)  # the check above was the warm-up
        case = {"batch": batch, "prompt": prompt_len, "new_tokens": new_tokens}
        results.append(report("generation", case, batch * new_tokens, times))
    return results


def weight_bytes_per_token(gpt):
    """Bytes of parameters one decode step reads: all of them (the tied lm_head / wte once) except
    the position table, of which it reads one row."""
    total = sum(p.numel() * p.element_size() for p in gpt.parameters())
    return total - gpt.transformer.wpe.weight.numel() * gpt.transformer.wpe.weight.element_size()


def weight_gemvs(gpt, transposed=False, linear=F.linear):
    """The batch-1 decode step's weight GEMVs alone, in the model's order: (run, bytes of weights).
    With transposed, on (in, out) copies of the weights (x @ W^T as x @ (W^T stored contiguously)).
    `linear` computes each product: BLAS (F.linear) or fastgpt's cpu kernel."""
    channels = gpt.config.n_embd
    x, hidden = torch.randn(1, channels), torch.randn(1, gpt.config.n_inner)
    layers = []
    for block in gpt.transformer.h:
        for module, inputs in (
            (block.attn.c_attn, x), (block.attn.c_proj, x), (block.mlp.c_fc, x), (block.mlp.c_proj, hidden)
        ):  # fmt: skip
            layers.append((inputs, module.weight, module.bias))
    layers.append((x, gpt.lm_head.weight, None))
    if transposed:
        layers = [(inputs, weight.t().contiguous().t(), bias) for inputs, weight, bias in layers]

    def run():
        for inputs, weight, bias in layers:
            linear(inputs, weight, bias)

    return run, sum(weight.numel() * weight.element_size() for _, weight, _ in layers)


def bench_bandwidth(gpt, generation, rounds):
    """Copy, read and GEMV bandwidth on 4 KiB and on huge pages, and each provider's end-to-end weight
    bandwidth at batch 1."""
    source = torch.randn(64 << 20)  # 256 MiB of float32, far beyond any cache
    target = torch.empty_like(source)
    huge_source = huge_pages.huge_page_buffer(source.numel() * source.element_size())
    huge_source = source if huge_source is None else huge_source.view(torch.float32).copy_(source)
    small_pages = copy.deepcopy(gpt)  # torch's allocator: 4 KiB pages (gpt may be in huge pages)
    in_huge_pages = copy.deepcopy(gpt)
    huge_pages.move_to_huge_pages(in_huge_pages)
    gemvs, gemv_bytes = weight_gemvs(small_pages)
    providers = {
        "copy": lambda: target.copy_(source), "read": source.sum, "read_huge": huge_source.sum, "gemvs": gemvs,
        "gemvs_huge": weight_gemvs(in_huge_pages)[0], "transposed": weight_gemvs(small_pages, transposed=True)[0],
    }  # fmt: skip
    if "cpu" in dispatch.available_backends():
        from fastgpt.ops import compiled

        providers["fastgpt"] = weight_gemvs(small_pages, linear=compiled.linear)[0]
        providers["fastgpt_huge"] = weight_gemvs(in_huge_pages, linear=compiled.linear)[0]
        providers["fastgpt_transposed"], _ = weight_gemvs(
            small_pages, transposed=True, linear=compiled.linear
        )
    with torch.inference_mode():
        times = interleaved(providers, rounds)

    def gigabytes_per_s(provider, nbytes):
        return nbytes / statistics.median(times[provider]) / 1e9 if provider in times else None

    source_bytes = source.numel() * source.element_size()
    read_rate = gigabytes_per_s("read", source_bytes)
    per_token = weight_bytes_per_token(gpt)
    result = {
        "kind": "bandwidth",
        "copy_GBps": gigabytes_per_s("copy", 2 * source_bytes),
        "read_GBps": read_rate,
        "read_huge_pages_GBps": gigabytes_per_s("read_huge", source_bytes),
        "gemv_GBps": gigabytes_per_s("gemvs", gemv_bytes),
        "gemv_huge_pages_GBps": gigabytes_per_s("gemvs_huge", gemv_bytes),
        "gemv_in_out_layout_GBps": gigabytes_per_s("transposed", gemv_bytes),
        "fastgpt_kernel_GBps": gigabytes_per_s("fastgpt", gemv_bytes),
        "fastgpt_kernel_huge_pages_GBps": gigabytes_per_s("fastgpt_huge", gemv_bytes),
        "fastgpt_kernel_in_out_layout_GBps": gigabytes_per_s("fastgpt_transposed", gemv_bytes),
        "weight_bytes_per_token": per_token,
        "batch1_tokens_per_s_ceiling": read_rate * 1e9 / per_token,
    }
    print(
        "bandwidth (GB/s; 4 KiB pages, then huge pages): "
        f"copy {result['copy_GBps']:.1f} (read + write); read {read_rate:.1f}, "
        f"{result['read_huge_pages_GBps']:.1f}; weight GEMVs alone {result['gemv_GBps']:.1f}, "
        f"{result['gemv_huge_pages_GBps']:.1f} ((in, out) layout: {result['gemv_in_out_layout_GBps']:.1f}); "
        f"fastgpt's cpu kernel {result['fastgpt_kernel_GBps'] or float('nan'):.1f}, "
        f"{result['fastgpt_kernel_huge_pages_GBps'] or float('nan'):.1f} ((in, out) layout: "
        f"{result['fastgpt_kernel_in_out_layout_GBps'] or float('nan'):.1f}); {per_token / 1e6:.0f} MB of weights "
        f"per token -> at most {result['batch1_tokens_per_s_ceiling']:.1f} tok/s at batch 1 at the 4 KiB read rate"
    )
    batch1 = next((r for r in generation if r["case"]["batch"] == 1), None)
    if batch1 is not None:
        result["batch1_weight_GBps"] = {
            name: rate * per_token / 1e9 for name, rate in batch1["tokens_per_s"].items()
        }
        print(
            "batch-1 decoding, weight bytes read per second: "
            + ", ".join(f"{name} {rate:.1f} GB/s" for name, rate in result["batch1_weight_GBps"].items())
        )
    return result


def train_step(model, optimizer, loss_fn):
    loss_fn(model).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def saved_activation_bytes(model, loss_fn):
    """Bytes autograd keeps for the backward of loss_fn(model), parameters left out (each storage once):
    the activation memory of a training step."""
    return sum(nbytes for _, nbytes in saved_for_backward(lambda: loss_fn(model), model.parameters()))


def bench_training(hf, gpt, rounds):
    results = []
    hf, gpt = copy.deepcopy(hf).train(), copy.deepcopy(gpt).train()
    checkpointed = copy.deepcopy(gpt).set_activation_checkpointing()
    hf_optimizer, gpt_optimizer, checkpointed_optimizer = (
        torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1) for model in (hf, gpt, checkpointed)
    )
    for batch, seq in TRAINING_CASES:
        idx = torch.randint(0, hf.config.vocab_size, (batch, seq + 1))
        inputs, targets = idx[:, :-1], idx[:, 1:]
        gpt_loss = functools.partial(lambda m, x, y: m(x, y), x=inputs, y=targets)
        hf_loss = functools.partial(lambda m, x: m(x, labels=x).loss, x=inputs)
        # transformers shifts the labels inside; both run forward and backward over seq tokens
        providers = {
            "fastgpt GPT": functools.partial(train_step, gpt, gpt_optimizer, gpt_loss),
            "fastgpt GPT, activation checkpointing": functools.partial(
                train_step, checkpointed, checkpointed_optimizer, gpt_loss
            ),
            BASELINE: functools.partial(train_step, hf, hf_optimizer, hf_loss),
        }
        times = interleaved(providers, rounds)  # its warm-up call sets up the allocator and optimizer state
        activations = {
            name: saved_activation_bytes(model, loss_fn)
            for name, model, loss_fn in (
                ("fastgpt GPT", gpt, gpt_loss),
                ("fastgpt GPT, activation checkpointing", checkpointed, gpt_loss),
                (BASELINE, hf, hf_loss),
            )
        }
        print(
            "saved activations: "
            + ", ".join(f"{name} {nbytes / 2**20:,.1f} MiB" for name, nbytes in activations.items())
        )
        result = report("training", {"batch": batch, "seq": seq}, batch * seq, times)
        results.append(dict(result, saved_activation_bytes=activations))
    return results


def generate_hf_left_padded(hf, prompts, new_tokens):
    """transformers' batch of prompts of different lengths: left-padded, with the mask marking the pads."""
    width = max(len(prompt) for prompt in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)  # (B, T)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    out = hf.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return [torch.cat([prompt, new]) for prompt, new in zip(prompts, out[:, width:])]


def generate_gpt_one_at_a_time(gpt, prompts, new_tokens):
    return [gpt.generate(prompt[None], new_tokens, temperature=0)[0] for prompt in prompts]


def bench_ragged_generation(hf, gpt, rounds):
    lengths, new_tokens = RAGGED_CASE
    prompts = [torch.randint(0, hf.config.vocab_size, (length,)) for length in lengths]
    patched = fastgpt.patch(copy.deepcopy(hf))
    providers = {
        "fastgpt GPT": functools.partial(generate_gpt, gpt, prompts, new_tokens),
        "fastgpt GPT, one prompt at a time": functools.partial(
            generate_gpt_one_at_a_time, gpt, prompts, new_tokens
        ),
        "transformers + fastgpt.patch": functools.partial(
            generate_hf_left_padded, patched, prompts, new_tokens
        ),
        BASELINE: functools.partial(generate_hf_left_padded, hf, prompts, new_tokens),
    }
    with torch.inference_mode():
        outputs = {name: run() for name, run in providers.items()}  # also the warm-up
        reference_rows = outputs["fastgpt GPT, one prompt at a time"]
        agreement = {
            name: sum(torch.equal(a, b) for a, b in zip(rows, reference_rows)) / len(prompts)
            for name, rows in outputs.items()
        }
        times = interleaved(providers, rounds, warmup_calls=0)
    print(f"ragged generation: sequences whose greedy tokens equal one-at-a-time generation's: {agreement}")
    case = {"prompt_lengths": list(lengths), "new_tokens": new_tokens}
    return dict(report("ragged generation", case, len(prompts) * new_tokens, times), same_tokens=agreement)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    parser.add_argument("--only", choices=("generation", "ragged", "training", "bandwidth"), default=None)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf = transformers_gpt2()
    gpt = GPT.from_hf(hf)
    import transformers

    header = {
        "torch": torch.__version__, "transformers": transformers.__version__, "fastgpt": fastgpt.__version__,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "fastgpt_backends": resolved_backends(), "available_backends": fastgpt.available_backends(),
    }  # fmt: skip
    print(json.dumps(header))
    results, generation = [], []
    if args.only in (None, "generation"):
        generation = bench_generation(hf, gpt, args.rounds)
        results += generation
    if args.only in (None, "ragged"):
        results.append(bench_ragged_generation(hf, gpt, args.rounds))
    if args.only in (None, "bandwidth"):
        results.append(bench_bandwidth(gpt, generation, args.rounds))
    if args.only in (None, "training"):
        results += bench_training(hf, gpt, args.rounds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header, results=results), f, indent=2)


if __name__ == "__main__":
    main()
