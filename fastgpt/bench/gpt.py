"""Whole-model benchmark: a GPT-2 training step and greedy generation, in tokens/s.

Providers, all holding the same weights (one randomly initialised transformers GPT-2, copied):
- `fastgpt.nn`: fastgpt.nn.GPT.from_hf(model) (imported lazily; reported as not available until it
  exists);
- `fastgpt.nn+torch.compile`: the same model under torch.compile(fullgraph=True) (fastgpt's ops opaque,
  the glue between them fused by Inductor), and `fastgpt.nn+cuda-graph` (CUDA only): its whole
  training step (forward, backward, AdamW(fused=True, capturable=True), zero_grad) captured in a CUDA
  graph after one eager step on a side stream and replayed (fastgpt.train.step.CapturedStep, as
  `fastgpt train --step-mode cuda-graph` runs it). The compiled provider times the training step only;
  in generation `fastgpt.nn` runs GPT.generate's per-op decode loop and `fastgpt.nn+cuda-graph` its
  static decode step replayed from a CUDA graph (GPT.generate(cuda_graph=True));
- `hf+fastgpt.patch`: the transformers model patched in place by fastgpt.patch;
- `hf (sdpa)`: the unpatched transformers model with attn_implementation="sdpa";
- `nanogpt`: the nanoGPT-style eager model of fastgpt.bench.nanogpt, and `nanogpt+torch.compile`.

Training step: forward, loss, backward and AdamW (fused on CUDA, the default on CPU; capturable for
the graph-captured provider), then zero_grad(set_to_none=True). Weights, gradients and optimizer state
are all in the run's dtype (pure bf16 on GPU, no autocast), the same for every provider. The transformers
models' loss is their `labels=` path (with `shift_labels`, over the same (input, target) pairs as the
others): F.cross_entropy on float32-upcast logits unpatched, fastgpt.linear_cross_entropy patched.
tokens/s = batch x seq / step time; % of peak is the model-FLOP utilisation (flops.gpt_train_flops)
against the measured matmul peak.

Generation: greedy (temperature 0) from `batch` prompts of `prompt` tokens to exactly `new_tokens` more
(tokens/s = batch x new_tokens / time of the whole call, prefill included).

Errors come from each provider's first call: for training, the loss of the first step (fresh weights,
before any update) against the float64 nanoGPT model on the same batch; for generation, the fraction
of new tokens that differ from float64 greedy decoding of the first two prompts (low precision may
legitimately flip a near-tie, after which a sequence diverges).
"""

import copy
import dataclasses

import torch

import fastgpt
from fastgpt.bench import flops as counts
from fastgpt.bench import timing
from fastgpt.bench.nanogpt import NanoGPT, generate_greedy
from fastgpt.bench.providers import optional_module, reset_compiled, select
from fastgpt.bench.records import BASELINE, FASTGPT, dtype_name, matmul_peak
from fastgpt.train.step import CapturedStep

GPT2_124M = {
    "model": "gpt2",
    "n_layer": 12,
    "n_head": 12,
    "n_embd": 768,
    "vocab_size": 50257,
    "block_size": 1024,
}
SMALL = {"model": "small", "n_layer": 2, "n_head": 4, "n_embd": 256, "vocab_size": 8192, "block_size": 256}
TINY_MODEL = {"model": "tiny", "n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": 256, "block_size": 64}


def _cases(model, batch, seq, gen_batch, prompt, new_tokens):
    """A training case and a generation case (each written to the results as soon as it is done)."""
    return [
        {"mode": "train", **model, "batch": batch, "seq": seq},
        {"mode": "generate", **model, "batch": gen_batch, "prompt": prompt, "new_tokens": new_tokens},
    ]


