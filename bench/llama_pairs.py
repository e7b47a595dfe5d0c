"""kvlab against a real llama.cpp on all 81 K/V pairs (kvlab.ggml.llama_check), one JSON line per row.

    python bench/llama_pairs.py [--ctx 256] [--chunks 8] [--models 64,128] [--pairs all] > llama_pairs.jsonl

Per model (head_dim), rotation (llama.cpp's default gate, LLAMA_ATTN_ROT_DISABLE=1) and pair: llama.cpp's
mean KLD against its f16 cache and its noise, kvlab's with the model's exact attention and with ggml-cpu
attention, their ratios (with the paired noise), top-1 agreement, delta PPL, identical blocks per layer.
The last line is the summary: ordering per group, rows missing the goal, seconds.
Single-threaded on purpose (torch, Numba, llama.cpp): the figures do not depend on threads, and on a
shared machine one thread per process is the fastest.
"""
import os

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

from kvlab.ggml.llama_check import CheckConfig, ModelSpec, run_check  # noqa: E402
from kvlab.hf.evaluate import parse_pairs  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--models", default="64,128", help="head_dims, comma separated")
    p.add_argument("--pairs", nargs="+", default=["all"])
    args = p.parse_args()
    torch.set_num_threads(1)
    config = CheckConfig(models=tuple(ModelSpec(int(d)) for d in args.models.split(",")),
                         pairs=tuple(parse_pairs(args.pairs)), n_ctx=args.ctx, n_chunks=args.chunks)
    report = run_check(config, progress=lambda m, k, v, rot: print(f"{m} {k}/{v} rot={rot}", file=sys.stderr,
                                                                   flush=True))
    for row in report["rows"]:
        print(json.dumps(row), flush=True)
    print(json.dumps({"summary": True, "ordering": report["ordering"], "ok": report["ok"],
                      "missed": [f"{r['model']} {r['type_k']}/{r['type_v']} rot={r['rotation']}"
                                 for r in report["rows"] if not r["ok"]],
                      "seconds": report["seconds"], "config": report["config"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
