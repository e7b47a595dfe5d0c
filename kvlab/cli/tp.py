"""`kvlab tp` (= `python -m kvlab.tp`): the attention stack tensor-parallel over torch.distributed ranks,
checked against one process (kvlab.tp.check)."""
import argparse
import os

from kvlab.tp import PAIRS, ROTATIONS


def add_options(p) -> None:
    p.add_argument("--nproc", type=int, default=None, help="spawn this many local ranks (not under torchrun)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--backend", default="auto", choices=("auto", "nccl", "gloo"),
                   help="default nccl on GPU, gloo on CPU; gloo lets several ranks share one GPU")
    p.add_argument("--pairs", default=",".join(PAIRS), help="K/V type pairs, e.g. q8_0/q4_0,f16/f16")
    p.add_argument("--rotation", default="both", choices=tuple(ROTATIONS))
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--n-head-kv", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=None)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--cells", type=int, default=256)
    p.add_argument("--n-past", type=int, default=40)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--flavor", default=None, choices=("ref", "cpu", "cuda"),
                   help="default: what the device's ggml backend writes (cpu or cuda)")
    p.add_argument("--era", default="pr23792")
    p.add_argument("--ref-device", default="cpu", help="where the single-process run computes")
    p.add_argument("--seed", type=int, default=0)


def register(subparsers) -> None:
    p = subparsers.add_parser("tp", help="the attention stack tensor-parallel over torch.distributed, checked "
                              "against one process", description=__doc__.split("\n\n")[0])
    add_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
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
    """`python -m kvlab.tp` and torchrun's entry: the `kvlab tp` command on its own."""
    p = argparse.ArgumentParser(prog="python -m kvlab.tp", description=__doc__.split("\n\n")[0])
    add_options(p)
    return run(p.parse_args(argv))
