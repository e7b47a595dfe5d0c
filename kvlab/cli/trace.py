"""`kvlab trace` (split state of every node of one attention layer) and `kvlab compat` (which K/V pairs run)."""
import argparse
import json

from kvlab.cli.options import (UsageError, add_cache_types, add_command, comma_list, int_list, kv_type,
                               positive_int)
from kvlab.split.attention import BlockConfig, build_attention_block
from kvlab.split.compat import DEVICE_COUNTS, compat_matrix
from kvlab.split.cuda import DEFAULT_FA_QUANTS, cuda_flash_attn
from kvlab.split.eras import ERAS
from kvlab.types import TYPES

_CODES = {"runs": "R", "runs (slow FA)": "r", "refused at init": "G", "split abort": "S", "no CUDA FA kernel": "C"}


def fa_quants(text: str) -> str:
    """A GGML_CUDA_FA_QUANTS value (`q4_0-q4_0;q8_0-q8_0`, commas too), checked by parsing it once."""
    try:
        cuda_flash_attn("q4_0", "q8_0", fa_quants=text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def era(text: str) -> str:
    if text not in ERAS:
        raise argparse.ArgumentTypeError(f"unknown era {text!r}: expected one of {', '.join(ERAS)}")
    return text


def _add_shape_options(p, tokens_default: int) -> None:
    p.add_argument("--head-dim", type=positive_int, default=128, metavar="N", help="values per head (K and V)")
    p.add_argument("--n-head", type=positive_int, default=32, metavar="N", help="query heads")
    p.add_argument("--n-head-kv", type=positive_int, default=8, metavar="N", help="K/V heads (GQA)")
    p.add_argument("-ub", "--ubatch-size", "--n-tokens", dest="n_tokens", type=positive_int, default=tokens_default,
                   metavar="N", help="tokens in the graph, as llama.cpp's -ub (1 = a decode step)")
    p.add_argument("--format", choices=("text", "json"), default="text",
                   help="json: one object per node (ggml's ne order, split states)")
    p.add_argument("--fa-quants", type=fa_quants, default=DEFAULT_FA_QUANTS, metavar="LIST",
                   help="ggml-cuda's GGML_CUDA_FA_QUANTS: the K-V pairs with a compiled FA kernel")
    p.add_argument("--fa-all-quants", action="store_true", help="ggml-cuda built with GGML_CUDA_FA_ALL_QUANTS")


def register(subparsers) -> None:
    p = add_command(subparsers, "trace", help="split state of every node of one attention layer (ggml meta backend)",
                    description="The split state of every node of one attention layer, as the era's meta backend "
                                "infers it on --devices devices, and whether ggml-cuda's flash attention runs the "
                                "pair. Exit 1 when the graph stops (STOP) or CUDA does not run it.")
    p.add_argument("--era", type=era, default="pr23792", help=f"rule set: {', '.join(ERAS)}")
    p.add_argument("--devices", type=positive_int, default=2, metavar="N", help="number of tensor-parallel devices")
    add_cache_types(p, kv_type, "f16", "type")
    p.add_argument("--layer", type=int, default=0, metavar="IL", help="layer index (which device takes an uneven "
                                                                      "remainder)")
    p.add_argument("--no-rotation", action="store_true", help="as LLAMA_ATTN_ROT_DISABLE=1")
    p.add_argument("--no-guard", action="store_true", help="skip the era's init-time TP + quantized-KV guard")
    _add_shape_options(p, tokens_default=1)
    p.set_defaults(run=run_trace)

    c = add_command(subparsers, "compat", help="which K/V type pairs run under --split-mode tensor, per era")
    c.add_argument("--era", type=comma_list(era, "eras", ERAS), default=tuple(ERAS), metavar="ERAS",
                   help="rule sets, or all")
    c.add_argument("--devices", type=int_list, default=DEVICE_COUNTS, metavar="N,N",
                   help="numbers of tensor-parallel devices")
    _add_shape_options(c, tokens_default=512)
    c.set_defaults(run=run_compat)


def _node_line(n) -> str:
    t, s = n.tensor, n.state
    shape = "[" + ", ".join(map(str, t.ne)) + "]"
    sync = f"  ({n.local.axis.name} -> all-reduce)" if n.local.axis != s.axis else ""
    return f"{t.op:<15} {t.name:<34} {shape:<22} {s.describe()}{sync}"


def run_trace(args) -> int:
    try:
        cfg = BlockConfig(head_dim=args.head_dim, n_head=args.n_head, n_head_kv=args.n_head_kv,
                          n_devices=args.devices, type_k=args.type_k, type_v=args.type_v, n_tokens=args.n_tokens,
                          rotation=not args.no_rotation, era=args.era, guard=not args.no_guard, layer=args.layer)
        block = build_attention_block(cfg)
    except ValueError as e:
        raise UsageError(e) from None
    tr = block.trace()
    error = block.init_error or tr.error
    cuda = cuda_flash_attn(cfg.type_k, cfg.type_v, cfg.head_dim, cfg.era, args.fa_quants, args.fa_all_quants)
    stops = error is not None or not cuda.runs   # exit 1 whenever the output says STOP or DOES NOT RUN
    if args.format == "json":
        nodes = [] if block.init_error else [n.to_dict() for n in tr.nodes]
        for node in nodes:
            if node["op"] == "FLASH_ATTN_EXT":   # where ggml-cuda would stop the pair
                node.update(cuda_runs=cuda.runs, cuda_kernel=cuda.kernel, cuda_reason=cuda.reason)
        if error is not None:
            t = None if block.init_error else block.graph.find(error.node)
            nodes.append({"name": error.node, "op": error.op, "ne": list(t.ne) if t else [0, 0, 0, 0],
                          "axis": "UNKNOWN", "split_ne": [], "nr": [], "error": str(error), "rule": error.rule,
                          "c_function": error.c_function, "inputs": [list(i) for i in error.inputs]})
        for node in nodes:
            print(json.dumps(node))
        return 1 if stops else 0
    print(f"era {block.era.name}: {block.era.source}; {cfg.n_devices} devices, K {cfg.type_k}, V {cfg.type_v}, "
          f"T={cfg.n_tokens}, rotation K={cfg.plan.k} V={cfg.plan.v}")
    if block.init_error is None:
        for n in tr.nodes:
            print(_node_line(n))
    if error is not None:
        print(f"\nSTOP: {error}")
    print(f"\nCUDA flash attention ({block.era.cuda_version}): {'runs' if cuda.runs else 'DOES NOT RUN'} "
          f"[{cuda.kernel}] {cuda.reason}")
    return 1 if stops else 0


def run_compat(args) -> int:
    eras = args.era
    try:
        rows = compat_matrix(eras, tuple(TYPES), args.devices, (True, False), args.head_dim, args.n_head,
                             args.n_head_kv, args.n_tokens, args.fa_quants, args.fa_all_quants)
    except ValueError as e:
        raise UsageError(e) from None
    if args.format == "json":
        for r in rows:
            print(json.dumps(r.to_dict()))
        return 0
    cell = {(r.era, r.rotation, r.type_k, r.type_v, r.devices): _CODES[r.outcome] for r in rows}
    print("cell = outcome per device count " + "/".join(map(str, args.devices)) + ": "
          + ", ".join(f"{v} {k}" for k, v in _CODES.items()))
    for era_name in eras:
        for rot in (True, False):
            print(f"\n{era_name} ({ERAS[era_name].source}), rotation {'on' if rot else 'off'}; rows K, columns V")
            print(" " * 7 + "".join(f"{v:>{len(args.devices) + 2}}" for v in TYPES))
            for k in TYPES:
                codes = ["".join(cell[(era_name, rot, k, v, n)] for n in args.devices) for v in TYPES]
                print(f"{k:<7}" + "".join(f"{c:>{len(args.devices) + 2}}" for c in codes))
    stops = sorted({(r.era, r.split) for r in rows if r.split})
    if stops:
        print("\nsplit aborts (with the init guard removed):")
        for era_name, what in stops:
            print(f"  {era_name}: {what}")
    return 0
