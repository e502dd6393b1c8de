"""`fastgpt bench`: run the benchmark sweep, or render committed results into docs/performance.md.

    fastgpt bench [--ops attention,ffn,layer_norm,cross_entropy,gpt] [--device auto|cpu|cuda]
                  [--dtype bf16,fp16] [--quick] [--out DIR] [--providers GLOBS] [--skip-providers GLOBS]
    fastgpt bench --render benchmarks/results/FILE.json [...] [--readme docs/performance.md]

A run writes DIR/results.json (after every case), DIR/report.md and DIR/*.png (the plots need
matplotlib; without it the run says so at the start and skips them), and prints a table per op and a
summary of fastgpt's speedups. --render writes, per device, a summary of the newest of the given
results files into docs/performance.md, which the README links (fastgpt.bench.report.render_readme).
"""

import argparse
from pathlib import Path

import torch

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
OP_NAMES = ("attention", "ffn", "layer_norm", "cross_entropy", "gpt")  # runner.OPS, without importing it
DEFAULT_DTYPE = {"cuda": "bf16", "cpu": "fp32"}  # bf16 is what GPUs train in; CPUs have no fast bf16 path


def _comma_list(text):
    return [item.strip() for item in text.split(",") if item.strip()]


def add_arguments(parser):
    parser.add_argument(
        "--ops",
        type=_comma_list,
        default=list(OP_NAMES),
        help=f"comma-separated ops to run (default: all of {','.join(OP_NAMES)})",
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when a GPU is visible"
    )
    parser.add_argument(
        "--dtype",
        type=_comma_list,
        default=None,
        help="comma-separated dtypes: bf16, fp16, fp32 (default: bf16 on cuda, fp32 on cpu)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a short sweep (under 3 minutes on a 2-core CPU)"
    )
    parser.add_argument(
        "--tiny", action="store_true", help=argparse.SUPPRESS
    )  # seconds: tests, gpu_check --dry-run
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results"), help="output folder (default bench-results)"
    )
    parser.add_argument(
        "--append", action="store_true", help="add to DIR/results.json instead of replacing it"
    )
    parser.add_argument(
        "--providers", type=_comma_list, default=None, help="only providers matching these globs"
    )
    parser.add_argument(
        "--skip-providers", type=_comma_list, default=None, help="leave out providers matching these globs"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    parser.add_argument(
        "--render",
        type=Path,
        nargs="+",
        metavar="RESULTS.json",
        help="regenerate the summary tables of docs/performance.md (and plots) from these results files",
    )
    parser.add_argument(
        "--readme",
        type=Path,
        default=Path("docs/performance.md"),
        help="the markdown page --render writes into, between its perf markers",
    )


def _device(choice):
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastgpt bench: --device cuda was given but torch sees no CUDA GPU")
    return torch.device(choice)


def _dtypes(names, device):
    names = names or [DEFAULT_DTYPE[device.type]]
    unknown = [name for name in names if name not in DTYPES]
    if unknown:
        raise SystemExit(
            f"fastgpt bench: --dtype must be among {', '.join(DTYPES)}, got {', '.join(unknown)}"
        )
    return list(dict.fromkeys(DTYPES[name] for name in names))


def plots_dir(results_path):
    """Where --render draws a committed results file's plots: beside it, in a folder of its name."""
    return Path(results_path).with_suffix("")


def draws_plots(args):
    """Whether this run draws plots: not with --no-plots, nor without matplotlib, which it says at
    once rather than after the sweep."""
    from fastgpt.bench.plots import NO_MATPLOTLIB, matplotlib_available

    if args.no_plots:
        return False
    if not matplotlib_available():
        print(f"fastgpt bench: {NO_MATPLOTLIB}", flush=True)
        return False
    return True


def render(args):
    from fastgpt.bench.plots import write_plots
    from fastgpt.bench.report import render_readme

    missing = [str(path) for path in args.render if not path.exists()]
    if missing:
        raise SystemExit(f"fastgpt bench --render: no such results file: {', '.join(missing)}")
    plots_for = (lambda path, data: write_plots(data, plots_dir(path))) if draws_plots(args) else None
    rendered = render_readme(args.readme, args.render, plots_for=plots_for)
    superseded = [str(path) for path in args.render if path not in rendered]
    print(
        f"rendered {', '.join(str(path) for path in rendered)} into {args.readme}"
        + (f" (superseded by a newer file of the same device: {', '.join(superseded)})" if superseded else "")
    )
    return 0


def run(args):
    if args.render:
        return render(args)
    from fastgpt.bench import runner
    from fastgpt.bench.plots import write_plots
    from fastgpt.bench.records import dtype_name
    from fastgpt.bench.report import markdown_report, print_summary, print_tables, wide_console

    unknown = [op for op in args.ops if op not in runner.OPS]
    if unknown:
        raise SystemExit(
            f"fastgpt bench: --ops must be among {', '.join(runner.OPS)}, got {', '.join(unknown)}"
        )
    device = _device(args.device)
    dtypes = _dtypes(args.dtype, device)
    plots_wanted = draws_plots(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    sweep = "tiny" if args.tiny else "quick" if args.quick else "full"
    command = (
        f"fastgpt bench --ops {','.join(args.ops)} --device {device.type} "
        f"--dtype {','.join(dtype_name(d) for d in dtypes)} --sweep {sweep}"
    )
    if args.providers:
        command += f" --providers {','.join(args.providers)}"
    if args.skip_providers:
        command += f" --skip-providers {','.join(args.skip_providers)}"
    results_path = args.out / "results.json"
    results = runner.run(
        args.ops,
        device,
        dtypes,
        sweep,
        results_path,
        include=args.providers,
        exclude=args.skip_providers,
        append=args.append,
        command=command,
    )
    data = results.as_dict()
    plots = write_plots(data, args.out) if plots_wanted else []
    (args.out / "report.md").write_text(
        markdown_report(data, [p.relative_to(args.out) for p in plots], heading_level=2) + "\n"
    )
    console = wide_console()
    print_tables(data, console, ops=args.ops)
    print_summary(data, console)
    console.print(f"wrote {results_path}, {args.out / 'report.md'} and {len(plots)} plot(s)")
    return 0
