"""Run the attention block on N virtual devices exactly as the meta backend lays it out, and on one device.

Each device gets "simple tensors" as `ggml_backend_meta_buffer_init_tensor_impl` makes them: the split
dim shrinks to the device's count and every stride above it shrinks in proportion. Weights and caches
are cut from the global data by their split state; every op then runs on the device's own arrays, the
K/V caches are written per shard with `kvlab.set_rows` (ggml's bytes), and a PARTIAL result is summed
over the devices (the all-reduce). Comparing the gathered results with a one-device run shows whether
the states were right: cache bytes must be equal, the attention heads bitwise equal, and the output
equal up to the order of the all-reduce sum:

    |sharded - single| <= (n_devices + 2) * 2**-24 * sum_k |wo[m, k] * attn[n, k]|     (per element)

(every partial sum is rounded to float32 once and added in float32 n-1 times; the one-device value is
one float32 rounding of a float64 sum; |each partial| and |each running sum| are <= sum_k |w x|).
"""
from dataclasses import dataclass

import numpy as np
from numba import njit

from kvlab.quant import QTensor, dequantize, empty_cache, quantize, set_rows
from kvlab.rope import rope
from kvlab.rotation import hadamard, rotate
from kvlab.types import TYPES
from kvlab.split.attention import Block, BlockConfig, build_attention_block
from kvlab.split.graph import block_size, type_size
from kvlab.split.state import SplitState

U32 = 2.0 ** -24


@njit(cache=True)
def _mul_mat(a, b, out):
    """out[n, m] = sum_k a[m, k] * b[n, k], float64 accumulation in k order (same per element on any shard)."""
    for n in range(b.shape[0]):
        for m in range(a.shape[0]):
            acc = 0.0
            for k in range(a.shape[1]):
                acc += np.float64(a[m, k]) * np.float64(b[n, k])
            out[n, m] = np.float32(acc)


@njit(cache=True)
def _flash_attn(q, k, v, mask, scale, out):
    """q (H, T, D), k (Hkv, n_kv, D), v (Hkv, n_kv, Dv), mask (T, n_kv) -> out (T, H, Dv); float64 inside."""
    H, T, D = q.shape
    ratio = H // k.shape[0]
    n_kv = k.shape[1]
    s = np.empty(n_kv)
    for h in range(H):
        kh = h // ratio
        for t in range(T):
            top = -np.inf
            for c in range(n_kv):
                acc = 0.0
                for d in range(D):
                    acc += np.float64(q[h, t, d]) * np.float64(k[kh, c, d])
                s[c] = acc * scale + mask[t, c]
                top = max(top, s[c])
            total = 0.0
            for c in range(n_kv):
                s[c] = np.exp(s[c] - top) if s[c] > -np.inf else 0.0
                total += s[c]
            for d in range(v.shape[2]):
                acc = 0.0
                for c in range(n_kv):
                    acc += s[c] * np.float64(v[kh, c, d])
                out[t, h, d] = np.float32(acc / total)


def _layout(state: SplitState):
    """(segment, repeat, device, count) chunks along the split dim in global order."""
    for seg, r in zip(state.ne, state.nr):
        for _ in range(r):
            for j, n in enumerate(seg):
                yield j, n


def cut(x: np.ndarray, state: SplitState, j: int, dim: int) -> np.ndarray:
    """Device j's part of x along numpy axis `dim` (the ggml split axis), as ggml's set_tensor lays it out."""
    if not state.axis.is_dim:
        return x
    parts, start = [], 0
    for dev, n in _layout(state):
        if dev == j:
            parts.append(np.take(x, range(start, start + n), axis=dim))
        start += n
    return np.concatenate(parts, axis=dim)


def gather(parts: list, state: SplitState, dim: int) -> np.ndarray:
    """Inverse of cut: the global array from every device's part."""
    if not state.axis.is_dim:
        return parts[0]
    offsets = [0] * len(parts)
    chunks = []
    for dev, n in _layout(state):
        chunks.append(np.take(parts[dev], range(offsets[dev], offsets[dev] + n), axis=dim))
        offsets[dev] += n
    return np.concatenate(chunks, axis=dim)


