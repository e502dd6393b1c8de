"""Tables of results: rich tables for the terminal, markdown for report.md and docs/performance.md.

Every number comes from a results file (records.py); nothing here measures anything. The summary in
docs/performance.md (which the README links), between the markers below, is written by `fastgpt bench
--render FILE...`: for each device, a summary of the newest of the given results files (fastgpt's
speedups over the shapes), with links to that file and to its full per-shape report, `<name>.report.md` beside it
(written from the results file when it is not there yet).

`python -m fastgpt.bench.report RESULTS.json [--stages stages.tsv] [--markdown report.md]` prints the
tables (and writes the markdown): benchmarks/gpu_check.sh uses it for its report.
"""

import argparse
import collections
import datetime
import math
import os
import statistics
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fastgpt.bench.records import BASELINE, FASTGPT, load_results

START_MARKER = "<!-- perf:start -->"
END_MARKER = "<!-- perf:end -->"
METRIC_LABELS = {"tflops": "TFLOP/s", "gbps": "GB/s", "tokens_per_s": "tokens/s"}
VERSION_KEYS = (
    "python",
    "torch",
    "triton",
    "transformers",
    "fastgpt",
    "flash-attn",
    "liger-kernel",
    "cuda (torch)",
    "sm_90a attention (_C)",
)
LEGEND = (
    "Columns: median time per call ± its interquartile range; throughput and % of the measured peak; "
    "speedup = a baseline's median / this median, both from the same run (the median over the "
    "interleaved rounds of that ratio within each round); max err = largest |difference| "
    "from the float64 reference over the outputs and, for fwd+bwd, every input gradient (gpt: the loss "
    "difference, or the fraction of greedy tokens that differ); peak mem = memory allocated during one "
    "call beyond what was allocated before it."
)
MODE_ORDER = {"fwd": 0, "fwd+bwd": 1, "train": 2, "generate": 3}


# ----------------------------------------------------------------------------------------------
# Formatting


def shape_label(op, shape):
    s = shape
    if op == "attention":
        return f"seq {s['seq']}, d {s['head_dim']} (B {s['batch']}, H {s['heads']})"
    if op == "ffn":
        return f"{s['tokens']} tok, C {s['channels']}"
    if op == "layer_norm":
        return f"{s['tokens']}x{s['channels']}" + (" +residual" if s.get("residual") else "")
    if op == "cross_entropy":
        return f"{s['tokens']} tok, C {s['channels']}, V {s['vocab']}"
    if op == "gpt" and "seq" in s:  # training
        return f"{s['model']} B {s['batch']}, T {s['seq']}"
    if op == "gpt":
        return f"{s['model']} B {s['batch']}, {s['prompt']}+{s['new_tokens']} tok"
    return ", ".join(f"{key} {value}" for key, value in s.items())


def format_metric(value, metric):
    if value is None:
        return "-"
    if metric == "tokens_per_s":
        return f"{value:,.0f}"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def format_bytes(count):
    if count is None:
        return "-"
    if count >= 2**30:
        return f"{count / 2**30:.2f} GiB"
    return f"{count / 2**20:.1f} MiB"


def format_time(record):
    return f"{record['median_ms']:.3g} ± {record['iqr_ms']:.2g}"


def format_error(value):
    return "-" if value is None else f"{value:.1e}"


def short_reason(reason, limit=60):
    """The first clause of a skip reason, for a table cell (results.json keeps the whole)."""
    first = reason.split(" (")[0]
    return first if len(first) <= limit else first[: limit - 3] + "..."


def wide_console():
    """A console as wide as the terminal, or 200 columns when writing to a log file."""
    console = Console()
    return console if console.is_terminal else Console(width=200)


# ----------------------------------------------------------------------------------------------
# Grouping


def _ordered(values):
    return list(dict.fromkeys(values))