SHAPES = {
    ("cuda", "full"): _cases(GPT2_124M, batch=16, seq=1024, gen_batch=16, prompt=128, new_tokens=64),
    ("cuda", "quick"): _cases(GPT2_124M, batch=8, seq=1024, gen_batch=8, prompt=128, new_tokens=64),
    ("cpu", "full"): _cases(GPT2_124M, batch=1, seq=128, gen_batch=1, prompt=32, new_tokens=32),
    ("cpu", "quick"): _cases(SMALL, batch=2, seq=128, gen_batch=16, prompt=16, new_tokens=16),
}
TINY = _cases(TINY_MODEL, batch=2, seq=32, gen_batch=2, prompt=8, new_tokens=8)
MODES = ("train", "generate")
ERROR_ROWS = 2  # generated sequences compared with float64 greedy decoding
# On GPU, nanoGPT's generation under torch.compile would compile two more graphs (prefill and decode;
# the training step's graph took 22.6 s to compile on the H200), over gpu_check.sh's budget.
# transformers' generate is the generation baseline there.
GPU_COMPILED_GENERATION_SKIP = (
    "not run on GPU: compiling its prefill and decode graphs would exceed "
    "gpu_check.sh's budget (transformers is the generation baseline)"
)
# CPU rounds of generate calls last this many times the sweep's round: the quick sweep's calls take
# ~25 ms, and its 50 ms rounds held two calls, whose median moved the speedups by up to 50% run to run.
GENERATION_ROUND_FACTOR = 10
NANOGPT_VOCAB_MULTIPLE = 64  # nanoGPT's train.py: GPT-2's 50257 -> 50304
LEARNING_RATE = 1e-5  # small, so the timed steps leave the weights near where the errors were measured
# The graph-captured step runs its first call eagerly (that call's loss gives the error, and it creates
# AdamW's state and tunes Triton's kernels) and captures at the second, made right after the first and
# guarded as it is (a capture can fail where the eager step ran: a host synchronisation or an allocation
# the graph cannot record), so a failed capture skips the provider instead of ending the case, and the
# warm-up and timed rounds are replays only.
CAPTURE_WARMUP_STEPS = 1
TRAINING_ONLY = (
    "a training-step provider: GPT.generate runs its own decode step, which compiling does not change"
)


@dataclasses.dataclass
class ModelProvider:
    name: str
    kind: str
    skip: str | None = None
    model: object = None  # the torch.nn.Module holding the weights
    loss: object = None  # loss(x, y) -> scalar
    generate: object = None  # generate(prompts, new_tokens) -> (B, P + new_tokens)
    captured: bool = False  # the whole training step replayed from a CUDA graph


