"""Options that `kvlab sweep` and `kvlab report` share, and the configurations they make."""
from dataclasses import replace

from kvlab.accuracy.depth import StackConfig
from kvlab.accuracy.sample import KVSample, load_sample, synthetic_sample
from kvlab.accuracy.sweep import SweepConfig
from kvlab.accuracy.synthetic import SyntheticConfig
from kvlab.types import FLAVORS, TYPES


def add_sweep_options(parser, default_lengths) -> None:
    parser.add_argument("--lengths", type=lambda s: tuple(int(x) for x in s.split(",")), default=default_lengths,
                        help="context lengths, comma separated (default: %(default)s)")
    parser.add_argument("--types", default=",".join(TYPES), help="K and V types, comma separated")
    parser.add_argument("--flavors", default=",".join(FLAVORS), help="flavors (= backends), comma separated")
    parser.add_argument("--n-q", type=int, default=4, help="query tokens per context (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--data", help=".npz with q, k, v (and optionally q_positions), e.g. from kvlab.hf.capture")
    parser.add_argument("--cache-dir", help="where cell results are cached (default: $KVLAB_CACHE or ~/.cache/kvlab)")
    parser.add_argument("--device", default="auto",
                        help="auto (the GPU when torch sees one, else the CPU), cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args) -> SweepConfig:
    types = tuple(t.strip() for t in args.types.split(","))
    return SweepConfig(lengths=tuple(args.lengths), n_q=args.n_q, types_k=types, types_v=types,
                       flavors=tuple(f.strip() for f in args.flavors.split(",")),
                       synthetic=SyntheticConfig(seed=args.seed))


def sample_from_args(args, cfg: SweepConfig) -> KVSample:
    if not args.data:
        return synthetic_sample(cfg.lengths, cfg.n_q, cfg.synthetic)
    return load_sample(args.data)


def add_depth_options(parser, default_layers: int) -> None:
    parser.add_argument("--layers", type=int, default=default_layers,
                        help="layers of the error-growth stack (kvlab.accuracy.depth); 0 skips it (default: %(default)s)")
    parser.add_argument("--layer-tokens", type=int, default=StackConfig.n_tokens,
                        help="tokens the stack runs on (default: %(default)s)")


def stack_from_args(args) -> StackConfig | None:
    if not args.layers:
        return None
    return StackConfig(n_layers=args.layers, n_tokens=args.layer_tokens,
                       heads=replace(StackConfig().heads, seed=args.seed))
