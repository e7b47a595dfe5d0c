"""What every `kvlab` command shares: one-line user errors, one list convention, llama.cpp's spellings.

- A user error is one line on stderr, `kvlab <command>: error: ...`, exit status 2, found before any
  work starts: argparse's own errors (Parser.error) and the checks a command runs first (UsageError).
- Lists are comma separated everywhere (`--types q4_0,q8_0`, `--devices 1,2,4`, `--pairs q4_0/q8_0,q8_0`).
- K/V types in any case (`Q8_0` is q8_0), given as llama.cpp spells them: `-ctk/--cache-type-k`,
  `-ctv/--cache-type-v` (`--ctk/--ctv` kept as aliases).
- Every option's --help ends with its default.
"""
import argparse
from dataclasses import replace
import os
from pathlib import Path
import textwrap

from kvlab.accuracy.depth import StackConfig
from kvlab.accuracy.sample import CAPTURED, KVSample, captured_sample, load_sample, synthetic_sample
from kvlab.accuracy.sweep import SweepConfig
from kvlab.accuracy.synthetic import SyntheticConfig
from kvlab.types import FLAVORS, TYPES, type_info

LIST_NOTE = "Lists are comma separated: --types q4_0,q8_0, --devices 1,2,4, --pairs q4_0/q8_0,q8_0."
EXIT_NOTE = ("exit status: 0 it ran (and the answer is: runs / no differences); 1 it ran and the answer is STOP or "
             "a check failed (a graph that aborts or has no CUDA flash-attention kernel, bytes that differ); "
             "2 usage error (one line on stderr: kvlab <command>: error: ...).")
SPELLING_NOTE = ("K/V types are ggml's names in any case (f32 f16 bf16 q8_0 q4_0 q4_1 iq4_nl q5_0 q5_1; Q8_0 = "
                 "q8_0), given as llama.cpp spells them: -ctk/--cache-type-k, -ctv/--cache-type-v.")


class UsageError(Exception):
    """A user error found before the work starts: reported as `kvlab <command>: error: ...`, exit 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends `(default: X)` to every option that has a default, lists and tuples as comma strings."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if not action.option_strings or action.nargs == 0 or default is None or default == argparse.SUPPRESS \
                or "(default:" in text:   # nargs 0: a flag
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """argparse whose errors are kvlab's one line (`kvlab <command>: error: ...`, exit 2), no usage dump."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


def paragraphs(*texts: str) -> str:
    """Help text wrapped by paragraph (the formatter keeps line breaks as written)."""
    return "\n\n".join(textwrap.fill(t, 100) for t in texts)


def add_command(subparsers, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose help notes the list and exit-status conventions."""
    kwargs.setdefault("epilog", paragraphs(LIST_NOTE, EXIT_NOTE))
    parser = subparsers.add_parser(name, **kwargs)
    parser.set_defaults(command_parser=parser)
    return parser


# ---- values: argparse `type=` functions (their errors become one-line usage errors) --------------

def kv_type(text: str) -> str:
    """One K/V type name in any case -> ggml's spelling."""
    try:
        return type_info(text).name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def count(text: str) -> int:
    """A non-negative integer (0 switches a stage off)."""
    return 0 if text.strip() == "0" else positive_int(text)


def flavor(text: str) -> str:
    if text not in FLAVORS:
        raise argparse.ArgumentTypeError(f"unknown flavor {text!r}: expected one of {', '.join(FLAVORS)}")
    return text


def kv_pair(text: str) -> tuple:
    """`K/V`, or `T` for T/T -> (type_k, type_v)."""
    parts = text.split("/")
    if len(parts) > 2 or not all(p.strip() for p in parts):
        raise argparse.ArgumentTypeError(f"a K/V pair is written K/V (e.g. q4_0/q8_0) or T for T/T, got {text!r}")
    return kv_type(parts[0].strip()), kv_type(parts[-1].strip())


def comma_list(item, what: str, everything=None):
    """An argparse type: `a,b,c` -> tuple of item(a), ...; `all` -> everything when given."""
    def parse(text: str) -> tuple:
        if everything is not None and text.strip().lower() == "all":
            return tuple(everything)
        parts = [p.strip() for p in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}")
        return tuple(dict.fromkeys(item(p) for p in parts))   # in order, once each
    parse.__name__ = f"list of {what}"
    return parse


type_list = comma_list(kv_type, "K/V types", TYPES)
flavor_list = comma_list(flavor, "flavors", FLAVORS)
pair_list = comma_list(kv_pair, "K/V pairs", [(k, v) for k in TYPES for v in TYPES])
int_list = comma_list(positive_int, "positive integers")


def add_cache_types(parser, parse, default, what: str, metavar: str = "TYPE") -> None:
    """llama.cpp's -ctk/--cache-type-k and -ctv/--cache-type-v (--ctk/--ctv kept as aliases)."""
    for side in ("k", "v"):
        parser.add_argument(f"-ct{side}", f"--cache-type-{side}", f"--ct{side}", dest=f"type_{side}", type=parse,
                            default=default, metavar=metavar, help=f"{side.upper()} cache {what}")


def add_device_option(parser) -> None:
    parser.add_argument("--device", default="auto", metavar="WHERE",
                        help="where the math runs: auto (the GPU when torch sees one, else the CPU), cpu, cuda or "
                             "cuda:N")


def check_device(device: str) -> None:
    """The --device value names a place that exists here (resolved before the work, not at its end)."""
    from kvlab._xp import resolve_device
    try:
        resolve_device(device)
    except ValueError as e:
        raise UsageError(f"--device: {e}") from None


# ---- files: checked before the work ----------------------------------------------------------------

def writable_file(path, option: str, suffixes=()) -> Path:
    """An output path kvlab can write (its directory exists or can be made, and is writable)."""
    p = Path(path)
    if suffixes and p.suffix not in suffixes:
        raise UsageError(f"{option} {path}: expected a {' or '.join(suffixes)} file")
    if p.is_dir():
        raise UsageError(f"{option} {path}: is a directory, expected a file name")
    parent = p.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"{option} {path}: not writable")
    return p


