"""`kvlab` command line: one module per subcommand here; library modules register nothing.

Every module in COMMAND_MODULES has `register(subparsers)`, which adds its
subcommands with `set_defaults(run=function)`; `function(args)` returns the exit code.
"""
import argparse
import importlib
import sys

COMMAND_MODULES = (
    "kvlab.cli.report",      # report (the main job)
    "kvlab.cli.sweep",       # sweep
    "kvlab.cli.trace",       # trace, compat
    "kvlab.cli.eval",        # eval
    "kvlab.cli.check_ggml",  # check-ggml
    "kvlab.cli.tp",          # tp
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvlab", description="Quantized KV caches under tensor parallelism, as llama.cpp runs them.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
