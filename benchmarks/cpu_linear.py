"""fastgpt's cpu linear kernel (csrc/cpu/skinny_gemm.cpp) against torch's F.linear (BLAS) on the
projections of GPT-2 small, for the few rows of a decode step.

    PYTHONPATH=. python benchmarks/cpu_linear.py [--calls 30]

For each row count and weight shape: the median time of each provider over `calls` calls (after two
warm-up calls, providers alternating call by call: fastgpt.bench.timing.measure_interleaved with one
timed call per provider and round), the weight bytes read per second, the speedup,
and the max difference between the two results. Each weight alone fits in the last-level cache, so
these are cache-resident rates; gpt_targets.py --only bandwidth streams all weights from DRAM.
Rows above fastgpt.ops.compiled.LINEAR_KERNEL_MAX_ROWS (16) go to BLAS inside the op as well.
"""

import argparse
import functools

import torch
import torch.nn.functional as F

from fastgpt.bench.timing import measure_interleaved, single_call_plan
from fastgpt.ops import compiled

# (out_features, in_features): c_attn, attention c_proj, c_fc, MLP c_proj, lm_head.
GPT2_SMALL_WEIGHTS = ((2304, 768), (768, 768), (3072, 768), (768, 3072), (50257, 768))
ROWS = (1, 2, 4, 8, 16)


def median_times(providers, calls):
    """{name: median seconds per call} over `calls` rounds of one call per provider."""
    plan = single_call_plan(calls, warmup_calls=2)
    return {
        name: result.median_ms / 1e3 for name, result in measure_interleaved(providers, "cpu", plan).items()
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=30, help="timed calls per provider and case")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for rows in ROWS:
        for out_features, in_features in GPT2_SMALL_WEIGHTS:
            x = torch.randn(rows, in_features)
            weight, bias = torch.randn(out_features, in_features), torch.randn(out_features)
            error = (compiled.linear(x, weight, bias) - F.linear(x, weight, bias)).abs().max().item()
            arguments = (x, weight, bias)
            times = median_times(
                {
                    "torch": functools.partial(F.linear, *arguments),
                    "fastgpt": functools.partial(compiled.linear, *arguments),
                },
                args.calls,
            )
            weight_gb = weight.numel() * weight.element_size() / 1e9
            print(
                f"rows {rows:2d} weight ({out_features}, {in_features}): "
                f"F.linear {times['torch'] * 1e6:7.0f} us ({weight_gb / times['torch']:5.1f} GB/s), "
                f"fastgpt {times['fastgpt'] * 1e6:7.0f} us ({weight_gb / times['fastgpt']:5.1f} GB/s), "
                f"{times['torch'] / times['fastgpt']:.2f}x, max diff {error:.1e}"
            )


if __name__ == "__main__":
    main()
