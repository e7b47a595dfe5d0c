"""`kvlab tp` (= `python -m kvlab.tp`): the attention stack tensor-parallel over torch.distributed ranks,
checked against one process (kvlab.tp.check)."""
import os
import sys

from kvlab.cli.options import Parser, UsageError, add_command, count, flavor, pair_list, positive_int
from kvlab.split.eras import ERAS
from kvlab.tp import PAIRS, ROTATIONS


def pair_string(text: str) -> str:
    """A checked pair list in the canonical "k/v,k/v" form the ranks read (kvlab.tp.check.check_all)."""
    return ",".join(f"{k}/{v}" for k, v in pair_list(text))


def add_options(p) -> None:
    p.add_argument("--nproc", type=positive_int, default=None, metavar="N",
                   help="spawn this many local ranks (default: under torchrun, its ranks; else one process)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where each rank computes: auto (cuda when torch sees a GPU), cpu or cuda")
    p.add_argument("--backend", default="auto", choices=("auto", "nccl", "gloo"),
                   help="auto: nccl on GPU, gloo on CPU; gloo lets several ranks share one GPU")
    p.add_argument("--pairs", type=pair_string, default=",".join(PAIRS), metavar="K/V,K/V",
                   help="K/V type pairs (T for T/T)")
    p.add_argument("--rotation", default="both", choices=tuple(ROTATIONS), help="rotation on, off, or both runs")
    p.add_argument("--head-dim", type=positive_int, default=128, metavar="N", help="values per head")
    p.add_argument("--n-head", type=positive_int, default=8, metavar="N", help="query heads")
    p.add_argument("--n-head-kv", type=positive_int, default=4, metavar="N", help="K/V heads (GQA)")
    p.add_argument("--n-embd", type=positive_int, default=None, metavar="N",
                   help="model width (default: n_head x head_dim)")
    p.add_argument("--layers", type=positive_int, default=2, metavar="N", help="attention layers in the stack")
    p.add_argument("--cells", type=positive_int, default=256, metavar="N",
                   help="KV cache cells per layer (a multiple of 256, as llama.cpp pads n_kv)")
    p.add_argument("--n-past", type=count, default=40, metavar="N", help="tokens already in the cache")
    p.add_argument("--steps", type=positive_int, default=2, metavar="N", help="decode steps checked")
    p.add_argument("--flavor", type=flavor, default=None,
                   help="ggml code path of the cache bytes (default: the device's backend, cpu or cuda)")
    p.add_argument("--era", default="pr23792", choices=tuple(ERAS), help="split-state rule set")
    p.add_argument("--ref-device", default="cpu", metavar="DEVICE", help="where the single-process run computes")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and tokens")


def register(subparsers) -> None:
    p = add_command(subparsers, "tp", help="the attention stack tensor-parallel over torch.distributed, checked "
                    "against one process", description=__doc__.split("\n\n")[0] + " Exit 1 when a check fails.")
    add_options(p)
    p.set_defaults(run=run)


def check_args(args) -> None:
    """What every rank would refuse, refused once here before any rank starts."""
    try:
        import torch
        from kvlab.tp.model import TPConfig
    except ImportError as e:
        raise UsageError(f"needs torch ({e}): pip install 'kvlab[torch]'") from None
    if args.n_head % args.n_head_kv:
        raise UsageError(f"--n-head ({args.n_head}) must be a multiple of --n-head-kv ({args.n_head_kv}) (GQA)")
    for type_k, type_v in (pair.split("/") for pair in args.pairs.split(",")):
        try:
            TPConfig(head_dim=args.head_dim, n_head=args.n_head, n_head_kv=args.n_head_kv, n_embd=args.n_embd,
                     n_layers=args.layers, cells=args.cells, type_k=type_k, type_v=type_v, era=args.era)
        except ValueError as e:
            raise UsageError(e) from None
    if args.n_past + args.steps > args.cells:
        raise UsageError(f"--n-past + --steps ({args.n_past} + {args.steps}) exceed the {args.cells} cache cells")
    if (args.device == "cuda" or args.backend == "nccl") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} --backend {args.backend}: torch sees no CUDA GPU here")


def run(args) -> int:
    check_args(args)
    from kvlab.tp.check import check_all
    from kvlab.tp.dist import spawn
    if args.nproc is not None and "RANK" not in os.environ:
        rows = spawn(args.nproc, check_all, args)
    else:
        rows = check_all(args)
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
    return 0 if rows and all(r["ok"] for r in rows) else 1


def main(argv=None) -> int:
    """`python -m kvlab.tp` and torchrun's entry: the `kvlab tp` command on its own, same errors."""
    p = Parser(prog="kvlab tp", description=__doc__.split("\n\n")[0])
    add_options(p)
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return e.code
    try:
        return run(args)
    except UsageError as e:
        print(f"kvlab tp: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
