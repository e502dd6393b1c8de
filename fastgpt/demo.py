"""`fastgpt demo`: the showcase, offline and with no arguments, in about 2 minutes on a 2-core CPU.

1. every op on every available backend, with its error against the float64 reference;
2. speed against eager PyTorch and SDPA on this device;
3. a tiny GPT trained on the standard library's sources with the fused kernels, interleaved step by
   step with the same model on eager PyTorch ops (backend "reference"), for the training tokens/s of both;
4. the fastgpt model trained on alone (it is the faster one) to the end of the one warmup + cosine
   schedule planned over parts 3 and 4, so that what it writes reads like Python;
5. its held-out loss and a sample.

Everything it writes goes under --out (default ./demo-out, which git ignores): the loss curves
(loss.png), the checkpoint and the record of the run (results.json).
"""

import datetime
import json
import math
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from torch.utils import benchmark

import fastgpt
from fastgpt import dispatch, reference
from fastgpt.dispatch import triton_interpreter_enabled
from fastgpt.info import device_description, package_versions
from fastgpt.nn import GPT, GPTConfig
from fastgpt.train import runtime
from fastgpt.train.data import read_corpus, split_tokens
from fastgpt.train.errors import UserError
from fastgpt.train.loop import Settings, Trainer, progress_bar
from fastgpt.train.tokenizer import ByteTokenizer

# (batch, heads, kv_heads, seq, head_dim): GPT-2 small's attention at a length a CPU handles in seconds.
ATTENTION_SHAPE = (2, 12, 12, 512, 64)
# Model, batch and peak learning rate of the demo's training. On CPU: among the shapes tried (2-4 layers,
# 128-160 wide, context 64-256, batches of 4-16, lr 2e-3 to 8e-3), one of the few that reached a held-out
# loss of 1.44-1.47 in 180 CPU-seconds of one thread, about the fastgpt steps an idle 2-core machine takes
# in the demo's 100 s of training (lr 6e-3 and up trained worse). max_steps caps the comparison only.
# On GPU: large enough that the kernels, not launches, dominate.
DEMO_MODEL = {
    "cpu": dict(n_layer=3, n_head=4, n_embd=128, block_size=64, batch_size=16, lr=3e-3, max_steps=400),
    "cuda": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=32, lr=2e-3, max_steps=600),
}
CALIBRATION_STEPS = 4  # interleaved steps before the first plan of how many fit in the time budgets
PACE_STEPS = 20  # the latest steps whose median time is the pace that plans the steps left
WARMUP_STEPS = 40
EVALUATIONS = 8  # held-out evaluations over the run planned after calibration, and one at each end
MIN_STEPS = 30  # on a machine too slow for more in --train-seconds, the demo overruns rather than train less
PROMPT = "def "
SAMPLE_BYTES = 400  # about ten lines of code: several context windows of the CPU model
SAMPLE_TEMPERATURE = 0.8
SAMPLE_TOP_K = 20  # of 257 byte tokens: cuts the long tail of unlikely bytes that turns a sample into noise
REPO_ROOT = Path(__file__).resolve().parents[1]


def add_arguments(parser):
    parser.add_argument(
        "--device", choices=runtime.DEVICES, default="auto", help="auto: cuda when a GPU is visible"
    )
    parser.add_argument(
        "--out",
        default="demo-out",
        help="the only place the demo writes: loss curves, checkpoint and results.json (default: ./demo-out)",
    )
    parser.add_argument(
        "--train-seconds",
        type=float,
        default=20.0,
        help="time for the training comparison, fastgpt against eager PyTorch (default: 20)",
    )
    parser.add_argument(
        "--continue-seconds",
        type=float,
        default=80.0,
        help="time for training the fastgpt model on alone after the comparison (default: 80)",
    )
    parser.add_argument(
        "--steps", type=int, help="steps of the comparison (default: as many as fit in --train-seconds)"
    )
    parser.add_argument(
        "--continue-steps",
        type=int,
        help="steps of the fastgpt model alone (default: as many as fit in --continue-seconds)",
    )