def table_groups(data):
    """[(op, dtype, mode, records, skipped)] in run order, one per table."""
    entries = data["records"] + data["skipped"]
    ops, dtypes = _ordered(e["op"] for e in entries), _ordered(e["dtype"] for e in entries)
    keys = _ordered((e["op"], e["dtype"], e["mode"]) for e in entries)
    keys.sort(
        key=lambda key: (ops.index(key[0]), dtypes.index(key[1]), MODE_ORDER.get(key[2], len(MODE_ORDER)))
    )
    groups = []
    for op, dtype, mode in keys:
        records = [r for r in data["records"] if (r["op"], r["dtype"], r["mode"]) == (op, dtype, mode)]
        skipped = [s for s in data["skipped"] if (s["op"], s["dtype"], s["mode"]) == (op, dtype, mode)]
        groups.append((op, dtype, mode, records, skipped))
    return groups


def baselines_of(records):
    return _ordered(r["provider"] for r in records if r["kind"] == BASELINE)


def skipped_rows(op, records, skipped):
    """(shape label, provider, reason), a reason shared by every shape of the table given once."""
    shapes = _ordered(shape_label(op, r["shape"]) for r in records + skipped)
    by_reason = {}
    for note in skipped:
        by_reason.setdefault((note["provider"], note["reason"]), []).append(shape_label(op, note["shape"]))
    rows = []
    for (provider, reason), labels in by_reason.items():
        if len(set(labels)) == len(shapes) and len(shapes) > 1:
            rows.append(("all shapes", provider, reason))
        else:
            rows.extend((label, provider, reason) for label in _ordered(labels))
    return rows


def table_rows(op, records, baselines):
    """Header and rows of one table (strings)."""
    metric = records[0]["metric"] if records else "tflops"
    header = ["shape", "provider", "median ms ± IQR", METRIC_LABELS[metric], "% peak"]
    header += [f"vs {name}" for name in baselines] + ["max err", "peak mem"]
    shapes = _ordered(shape_label(op, r["shape"]) for r in records)
    rows = []
    for record in sorted(records, key=lambda r: shapes.index(shape_label(op, r["shape"]))):
        pct = record["pct_of_peak"]
        speedups = [
            ""
            if name == record["provider"]
            else (f"{record['speedup'][name]:.2f}x" if name in record["speedup"] else "-")
            for name in baselines
        ]
        rows.append(
            [
                shape_label(op, record["shape"]),
                record["provider"],
                format_time(record),
                format_metric(record[metric], metric),
                "-" if pct is None else f"{pct:.0f}%",
                *speedups,
                format_error(record["err_vs_reference"]),
                format_bytes(record["peak_mem_bytes"]),
            ]
        )
    return header, rows


# ----------------------------------------------------------------------------------------------
# Summary: each fastgpt provider's speedup against each baseline, over the shapes of a table


def geometric_mean(values):
    return math.exp(statistics.fmean(math.log(v) for v in values))


def summary_rows(data):
    """[(op, dtype, mode, fastgpt provider, {baseline: (geomean, min, max)})]."""
    rows = []
    for op, dtype, mode, records, _ in table_groups(data):
        for provider in _ordered(r["provider"] for r in records if r["kind"] == FASTGPT):
            ratios = {}
            for record in (r for r in records if r["provider"] == provider):
                for name, value in record["speedup"].items():
                    ratios.setdefault(name, []).append(value)
            rows.append(
                (
                    op,
                    dtype,
                    mode,
                    provider,
                    {name: (geometric_mean(v), min(v), max(v)) for name, v in ratios.items()},
                )
            )
    return rows


def format_speedups(speedups):
    return (
        ", ".join(
            f"{name} {mean:.2f}x" + (f" ({low:.2f}-{high:.2f})" if high > low else "")
            for name, (mean, low, high) in speedups.items()
        )
        or "-"
    )


# ----------------------------------------------------------------------------------------------
# Rich (terminal)


