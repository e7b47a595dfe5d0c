"""The check of kvlab.tp: the sharded decode against the single-process run (`kvlab tp`, `python -m kvlab.tp`).

    torchrun --nproc-per-node N -m kvlab.tp [options]    one process per rank (GPU = local rank, NCCL)
    python -m kvlab.tp --nproc N [options]                the same, spawned here on a free localhost port
    python -m kvlab.tp --nproc 2 --device cuda --backend gloo    two ranks sharing one GPU (no NCCL)

With TPConfig(exact=True) the gathered cache bytes must equal the single-process run's, the heads (input
of wo) must be bitwise equal, and the output must lie within kvlab.split.sharded's all-reduce bound.
Each check prints one JSON line (cache_equal, heads_mismatch, within_bound, ok, ...); the exit code is 1
unless every line is ok.
"""
import argparse
import json

import numpy as np
import torch
import torch.distributed as dist

from kvlab.split.sharded import allreduce_bound, gather_cache
from kvlab.split.state import SplitError
from kvlab.tp import ROTATIONS
from kvlab.tp.dist import Dist, init_distributed
from kvlab.tp.model import TPConfig, build_layers, fill_past, layer_shard, layer_step, randn, reset_caches


def check(cfg: TPConfig, d: Dist, n_past: int = 40, n_steps: int = 2, seed: int = 0,
          ref_device: str = "cpu") -> dict | None:
    """Run n_steps decode tokens through every layer (fresh inputs per layer and token) on all ranks, and on
    rank 0 the single-process run on ref_device; compare. Returns the summary on rank 0, None elsewhere."""
    if not cfg.exact:
        raise ValueError("check needs TPConfig(exact=True): the fast path's matmuls round shard-dependently")
    if n_past + n_steps > cfg.cells:
        raise ValueError(f"n_past + n_steps ({n_past} + {n_steps}) exceeds the {cfg.cells} cache cells")
    layers = build_layers(cfg, d.world, d.rank, d.device, seed)
    reset_caches(cfg, layers, d.world, d.device)
    single = None
    if d.rank == 0:
        single = build_layers(cfg, 1, 0, ref_device, seed)
        reset_caches(cfg, single, 1, ref_device)
    hd_kv = cfg.n_head_kv * cfg.head_dim
    res = dict(cache_equal=True, heads_mismatch=0, within_bound=True, max_abs_diff=0.0, max_diff_over_bound=0.0,
               kv_heads=[])
    for il in range(cfg.n_layers):
        past = [randn((n_past, hd_kv), seed * 1000 + il * 10 + j) for j in (4, 5)]
        fill_past(layers[il], *(p.to(d.device) for p in past))
        if single is not None:
            fill_past(single[il], *(p.to(ref_device) for p in past))
        shards = [layer_shard(cfg, il, d.world, r) for r in range(d.world)]
        for step in range(n_steps):
            x = randn((1, cfg.width), seed * 1000 + il * 10 + 6 + step * 100)
            out, heads = layer_step(cfg, layers[il], x.to(d.device), n_past + step, d.all_reduce)
            parts = d.gather(heads.cpu().numpy())
            if single is not None:
                want_out, want_heads = (t.cpu().numpy() for t in
                                        layer_step(cfg, single[il], x.to(ref_device), n_past + step, lambda t: t))
                got_heads = np.zeros_like(want_heads)
                for part, s in zip(parts, shards):
                    got_heads[:, s.q] = part
                res["heads_mismatch"] += int(np.sum(got_heads.view(np.uint32) != want_heads.view(np.uint32)))
                bound = allreduce_bound(want_heads, single[il].wo.cpu().numpy(), d.world)   # (1, n_embd)
                diff = np.abs(out.cpu().numpy().astype(np.float64) - want_out)
                res["within_bound"] &= bool(np.all(diff <= bound))
                res["max_abs_diff"] = max(res["max_abs_diff"], float(diff.max()))
                res["max_diff_over_bound"] = max(res["max_diff_over_bound"], float((diff / bound).max()))
        for side in ("k", "v"):
            parts = d.gather(getattr(layers[il], f"cache_{side}").raw.cpu().numpy())
            if single is not None:
                want = getattr(single[il], f"cache_{side}")
                got = gather_cache(parts, want.type, shards[0].kv_state)
                res["cache_equal"] &= bool(np.array_equal(got, want.raw.cpu().numpy()))
        res["kv_heads"].append([s.kv.size // cfg.head_dim for s in shards])
    if single is None:
        return None
    res["heads_equal"] = res["heads_mismatch"] == 0
    res["ok"] = res["cache_equal"] and res["heads_equal"] and res["within_bound"]
    return res


def check_all(args: argparse.Namespace) -> list:
    """The worker of `python -m kvlab.tp`: every pair x rotation; rank 0 prints and returns JSON lines."""
    d = init_distributed(args.device, args.backend)
    flavor = args.flavor or ("cuda" if d.device.type == "cuda" else "cpu")
    rows = []
    try:
        with torch.no_grad():
            for pair in args.pairs.split(","):
                type_k, type_v = pair.split("/")
                for rot in ROTATIONS[args.rotation]:
                    cfg = TPConfig(head_dim=args.head_dim, n_head=args.n_head, n_head_kv=args.n_head_kv,
                                   n_embd=args.n_embd, n_layers=args.layers, cells=args.cells, type_k=type_k,
                                   type_v=type_v, rotation=rot, flavor=flavor, era=args.era, exact=True)
                    try:                # every rank refuses the same configs, before any collective
                        res = check(cfg, d, args.n_past, args.steps, args.seed, args.ref_device)
                    except SplitError as e:
                        res = dict(ok=False, error=str(e)) if d.rank == 0 else None
                    if res is not None:
                        row = dict(check="tp", world_size=d.world, backend=d.backend, device=str(d.device),
                                   ref_device=args.ref_device, era=cfg.era, type_k=type_k, type_v=type_v,
                                   rotation=rot, rot_k=cfg.plan.k, rot_v=cfg.plan.v, flavor=flavor,
                                   layers=cfg.n_layers, n_past=args.n_past, steps=args.steps, **res)
                        print(json.dumps(row), flush=True)
                        rows.append(row)
    finally:
        dist.destroy_process_group()
    return rows
