"""`fastgpt demo`: causal attention on every available backend, timed, with its error against the
float64 reference."""

import torch
import torch.utils.benchmark as benchmark
from rich.console import Console
from rich.table import Table

import fastgpt
from fastgpt import reference
from fastgpt.dispatch import triton_interpreter_enabled
from fastgpt.info import device_description

# (batch, heads, kv_heads, seq, head_dim): GPT-2 small's attention at a length a CPU handles in seconds.
ATTENTION_SHAPE = (2, 12, 12, 512, 64)


def add_arguments(parser):
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


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
        timer = benchmark.Timer("f(q, k, v, backend=name)", globals={"f": fastgpt.causal_attention, "q": q, "k": k, "v": v, "name": name})
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


def run(args):
    wants_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if wants_cuda and not torch.cuda.is_available():
        print("fastgpt demo: --device cuda was given but torch sees no CUDA GPU")
        return 2
    device = torch.device("cuda" if wants_cuda else "cpu")
    Console().print(attention_table(device))
    return 0
