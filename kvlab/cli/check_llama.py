"""`kvlab check-llama`: kvlab's KLD per K/V pair and its cache bytes held against a real llama.cpp
(kvlab.ggml.llama_check says what is compared)."""
import json
import sys

from kvlab.cli.options import UsageError, add_command, int_list, pair_list, positive_int


def register(subparsers) -> None:
    from kvlab.ggml.llama_check import DEFAULT_PAIRS
    p = add_command(subparsers, "check-llama", help="kvlab eval against a real llama.cpp: KLD per pair, cache bytes",
                    description="Build a small random Llama (GQA, outlier K channels), write it as GGUF, run it in "
                                "llama.cpp (llama-cpp-python, flash attention, each K/V pair, rotation on and off) "
                                "and in transformers with kvlab's GGMLQuantizedCache (the model's exact attention and "
                                "ggml-cpu attention); compare mean KLD against each side's f16 cache and the cache "
                                "bytes. Exit 1 if a pair's ggml-cpu KLD is not within --tolerance of llama.cpp's or "
                                "layer 0 has fewer identical blocks than --min-identical. Needs llama-cpp-python.")
    p.add_argument("--pairs", type=pair_list, default=DEFAULT_PAIRS, metavar="K/V,K/V",
                   help="K/V type pairs (T for T/T), or all for the 81 (default: "
                        f"{','.join(k + '/' + v for k, v in DEFAULT_PAIRS)})")
    p.add_argument("--head-dims", type=int_list, default=(64, 128), metavar="D,D", help="models, by head_dim")
    p.add_argument("--layers", type=positive_int, default=4, metavar="N", help="layers of each model")
    p.add_argument("-c", "--ctx-size", dest="ctx", type=positive_int, default=256, metavar="N", help="tokens per chunk")
    p.add_argument("--chunks", type=positive_int, default=4, metavar="N", help="chunks (the second half of each is scored)")
    p.add_argument("--rotation", choices=("both", "on", "off"), default="both",
                   help="llama.cpp's default gate (on), LLAMA_ATTN_ROT_DISABLE=1 (off), or both")
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed |kvlab/llama.cpp KLD - 1|")
    p.add_argument("--min-identical", type=float, default=0.99, help="identical blocks wanted at layer 0")
    p.add_argument("--threads", type=positive_int, default=1, help="llama.cpp threads (the figures do not depend on it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the tokens")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.set_defaults(run=run)


def run(args) -> int:
    try:
        import llama_cpp  # noqa: F401  (checked before any work)
        from kvlab.ggml.llama_check import CheckConfig, ModelSpec, format_report, run_check
    except ImportError as e:
        raise UsageError(f"needs torch, transformers, gguf and llama-cpp-python ({e}): "
                         "pip install 'kvlab[test]' (llama-cpp-python builds from source, a few minutes)") from None
    for d in args.head_dims:
        if d % 64:
            raise UsageError(f"--head-dims: {d} is not a multiple of 64 (the rotation's smallest size)")
    for name in ("tolerance", "min_identical"):
        if not 0 <= getattr(args, name) <= 1:
            raise UsageError(f"--{name.replace('_', '-')}: expected a fraction in [0, 1], got {getattr(args, name)}")
    rotations = {"both": (True, False), "on": (True,), "off": (False,)}[args.rotation]
    try:
        config = CheckConfig(models=tuple(ModelSpec(d, n_layer=args.layers, seed=args.seed) for d in args.head_dims),
                             pairs=tuple(args.pairs), rotations=rotations, n_ctx=args.ctx, n_chunks=args.chunks,
                             seed=args.seed, n_threads=args.threads, kld_tolerance=args.tolerance,
                             min_identical=args.min_identical)
    except ValueError as e:
        raise UsageError(e) from None
    report = run_check(config, progress=None if args.no_progress else _progress)
    if not args.no_progress:
        print(file=sys.stderr)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0 if report["ok"] else 1


def _progress(model: str, type_k: str, type_v: str, rotation: bool) -> None:
    print(f"\r{model} {type_k}/{type_v} rotation {'on' if rotation else 'off'}   ", end="", file=sys.stderr, flush=True)