def readable_file(path, option: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{option} {path}: no such file")
    if not os.access(p, os.R_OK):
        raise UsageError(f"{option} {path}: not readable")
    return p


# ---- `kvlab sweep` and `kvlab report` ---------------------------------------------------------------

def add_sweep_options(parser, default_lengths) -> None:
    parser.add_argument("--lengths", type=int_list, default=None, metavar="N,N",
                        help=f"context lengths (default: {','.join(map(str, default_lengths))}; with --data, those "
                             "the sample holds)")
    parser.set_defaults(default_lengths=default_lengths)
    parser.add_argument("--types", type=type_list, default=tuple(TYPES), metavar="TYPES",
                        help="K and V types, or all")
    add_cache_types(parser, type_list, None, "types, overriding --types for that side (default: --types)", "TYPES")
    parser.add_argument("--flavors", type=flavor_list, default=FLAVORS, metavar="FLAVORS",
                        help="which ggml code paths write and read the cache (ref, cpu, cuda)")
    parser.add_argument("--n-q", type=positive_int, default=4, metavar="N",
                        help="query tokens at the end of each context")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic K/V and of the layer stack")
    parser.add_argument("--data", metavar="NPZ",
                        help="K/V to sweep instead of the synthetic ones: an .npz with q, k, v (kvlab.save_sample), "
                             f"or '{CAPTURED}' for the bundled all-MiniLM-L6-v2 capture (default: synthetic)")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="where results are cached (default: $KVLAB_CACHE or ~/.cache/kvlab)")
    add_device_option(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def sweep_inputs(args, **override) -> tuple[SweepConfig, KVSample]:
    """The sweep's configuration (`override`: fields that replace the options', e.g. --quick's) and its K/V,
    loaded and checked against each other before any work."""
    data = _load_data(args.data) if args.data else None
    lengths = args.lengths
    if lengths is None:   # the default lengths, or those a given sample holds
        lengths = args.default_lengths if data is None else (
            tuple(n for n in args.default_lengths if n <= data.k.shape[1]) or (data.k.shape[1],))
    try:
        cfg = replace(SweepConfig(lengths=lengths, n_q=args.n_q, types_k=args.type_k or args.types,
                                  types_v=args.type_v or args.types, flavors=args.flavors,
                                  synthetic=SyntheticConfig(seed=args.seed)), **override)
    except ValueError as e:
        raise UsageError(e) from None
    if data is None:
        return cfg, synthetic_sample(cfg.lengths, cfg.n_q, cfg.synthetic)
    if data.k.shape[1] < max(cfg.lengths):
        raise UsageError(f"--data {args.data}: {data.k.shape[1]} tokens, but --lengths go to {max(cfg.lengths)}")
    return cfg, data


def _load_data(name: str) -> KVSample:
    try:
        return captured_sample() if name == CAPTURED else load_sample(readable_file(name, "--data"))
    except (OSError, ValueError) as e:
        raise UsageError(f"--data {name}: {e}") from None


def add_depth_options(parser, default_layers: int, why: str) -> None:
    parser.add_argument("--layers", type=count, default=default_layers, metavar="N",
                        help=f"layers of the error-growth stack (kvlab.layer_growth), 0: none; {why}")
    parser.add_argument("--layer-tokens", type=positive_int, default=StackConfig.n_tokens, metavar="N",
                        help="tokens the stack runs on")


def stack_from_args(args) -> StackConfig | None:
    if not args.layers:
        return None
    try:
        return StackConfig(n_layers=args.layers, n_tokens=args.layer_tokens,
                           heads=replace(StackConfig().heads, seed=args.seed))
    except ValueError as e:
        raise UsageError(e) from None