def print_tables(data, console=None, ops=None):
    console = console or wide_console()
    for op, dtype, mode, records, skipped in table_groups(data):
        if ops and op not in ops:
            continue
        baselines = baselines_of(records)
        header, rows = table_rows(op, records, baselines)
        table = Table(title=f"{op} · {dtype} · {mode} · {data['metadata']['device']}", title_justify="left")
        for index, name in enumerate(header):
            table.add_column(name, justify="left" if index < 2 else "right", no_wrap=index < 2)
        for row in rows:
            table.add_row(*row)
        for label, provider, reason in skipped_rows(op, records, skipped):
            table.add_row(label, provider, f"[dim]{short_reason(reason)}[/dim]", *[""] * (len(header) - 3))
        console.print(table)


def print_summary(data, console=None):
    console = console or wide_console()
    table = Table(
        title=f"fastgpt speedups (geometric mean over shapes, min-max) · {data['metadata']['device']}",
        title_justify="left",
    )
    for name in ("op", "dtype", "mode", "fastgpt", "speedup vs baselines (same run)"):
        table.add_column(name)
    rows = summary_rows(data)
    for op, dtype, mode, provider, speedups in rows:
        table.add_row(op, dtype, mode, provider, format_speedups(speedups))
    if not rows:
        table.add_row("-", "-", "-", "-", "no fastgpt kernel backend was timed in this run")
    console.print(table)


# ----------------------------------------------------------------------------------------------
# Markdown


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def metadata_lines(data):
    meta = data["metadata"]
    versions = meta.get("versions", {})
    listed = ", ".join(f"{key} {versions[key]}" for key in VERSION_KEYS if versions.get(key))
    peaks = meta.get("peaks", {})
    load = meta.get("load_average") or {}
    matmul = ", ".join(
        f"{dtype} {value:.3g} TFLOP/s" for dtype, value in peaks.get("matmul_tflops", {}).items()
    )
    return [
        (
            f"- device: **{meta['device']}**; date: {meta['date']}; git: `{meta.get('git_sha') or 'unknown'}`; "
            f"sweep: `{meta.get('sweep')}`; threads: {meta.get('threads')}; load average at start / end: "
            f"{load.get('start')} / {load.get('end')} on {meta.get('cpus')} CPUs"
        ),
        f"- versions: {listed}",
        f"- measured peaks (the denominators of % peak): matmul {matmul}; copy {peaks.get('copy_gbps', 0):.0f} GB/s",
        (
            f"- timing: {meta['timing']['method']}; {meta['timing']['interleaved_rounds']} interleaved rounds after "
            f"{meta['timing']['warmup_calls']} warm-up call(s); {meta['timing']['statistic']}"
            + (f"; {meta['timing']['cpu_allocator']}" if meta["timing"].get("cpu_allocator") else "")
        ),
    ]


def markdown_report(data, plots=(), heading_level=3, title=None, inline_plots=True):
    """Markdown for one results file: metadata, the speedup summary, the plots (inline images, or
    links), and every table."""
    hashes = "#" * heading_level
    meta = data["metadata"]
    out = [f"{hashes} {title or meta['device']}", "", *metadata_lines(data), "", LEGEND, ""]
    rows = summary_rows(data)
    if rows:
        out.append(
            markdown_table(
                [
                    "op",
                    "dtype",
                    "mode",
                    "fastgpt",
                    "speedup vs baselines (geometric mean over shapes, min-max)",
                ],
                [[op, dtype, mode, provider, format_speedups(s)] for op, dtype, mode, provider, s in rows],
            )
        )
    else:
        out.append("No fastgpt kernel backend was timed in this run: the tables hold the baselines only.")
    out.append("")
    if plots and inline_plots:
        out += [" ".join(f"![{Path(p).stem}]({p})" for p in plots), ""]
    elif plots:
        out += ["Plots: " + " · ".join(f"[{Path(p).stem}]({p})" for p in plots), ""]
    for op, dtype, mode, records, skipped in table_groups(data):
        baselines = baselines_of(records)
        header, table = table_rows(op, records, baselines)
        table += [
            [label, provider, f"*{short_reason(reason)}*"] + [""] * (len(header) - 3)
            for label, provider, reason in skipped_rows(op, records, skipped)
        ]
        out += [
            f"<details><summary>{op} · {dtype} · {mode}</summary>",
            "",
            markdown_table(header, table),
            "",
            *kernel_lines(op, records),
            "</details>",
            "",
        ]
    return "\n".join(out)


