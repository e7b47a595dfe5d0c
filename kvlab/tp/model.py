"""Tensor parallelism for real: llama.cpp's attention block sharded over torch.distributed ranks.

Each rank owns what kvlab.split's static states give its device (llama.cpp's granularity rule with the
per-layer remainder rotation): the rows of attn_q/k/v.weight of its heads, its shard of every layer's K/V
cache (cache rows cut on ggml dim 0, whole KV heads) and the matching columns of attn_output.weight.
One decode token on one rank: project x to its Q/K/V heads, rope, rotate (rotation_plan), write K/V into
its cache shard with kvlab.set_rows (kvlab's kernels: Numba on CPU, Numba CUDA on GPU), attend over its
dequantized shard (n_kv padded to 256 and masked, as llama.cpp reads the cache), un-rotate, multiply by
its wo columns: a PARTIAL sum (the split model's local state of attn_out), all-reduced (gloo or NCCL).

Contractions run one of two ways (TPConfig.exact):
  exact  float32 products taken exactly in float64 and summed by a fixed pairwise tree of elementwise adds,
         so every element is computed the same way whatever the shard's shape and on any device; results
         are rounded to float32 where ggml stores float32. `check` uses it: the gathered cache bytes must
         equal the single-process run's, the heads (input of wo) must be bitwise equal, and the output must
         lie within kvlab.split.sharded's all-reduce bound (world + 2) * 2**-24 * sum_k |wo[m, k] attn[k]|.
  fast   torch matmuls in the weights' dtype (f16 on GPU): what bench/tp_decode.py times.

    torchrun --nproc-per-node N -m kvlab.tp [options]    one process per rank (GPU = local rank, NCCL)
    python -m kvlab.tp --nproc N [options]                the same, spawned here on a free localhost port
    python -m kvlab.tp --nproc 2 --device cuda --backend gloo    two ranks sharing one GPU (no NCCL)
Each check prints one JSON line (cache_equal, heads_mismatch, within_bound, ok, ...); the exit code is 1
unless every line is ok. NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and friends are set before the
group starts).
"""
import argparse
from dataclasses import dataclass
from datetime import timedelta
import json
import os
import socket

import numpy as np
import torch
import torch.distributed as dist

from kvlab.quant import QTensor, dequantize, empty_cache, set_rows
from kvlab.rotation import rotate, rotation_plan
from kvlab.split.attention import BlockConfig, build_attention_block
from kvlab.split.infer import trace
from kvlab.split.sharded import U32, cut
from kvlab.split.state import Axis, SplitError
from kvlab.types import TYPES
from kvlab.tp import ROTATIONS

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
FA_PAD = 256          # llama.cpp's get_n_kv: flash attention reads the cache in multiples of 256 cells


@dataclass(frozen=True)
class TPConfig:
    """The model (a stack of attention layers) and how it is computed."""
    head_dim: int = 128
    n_head: int = 32
    n_head_kv: int = 8
    n_embd: int | None = None     # default n_head * head_dim
    n_layers: int = 2
    cells: int = 256              # KV cache rows per layer
    type_k: str = "f16"
    type_v: str = "f16"
    rotation: bool = True         # False = LLAMA_ATTN_ROT_DISABLE=1
    flavor: str = "ref"           # which ggml code path's bytes set_rows writes
    era: str = "pr23792"
    exact: bool = True
    rope_base: float = 10000.0

    def __post_init__(self):
        for t in (self.type_k, self.type_v):
            if t not in TYPES:
                raise ValueError(f"unknown cache type {t!r}: expected one of {', '.join(TYPES)}")
        if self.cells % FA_PAD:
            raise ValueError(f"cells ({self.cells}) must be a multiple of {FA_PAD} (llama.cpp pads n_kv to it)")

    @property
    def width(self) -> int:
        return self.n_embd or self.n_head * self.head_dim

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv

    @property
    def plan(self):
        return rotation_plan(self.type_k, self.type_v, self.head_dim, disable=not self.rotation)

    def block(self, n_devices: int, layer: int) -> BlockConfig:
        return BlockConfig(head_dim=self.head_dim, n_head=self.n_head, n_head_kv=self.n_head_kv,
                           n_devices=n_devices, type_k=self.type_k, type_v=self.type_v, n_tokens=1,
                           n_kv=self.cells, rotation=self.rotation, era=self.era, layer=layer, n_embd=self.n_embd)


