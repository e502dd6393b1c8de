"""PNG plots of a results file (matplotlib, headless):
- attention_fwd.png, attention_fwd_bwd.png: TFLOP/s against sequence length, one line per provider,
  one panel per (dtype, head_dim);
- attention_memory.png: peak memory of forward+backward against sequence length;
- ffn.png, layer_norm.png, gpt.png: the headline metric per shape and provider (layer_norm.png marks
  the measured copy bandwidth);
- cross_entropy.png, cross_entropy_memory.png: median time and peak memory per shape and provider.
Each plot is drawn only when the results hold its op. matplotlib is optional (the `test` and `dev`
extras install it): without it `fastgpt bench` says so before it starts and writes everything else.
"""

import importlib.util
from pathlib import Path

from fastgpt.bench.report import METRIC_LABELS, shape_label

PROVIDER_STYLE = {"fastgpt": "-", "baseline": "--"}
NO_MATPLOTLIB = (
    "matplotlib is not installed, so no plots will be drawn (results.json, report.md and the "
    "tables are written all the same); to get them: pip install matplotlib, or install fastgpt "
    "with its test or dev extra (pip install 'fastgpt[test]')"
)


def matplotlib_available():
    # find_spec, not an import: matplotlib takes a second to import, and the plots come last
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(count):
    plt = _pyplot()
    columns = min(count, 2)
    rows = (count + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 4.2 * rows), squeeze=False)
    for extra in axes.flat[count:]:
        extra.set_visible(False)
    return plt, figure, list(axes.flat)


def _provider_colors(records):
    """One matplotlib cycle colour per provider, the same in every panel of a figure."""
    providers = dict.fromkeys(r["provider"] for r in records)
    return {provider: f"C{index % 10}" for index, provider in enumerate(providers)}


def _save(plt, figure, path):
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def attention_lines(records, mode, value, ylabel, title, path, log_y=False):
    records = [r for r in records if r["op"] == "attention" and r["mode"] == mode]
    if not records:
        return None
    panels = sorted({(r["dtype"], r["shape"]["head_dim"]) for r in records})
    colors = _provider_colors(records)
    plt, figure, axes = _panels(len(panels))
    for ax, (dtype, head_dim) in zip(axes, panels):
        subset = [r for r in records if r["dtype"] == dtype and r["shape"]["head_dim"] == head_dim]
        for provider in dict.fromkeys(r["provider"] for r in subset):
            points = sorted((r["shape"]["seq"], value(r)) for r in subset if r["provider"] == provider)
            kind = next(r["kind"] for r in subset if r["provider"] == provider)
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                PROVIDER_STYLE.get(kind, "-"),
                marker="o",
                color=colors[provider],
                label=provider,
            )
        ax.set_xscale("log", base=2)
        seqs = sorted({r["shape"]["seq"] for r in subset})
        ax.set_xticks(seqs, [str(seq) for seq in seqs])
        ax.minorticks_off()
        if log_y:
            from matplotlib.ticker import FuncFormatter

            ax.set_yscale("log")
            plain = FuncFormatter(lambda value, _: f"{value:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} · {dtype} · head_dim {head_dim}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(plt, figure, path)


def grouped_bars(records, op, value, ylabel, path, reference_line=None):
    """One panel per (dtype, mode); bars per shape, one per provider."""
    records = [r for r in records if r["op"] == op]
    if not records:
        return None
    panels = list(dict.fromkeys((r["dtype"], r["mode"]) for r in records))
    colors = _provider_colors(records)
    plt, figure, axes = _panels(len(panels))
    for ax, (dtype, mode) in zip(axes, panels):
        subset = [r for r in records if (r["dtype"], r["mode"]) == (dtype, mode)]
        shapes = list(dict.fromkeys(shape_label(op, r["shape"]) for r in subset))
        providers = list(dict.fromkeys(r["provider"] for r in subset))
        width = 0.8 / len(providers)
        for index, provider in enumerate(providers):
            heights = [
                next(
                    (
                        value(r)
                        for r in subset
                        if r["provider"] == provider and shape_label(op, r["shape"]) == label
                    ),
                    0,
                )
                or 0
                for label in shapes
            ]
            ax.bar(
                [s + index * width for s in range(len(shapes))],
                heights,
                width,
                color=colors[provider],
                label=provider,
            )
        ax.set_xticks([s + 0.4 - width / 2 for s in range(len(shapes))], shapes, fontsize=7, rotation=15)
        if reference_line:
            ax.axhline(reference_line[0], color="black", linestyle=":", label=reference_line[1])
        ax.set_ylabel(ylabel)
        ax.set_title(f"{op} · {dtype} · {mode}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    return _save(plt, figure, path)


def write_plots(data, directory):
    """Draw every plot the results allow into directory; returns the paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    records = data["records"]
    copy_gbps = data["metadata"].get("peaks", {}).get("copy_gbps")

    def metric(r):
        return r[r["metric"]]

    written = [
        attention_lines(
            records,
            "fwd",
            lambda r: r["tflops"],
            "TFLOP/s",
            "attention forward",
            directory / "attention_fwd.png",
        ),
        attention_lines(
            records,
            "fwd+bwd",
            lambda r: r["tflops"],
            "TFLOP/s",
            "attention forward+backward",
            directory / "attention_fwd_bwd.png",
        ),
        attention_lines(
            records,
            "fwd+bwd",
            lambda r: r["peak_mem_bytes"] / 2**20,
            "peak memory (MiB)",
            "attention fwd+bwd memory",
            directory / "attention_memory.png",
            log_y=True,
        ),
        grouped_bars(records, "ffn", metric, METRIC_LABELS["tflops"], directory / "ffn.png"),
        grouped_bars(
            records,
            "layer_norm",
            metric,
            METRIC_LABELS["gbps"],
            directory / "layer_norm.png",
            reference_line=(copy_gbps, "copy bandwidth") if copy_gbps else None,
        ),
        grouped_bars(
            records,
            "cross_entropy",
            lambda r: r["peak_mem_bytes"] / 2**20,
            "peak memory (MiB)",
            directory / "cross_entropy_memory.png",
        ),
        grouped_bars(
            records, "cross_entropy", lambda r: r["median_ms"], "median ms", directory / "cross_entropy.png"
        ),
        grouped_bars(records, "gpt", metric, METRIC_LABELS["tokens_per_s"], directory / "gpt.png"),
    ]
    return [path for path in written if path is not None]