def _hf_model(shape, seed):
    from transformers import AutoModelForCausalLM, GPT2Config

    last = shape["vocab_size"] - 1
    config = GPT2Config(
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        n_embd=shape["n_embd"],
        vocab_size=shape["vocab_size"],
        n_positions=shape["block_size"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=last,
        eos_token_id=last,
        pad_token_id=last,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _hf_loss(model):
    """The loss as transformers users train: `labels=` (here `shift_labels=y`, so the targets are the
    same (input, target) pairs as the other providers'). Unpatched, transformers upcasts its logits to
    float32 for F.cross_entropy; patched, fastgpt.linear_cross_entropy forms no logits."""

    def loss(x, y):
        return model(input_ids=x, labels=y, shift_labels=y).loss

    return loss


def _hf_generate(model):
    pad = model.config.pad_token_id

    def generate(prompts, new_tokens):
        return model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )

    return generate


def _fastgpt_nn(hf_model, step="eager"):
    """fastgpt.nn.GPT with hf_model's weights; step: "eager", "compile" (the model under
    torch.compile(fullgraph=True)) or "cuda-graph" (the training step captured)."""
    name = {
        "eager": "fastgpt.nn",
        "compile": "fastgpt.nn+torch.compile",
        "cuda-graph": "fastgpt.nn+cuda-graph",
    }[step]
    nn_module = optional_module("fastgpt.nn")
    if nn_module is None or not hasattr(nn_module, "GPT"):
        return ModelProvider(name, FASTGPT, skip="fastgpt.nn not available")
    weight = hf_model.lm_head.weight
    if step == "cuda-graph" and weight.device.type != "cuda":
        return ModelProvider(name, FASTGPT, skip=f"CUDA graphs need a CUDA device, got {weight.device.type}")
    model = nn_module.GPT.from_hf(hf_model).to(device=weight.device, dtype=weight.dtype)
    forward = torch.compile(model, fullgraph=True, dynamic=False) if step == "compile" else model
    return ModelProvider(
        name,
        FASTGPT,
        model=model,
        loss=lambda x, y: forward(x, y),
        generate=lambda prompts, new_tokens: model.generate(
            prompts, new_tokens, temperature=0, cuda_graph=step == "cuda-graph"
        ),
        captured=step == "cuda-graph",
    )


def _hf_patched(hf_model):
    if not hasattr(fastgpt, "patch"):
        return ModelProvider("hf+fastgpt.patch", FASTGPT, skip="fastgpt.patch not available")
    model = fastgpt.patch(hf_model)
    return ModelProvider(
        "hf+fastgpt.patch", FASTGPT, model=model, loss=_hf_loss(model), generate=_hf_generate(model)
    )


def _hf_plain(model):
    return ModelProvider(
        "hf (sdpa)", BASELINE, model=model, loss=_hf_loss(model), generate=_hf_generate(model)
    )


def _nanogpt(hf_model, compile_it):
    """nanoGPT as its users train it, on the vocabulary padded to a multiple of 64 (50304 for GPT-2)."""
    model = NanoGPT.from_hf(hf_model, vocab_multiple=NANOGPT_VOCAB_MULTIPLE)
    step = torch.compile(model, dynamic=False) if compile_it else model

    def generate(prompts, new_tokens):
        return generate_greedy(step, model, prompts, new_tokens)

    name = "nanogpt+torch.compile" if compile_it else "nanogpt"
    return ModelProvider(name, BASELINE, model=model, loss=lambda x, y: step(x, y), generate=generate)


PROVIDER_NAMES = (
    "fastgpt.nn",
    "fastgpt.nn+torch.compile",
    "fastgpt.nn+cuda-graph",
    "hf+fastgpt.patch",
    "hf (sdpa)",
    "nanogpt",
    "nanogpt+torch.compile",
)
TRAINING_ONLY_PROVIDERS = ("fastgpt.nn+torch.compile",)


def build_providers(master, device, dtype, include=None, exclude=None, skips=None):
    """Every provider, each with its own copy of the master model's weights in (device, dtype); those
    named in `skips` ({name: reason}) are not built and carry the reason."""

    def fresh():
        return copy.deepcopy(master).to(device=device, dtype=dtype)

    builders = {
        "fastgpt.nn": lambda: _fastgpt_nn(fresh()),
        "fastgpt.nn+torch.compile": lambda: _fastgpt_nn(fresh(), step="compile"),
        "fastgpt.nn+cuda-graph": lambda: _fastgpt_nn(fresh(), step="cuda-graph"),
        "hf+fastgpt.patch": lambda: _hf_patched(fresh()),
        "hf (sdpa)": lambda: _hf_plain(fresh()),
        "nanogpt": lambda: _nanogpt(fresh(), compile_it=False),
        "nanogpt+torch.compile": lambda: _nanogpt(fresh(), compile_it=True),
    }
    names = [p.name for p in select([ModelProvider(n, "") for n in PROVIDER_NAMES], include, exclude)]
    providers = []
    for name in names:
        kind = FASTGPT if name.startswith(("fastgpt", "hf+fastgpt")) else BASELINE
        if name in (skips or {}):
            providers.append(ModelProvider(name, kind, skip=skips[name]))
            continue
        try:
            providers.append(builders[name]())
        except Exception as error:  # noqa: BLE001 - a provider that cannot be built is reported, not fatal
            providers.append(ModelProvider(name, kind, skip=f"error: {type(error).__name__}: {error}"[:500]))
    return providers


def _train_step(provider, x, y, device):
    """One optimizer step on (x, y); returns the loss before the update. A captured provider's step
    reads x and y in place: they are its graph's static inputs."""
    on_cuda = torch.device(device).type == "cuda"
    optimizer = torch.optim.AdamW(
        provider.model.parameters(),
        lr=LEARNING_RATE,
        **({"fused": True, "capturable": provider.captured} if on_cuda else {}),
    )

    def step():
        loss = provider.loss(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return CapturedStep(step, warmup_steps=CAPTURE_WARMUP_STEPS) if provider.captured else step


def _generate_call(provider, prompts, new_tokens):
    def call():
        with torch.no_grad():
            return provider.generate(prompts, new_tokens)

    return call


def mode_skips(mode, device):
    """{provider: reason} of the providers not built for this mode on this device."""
    if mode == "train":
        return {}
    skips = dict.fromkeys(TRAINING_ONLY_PROVIDERS, TRAINING_ONLY)
    if torch.device(device).type == "cuda":
        skips["nanogpt+torch.compile"] = GPU_COMPILED_GENERATION_SKIP
    return skips


def _tokens(shape, device):
    """The case's token ids, the same for every provider: (inputs, targets), each (B, T), for training;
    prompts (B, P) for generation."""
    generator = torch.Generator().manual_seed(1)
    vocab = shape["vocab_size"]
    if shape["mode"] == "train":
        size = (shape["batch"], shape["seq"])
        return tuple(torch.randint(0, vocab, size, generator=generator).to(device) for _ in range(2))
    return torch.randint(0, vocab, (shape["batch"], shape["prompt"]), generator=generator).to(device)


def _reference_error(shape, master, tokens, device):
    """(error_of(first result) -> (detail, note)), from the float64 nanoGPT model with the same weights."""
    reference = NanoGPT.from_hf(master).to(device=device, dtype=torch.float64).eval()
    with torch.no_grad():
        if shape["mode"] == "train":
            expected_loss = float(reference(*tokens))

            def loss_error(loss):
                return {
                    "loss_abs_error": abs(float(loss) - expected_loss)
                }, "loss of the first step (fresh weights)"

            return loss_error
        new_tokens = shape["new_tokens"]
        expected = generate_greedy(reference, reference, tokens[:ERROR_ROWS], new_tokens)[:, -new_tokens:]

    def token_error(generated):
        mismatch = (generated[:ERROR_ROWS, -new_tokens:] != expected).double().mean()
        return (
            {"token_mismatch_fraction": float(mismatch)},
            f"greedy tokens of the first {ERROR_ROWS} prompts against float64 greedy decoding",
        )

    return token_error


def _calls(providers, shape, tokens, device):
    """{provider: no-argument callable}: a training step, or a generate call."""
    calls = {}
    for provider in providers:
        if provider.skip:
            continue
        if shape["mode"] == "train":
            provider.model.train()
            calls[provider.name] = _train_step(provider, *tokens, device)
        else:
            provider.model.eval()
            calls[provider.name] = _generate_call(provider, tokens, shape["new_tokens"])
    return calls


def _peak_memory_bytes(call, device):
    """A call's peak memory beyond what was allocated before it; for a captured step, which allocates
    nothing when replayed, the memory its graph's private pool holds for the replays."""
    if isinstance(call, CapturedStep):
        return call.pool_bytes()
    return timing.peak_memory_bytes(call, device)


class GPTBench:
    name = "gpt"
    modes = MODES

    def shapes(self, device_type, sweep):
        return TINY if sweep == "tiny" else SHAPES[(device_type, sweep)]

    def provider_names(self, shape, dtype, device):
        return list(PROVIDER_NAMES)

    def benchmark_call(self, shape, dtype, device, provider_name, mode):
        """(call, None): one training step or one generate call of one provider (synchronised on GPU),
        for pytest-benchmark; or (None, the reason it cannot run)."""
        if optional_module("transformers") is None:
            return None, "transformers is not installed"
        providers = build_providers(
            _hf_model(shape, seed=0), device, dtype, include=[provider_name], skips=mode_skips(mode, device)
        )
        if providers[0].skip:
            return None, providers[0].skip
        (run,) = _calls(providers, shape, _tokens(shape, device), device).values()

        def call():
            result = run()
            timing.synchronize(device)
            return result

        return call, None

    def work(self, shape, dtype, mode):
        if mode == "train":
            return {
                "tokens": shape["batch"] * shape["seq"],
                "flops": counts.gpt_train_flops(
                    shape["batch"],
                    shape["seq"],
                    shape["n_layer"],
                    shape["n_head"],
                    shape["n_embd"],
                    shape["vocab_size"],
                ),
            }
        return {"tokens": shape["batch"] * shape["new_tokens"], "flops": None}

    def run_case(self, shape, dtype, device, plan, peaks, include=None, exclude=None):
        device = torch.device(device)
        mode = shape["mode"]
        recorded_shape = {key: value for key, value in shape.items() if key != "mode"}
        note = {"op": self.name, "shape": recorded_shape, "dtype": dtype_name(dtype), "mode": mode}
        if optional_module("transformers") is None:
            return [], [
                {**note, "provider": "*", "kind": BASELINE, "reason": "transformers is not installed"}
            ]
        reset_compiled()
        master = _hf_model(shape, seed=0)
        tokens = _tokens(shape, device)
        error_of = _reference_error(shape, master, tokens, device)
        providers = build_providers(master, device, dtype, include, exclude, mode_skips(mode, device))
        calls = _calls(providers, shape, tokens, device)
        if mode == "generate":
            rounds = plan.gpu_generation_rounds if device.type == "cuda" else plan.cpu_generation_rounds
            plan = dataclasses.replace(
                plan,
                rounds=rounds,
                warmup_calls=min(plan.warmup_calls, 1),
                warmup_s=0.0,
                gpu_warmup_s=0.0,
                cpu_round_s=plan.cpu_round_s * GENERATION_ROUND_FACTOR,
            )
        work = self.work(shape, dtype, mode)
        skipped = [
            {**note, "provider": p.name, "kind": p.kind, "reason": p.skip} for p in providers if p.skip
        ]
        kinds = {p.name: p.kind for p in providers}
        measured = {}
        for name, call in calls.items():  # first call: compilation; its result gives the error
            try:
                seconds, result = timing.timed_first_call(call, device)
                detail = error_of(result)
                while isinstance(call, CapturedStep) and not call.captured:
                    timing.timed_first_call(call, device)  # its eager steps left, then the capture
            except Exception as error:  # noqa: BLE001 - report it and go on with the others
                skipped.append(
                    {
                        **note,
                        "provider": name,
                        "kind": kinds[name],
                        "reason": f"error: {type(error).__name__}: {error}"[:500],
                    }
                )
                continue
            measured[name] = (seconds, detail)
        timed = {name: calls[name] for name in measured}
        timings = timing.measure_interleaved(timed, device, plan) if timed else {}
        peak_tflops = matmul_peak(peaks, dtype)
        records = []
        for name, (first_call_s, (detail, err_note)) in measured.items():
            result = timings[name]
            seconds = result.median_ms * 1e-3
            tflops = work["flops"] / seconds / 1e12 if work["flops"] else None
            records.append(
                {
                    **note,
                    "device": peaks["device"],
                    "provider": name,
                    "kind": kinds[name],
                    "median_ms": result.median_ms,
                    "iqr_ms": result.iqr_ms,
                    "min_ms": result.min_ms,
                    "max_ms": result.max_ms,
                    "samples": result.samples,
                    "round_ms": list(result.round_ms),
                    "first_call_s": first_call_s,
                    "input_copies": 1,
                    "metric": "tokens_per_s",
                    "tflops": tflops,
                    "gbps": None,
                    "tokens_per_s": work["tokens"] / seconds,
                    "pct_of_peak": 100 * tflops / peak_tflops if tflops and peak_tflops else None,
                    "err_vs_reference": max(detail.values()),
                    "err_detail": detail,
                    "err_note": err_note,
                    "peak_mem_bytes": int(_peak_memory_bytes(calls[name], device)),
                }
            )
        return records, skipped