# ----------------------------------------------------------------------------------------------
# 1. Every op on every backend, against the float64 reference


def op_cases(device, dtype):
    """{op: (function of (inputs, backend), float inputs needing gradients, reference function)}, small shapes."""

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_()

    hidden = 256
    targets = torch.randint(0, 1024, (256,), device=device)
    return {
        "causal_attention": (
            lambda t, b: fastgpt.causal_attention(*t, backend=b),
            [make(2, 4, 97, 64), make(2, 2, 97, 64), make(2, 2, 97, 64)],  # GQA, a ragged length
            lambda t: reference.causal_attention(*t),
        ),
        "fused_ffn": (
            lambda t, b: fastgpt.fused_ffn(*t, backend=b),
            [
                make(2, 64, hidden),
                make(4 * hidden, hidden, scale=0.05),
                make(4 * hidden, scale=0.1),
                make(hidden, 4 * hidden, scale=0.05),
                make(hidden, scale=0.1),
            ],
            lambda t: reference.fused_ffn(*t),
        ),
        "layer_norm": (
            lambda t, b: fastgpt.layer_norm(t[0], t[1], t[2], residual=t[3], backend=b)[0],
            [make(2, 64, hidden), make(hidden), make(hidden), make(2, 64, hidden)],
            lambda t: reference.layer_norm(t[0], t[1], t[2], residual=t[3])[0],
        ),
        "linear_cross_entropy": (
            lambda t, b: fastgpt.linear_cross_entropy(t[0], t[1], targets, backend=b),
            [make(256, hidden), make(1024, hidden, scale=0.05)],
            lambda t: reference.linear_cross_entropy(t[0], t[1], targets),
        ),
    }


def max_errors(fn, backend, inputs, expected_out, expected_grads, grad_out):
    """Max |error| of fn's output and of the gradients of all its inputs, against float64 results."""
    out = fn(inputs, backend)
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    out_error = (out.detach().double() - expected_out).abs().max().item()
    grad_error = max((g.double() - e).abs().max().item() for g, e in zip(grads, expected_grads))
    return out_error, grad_error


def backend_table(device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    table = Table(
        title=f"every op on every backend: max |error| against the float64 reference ({dtype}, {device.type})"
    )
    for column in ("op", "backend", "output", "gradients"):
        table.add_column(column, justify="left" if column in ("op", "backend") else "right")
    for op, (fn, inputs, reference_fn) in op_cases(device, dtype).items():
        inputs64 = [t.detach().double().requires_grad_() for t in inputs]
        expected = reference_fn(inputs64)
        grad_out = torch.randn_like(expected)
        expected_grads = torch.autograd.grad(expected, inputs64, grad_out)
        for name in fastgpt.available_backends():
            if name in ("cpu", "cuda") and name != device.type:
                continue
            if dispatch.IMPLEMENTATIONS[name].get(op) is None:
                table.add_row(op, name, "[dim]not implemented[/dim]", "")
                continue
            out_error, grad_error = max_errors(fn, name, inputs, expected, expected_grads, grad_out)
            table.add_row(op, name, f"{out_error:.1e}", f"{grad_error:.1e}")
        table.add_section()
    return table


# ----------------------------------------------------------------------------------------------
# 2. Speed against eager PyTorch and SDPA


def attention_table(device):
    batch, heads, kv_heads, seq, head_dim = ATTENTION_SHAPE
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, seq, head_dim, device=device, dtype=dtype) for _ in range(2))
    expected = reference.causal_attention(q.double().cpu(), k.double().cpu(), v.double().cpu())

    table = Table(title=f"causal attention forward {tuple(q.shape)} {dtype} on {device_description()}")
    table.add_column("backend")
    table.add_column("median ms", justify="right")
    table.add_column("max error vs float64", justify="right")
    for name in fastgpt.available_backends():
        if name in ("cpu", "cuda") and name != device.type:
            continue
        out = fastgpt.causal_attention(q, k, v, backend=name)
        error = (out.double().cpu() - expected).abs().max().item()
        if name == "triton" and device.type == "cpu" and triton_interpreter_enabled():
            table.add_row(name, "[dim]interpreter: not timed[/dim]", f"{error:.2e}")
            continue
        timer = benchmark.Timer(
            "f(q, k, v, backend=name)",
            globals={"f": fastgpt.causal_attention, "q": q, "k": k, "v": v, "name": name},
        )
        table.add_row(name, f"{timer.blocked_autorange(min_run_time=0.5).median * 1e3:.2f}", f"{error:.2e}")
    sdpa = benchmark.Timer(
        "f(q, k, v, is_causal=True, enable_gqa=True)",
        globals={"f": torch.nn.functional.scaled_dot_product_attention, "q": q, "k": k, "v": v},
    )
    sdpa_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    table.add_row(
        "torch SDPA (baseline)",
        f"{sdpa.blocked_autorange(min_run_time=0.5).median * 1e3:.2f}",
        f"{(sdpa_out.double().cpu() - expected).abs().max().item():.2e}",
    )
    return table


