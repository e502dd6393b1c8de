"""The `cpu` backend's targets, measured against torch in one interleaved run.

    python benchmarks/cpu_targets.py            # timings (interleaved) and peak memory
    python benchmarks/cpu_targets.py --no-memory

Run from the repository root with fastgpt importable (installed, or PYTHONPATH=.) and fastgpt._C built.

Timing: fastgpt.bench.timing.measure_interleaved, the loop `fastgpt bench` times with: one warm-up
call each, then the providers in alternation round after round (the order rotating from round to
round), so load from other processes hits every provider alike. Each provider's time is its median
over rounds; each speedup is the median of the per-round ratios, i.e. of paired samples taken moments
apart. The process CPU time per call (all threads) is reported too: on a machine shared with other
jobs it is the steadier measure of the work each provider does.
- causal attention forward+backward, fp32, B=2, H=12, N=2048, D=64: the cpu backend against
  F.scaled_dot_product_attention(is_causal=True) (target: >= 1.0x);
- fused FFN forward+backward at GPT-2 small shapes (2048 tokens, C=768, hidden 3072, gelu_tanh): the
  cpu backend against eager torch (reference.py in float32; target >= 1.1x), and against the tightest
  eager code (F.linear + F.gelu(approximate="tanh"), torch's fused GELU kernel) for information.

Peak memory: attention forward+backward (B=1, H=12, D=64) at N = 1k, 4k and 16k, each in a fresh
process: the peak resident set size (VmHWM, reset through /proc/self/clear_refs after the inputs
exist) minus the resident size before the call. This sees every allocation (torch's allocator, the
kernels' own scratch, BLAS buffers), unlike tracemalloc or a TorchDispatchMode, which miss memory
allocated inside C++ kernels. Eager attention (O(N^2) scores) is measured up to 4k only.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

from fastgpt import functional, reference
from fastgpt.bench.timing import measure_interleaved, single_call_plan


def interleaved_samples(providers, rounds):
    """{name: ([wall seconds per round], [process CPU seconds per call, per round])}: the providers
    timed in interleaved rounds (timing.measure_interleaved), so neighbouring samples see the same load.
    The calls take tens to hundreds of ms: one call per provider and round, each timed alone."""
    plan = single_call_plan(rounds)
    timings = measure_interleaved(providers, "cpu", plan, cpu_time=True)
    return {
        name: ([ms / 1e3 for ms in result.round_ms], [ms / 1e3 for ms in result.round_cpu_ms])
        for name, result in timings.items()
    }


def attention_providers(batch, heads, seq, head_dim):
    q, k, v = (torch.randn(batch, heads, seq, head_dim, requires_grad=True) for _ in range(3))
    dout = torch.randn(batch, heads, seq, head_dim)

    def cpu():
        out = functional.causal_attention(q, k, v, backend="cpu")
        torch.autograd.grad(out, (q, k, v), dout)

    def sdpa():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.autograd.grad(out, (q, k, v), dout)

    def cpu_forward():
        with torch.no_grad():
            functional.causal_attention(q, k, v, backend="cpu")

    def sdpa_forward():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return {"cpu fwd+bwd": cpu, "sdpa fwd+bwd": sdpa, "cpu fwd": cpu_forward, "sdpa fwd": sdpa_forward}


def ffn_providers(tokens, channels, hidden):
    x = torch.randn(tokens, channels, requires_grad=True)
    fc_weight = (torch.randn(hidden, channels) * channels**-0.5).requires_grad_()
    fc_bias = torch.randn(hidden, requires_grad=True)
    proj_weight = (torch.randn(channels, hidden) * hidden**-0.5).requires_grad_()
    proj_bias = torch.randn(channels, requires_grad=True)
    params = (x, fc_weight, fc_bias, proj_weight, proj_bias)
    dout = torch.randn(tokens, channels)

    def cpu():
        out = functional.fused_ffn(*params, activation="gelu_tanh", backend="cpu")
        torch.autograd.grad(out, params, dout)

    def eager():
        out = reference.fused_ffn(*params, "gelu_tanh")
        torch.autograd.grad(out, params, dout)

    def eager_fused_gelu():
        out = F.linear(F.gelu(F.linear(x, fc_weight, fc_bias), approximate="tanh"), proj_weight, proj_bias)
        torch.autograd.grad(out, params, dout)

    return {"cpu fwd+bwd": cpu, "eager fwd+bwd": eager, "eager F.gelu(tanh) fwd+bwd": eager_fused_gelu}


def print_timings(title, samples, comparisons, flops):
    """Median wall and CPU time per provider, and each comparison's speedup as the median of the
    per-round ratios (paired samples taken moments apart)."""
    print(f"\n{title}")
    print(f"  {'provider':32s} {'wall':>9s}    {'GFLOP/s':>7s} {'CPU (all threads)':>18s}")
    for name, (wall, cpu) in samples.items():
        wall_median, cpu_median = statistics.median(wall), statistics.median(cpu)
        print(
            f"  {name:32s} {wall_median * 1e3:9.1f} ms {flops[name] / wall_median / 1e9:7.1f} {cpu_median * 1e3:15.1f} ms"
        )
    for name, other in comparisons:
        ratios = [
            statistics.median(
                theirs / ours for theirs, ours in zip(samples[other][kind], samples[name][kind])
            )
            for kind in (0, 1)
        ]
        print(
            f"  speedup {name} vs {other}: {ratios[0]:.2f}x wall, {ratios[1]:.2f}x CPU time (median of per-round ratios)"
        )


# ----------------------------------------------------------------------------------------------
# Peak memory, one fresh process per measurement


def resident_mb(field):
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+)", status.read()).group(1)) / 1024


def memory_child(provider, seq):
    """Runs in a fresh process: prints the peak resident memory (MiB) that one forward+backward adds."""
    q, k, v = (torch.randn(1, 12, seq, 64, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, 12, seq, 64)
    attention = {
        "cpu": lambda: functional.causal_attention(q, k, v, backend="cpu"),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "eager": lambda: reference.causal_attention(q, k, v),
    }[provider]
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current resident size
    before = resident_mb("VmRSS")
    grads = torch.autograd.grad(attention(), (q, k, v), dout)
    print(f"{resident_mb('VmHWM') - before:.1f}")
    del grads


def measure_memory():
    print("\nattention fwd+bwd: peak resident memory added on top of q, k, v, dout (B=1, H=12, D=64),")
    print("including the results out, dq, dk, dv themselves (4 x N x 3 KiB)")
    print(f"  {'N':>6s} {'cpu':>10s} {'sdpa':>10s} {'eager':>10s}   (MiB)")
    for seq in (1024, 4096, 16384):
        row = []
        for provider in ("cpu", "sdpa", "eager"):
            if provider == "eager" and seq > 4096:
                row.append("skipped")
                continue
            result = subprocess.run(
                [sys.executable, __file__, "--memory-child", provider, str(seq)],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "PYTHONPATH": os.getcwd()},
            )
            row.append(result.stdout.strip().splitlines()[-1])
        print(f"  {seq:6d} {row[0]:>10s} {row[1]:>10s} {row[2]:>10s}")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per provider")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--memory-child", nargs=2, metavar=("PROVIDER", "SEQ"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]))
        return
    from fastgpt import _C

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fastgpt._C kernels: {_C.cpu_isa()}")
    batch, heads, seq, head_dim = 2, 12, 2048, 64
    forward_flops = 4 * batch * heads * seq * seq * head_dim / 2  # causal: half the square
    samples = interleaved_samples(attention_providers(batch, heads, seq, head_dim), args.rounds)
    flops = {
        "cpu fwd+bwd": 3.5 * forward_flops,
        "sdpa fwd+bwd": 3.5 * forward_flops,
        "cpu fwd": forward_flops,
        "sdpa fwd": forward_flops,
    }
    print_timings(
        f"causal attention fp32 B={batch} H={heads} N={seq} D={head_dim}",
        samples,
        [("cpu fwd+bwd", "sdpa fwd+bwd"), ("cpu fwd", "sdpa fwd")],
        flops,
    )

    tokens, channels, hidden = 2048, 768, 3072
    samples = interleaved_samples(ffn_providers(tokens, channels, hidden), args.rounds)
    ffn_flops = 3 * 2 * (2 * tokens * channels * hidden)  # two GEMMs forward, four backward
    print_timings(
        f"FFN fp32 fwd+bwd tokens={tokens} C={channels} hidden={hidden} gelu_tanh",
        samples,
        [("cpu fwd+bwd", "eager fwd+bwd"), ("cpu fwd+bwd", "eager F.gelu(tanh) fwd+bwd")],
        {name: ffn_flops for name in samples},
    )
    if not args.no_memory:
        measure_memory()


if __name__ == "__main__":
    main()