def kernel_lines(op, records):
    """One line per profiled provider and shape: the GPU kernels it ran (records' "gpu_kernels")."""
    lines = [
        f"- {record['provider']} at {shape_label(op, record['shape'])} ran: "
        + ", ".join(f"`{name}`" for name in record["gpu_kernels"])
        for record in records
        if record.get("gpu_kernels")
    ]
    return lines + [""] if lines else []


# ----------------------------------------------------------------------------------------------
# The performance page (docs/performance.md, or the README given): a summary per device


README_LEGEND = (
    "Per row, fastgpt's provider that was fastest at the most shapes (the others are in the full report), "
    "and its speedup over each baseline: a baseline's time / fastgpt's, per shape the median over the "
    "interleaved rounds of the ratio within a round, here the median over the shapes the two share "
    "(min-max)."
)


def best_fastgpt_provider(records):
    """The fastgpt provider fastest at the most shapes of one table (a tie goes to the first in run order)."""
    fastest = {}
    for record in records:
        if record["kind"] != FASTGPT:
            continue
        shape = tuple(sorted(record["shape"].items()))
        if shape not in fastest or record["median_ms"] < fastest[shape]["median_ms"]:
            fastest[shape] = record
    wins = collections.Counter(record["provider"] for record in fastest.values())
    providers = _ordered(r["provider"] for r in records if r["kind"] == FASTGPT)
    return max(providers, key=lambda provider: wins[provider]) if providers else None


def device_summary_rows(data):
    """[(op, dtype, mode, provider, shapes, {baseline: [speedups over the shapes]})], one row per table
    with a fastgpt provider: its best provider's speedups (best_fastgpt_provider)."""
    rows = []
    for op, dtype, mode, records, _ in table_groups(data):
        provider = best_fastgpt_provider(records)
        if provider is None:
            continue
        ratios = {}
        for record in (r for r in records if r["provider"] == provider):
            for name, value in record["speedup"].items():
                ratios.setdefault(name, []).append(value)
        rows.append((op, dtype, mode, provider, sum(r["provider"] == provider for r in records), ratios))
    return rows


def format_median_speedups(ratios, shapes):
    """'sdpa 0.69x (0.50-0.83)', naming the count where a baseline ran at fewer of the shapes."""
    cells = []
    for name, values in ratios.items():
        low, high = min(values), max(values)
        spread = [f"{low:.2f}-{high:.2f}"] if high > low else []
        spread += [f"{len(values)} of {shapes} shapes"] if len(values) < shapes else []
        cells.append(
            f"{name} {statistics.median(values):.2f}x" + (f" ({'; '.join(spread)})" if spread else "")
        )
    return ", ".join(cells) or "-"


def newest_per_device(loaded):
    """The (path, data) pairs of loaded that are each device's newest run, in the order given."""
    newest = {}
    for path, data in loaded:
        device, date = data["metadata"]["device"], datetime.datetime.fromisoformat(data["metadata"]["date"])
        if device not in newest or date > newest[device][0]:
            newest[device] = (date, path)
    kept = {path for _, path in newest.values()}
    return [(path, data) for path, data in loaded if path in kept]


def full_report_path(results_path, data, plots=()):
    """The per-shape report committed beside a results file (`NAME.report.md`; benchmarks/gpu_check.sh
    writes it with its stage table); written from the results file, plots inline, when missing."""
    path = Path(results_path).with_suffix(".report.md")
    if not path.exists():
        relative = [os.path.relpath(plot, path.parent) for plot in plots]
        path.write_text(markdown_report(data, relative, heading_level=2) + "\n")
    return path


