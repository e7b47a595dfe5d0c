"""`kvlab` command line (also `python -m kvlab`): one module per subcommand here; library modules register nothing.

Every module in COMMAND_MODULES has `register(subparsers)`, which adds its subcommands with
`set_defaults(run=function)`; `function(args)` returns the exit status, or raises UsageError for a user
error found before its work starts. kvlab.cli.options holds the conventions every command shares.
"""
import importlib
import sys

from kvlab import __version__
from kvlab.cli.options import EXIT_NOTE, LIST_NOTE, SPELLING_NOTE, Parser, UsageError, paragraphs

COMMAND_MODULES = (
    "kvlab.cli.report",      # report (the main job)
    "kvlab.cli.sweep",       # sweep
    "kvlab.cli.trace",       # trace, compat
    "kvlab.cli.eval",        # eval
    "kvlab.cli.check_ggml",  # check-ggml
    "kvlab.cli.check_llama", # check-llama
    "kvlab.cli.tp",          # tp
)


def build_parser() -> Parser:
    parser = Parser(prog="kvlab", description="Quantized KV caches under tensor parallelism, as llama.cpp runs them "
                                              "(also: python -m kvlab).",
                    epilog=paragraphs(f"{SPELLING_NOTE} {LIST_NOTE}", EXIT_NOTE))
    parser.add_argument("--version", action="version", version=f"kvlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    """Run one command; the exit status (0 ran, 1 ran and the answer is STOP/failed, 2 usage error)."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:   # reported by the subcommand's parser, so the line names the command
            getattr(args, "command_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
        if not getattr(args, "run", None):
            parser.error("a command is required (kvlab --help lists them)")
    except SystemExit as e:   # argparse: --help / --version (0), or a usage error it printed (2)
        return e.code
    try:
        return int(args.run(args) or 0)
    except UsageError as e:
        print(f"kvlab {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
