"""`kvlab eval`: KL divergence and PPL change of K/V cache types on a causal LM (kvlab.hf.evaluate)."""
from dataclasses import asdict
from itertools import product
import json
from pathlib import Path

from kvlab._io import write_text
from kvlab.cli.options import (UsageError, add_cache_types, add_command, add_device_option, check_device, flavor,
                               pair_list, positive_int, readable_file, type_list, writable_file)

DEFAULT_PAIRS = "q8_0/q8_0,q4_0/q4_0"


def register(subparsers) -> None:
    p = add_command(subparsers, "eval", help="KL divergence / PPL change of K/V cache types on a causal LM",
                    description="What K/V cache type pairs do to a causal LM's next-token distribution, measured "
                                "as llama-perplexity --kl-divergence does (kvlab.hf.evaluate says what matches "
                                "llama.cpp). Needs torch and transformers: pip install 'kvlab[hf]'.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR", help="local transformers model directory (read offline)")
    src.add_argument("--tiny", action="store_true", help="a tiny random Llama, UTF-8 bytes as tokens (tests, CI)")
    p.add_argument("--text", required=True, metavar="FILE", help="text file to evaluate on")
    p.add_argument("--pairs", type=pair_list, default=DEFAULT_PAIRS, metavar="K/V,K/V",
                   help="K/V type pairs, e.g. q4_0/q8_0,q8_0 (T for T/T), or all for the 81 pairs")
    add_cache_types(p, type_list, None, "types: with -ctk and/or -ctv, the pairs are every K x V type "
                                        "(the other side f16) instead of --pairs", "TYPES")
    p.add_argument("--base", default="f16", help="reference cache type (both K and V) or 'dynamic' for "
                   "transformers' own cache")
    p.add_argument("-c", "--ctx-size", "--ctx", dest="ctx", type=positive_int, default=512, metavar="N",
                   help="tokens per chunk, as llama-perplexity's -c")
    p.add_argument("-b", "--batch-size", "--batch", dest="batch", type=positive_int, default=None, metavar="N",
                   help="tokens per forward pass, as llama-perplexity's -b (default: --ctx-size)")
    p.add_argument("--chunks", type=positive_int, default=None, metavar="N",
                   help="evaluate at most this many chunks (default: every whole chunk)")
    p.add_argument("--flavor", type=flavor, default="ref", help="ggml code path of the bytes: ref, cpu or cuda")
    rot = p.add_mutually_exclusive_group()
    rot.add_argument("--rotation", dest="rotation", action="store_true", default=None,
                     help="force the rotation on (default: llama.cpp's gate)")
    rot.add_argument("--no-rotation", dest="rotation", action="store_false", help="as LLAMA_ATTN_ROT_DISABLE=1")
    p.add_argument("--attention", default="model", choices=["model", "ggml-cpu", "ggml-cuda"],
                   help="model: the model's own exact attention on the dequantized cache; ggml-cpu / ggml-cuda: "
                        "read the cache as ggml's flash attention does (kvlab.hf.attention; slower)")
    p.add_argument("--k-order", default="model", choices=["model", "gguf"],
                   help="gguf: store K heads in llama.cpp's channel order for a Llama-family GGUF (Q/K permuted "
                        "for RoPE), so the blocks match llama.cpp's cache")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model dtype")
    add_device_option(p)
    p.add_argument("--json", metavar="FILE", help="also write the summaries as JSON")
    p.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def _pairs(args) -> list:
    if args.type_k is None and args.type_v is None:
        return list(args.pairs)
    return list(product(args.type_k or ("f16",), args.type_v or ("f16",)))


def run(args) -> int:
    try:   # kvlab.hf loads torch and transformers, which the light install (make report) leaves out
        from kvlab.hf.evaluate import EvalConfig
    except ImportError as e:
        raise UsageError(f"needs torch and transformers ({e}): pip install 'kvlab[hf]'") from None
    try:
        config = EvalConfig(n_ctx=args.ctx, n_batch=args.batch, n_chunks=args.chunks, flavor=args.flavor,
                            rotation=args.rotation, base=args.base, k_order=args.k_order, attention=args.attention)
    except ValueError as e:
        raise UsageError(e) from None
    text = readable_file(args.text, "--text").read_text(encoding="utf-8", errors="replace")
    if args.model and not (Path(args.model) / "config.json").is_file():
        raise UsageError(f"--model {args.model}: not a transformers model directory (no config.json)")
    if args.json:
        writable_file(args.json, "--json", (".json",))
    check_device(args.device)
    return _evaluate(args, config, _pairs(args), text)


def _evaluate(args, config, pairs, text) -> int:
    import torch
    from kvlab.hf.evaluate import evaluate, format_table, load_local_model, tiny_llama
    from kvlab._xp import resolve_device
    device = resolve_device(args.device) or torch.device("cpu")
    if args.tiny:
        model = tiny_llama().to(device=device, dtype=getattr(torch, args.dtype))
        tokens, bos_id = list(text.encode("utf-8")), None
    else:
        model, tokenize, bos_id = load_local_model(args.model, args.dtype, device)
        tokens = tokenize(text)
    result = evaluate(model, tokens, pairs, config, bos_id=bos_id, progress=not args.no_progress)
    print(format_table(result))
    if args.json:
        write_text(args.json, json.dumps({"config": asdict(config), "n_chunks": result.n_chunks,
                                          "pairs": result.summaries()}, indent=1))
    return 0