# --- which rows each rank owns --------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """One rank's part of one layer, as global indices along each tensor's split dim."""
    q: np.ndarray     # rows of attn_q.weight = columns of attn_output.weight = values of its Q heads
    kv: np.ndarray    # rows of attn_k/v.weight = values of a K/V cache row


def layer_shard(cfg: TPConfig, layer: int, world: int, rank: int) -> Shard:
    """The rows `rank` owns in layer `layer`, from the static split states llama.cpp gives the weights."""
    block = build_attention_block(cfg.block(world, layer))

    def owned(name):
        t = block.graph.find(name)
        s = block.static_states[id(t)]
        return cut(np.arange(t.ne[int(s.axis)]), s, rank, 0)

    q, o = owned(f"blk.{layer}.attn_q.weight"), owned(f"blk.{layer}.attn_output.weight")
    kv = [owned(n) for n in (f"blk.{layer}.attn_k.weight", f"blk.{layer}.attn_v.weight",
                             f"cache_k_l{layer}", f"cache_v_l{layer}")]
    hd = cfg.head_dim
    same_kv = all(np.array_equal(kv[0], other) for other in kv[1:])
    groups = np.unique(q // (hd * cfg.n_gqa)), np.unique(kv[0] // hd)
    if not (same_kv and np.array_equal(q, o) and np.array_equal(*groups) and q.size % hd == 0):
        raise SplitError(f"layer {layer}, rank {rank}/{world}: the split states do not give the rank whole GQA "
                         f"groups (Q heads {np.unique(q // hd)}, KV heads {np.unique(kv[0] // hd)})",
                         node=f"blk.{layer}", op="NONE", rule="Q, K, V, cache and wo shards hold the same heads")
    return Shard(q, kv[0])


def validate(cfg: TPConfig, world: int) -> None:
    """Raise what llama.cpp would refuse (init guard, a split rule) and insist the output is PARTIAL."""
    for layer in range(min(world, cfg.n_layers)):      # the remainder rotation repeats every `world` layers
        block = build_attention_block(cfg.block(world, layer))
        if block.init_error is not None:
            raise block.init_error
        tr = trace(block.graph, block.era, world, block.static_states)
        if tr.error is not None:
            raise tr.error
        if world > 1 and tr.nodes[-1].local.axis != Axis.PARTIAL:
            raise SplitError(f"attn_out-{layer} is {tr.nodes[-1].local.describe()} on each device, not PARTIAL",
                             node=f"attn_out-{layer}", op="MUL_MAT", rule="the output projection is all-reduced")


# --- one rank's layers ----------------------------------------------------------------------------------

@dataclass
class RankLayer:
    index: int
    shard: Shard
    wq: torch.Tensor      # (n_q, n_embd)    torch order (out, in): ggml ne = [n_embd, n_q]
    wk: torch.Tensor      # (n_kv, n_embd)
    wv: torch.Tensor      # (n_kv, n_embd)
    wo: torch.Tensor      # (n_embd, n_q)
    cache_k: QTensor | None = None   # (cells, n_kv) values of this rank's KV heads
    cache_v: QTensor | None = None


def randn(shape, seed: int) -> torch.Tensor:
    """Deterministic float32 normals, made on the CPU so every rank and device sees the same values."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def build_layers(cfg: TPConfig, world: int, rank: int, device, seed: int = 0, dtype=torch.float32) -> list:
    """This rank's weights of every layer (each rank draws the full matrices, then keeps its rows);
    caches come from reset_caches."""
    hd, width = cfg.head_dim, cfg.width
    layers = []
    for il in range(cfg.n_layers):
        sh = layer_shard(cfg, il, world, rank)
        full = [randn(shape, seed * 1000 + il * 10 + j) / np.sqrt(shape[1]) for j, shape in enumerate(
            ((cfg.n_head * hd, width), (cfg.n_head_kv * hd, width), (cfg.n_head_kv * hd, width),
             (width, cfg.n_head * hd)))]
        wq, wk, wv = (w[torch.from_numpy(rows)] for w, rows in zip(full, (sh.q, sh.kv, sh.kv)))
        wo = full[3][:, torch.from_numpy(sh.q)]
        layers.append(RankLayer(il, sh, *(w.to(device, dtype).contiguous() for w in (wq, wk, wv, wo))))
    return layers


def reset_caches(cfg: TPConfig, layers: list, world: int, device) -> None:
    """Fresh zeroed K/V cache shards of cfg's types and cells for every layer."""
    validate(cfg, world)
    for L in layers:
        for side, type_ in (("k", cfg.type_k), ("v", cfg.type_v)):
            c = empty_cache(cfg.cells, L.shard.kv.size, type_, cfg.flavor)
            setattr(L, f"cache_{side}", QTensor(torch.from_numpy(c.raw).to(device), c.type, c.shape, c.flavor))


def fill_past(L: RankLayer, past_k: torch.Tensor, past_v: torch.Tensor) -> None:
    """Write global past rows (n_past, n_head_kv * head_dim) into cells 0..n_past-1 of the rank's shard."""
    cols = torch.from_numpy(L.shard.kv).to(past_k.device)
    rows = np.arange(past_k.shape[0])
    set_rows(L.cache_k, rows, past_k.index_select(1, cols).contiguous())
    set_rows(L.cache_v, rows, past_v.index_select(1, cols).contiguous())


# --- the math of one decode token -----------------------------------------------------------------------

def tree_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over `dim` by a fixed pairwise tree of elementwise adds (zero-padded to a power of two): each
    output element gets the same roundings whatever the tensor's shape, thread count or device."""
    x = x.movedim(dim, -1)
    size = 1 << max(0, (x.shape[-1] - 1).bit_length())
    x = torch.nn.functional.pad(x, (0, size - x.shape[-1]))
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x[..., 0]


def matmul(a: torch.Tensor, b: torch.Tensor, exact: bool) -> torch.Tensor:
    """a (..., m, k) @ b (..., k, n): exact -> float64 by tree_sum (float32 products are exact in float64);
    fast -> torch's matmul in b's dtype. Callers round with .float() where ggml stores float32."""
    if exact:
        return tree_sum(a.double().unsqueeze(-1) * b.double().unsqueeze(-3), dim=-2)   # (..., m, k, n) -> (..., m, n)
    return a.to(b.dtype) @ b


def rope(x: torch.Tensor, pos: int, base: float) -> torch.Tensor:
    """ggml rope, normal mode, n_rot = head_dim: pairs (2i, 2i+1) turn by pos * base**(-2i/head_dim)."""
    hd = x.shape[-1]
    theta = pos * base ** (-np.arange(0, hd, 2) / hd)                      # (hd/2,) float64, same on every rank
    cos, sin = (torch.from_numpy(f(theta)).to(x.device) for f in (np.cos, np.sin))
    x = x.double()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).reshape(x.shape).float()


