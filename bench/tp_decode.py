"""Decode-step time of a tensor-parallel attention layer stack (kvlab.tp), one JSON line per figure.

    torchrun --nproc-per-node N bench/tp_decode.py [options]     world size N (GPU = local rank, NCCL)
    python bench/tp_decode.py [options]                          world size 1
    python bench/tp_decode.py --nproc N [options]                N local ranks spawned here (gloo on CPU)

The layer is a realistic one (32 heads, 8 KV heads, head_dim 128, n_embd 4096), stacked --layers deep;
each K/V type pair of kvlab.tp.PAIRS runs with rotation on and off, at each context length. One decode
step = one token through every layer: this rank's Q/K/V projections, rope, rotation, set_rows into its
cache shard (kvlab's kernels), attention over its dequantized shard (n_kv padded to 256, as llama.cpp
reads the cache), un-rotation, its wo columns and the all-reduce. The cache holds `context` random rows
before the timed steps. Weights are f16 on GPU, f32 on CPU; the math is kvlab.tp's fast path (torch matmuls).
`step_ms` is the median over --steps steps after --warmup, measured on rank 0 with the device synchronized.
Defaults: GPU contexts 4k..64k, 4 layers, 20 steps after 3; CPU contexts 256..4096, 2 layers, 5 steps after 1
(under 15 s on 2 cores).
Compare lines of one run, or runs on the same device kind, only.
"""
import argparse
from dataclasses import replace
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from kvlab.tp import PAIRS, ROTATIONS
from kvlab.tp.dist import init_distributed, spawn
from kvlab.tp.model import TPConfig, build_layers, decode_step, fill_past, randn, reset_caches

SPARE_CELLS = 256     # room for the warm-up and timed tokens after the context


def run(args: argparse.Namespace) -> None:
    d = init_distributed(args.device, args.backend)
    try:
        gpu = d.device.type == "cuda"
        contexts = [int(c) for c in (args.contexts or ("4096,8192,16384,32768,65536" if gpu else "256,1024,4096")
                                     ).split(",")]
        n_layers = args.layers or (4 if gpu else 2)
        steps, warmup = args.steps or (20 if gpu else 5), args.warmup if args.warmup is not None else (3 if gpu else 1)
        if warmup + steps > SPARE_CELLS:
            raise ValueError(f"--warmup + --steps must be at most {SPARE_CELLS}, got {warmup} + {steps}")
        base = TPConfig(head_dim=128, n_head=32, n_head_kv=8, n_layers=n_layers, exact=False,
                        flavor=args.flavor or ("cuda" if gpu else "cpu"))
        device_name = torch.cuda.get_device_name(d.device) if gpu else "cpu"
        with torch.no_grad():
            weight_dtype = torch.float16 if gpu else torch.float32
            layers = build_layers(base, d.world, d.rank, d.device, seed=1, dtype=weight_dtype)
            past = randn((max(contexts), base.n_head_kv * base.head_dim), 2).to(d.device)   # (cells, n_kv values)
            x0 = randn((1, base.width), 3).to(d.device)
            for pair in args.pairs.split(","):
                type_k, type_v = pair.split("/")
                for rotation in ROTATIONS[args.rotation]:
                    for context in contexts:
                        cfg = replace(base, type_k=type_k, type_v=type_v, rotation=rotation,
                                      cells=-(-(context + SPARE_CELLS) // 256) * 256)
                        row = measure(cfg, d, layers, past[:context], x0, warmup, steps)
                        if d.rank == 0:
                            print(json.dumps(dict(bench="tp_decode", world_size=d.world, backend=d.backend,
                                                  device=device_name, type_k=type_k, type_v=type_v,
                                                  rotation=rotation, rot_k=cfg.plan.k, rot_v=cfg.plan.v,
                                                  flavor=cfg.flavor, context=context, n_layers=n_layers, **row)),
                                  flush=True)
    finally:
        dist.destroy_process_group()


def measure(cfg: TPConfig, d, layers: list, past: torch.Tensor, x0: torch.Tensor, warmup: int, steps: int) -> dict:
    reset_caches(cfg, layers, d.world, d.device)
    for L in layers:
        fill_past(L, past, past)
    context = past.shape[0]
    times = []
    for i in range(warmup + steps):
        d.sync()
        t0 = time.perf_counter()
        decode_step(cfg, layers, x0, context + i, d.all_reduce)
        d.sync()
        times.append(time.perf_counter() - t0)
    step = statistics.median(times[warmup:])
    kv_bytes = sum(L.cache_k.raw.numel() + L.cache_v.raw.numel() for L in layers)
    return dict(step_ms=round(step * 1e3, 4), layer_ms=round(step * 1e3 / cfg.n_layers, 4),
                step_ms_min=round(min(times[warmup:]) * 1e3, 4), tokens_per_s=round(1 / step, 2),
                kv_bytes_rank0=kv_bytes, warmup_first_ms=round(times[0] * 1e3, 2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--backend", default="auto", choices=("auto", "nccl", "gloo"))
    p.add_argument("--nproc", type=int, default=None, help="spawn N local ranks (not under torchrun)")
    p.add_argument("--contexts", default=None, help="comma-separated context lengths")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--pairs", default=",".join(PAIRS))
    p.add_argument("--rotation", default="both", choices=tuple(ROTATIONS))
    p.add_argument("--steps", type=int, default=None, help="timed steps (default GPU 20, CPU 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default GPU 3, CPU 1)")
    p.add_argument("--flavor", default=None, choices=("ref", "cpu", "cuda"))
    args = p.parse_args(argv)
    if args.nproc is not None and "RANK" not in os.environ:
        spawn(args.nproc, run, args)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