class Device:
    """The simple tensors of one device (or of the single-device run when `states` is None)."""

    def __init__(self, j: int, states: dict | None, leaves: dict, flavor: str):
        self.j, self.states, self.leaves, self.flavor = j, states, leaves, flavor
        self.buffers = {}    # id(root tensor) -> flat float32 buffer, or QTensor for a typed cache
        self.geometry = {}   # id(tensor) -> (ne, nb, offset)

    def state(self, t):
        return None if self.states is None else self.states[id(t)]

    def local_ne_nb(self, t):
        """ggml_backend_meta_buffer_init_tensor_impl: shrink the split dim and the strides above it."""
        ne, nb = list(t.ne), list(t.nb)
        s = self.state(t)
        if s is not None and s.axis.is_dim:
            a = int(s.axis)
            ne[a] = s.device_ne(self.j)
            nb = [t.nb[i] * ne[a] // t.ne[a] if t.nb[i] > t.nb[a] else t.nb[i] for i in range(4)]
        return ne, nb

    def array(self, t) -> np.ndarray:
        """The device's data of t as a numpy view, numpy order (ne3, ne2, ne1, ne0)."""
        ne, nb, offs = self.geometry[id(t)]
        root = t.view_src or t
        buf = self.buffers[id(root)]
        if isinstance(buf, QTensor):
            buf = dequantize(buf).reshape(-1)   # (cells * row_len,)
        bs, ts = block_size(t.type), type_size(t.type)
        elems = [nb[i] * bs // ts if not (i == 0 and bs > 1) else 1 for i in range(4)]
        start = offs * bs // ts
        return np.lib.stride_tricks.as_strided(buf[start:], shape=tuple(reversed(ne)),
                                               strides=tuple(4 * e for e in reversed(elems)), writeable=False)

    def store(self, t, values: np.ndarray) -> None:
        ne, nb = self.local_ne_nb(t)
        values = np.ascontiguousarray(values, dtype=np.float32)
        if values.size != int(np.prod(ne)):
            raise RuntimeError(f"device {self.j}: {t.op} {t.name!r} produced {values.size} values for local ne {ne}")
        self.buffers[id(t)] = values.reshape(-1)
        self.geometry[id(t)] = (ne, nb, 0)

    def run(self, t) -> None:
        op = t.op
        ne, _ = self.local_ne_nb(t)
        if op not in ("NONE", "RESHAPE", "VIEW", "PERMUTE", "TRANSPOSE", "SET_ROWS") and 0 in ne:
            self.store(t, np.zeros(0, np.float32))   # a zero-sized slice: ggml clears the compute flag
        elif op == "NONE":
            self._leaf(t)
        elif op in ("RESHAPE", "VIEW", "PERMUTE", "TRANSPOSE"):
            ne, nb = self.local_ne_nb(t)
            self.geometry[id(t)] = (ne, nb, self._offset(t, ne))
        elif op == "MUL_MAT":
            self._mul_mat(t)
        elif op == "ROPE":
            n_rot, base = t.op_params
            pos = self.array(t.src[1]).reshape(-1)[:, None]                 # (T, 1) against x (1, T, H, D)
            self.store(t, rope(self.array(t.src[0]), pos, base, n_rot=n_rot))
        elif op == "CPY":       # ggml_cast to f16: round, keep as float32
            self.store(t, self.array(t.src[0]).astype(np.float16).astype(np.float32))
        elif op == "CONT":
            self.store(t, self.array(t.src[0]))
        elif op == "SET_ROWS":
            values, idx, dst = t.src
            self.geometry[id(t)] = self.geometry[id(dst)]
            if 0 in self.geometry[id(values)][0]:
                return
            rows = np.ascontiguousarray(self.array(values)[0, 0])        # (T, row_len)
            ids = self.array(idx).reshape(-1).astype(np.int64)
            set_rows(self.buffers[id(dst.view_src or dst)], ids, rows)
        elif op == "FLASH_ATTN_EXT":
            q, k, v, mask = (self.array(s) for s in t.src)
            out = np.empty((q.shape[2], q.shape[1], v.shape[3]), dtype=np.float32)   # (T, H, Dv)
            _flash_attn(np.ascontiguousarray(q[0]), np.ascontiguousarray(k[0]), np.ascontiguousarray(v[0]),
                        np.ascontiguousarray(mask[0, 0], dtype=np.float64), t.op_params[0], out)
            self.store(t, out)
        else:
            raise NotImplementedError(f"sharded execution of {op} is not modelled")

    def _offset(self, t, ne) -> int:
        """View offsets scale with the split unless they fall inside one device's slice (all 0 here)."""
        return t.view_offs if self.state(t) is None or t.view_offs == 0 else \
            t.view_offs * ne[int(self.state(t).axis)] // t.ne[int(self.state(t).axis)]

    def _leaf(self, t) -> None:
        data = self.leaves[t.name]
        s = self.state(t)
        if isinstance(data, QTensor):   # a cache: cut the bytes of every row (ggml dim 0), whole blocks
            ne, nb = self.local_ne_nb(t)
            raw = np.array(data.raw if s is None else cut_cache(data.raw, data.type, s, self.j))
            self.buffers[id(t)] = QTensor(raw, data.type, (ne[1], ne[0]), self.flavor)   # (cells, row_len)
            self.geometry[id(t)] = (ne, nb, 0)
            return
        if s is not None and s.axis.is_dim:
            data = cut(data, s, self.j, 3 - int(s.axis))
        self.store(t, data)

    def _mul_mat(self, t) -> None:
        a, b = self.array(t.src[0]), self.array(t.src[1])       # numpy (ne3, ne2, ne1, ne0)
        if t.hint == "SRC0_IS_HADAMARD":                          # what ggml-cuda's FWHT path computes
            out = rotate(np.ascontiguousarray(b), a.shape[-1])
        else:
            out = np.empty(b.shape[:2] + (b.shape[2], a.shape[2]), dtype=np.float32)
            for i3 in range(b.shape[0]):
                for i2 in range(b.shape[1]):
                    _mul_mat(np.ascontiguousarray(a[i3 % a.shape[0], i2 % a.shape[1]]),
                             np.ascontiguousarray(b[i3, i2]), out[i3, i2])
        self.store(t, out)


def _in_blocks(s: SplitState, type_name: str) -> SplitState:
    """The same split counted in quant blocks instead of values."""
    bs = TYPES[type_name].block_size
    return SplitState(s.axis, tuple(tuple(n // bs for n in seg) for seg in s.ne), s.nr)


def cut_cache(raw: np.ndarray, type_name: str, s: SplitState, j: int) -> np.ndarray:
    """Device j's bytes of every cache row: (cells, row_bytes) -> (cells, its row_bytes), whole blocks."""
    blocks = np.asarray(raw).reshape(raw.shape[0], -1, TYPES[type_name].type_size)   # (cells, n_blocks, type_size)
    return cut(blocks, _in_blocks(s, type_name), j, 1).reshape(raw.shape[0], -1)


def gather_cache(parts: list, type_name: str, s: SplitState) -> np.ndarray:
    """Inverse of cut_cache: the global cache bytes (cells, row_bytes) from every device's."""
    size = TYPES[type_name].type_size
    blocks = [np.asarray(p).reshape(p.shape[0], -1, size) for p in parts]          # (cells, n_blocks_j, type_size)
    return gather(blocks, _in_blocks(s, type_name), 1).reshape(parts[0].shape[0], -1)


def allreduce_bound(heads, wo, n_devices: int) -> np.ndarray:
    """The per-element bound on |sharded - single| of the output projection (see the module docstring).
    heads: (T, n_q) the input of wo; wo: (n_embd, n_q), torch order (ggml ne = [n_q, n_embd]); -> (T, n_embd)."""
    heads, wo = np.asarray(heads, np.float64), np.asarray(wo, np.float64)
    return (n_devices + 2) * U32 * (np.abs(heads) @ np.abs(wo).T)


@dataclass
class ShardedResult:
    config: BlockConfig
    out_single: np.ndarray          # attn_out (T, n_embd), one device
    out_sharded: np.ndarray         # after the all-reduce
    heads_equal: bool               # kqv_out gathered from the devices == one device, bitwise
    cache_equal: dict               # "k"/"v" -> gathered cache bytes == one-device bytes
    max_abs_diff: float
    bound: np.ndarray               # per-element bound on |sharded - single| (see module docstring)

    @property
    def within_bound(self) -> bool:
        return bool(np.all(np.abs(self.out_sharded - self.out_single) <= self.bound))

    @property
    def ok(self) -> bool:
        return self.heads_equal and all(self.cache_equal.values()) and self.within_bound


def _leaves(block: Block, n_past: int, seed: int, flavor: str) -> dict:
    cfg, rng = block.config, np.random.default_rng(seed)
    T, cells = cfg.n_tokens, cfg.cells
    data = {}
    for t in block.graph.leafs:
        role = t.data_role
        if role == "x":
            data[t.name] = rng.standard_normal((1, 1, T, cfg.width)).astype(np.float32)
        elif role in ("pos", "idxs"):
            data[t.name] = np.arange(n_past, n_past + T, dtype=np.float64 if role == "pos" else np.int64
                                     ).reshape(1, 1, 1, T)
        elif role == "mask":
            visible = np.arange(cells)[None, :] <= np.arange(n_past, n_past + T)[:, None]   # (T, cells)
            data[t.name] = np.where(visible, 0.0, -np.inf).astype(np.float32).reshape(1, 1, T, cells)
        elif role == "hadamard":
            data[t.name] = hadamard(t.ne[0]).reshape(1, 1, t.ne[1], t.ne[0])
        elif role.startswith("cache_"):
            cache = empty_cache(cells, t.ne[0], t.type, flavor)
            if n_past:
                past = rng.standard_normal((n_past, t.ne[0])).astype(np.float32)
                cache.raw[:n_past] = quantize(past, t.type, flavor).raw
            data[t.name] = cache
        else:   # a weight [ne0 = in, ne1 = out]
            w = rng.standard_normal((t.ne[1], t.ne[0])) / np.sqrt(t.ne[0])
            data[t.name] = w.astype(np.float32).reshape(1, 1, t.ne[1], t.ne[0])
    return data


def _execute(block: Block, device: Device) -> Device:
    for t in block.graph.order:
        device.run(t)
    return device


def run_sharded(cfg: BlockConfig | None = None, n_past: int = 0, seed: int = 0, flavor: str = "ref",
                **overrides) -> ShardedResult:
    """Run one attention layer on cfg.n_devices virtual devices and on one, and compare.
    Raises the SplitError (or init refusal) where the model says ggml would stop."""
    block = build_attention_block(cfg, **overrides)
    cfg = block.config
    if block.init_error is not None:
        raise block.init_error
    if n_past + cfg.n_tokens > cfg.cells:
        raise ValueError(f"n_past + n_tokens ({n_past} + {cfg.n_tokens}) exceeds the {cfg.cells} cache cells")
    tr = block.trace()
    if tr.error is not None:
        raise tr.error
    states = {id(n.tensor): n.state for n in tr.nodes}
    leaves = _leaves(block, n_past, seed, flavor)
    single = _execute(block, Device(0, None, leaves, flavor))
    devices = [Device(j, states, leaves, flavor) for j in range(cfg.n_devices)]
    g = block.graph
    out_node = g.nodes[-1]
    for t in g.order:
        for d in devices:
            d.run(t)
        local = next(n.local for n in tr.nodes if n.tensor is t) if t is out_node else None
        if local is not None and local.axis.name == "PARTIAL":    # the all-reduce, in device order
            total = devices[0].array(t).copy()
            for d in devices[1:]:
                total = (total + d.array(t)).astype(np.float32)
            for d in devices:
                d.store(t, total)

    heads = g.find(f"kqv_out-{cfg.layer}")
    gathered = gather([np.asarray(d.array(heads)) for d in devices], states[id(heads)], 3)
    caches = {}
    for side in ("k", "v"):
        c = g.find(f"cache_{side}_l{cfg.layer}")
        got = gather_cache([d.buffers[id(c)].raw for d in devices], c.type, states[id(c)])
        caches[side] = bool(np.array_equal(got, single.buffers[id(c)].raw))

    wo, attn = (single.array(x)[0, 0] for x in out_node.src)   # (out, in), (T, in)
    bound = allreduce_bound(attn, wo, cfg.n_devices)           # (T, out)
    out_single = np.asarray(single.array(out_node))[0, 0]
    out_sharded = np.asarray(devices[0].array(out_node))[0, 0]
    return ShardedResult(cfg, out_single, out_sharded,
                         bool(np.array_equal(gathered, np.asarray(single.array(heads)))), caches,
                         float(np.max(np.abs(out_sharded - out_single))), bound)