def cache_rows(cache: QTensor, n: int) -> torch.Tensor:
    """The first n rows of a cache, dequantized: (n, row_len) float32 on the cache's device."""
    return dequantize(QTensor(cache.raw[:n], cache.type, (n, cache.shape[1]), cache.flavor))


def attend(cfg: TPConfig, q: torch.Tensor, L: RankLayer, pos: int) -> torch.Tensor:
    """Flash attention of one token over the rank's cache shard: q (n_heads, hd) -> (1, n_heads * hd)."""
    hd, n_kv_heads = cfg.head_dim, L.shard.kv.size // cfg.head_dim
    n_kv = min(cfg.cells, -(-(pos + 1) // FA_PAD) * FA_PAD)
    keys = cache_rows(L.cache_k, n_kv).reshape(n_kv, n_kv_heads, hd).permute(1, 2, 0)     # (Hkv, hd, n_kv)
    vals = cache_rows(L.cache_v, n_kv).reshape(n_kv, n_kv_heads, hd).permute(1, 0, 2)     # (Hkv, n_kv, hd)
    scores = matmul(q.reshape(n_kv_heads, cfg.n_gqa, hd), keys, cfg.exact) * hd ** -0.5  # (Hkv, n_gqa, n_kv)
    scores[..., pos + 1:] = -torch.inf                                                    # the KQ mask
    p = torch.exp(scores - scores.amax(-1, keepdim=True))
    total = tree_sum(p, -1) if cfg.exact else p.sum(-1)
    return (matmul(p, vals, cfg.exact) / total[..., None]).float().reshape(1, -1)


def layer_step(cfg: TPConfig, L: RankLayer, x: torch.Tensor, pos: int, all_reduce) -> tuple:
    """One decode token at position `pos` through one layer on this rank.
    x: (1, n_embd) float32, the same on every rank. Returns (attn_out after all_reduce, heads = wo's input)."""
    hd, plan = cfg.head_dim, cfg.plan
    q, k, v = (matmul(x, w.T, cfg.exact).float().reshape(-1, hd) for w in (L.wq, L.wk, L.wv))  # (heads, hd) each
    q, k = rope(q, pos, cfg.rope_base), rope(k, pos, cfg.rope_base)
    if plan.k:
        q, k = rotate(q, plan.k), rotate(k, plan.k)
    if plan.v:
        v = rotate(v, plan.v)
    set_rows(L.cache_k, np.array([pos]), k.reshape(1, -1))   # one cache row: (1, n_kv_heads * hd)
    set_rows(L.cache_v, np.array([pos]), v.reshape(1, -1))
    heads = attend(cfg, q, L, pos)                            # (1, n_heads * hd)
    if plan.v:
        heads = rotate(heads, plan.v)                         # H @ H = I: back from the rotated V space
    out = matmul(heads, L.wo.T, cfg.exact).float()           # (1, n_embd): this rank's PARTIAL sum
    return all_reduce(out), heads


def decode_step(cfg: TPConfig, layers: list, x: torch.Tensor, pos: int, all_reduce) -> torch.Tensor:
    """One token through the stack, residual stream x -> x + attn_out per layer."""
    for L in layers:
        x = x + layer_step(cfg, L, x, pos, all_reduce)[0]
    return x


# --- the process group ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device
    backend: str

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather(self, obj) -> list | None:
        """Every rank's obj, in rank order, on rank 0 (None elsewhere)."""
        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: float = 120.0) -> Dist:
    """Join the group torchrun (or spawn) described in the environment, or form a group of one.
    device: "cuda" (GPU = LOCAL_RANK modulo the GPUs there are), "cpu" or "auto" (cuda when there is one);
    backend: "nccl" (one rank per GPU), "gloo" (CPU, or several ranks sharing GPUs) or "auto" (nccl on GPU)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if backend not in ("auto", "nccl", "gloo"):
        raise ValueError(f"backend must be 'auto', 'nccl' or 'gloo', got {backend!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' asked for, but torch sees no CUDA GPU")
    backend = backend if backend != "auto" else "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not use_cuda:
        raise ValueError("the nccl backend needs device='cuda'")
    os.environ.update(NO_MULTICAST)
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    local = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        import numba
        dev = torch.device("cpu")
        threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(threads)                 # ranks share the cores
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return Dist(dist.get_rank(), dist.get_world_size(), dev, backend)


def _spawned(rank: int, world: int, port: int, results, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    value = fn(*args)
    if rank == 0:
        results.put(value)


def spawn(nproc: int, fn, *args):
    """Run fn(*args) in nproc fresh local processes that form one group; rank 0's return value.
    A failing rank stops the others and re-raises here (torch.multiprocessing's ProcessContext)."""
    import torch.multiprocessing as mp
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive int, got {nproc!r}")
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_spawned, args=(nproc, free_port(), results, fn, args), nprocs=nproc, join=True,
                       start_method="spawn")
    return results.get()


# --- the check: sharded run vs the single-process run ---------------------------------------------------

def _assemble_cache(parts: list, shards: list, type_name: str) -> np.ndarray:
    """Global cache bytes (cells, row_bytes) from each rank's (cells, shard row_bytes), by block index."""
    info = TYPES[type_name]
    cells = parts[0].shape[0]
    n_blocks = sum(s.kv.size for s in shards) // info.block_size
    full = np.zeros((cells, n_blocks, info.type_size), np.uint8)                     # (cells, blocks, type_size)
    for part, s in zip(parts, shards):
        full[:, s.kv[::info.block_size] // info.block_size] = part.reshape(cells, -1, info.type_size)
    return full.reshape(cells, -1)


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
                wo = single[il].wo.cpu().numpy().astype(np.float64)                            # (n_embd, n_q)
                bound = (d.world + 2) * U32 * (np.abs(want_heads.astype(np.float64)) @ np.abs(wo).T)  # (1, n_embd)
                diff = np.abs(out.cpu().numpy().astype(np.float64) - want_out)
                res["within_bound"] &= bool(np.all(diff <= bound))
                res["max_abs_diff"] = max(res["max_abs_diff"], float(diff.max()))
                res["max_diff_over_bound"] = max(res["max_diff_over_bound"], float((diff / bound).max()))
        for side in ("k", "v"):
            parts = d.gather(getattr(layers[il], f"cache_{side}").raw.cpu().numpy())
            if single is not None:
                want = getattr(single[il], f"cache_{side}")
                got = _assemble_cache(parts, shards, want.type)
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

