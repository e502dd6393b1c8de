"""The `fastgpt` command line. Each subcommand lives in its own module exposing `add_arguments(parser)`
and `run(args) -> int`; this file only wires them together."""

import argparse
import importlib
import sys

from fastgpt.train.errors import UserError

# name -> (module, one-line help)
COMMANDS = {
    "info": (
        "fastgpt.info",
        "print versions, the device, and each backend with why it is or isn't available",
    ),
    "demo": (
        "fastgpt.demo",
        "the showcase: every op on every backend against the reference, then a tiny GPT trained and sampled",
    ),
    "train": ("fastgpt.train_cli", "train a GPT on text, fine-tune one from a checkpoint, or resume a run"),
    "generate": ("fastgpt.generate_cli", "sample text from a checkpoint, streamed as it is generated"),
    "eval": ("fastgpt.eval_cli", "held-out loss and perplexity of a checkpoint"),
    "export": (
        "fastgpt.export_cli",
        "write a checkpoint as a transformers GPT-2 directory, with its tokenizer",
    ),
    "bench": (
        "fastgpt.bench.command",
        "benchmark every backend against the baselines; tables, plots, results.json",
    ),
}


def build_parser():
    parser = argparse.ArgumentParser(prog="fastgpt", description="Fused GPU kernels for GPT models.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(subparser)
        subparser.set_defaults(run=module.run)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as error:  # a bad path, checkpoint, device or prompt: one line, no traceback
        print(f"fastgpt {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
