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

The process group is kvlab.tp.dist; the check against one process, kvlab.tp.check (`kvlab tp`).
"""
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from kvlab.quant import QTensor, dequantize, empty_cache, set_rows
from kvlab.rope import rope
from kvlab.rotation import rotate
from kvlab.shape import HeadShape
from kvlab.split.attention import BlockConfig, build_attention_block
from kvlab.split.sharded import cut
from kvlab.split.state import Axis, SplitError, SplitState
from kvlab.types import TYPES

FA_PAD = 256          # llama.cpp's get_n_kv: flash attention reads the cache in multiples of 256 cells


@dataclass(frozen=True)
class TPConfig(HeadShape):
    """The model (a stack of attention layers of HeadShape's heads) and how it is computed."""
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
        super().__post_init__()
        for t in (self.type_k, self.type_v):
            if t not in TYPES:
                raise ValueError(f"unknown cache type {t!r}: expected one of {', '.join(TYPES)}")
        if self.cells % FA_PAD:
            raise ValueError(f"cells ({self.cells}) must be a multiple of {FA_PAD} (llama.cpp pads n_kv to it)")

    @cached_property
    def layer_config(self) -> BlockConfig:
        """One layer as kvlab.split builds it (its width and rotation are the model's)."""
        return self.block(1, 0)

    @property
    def width(self) -> int:
        return self.layer_config.width

    @property
    def plan(self):
        return self.layer_config.plan

    def block(self, n_devices: int, layer: int) -> BlockConfig:
        return BlockConfig(**self.head_fields(), n_devices=n_devices, type_k=self.type_k, type_v=self.type_v,
                           n_tokens=1, n_kv=self.cells, rotation=self.rotation, era=self.era, layer=layer,
                           n_embd=self.n_embd)


# --- which rows each rank owns --------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """One rank's part of one layer, as global indices along each tensor's split dim."""
    q: np.ndarray     # rows of attn_q.weight = columns of attn_output.weight = values of its Q heads
    kv: np.ndarray    # rows of attn_k/v.weight = values of a K/V cache row
    kv_state: SplitState   # the K/V caches' split state (kvlab.split.sharded.gather_cache reassembles them)


def layer_shard(cfg: TPConfig, layer: int, world: int, rank: int) -> Shard:
    """The rows `rank` owns in layer `layer`, from the static split states llama.cpp gives the weights."""
    block = build_attention_block(cfg.block(world, layer))

    def state(name):
        return block.static_states[id(block.graph.find(name))]

    def owned(name):
        s = state(name)
        return cut(np.arange(block.graph.find(name).ne[int(s.axis)]), s, rank, 0)

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
    return Shard(q, kv[0], state(f"cache_k_l{layer}"))


def validate(cfg: TPConfig, world: int) -> None:
    """Raise what llama.cpp would refuse (init guard, a split rule) and insist the output is PARTIAL."""
    for layer in range(min(world, cfg.n_layers)):      # the remainder rotation repeats every `world` layers
        block = build_attention_block(cfg.block(world, layer))
        if block.init_error is not None:
            raise block.init_error
        tr = block.trace()
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
    q, k = rope(q, pos, cfg.rope_base), rope(k, pos, cfg.rope_base)     # ggml normal mode, n_rot = head_dim
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
