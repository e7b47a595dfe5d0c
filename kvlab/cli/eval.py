"""`kvlab eval`: KL divergence and PPL change of K/V cache types on a causal LM (kvlab.hf.evaluate)."""
from dataclasses import asdict
import json

from kvlab.hf.evaluate import (EvalConfig, evaluate, format_table, load_local_model, parse_pairs, tiny_llama)
from kvlab.hf.evaluate import __doc__ as eval_doc


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="KL divergence / PPL change of K/V cache types on a causal LM",
                              description=eval_doc.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR", help="local transformers model directory (read offline)")
    src.add_argument("--tiny", action="store_true", help="a tiny random Llama, UTF-8 bytes as tokens (tests, CI)")
    p.add_argument("--text", required=True, metavar="FILE", help="text file to evaluate on")
    p.add_argument("--pairs", nargs="+", default=["q8_0/q8_0", "q4_0/q4_0"], metavar="K/V",
                   help="K/V type pairs, e.g. q4_0/q8_0; T for T/T; all for the 81 pairs (default: %(default)s)")
    p.add_argument("--base", default="f16", help="reference cache type (both K and V) or 'dynamic' for "
                   "transformers' own cache (default: %(default)s)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default: %(default)s)")
    p.add_argument("--batch", type=int, default=None, help="tokens per forward pass (default: ctx)")
    p.add_argument("--chunks", type=int, default=None, help="evaluate at most this many chunks")
    p.add_argument("--flavor", default="ref", choices=["ref", "cpu", "cuda"], help="ggml code path of the bytes")
    rot = p.add_mutually_exclusive_group()
    rot.add_argument("--rotation", dest="rotation", action="store_true", default=None, help="force the rotation on")
    rot.add_argument("--no-rotation", dest="rotation", action="store_false", help="as LLAMA_ATTN_ROT_DISABLE=1")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model dtype")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--json", metavar="FILE", help="also write the summaries as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch
    try:
        pairs = parse_pairs(args.pairs)
        config = EvalConfig(n_ctx=args.ctx, n_batch=args.batch, n_chunks=args.chunks, flavor=args.flavor,
                            rotation=args.rotation, base=args.base)
    except ValueError as err:
        raise SystemExit(f"kvlab eval: {err}")
    with open(args.text, encoding="utf-8", errors="replace") as f:
        text = f.read()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        model = tiny_llama().to(device=device, dtype=getattr(torch, args.dtype))
        tokens, bos_id = list(text.encode("utf-8")), None
    else:
        model, tokenize, bos_id = load_local_model(args.model, args.dtype, device)
        tokens = tokenize(text)
    result = evaluate(model, tokens, pairs, config, bos_id=bos_id, progress=not args.quiet)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": asdict(config), "n_chunks": result.n_chunks, "pairs": result.summaries()}, f, indent=1)
    return 0