def training_op_cases(device, dtype):
    """{op: {provider: a forward+backward closure}} at the shapes of one GPT-2 small layer over
    512 tokens, the work of one training step per layer."""

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()

    channels, tokens = 768, 512
    q, k, v = (make(1, 12, tokens, 64) for _ in range(3))
    x, ln_w, ln_b = make(tokens, channels), make(channels), make(channels)
    fc_w, fc_b = make(4 * channels, channels, scale=0.02), make(4 * channels, scale=0.02)
    proj_w, proj_b = make(channels, 4 * channels, scale=0.02), make(channels, scale=0.02)
    head = make(8192, channels, scale=0.02)  # a 8192-token vocabulary keeps the CPU timing short
    targets = torch.randint(0, 8192, (tokens,), device=device)

    def train(fn):
        return lambda: fn().float().sum().backward()

    return {
        "causal_attention": {
            "fastgpt": train(lambda: fastgpt.causal_attention(q, k, v)),
            "eager torch": train(lambda: reference.causal_attention(q, k, v)),
            "torch SDPA": train(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        },
        "fused_ffn": {
            "fastgpt": train(lambda: fastgpt.fused_ffn(x, fc_w, fc_b, proj_w, proj_b)),
            "eager torch": train(
                lambda: F.linear(F.gelu(F.linear(x, fc_w, fc_b), approximate="tanh"), proj_w, proj_b)
            ),
        },
        "layer_norm": {
            "fastgpt": train(lambda: fastgpt.layer_norm(x, ln_w, ln_b)),
            "eager torch": train(lambda: F.layer_norm(x, (channels,), ln_w, ln_b)),
        },
        "linear_cross_entropy": {
            "fastgpt": train(lambda: fastgpt.linear_cross_entropy(x, head, targets)),
            "eager torch": train(lambda: F.cross_entropy(F.linear(x, head).float(), targets)),
        },
    }


def speed_table(device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    min_run_time = 0.2 if device.type == "cuda" else 0.4
    table = Table(title=f"forward + backward, one GPT-2 small layer over 512 tokens ({dtype}, {device.type})")
    for column in ("op", "provider", "median ms", "speedup vs eager"):
        table.add_column(column, justify="left" if column in ("op", "provider") else "right")
    for op, providers in training_op_cases(device, dtype).items():
        medians = {}
        for provider, step in providers.items():
            step()  # warm-up (and first-call backend resolution)
            medians[provider] = (
                benchmark.Timer("step()", globals={"step": step})
                .blocked_autorange(min_run_time=min_run_time)
                .median
            )
        for provider, median in medians.items():
            table.add_row(op, provider, f"{median * 1e3:.2f}", f"{medians['eager torch'] / median:.2f}x")
        table.add_section()
    return table


# ----------------------------------------------------------------------------------------------
# 3. Training: fastgpt against eager PyTorch, interleaved; 4. fastgpt on alone


def chosen_backends(config, batch_size, device, dtype):
    """The backend `auto` runs each op of this model's training step on: asked with the routing facts
    that fastgpt.functional passes for the model's calls (the attention's over batches of batch_size
    and the whole context window, the loss over the padded LM head), since the CUDA order of
    causal_attention depends on kv_len (dispatch.CUDA_ORDER) and a fact left out picks the other order."""
    facts = {
        "causal_attention": dispatch.attention_facts(
            batch_size, config.n_head, config.head_dim, config.block_size
        ),
        "fused_ffn": (("hidden", config.n_inner),),
        "layer_norm": (("hidden", config.n_embd),),
        "linear_cross_entropy": (("vocab", config.padded_vocab_size),),
    }
    return {op: dispatch.choose_backend(op, "auto", device.type, dtype, fact) for op, fact in facts.items()}


def check_step_counts(args):
    if args.steps is not None and args.steps <= CALIBRATION_STEPS:
        raise UserError(
            f"--steps must be more than {CALIBRATION_STEPS} (the untimed warm-up steps), got {args.steps}"
        )
    if args.continue_steps is not None and args.continue_steps < 0:
        raise UserError(f"--continue-steps must be at least 0, got {args.continue_steps}")
    if args.train_seconds < 0 or args.continue_seconds < 0:
        raise UserError(
            f"--train-seconds and --continue-seconds must be at least 0, got {args.train_seconds} and "
            f"{args.continue_seconds}"
        )


def steps_left(deadline, step_seconds):
    """How many more steps fit before deadline (a time.perf_counter() value) at the median of the
    latest step times: the median of a few, since another program on the machine can slow any one step."""
    pace = statistics.median(step_seconds[-PACE_STEPS:])
    return max(0, int((deadline - time.perf_counter()) / pace))


def evaluate_once(trainer):
    """The held-out loss at the trainer's current step, evaluated unless it already was."""
    if trainer.evals[-1]["step"] != trainer.step:
        trainer.evaluate()
    return trainer.evals[-1]["loss"]


def demo_trainers(device):
    """The demo GPT with fastgpt's kernels and the same GPT on eager ops (backend "reference"): their
    Trainers, which start from the same weights and draw the same batches, and the corpus."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec = dict(DEMO_MODEL[device.type])
    batch_size, lr, max_steps = spec.pop("batch_size"), spec.pop("lr"), spec.pop("max_steps")
    tokenizer = ByteTokenizer()
    corpus = read_corpus(None)
    train_tokens, val_tokens = split_tokens(tokenizer.encode_documents(corpus.documents), spec["block_size"])
    config = GPTConfig.preset("tiny", vocab_size=tokenizer.vocab_size, **spec)
    torch.manual_seed(0)
    fused_model = GPT(config).to(device)
    eager_model = GPT(GPTConfig(**{**config.to_dict(), "backend": "reference"})).to(device)
    eager_model.load_state_dict(fused_model.state_dict())
    settings = dict(
        steps=max_steps, batch_size=batch_size, seq_len=config.block_size, lr=lr, warmup=WARMUP_STEPS,
        eval_windows=64, seed=0,
    )  # fmt: skip
    env = runtime.Runtime(device, dtype)
    fused, eager = (
        Trainer(model, tokenizer, train_tokens, val_tokens, Settings(**settings), env, data_name=corpus.name)
        for model in (fused_model, eager_model)
    )
    return fused, eager, corpus


def describe_training(fused, corpus, backends, console):
    config, settings = fused.model.config, fused.settings
    console.print(
        f"[bold]training[/bold] a {fused.model.num_params() / 1e6:.2f}M-parameter GPT ({config.n_layer} layers, "
        f"{config.n_embd} wide, context {config.block_size}) on {corpus.name}, batches of {settings.batch_size} x "
        f"{settings.seq_len} bytes, {fused.runtime.dtype}.\nfastgpt runs "
        f"{', '.join(f'{op} on {b}' for op, b in backends.items())}; the eager copy runs every op as plain "
        "PyTorch (backend 'reference'). Both start from the same weights and take turns, one step each, on the "
        "same batches."
    )
    if set(backends.values()) == {"reference"}:
        console.print(
            "[yellow]no kernel backend is available here, so both runs use the same eager ops[/yellow]"
        )


def train_comparison(device, args, console):
    """Trains the demo GPT with fastgpt's kernels and the same GPT on eager ops, a step of each in
    turn on the same batches; returns the results (tokens/s of both, losses) and both Trainers.

    Both follow one warmup + cosine schedule over this comparison and the fastgpt model's training on
    alone after it (train_alone): the fastgpt run is one run, whose second part the eager copy skips.
    Where step counts are not given, the schedule's end moves with every step to where the time
    budgets say at the pace measured so far, so that the run ends on time and at the end of its cosine."""
    check_step_counts(args)
    fused, eager, corpus = demo_trainers(device)
    max_steps = fused.settings.steps
    backends = chosen_backends(fused.model.config, fused.settings.batch_size, device, fused.runtime.dtype)
    describe_training(fused, corpus, backends, console)
    fused.evaluate()
    comparison_steps = args.steps or max_steps  # until the calibration steps have measured the pace
    seconds = {"fastgpt": 0.0, "eager": 0.0}
    pair_seconds, fastgpt_seconds = [], []

    def timed_step(trainer, name):
        started = time.perf_counter()
        loss = trainer.train_step()  # a Python float: the step has finished, also on GPU
        elapsed = time.perf_counter() - started
        if trainer.step > CALIBRATION_STEPS:  # the first steps warm caches and allocators up
            seconds[name] += elapsed
        return loss, elapsed

    def plan():
        """The steps of the comparison and the end of the schedule, at the pace of the steps after
        the first pair, which warms up."""
        nonlocal comparison_steps
        if args.steps is None:
            fit = fused.step + steps_left(deadline, pair_seconds[1:])
            comparison_steps = min(max_steps, max(MIN_STEPS, fit))
        alone_steps = args.continue_steps
        if alone_steps is None:
            alone_steps = int(args.continue_seconds / statistics.median(fastgpt_seconds[1:][-PACE_STEPS:]))
        fused.settings.steps = eager.settings.steps = comparison_steps + alone_steps

    deadline = time.perf_counter() + args.train_seconds
    with progress_bar(console) as progress:
        task = progress.add_task(
            "fastgpt vs eager", total=comparison_steps, loss=float("nan"), tokens_per_s=0.0
        )
        runs = [(fused, "fastgpt"), (eager, "eager")]
        while fused.step < comparison_steps:
            step_seconds, losses = {}, {}
            for trainer, name in runs if fused.step % 2 == 0 else runs[::-1]:  # neither always goes first
                losses[name], step_seconds[name] = timed_step(trainer, name)
            pair_seconds.append(step_seconds["fastgpt"] + step_seconds["eager"])
            fastgpt_seconds.append(step_seconds["fastgpt"])
            if fused.step >= CALIBRATION_STEPS:
                plan()
            if fused.step == CALIBRATION_STEPS:  # held-out evaluations spread over the planned run
                fused.settings.eval_every = max(1, fused.settings.steps // EVALUATIONS)
            progress.update(
                task,
                total=comparison_steps,
                advance=1,
                loss=losses["fastgpt"],
                tokens_per_s=fused.tokens_per_step / step_seconds["fastgpt"],
            )
            if fused.step % fused.settings.eval_every == 0:
                fused.evaluate()
    held_out = evaluate_once(fused)
    timed_steps = fused.step - CALIBRATION_STEPS
    tokens_per_s = {name: fused.tokens_per_step * timed_steps / s for name, s in seconds.items()}
    results = {
        "model": {k: v for k, v in fused.model.config.to_dict().items() if k != "backend"},
        "fastgpt_backends": backends,
        "dtype": str(fused.runtime.dtype).replace("torch.", ""),
        "batch_size": fused.settings.batch_size,
        "seq_len": fused.settings.seq_len,
        "lr": fused.settings.lr,
        "steps": fused.step,
        "timed_steps": timed_steps,
        "data": corpus.name,
        "tokens_per_s": tokens_per_s,
        "speedup": tokens_per_s["fastgpt"] / tokens_per_s["eager"],
        "final_train_loss": {"fastgpt": fused.history[-1]["loss"], "eager": eager.history[-1]["loss"]},
        "held_out_loss": held_out,
        "held_out_perplexity": math.exp(held_out),
    }
    return results, fused, eager


def train_alone(trainer, args, console):
    """Trains the fastgpt model on to the end of its schedule: --continue-steps more steps, or, moving
    the end with every step, as many as fit in --continue-seconds. Returns what that took and reached."""
    first_step, started = trainer.step, time.perf_counter()
    deadline = started + args.continue_seconds
    step_seconds = []
    with progress_bar(console) as progress:
        task = progress.add_task(
            "fastgpt alone",
            total=trainer.settings.steps,
            completed=trainer.step,
            loss=float("nan"),
            tokens_per_s=0.0,
        )
        while trainer.step < trainer.settings.steps:
            step_started = time.perf_counter()
            loss = trainer.train_step()
            step_seconds.append(time.perf_counter() - step_started)
            if args.continue_steps is None:
                trainer.settings.steps = trainer.step + steps_left(deadline, step_seconds)
            progress.update(
                task,
                total=trainer.settings.steps,
                advance=1,
                loss=loss,
                tokens_per_s=trainer.tokens_per_step / step_seconds[-1],
            )
            if trainer.step % trainer.settings.eval_every == 0:
                trainer.evaluate()
    held_out = evaluate_once(trainer)
    return {
        "steps": trainer.step - first_step,
        "seconds": time.perf_counter() - started,
        "train_loss": trainer.history[-1]["loss"],
        "held_out_loss": held_out,
        "held_out_perplexity": math.exp(held_out),
    }


def plot_losses(fused, eager, results, path):
    """The training loss of both runs per step and fastgpt's held-out loss, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for trainer, label, style in ((fused, "fastgpt", "-"), (eager, "eager PyTorch", "--")):  # eager on top
        axes.plot(
            [h["step"] for h in trainer.history],
            [h["loss"] for h in trainer.history],
            style,
            label=f"{label}, train",
        )
    axes.plot(
        [e["step"] for e in fused.evals], [e["loss"] for e in fused.evals], "o-", label="fastgpt, held-out"
    )
    if fused.step > eager.step:
        axes.axvline(eager.step, color="grey", linestyle=":", label="from here fastgpt trains alone")
    speed = results["tokens_per_s"]
    axes.set(
        xlabel="step", ylabel="cross-entropy (nats per byte)",
        title=f"fastgpt {speed['fastgpt']:,.0f} tok/s vs eager {speed['eager']:,.0f} tok/s ({results['speedup']:.2f}x)",
    )  # fmt: skip
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------
# 5. A sample


def sample(model, tokenizer, prompt, length):
    """The tokens of prompt and of what the model writes after it, up to length tokens in all (fewer if
    it ends the document). GPT.generate's KV cache holds one context window, so past the first window
    the text goes on from the last half window."""
    block_size = model.config.block_size
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt)
    while len(ids) < length and tokenizer.eot_id not in ids:
        context = ids[-(block_size // 2) :]
        generated = model.generate(
            torch.tensor([context], device=device), min(block_size - len(context), length - len(ids)),
            temperature=SAMPLE_TEMPERATURE, top_k=SAMPLE_TOP_K, eos_token_id=tokenizer.eot_id,
        )  # fmt: skip
        ids += generated[0, len(context) :].tolist()
    return ids


# ----------------------------------------------------------------------------------------------
# The record of the run


def git_sha():
    """This checkout's commit ('-dirty' with uncommitted changes), or None outside a git checkout."""

    def git(*command):
        return subprocess.run(
            ["git", "-C", str(REPO_ROOT), *command], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        sha, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def command_line(args):
    """The `fastgpt demo` command of this run, with the step counts it was given."""
    given = {"--steps": args.steps, "--continue-steps": args.continue_steps}
    return " ".join(
        ["fastgpt demo"] + [f"{flag} {value}" for flag, value in given.items() if value is not None]
    )


def write_record(results, device, args, wall_seconds):
    """Writes the record of the run to --out/results.json, and nowhere else, so that a checkout stays
    clean. A run worth keeping is committed by copying it to benchmarks/results/<date>-demo-<device>.json."""
    now = datetime.datetime.now(datetime.timezone.utc)
    record = {
        "kind": "demo training tokens/s, fastgpt vs eager PyTorch (same model, same batches, interleaved steps)",
        "date": now.isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "device": device_description(),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],  # other work on the machine slows both runs alike
        "versions": package_versions(),
        "available_backends": fastgpt.available_backends(),
        "command": command_line(args),
        "train_seconds": args.train_seconds,
        "continue_seconds": args.continue_seconds,
        "demo_wall_s": wall_seconds,
        **results,
    }
    path = Path(args.out) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------------------------


def run(args):
    started = time.perf_counter()
    device = runtime.resolve_device(args.device)
    console = Console(soft_wrap=True)
    console.rule("[bold]1. kernels against the float64 reference")
    console.print(backend_table(device))
    console.rule("[bold]2. speed on this device")
    console.print(attention_table(device))
    console.print(speed_table(device))
    console.rule("[bold]3. training: fastgpt against eager PyTorch")
    results, fused, eager = train_comparison(device, args, console)
    speed = results["tokens_per_s"]
    console.print(
        f"{results['steps']} steps each: held-out loss {results['held_out_loss']:.3f}; training "
        f"[bold]{speed['fastgpt']:,.0f} tok/s with fastgpt vs {speed['eager']:,.0f} tok/s eager: "
        f"{results['speedup']:.2f}x[/bold]"
    )
    console.rule("[bold]4. training on: fastgpt alone")
    alone = results["continued"] = train_alone(fused, args, console)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fused.save(str(out / "checkpoint"))
    plot_losses(fused, eager, results, out / "loss.png")
    console.print(
        f"{alone['steps']} more steps in {alone['seconds']:.0f} s\n"
        f"loss curves: {out / 'loss.png'}; checkpoint: {out / 'checkpoint'}"
    )
    console.rule("[bold]5. the trained model")
    torch.manual_seed(0)
    text = fused.tokenizer.decode(sample(fused.compute_model, fused.tokenizer, PROMPT, SAMPLE_BYTES))
    wall_seconds = time.perf_counter() - started
    record = write_record(results, device, args, wall_seconds)
    console.print(
        Panel(
            Text(text),
            title=f"a sample (temperature {SAMPLE_TEMPERATURE}, top-k {SAMPLE_TOP_K})",
            title_align="left",
        )
    )
    console.print(
        f"[bold]held-out loss {alone['held_out_loss']:.3f} nats per byte[/bold] (perplexity "
        f"{alone['held_out_perplexity']:.2f}) after {fused.step} steps, {fused.step * fused.tokens_per_step:,} "
        f"bytes of {results['data']}\n"
        f"demo finished in {wall_seconds:.0f} s; it wrote only under {out}: {record.name}, loss.png, checkpoint\n"
        f"try: fastgpt generate 'import ' --checkpoint {out / 'checkpoint'}"
    )
    return 0
