"""`kvlab trace` (split state of every node of one attention layer) and `kvlab compat` (which K/V pairs run)."""
import json
import sys

from kvlab.types import TYPES
from kvlab.split.attention import BlockConfig, build_attention_block
from kvlab.split.compat import DEVICE_COUNTS, compat_matrix
from kvlab.split.cuda import DEFAULT_FA_QUANTS, cuda_flash_attn
from kvlab.split.eras import ERAS

_CODES = {"runs": "R", "runs (slow FA)": "r", "refused at init": "G", "split abort": "S", "no CUDA FA kernel": "C"}


def _add_shape_options(p, tokens_default: int) -> None:
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--n-head", type=int, default=32)
    p.add_argument("--n-head-kv", type=int, default=8)
    p.add_argument("--n-tokens", type=int, default=tokens_default, help="batch size (1 = a decode step)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--fa-quants", default=DEFAULT_FA_QUANTS, help="ggml-cuda GGML_CUDA_FA_QUANTS")
    p.add_argument("--fa-all-quants", action="store_true", help="ggml-cuda built with GGML_CUDA_FA_ALL_QUANTS")


def register(subparsers) -> None:
    p = subparsers.add_parser("trace", help="split state of every node of one attention layer (ggml meta backend)")
    p.add_argument("--era", choices=tuple(ERAS), default="pr23792")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--ctk", choices=tuple(TYPES), default="f16", help="K cache type")
    p.add_argument("--ctv", choices=tuple(TYPES), default="f16", help="V cache type")
    p.add_argument("--layer", type=int, default=0, help="layer index (which device takes an uneven remainder)")
    p.add_argument("--no-rotation", action="store_true", help="as LLAMA_ATTN_ROT_DISABLE=1")
    p.add_argument("--no-guard", action="store_true", help="skip the era's init-time TP + quantized-KV guard")
    _add_shape_options(p, tokens_default=1)
    p.set_defaults(run=run_trace)

    c = subparsers.add_parser("compat", help="which K/V type pairs run under --split-mode tensor, per era")
    c.add_argument("--era", choices=tuple(ERAS), action="append", help="repeat to pick eras (default: all)")
    c.add_argument("--devices", type=int, nargs="+", default=list(DEVICE_COUNTS))
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
                          n_devices=args.devices, type_k=args.ctk, type_v=args.ctv, n_tokens=args.n_tokens,
                          rotation=not args.no_rotation, era=args.era, guard=not args.no_guard, layer=args.layer)
        block = build_attention_block(cfg)
    except ValueError as e:
        print(f"kvlab trace: {e}", file=sys.stderr)
        return 2
    tr = block.trace()
    error = block.init_error or tr.error
    if args.format == "json":
        nodes = [] if block.init_error else [n.to_dict() for n in tr.nodes]
        if error is not None:
            t = None if block.init_error else block.graph.find(error.node)
            nodes.append({"name": error.node, "op": error.op, "ne": list(t.ne) if t else [0, 0, 0, 0],
                          "axis": "UNKNOWN", "split_ne": [], "nr": [], "error": str(error), "rule": error.rule,
                          "c_function": error.c_function, "inputs": [list(i) for i in error.inputs]})
        for node in nodes:
            print(json.dumps(node))
        return 1 if error is not None else 0
    print(f"era {block.era.name}: {block.era.source}; {cfg.n_devices} devices, K {cfg.type_k}, V {cfg.type_v}, "
          f"T={cfg.n_tokens}, rotation K={cfg.plan.k} V={cfg.plan.v}")
    cuda = cuda_flash_attn(cfg.type_k, cfg.type_v, cfg.head_dim, cfg.era, args.fa_quants, args.fa_all_quants)
    if block.init_error is None:
        for n in tr.nodes:
            print(_node_line(n))
    if error is not None:
        print(f"\nSTOP: {error}")
    print(f"\nCUDA flash attention ({block.era.cuda_version}): {'runs' if cuda.runs else 'DOES NOT RUN'} "
          f"[{cuda.kernel}] {cuda.reason}")
    return 1 if error is not None else 0


def run_compat(args) -> int:
    eras = tuple(args.era or ERAS)
    try:
        rows = compat_matrix(eras, tuple(TYPES), tuple(args.devices), (True, False), args.head_dim, args.n_head,
                             args.n_head_kv, args.n_tokens, args.fa_quants, args.fa_all_quants)
    except ValueError as e:
        print(f"kvlab compat: {e}", file=sys.stderr)
        return 2
    if args.format == "json":
        for r in rows:
            print(json.dumps(r.to_dict()))
        return 0
    cell = {(r.era, r.rotation, r.type_k, r.type_v, r.devices): _CODES[r.outcome] for r in rows}
    print("cell = outcome per device count " + "/".join(map(str, args.devices)) + ": "
          + ", ".join(f"{v} {k}" for k, v in _CODES.items()))
    for era in eras:
        for rot in (True, False):
            print(f"\n{era} ({ERAS[era].source}), rotation {'on' if rot else 'off'}; rows K, columns V")
            print(" " * 7 + "".join(f"{v:>{len(args.devices) + 2}}" for v in TYPES))
            for k in TYPES:
                codes = ["".join(cell[(era, rot, k, v, n)] for n in args.devices) for v in TYPES]
                print(f"{k:<7}" + "".join(f"{c:>{len(args.devices) + 2}}" for c in codes))
    stops = sorted({(r.era, r.split) for r in rows if r.split})
    if stops:
        print("\nsplit aborts (with the init guard removed):")
        for era, what in stops:
            print(f"  {era}: {what}")
    return 0
