"""The benchmark runner behind `fastgpt bench`.

The shared ARCHITECTURE.md places "the runner behind fastgpt bench" with the benchmarks; it lives here, inside
the package, so that `fastgpt bench` works for pip-installed users. The repository's benchmarks/
folder holds what is not installed: the pytest-benchmark files (which reuse the providers defined
here), gpu_check.sh, and the committed results files (benchmarks/results/).

Modules:
- flops.py: FLOP and byte counts of each op;
- timing.py: interleaved timing (CPU: torch.utils.benchmark; GPU: CUDA events), peak memory, the
  device's measured peaks;
- providers.py: fastgpt's backends (from fastgpt.available_backends()) and optional baselines;
- kernels.py and attention.py, ffn.py, layer_norm.py, cross_entropy.py: one kernel op each: its
  shapes, inputs, baselines and work;
- gpt.py and nanogpt.py: the whole-model training-step and generation benchmark;
- records.py: the record schema, run metadata, speedups, results.json;
- runner.py: the sweep; report.py and plots.py: tables, markdown, the README section, PNGs;
- command.py: the command line.
"""