def device_summary(data, links, title):
    """Markdown of one device: its run, the links, and the summary table."""
    meta = data["metadata"]
    versions = meta.get("versions", {})
    listed = ", ".join(
        f"{key} {versions[key]}" for key in ("torch", "triton", "cuda (torch)") if versions.get(key)
    )
    run = (
        f"git `{meta.get('git_sha') or 'unknown'}`; sweep `{meta.get('sweep')}`; threads: {meta.get('threads')}; "
        f"{listed}."
    )
    out = [f"### {title}", "", " · ".join(links), "", run, ""]
    rows = device_summary_rows(data)
    if not rows:
        return "\n".join(out + ["No fastgpt kernel backend was timed in this run.", ""])
    out.append(
        markdown_table(
            [
                "op",
                "dtype",
                "mode",
                "fastgpt",
                "shapes",
                "speedup vs each baseline (median over shapes, min-max)",
            ],
            [
                [op, dtype, mode, provider, str(shapes), format_median_speedups(ratios, shapes)]
                for op, dtype, mode, provider, shapes, ratios in rows
            ],
        )
    )
    return "\n".join(out + [""])


def render_readme(readme_path, results_paths, plots_for=None):
    """Replace the README's text between the perf markers with a summary of each device's newest
    results file among results_paths, and return those paths. plots_for(path, data) draws a file's
    plots and returns their paths (linked from the README, and inline in a report written here)."""
    readme_path = Path(readme_path)
    text = readme_path.read_text()
    if START_MARKER not in text or END_MARKER not in text:
        raise ValueError(f"{readme_path} has no '{START_MARKER}' ... '{END_MARKER}' section to render into")
    before, rest = text.split(START_MARKER, 1)
    _, after = rest.split(END_MARKER, 1)
    kept = newest_per_device([(Path(path), load_results(path)) for path in results_paths])

    def link(name, target):
        return f"[{name}]({os.path.relpath(target, readme_path.parent)})"

    command = "python -m fastgpt bench --render " + " ".join(str(p) for p in results_paths)
    sections = [
        f"<!-- generated by `{command}`: edit the results files, not this section -->",
        "",
        README_LEGEND,
        "",
    ]
    for path, data in kept:
        plots = plots_for(path, data) if plots_for else []
        links = [
            link("full per-shape report", full_report_path(path, data, plots)),
            link("results file", path),
        ]
        links += [link("plots", Path(plots[0]).parent)] if plots else []
        title = f"{data['metadata']['device']} — {data['metadata']['date'][:10]}"
        sections.append(device_summary(data, links, title))
    readme_path.write_text(
        before + START_MARKER + "\n" + "\n".join(sections).rstrip() + "\n" + END_MARKER + after
    )
    return [path for path, _ in kept]


def stage_table(stages_path):
    """Markdown table of gpu_check.sh's stages (a TSV of stage, status, seconds, note)."""
    rows = [line.split("\t") for line in Path(stages_path).read_text().splitlines() if line.strip()]
    rows = [(row + [""] * 4)[:4] for row in rows]
    return markdown_table(["stage", "status", "seconds", "note"], rows)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m fastgpt.bench.report", description=__doc__.splitlines()[0]
    )
    parser.add_argument("results", type=Path)
    parser.add_argument("--stages", type=Path, help="a TSV of stage, status, seconds, note (gpu_check.sh)")
    parser.add_argument("--markdown", type=Path, help="write the markdown report here")
    args = parser.parse_args(argv)
    console = wide_console()
    report = f"No results file at {args.results}."
    if args.stages and args.stages.exists():
        stages = stage_table(args.stages)
        console.print(stages)
    if args.results.exists():
        data = load_results(args.results)
        report = markdown_report(data, heading_level=2)
        print_tables(data, console)
        print_summary(data, console)  # last: the one table a reader of a long log needs
    else:
        console.print(report)
    if args.stages and args.stages.exists():
        report = "## Stages\n\n" + stages + "\n\n" + report
    if args.markdown:
        args.markdown.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
