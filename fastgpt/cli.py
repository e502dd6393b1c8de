"""The `fastgpt` command line. Each subcommand lives in its own module exposing `add_arguments(parser)`
and `run(args) -> int`; this file only wires them together."""

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "info": ("fastgpt.info", "print versions, the device, and each backend with why it is or isn't available"),
    "demo": ("fastgpt.demo", "the showcase: kernels on every backend, with time and error against the reference"),
    "bench": ("fastgpt.bench.command", "benchmark every backend against the baselines; tables, plots, results.json"),
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
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
