"""Attention over a quantized KV cache, the way llama.cpp runs it, and its error against exact attention.

The llama.cpp path (src/llama-graph.cpp build_attn, src/llama-kv-cache.cpp):
  1. Q and K are rotated with the K Hadamard matrix, V with the V matrix (`rotation_plan`);
  2. K and V are written into the cache with set_rows (one cache row per token holding all KV heads,
     ggml ne = [head_dim * n_head_kv, n_kv]) in the cache type and flavor;
  3. flash attention reads the cache; 4. the output is rotated back with the V matrix.

Backends: what flash_attn_ext does with the other operands (vendored llama.cpp 0.3.36 sources).
- ``"ref"``: exact float64 attention on the dequantized cache (scale 1/sqrt(head_dim), no mask).
- ``"cpu"`` (ggml-cpu/ops.cpp flash_attn_ext, kvlab.accuracy.cpu_fa): llama.cpp casts an f32 K/V
  cache to f16 first; each Q row is converted to K's ``vec_dot_type`` (f16 -> f16, bf16 -> bf16,
  q4_0/q5_0/q8_0/iq4_nl -> q8_0, q4_1/q5_1 -> q8_1 with its fp16 sum s; x86 AVX rounding), K.Q is
  K's SIMD vec_dot in its summation order, the softmax is ggml's online float32 softmax with expf,
  and V accumulates into float32 -- or, for an f16 V, into an fp16 vector rounded at every update.
  Prompt batches of >= 64 tokens over f16 K and V take ggml's tiled path (float32 Q, fma chains,
  softmax per tile of 64 cells with ggml's SIMD expf: `PairPath.kernel == "cpu-tiled"`); a decode over
  f16 K and V of >= 512 cells on more than one thread takes the split-KV path (one chunk of cells per
  thread, merged: "cpu-split-kv", `threads`). Given the cache bytes (`store_bytes`), every path is
  bit-exact with ggml-cpu on x86-64 AVX512 (checked against the real op by kvlab.ggml.fa in
  `kvlab check-ggml` and tests/ggml/test_ggml_fa.py).
- ``"cuda"`` (ggml-cuda/fattn.cu, fattn-vec.cuh, fattn-common.cuh; the vector kernel that decodes
  one token, as on an H100 for batch <= 2): Q is pre-multiplied by the scale and, for a quantized
  K, quantized to q8_1 per 32 values (d = amax/127 in float32, roundf); for f16/bf16 K it stays
  float32. K.Q and the softmax are float32 and the V accumulator is float32 (NVIDIA has no
  V_DOT2_F32_F16, so no half2 accumulation). Only the K-V pairs in GGML_CUDA_FA_QUANTS (default
  ``q4_0-q4_0;q8_0-q8_0;f16-f16;bf16-bf16``, f32 counting as f16) have a vector kernel; for any
  other pair ggml-cuda converts K and V to f16 and runs the f16-f16 kernel (fattn.cu warns "no
  FlashAttention vector kernel compiled ... converting K and V to f16"), and f32 K/V are always
  converted to f16. iq4_nl has no CUDA flash-attention kernel at all (best kernel NONE), nor has a head
  size fattn.cu lacks: the op falls back to the CPU backend, so it is modelled as ``"cpu"``. Which
  kernel a pair gets is kvlab.split.cuda.cuda_flash_attn's answer (the same one `kvlab trace` and
  `kvlab compat` give), read by `pair_path`.
Not modelled for cuda (documented, small next to quantization error): summation order and fast-math
expf; the tensor-core (MMA) kernel of prompt processing, which rounds Q and the softmax probabilities
to f16.
Kernels: given the bytes (`VCaches(..., raws)`, as the sweep and `attention_error` pass them), the attention
outputs come from the flash-decoding kernels of kvlab.flash where `kernel_runs` says so: ggml-cpu's one-chunk
decode path on the CPU (bit-identical to the online softmax below), ggml-cuda's vector kernel on a GPU
(its numerics, its summation order and expf included); each query row is a decode step of its own. Without the K bytes, the cpu logits come from Q's q8 values times the dequantized K in
float64 (one rounding instead of the vec_dot order, and q8_1's s unrounded).

Metrics (kvlab.accuracy.metrics) compare against exact float64 attention on the unrotated, unquantized input.
One pipeline computes every cell: `attend_cache` (one K cache, several V caches, the V types that read
K alike batched), called by `attention_error` with one V type and by kvlab.accuracy.sweep with all.
Axes: queries are grouped by the K/V head they read, (n_head_kv, n_rows, ...) with n_rows = n_gqa * n_q
(query head h reads K/V head h // n_gqa); n_kv is the cache length, D the head size.
The math below takes numpy arrays or torch tensors (kvlab._xp): the sweep runs it on a GPU.
"""
from dataclasses import dataclass

import numpy as np

from kvlab import _xp
from kvlab._threads import kernel_lock
from kvlab.accuracy import cpu_fa
from kvlab.accuracy.metrics import attention_metrics
from kvlab.quant import check_head_dim, dequantize, quantize
from kvlab.rotation import hadamard, rotate, rotation_plan
from kvlab.split.cuda import cuda_flash_attn
from kvlab.types import flavor_code, type_info

BACKENDS = ("ref", "cpu", "cuda")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)} "
                         "(ref = exact float64, cpu = ggml-cpu flash attention, cuda = ggml-cuda vector kernel)")
    return backend


# ---- inputs --------------------------------------------------------------------------------------

def as_heads(x, name: str, ndim: int = 3) -> np.ndarray:
    """float32 numpy (n_head, n_tokens, head_dim) from a numpy array or CPU/CUDA torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name}: a masked array's mask would be ignored; pass x.filled(...) or x.data")
    if x.dtype != np.float32:
        raise TypeError(f"{name}: expected float32, got {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected shape (n_head, n_tokens, head_dim), got {x.shape}")
    return np.ascontiguousarray(x)


def check_topk(topk) -> int:
    if isinstance(topk, (bool, np.bool_)) or not isinstance(topk, (int, np.integer)) or topk < 1:
        raise ValueError(f"topk must be a positive integer (keys per query row), got {topk!r}")
    return int(topk)


def check_qkv(q, k, v):
    q, k, v = as_heads(q, "q"), as_heads(k, "k"), as_heads(v, "v")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k {k.shape} and v {v.shape} must have the same (n_head_kv, n_kv)")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q head_dim {q.shape[2]} differs from k head_dim {k.shape[2]}")
    if q.shape[0] % k.shape[0]:
        raise ValueError(f"n_head ({q.shape[0]}) must be a multiple of n_head_kv ({k.shape[0]}) for GQA")
    if k.shape[1] == 0 or q.shape[1] == 0:
        raise ValueError("need at least one query and one key")
    return q, k, v


def group_queries(q, n_head_kv: int):
    """(n_head, n_q, D) -> (n_head_kv, n_rows, D), n_rows = n_gqa * n_q: the query heads that share one KV head."""
    n_head, n_q, d = q.shape
    return q.reshape(n_head_kv, (n_head // n_head_kv) * n_q, d)  # head h uses KV head h // n_gqa


# ---- the cache -----------------------------------------------------------------------------------

def store(x, type_name: str, flavor: str, rot: int | None):
    """What the cache holds for x (n_head_kv, n_kv, D) float32: rotate, set_rows, dequantize (rotated basis)."""
    return store_bytes(x, type_name, flavor, rot)[0]


def store_bytes(x, type_name: str, flavor: str, rot: int | None):
    """(values, raw): `store`'s dequantized cache and the bytes behind it, (n_head_kv, n_kv, row_bytes) uint8.

    set_rows of rows 0..n_kv-1 in order writes exactly quantize(rows), so that is what is called
    (on x's device: CUDA tensors go to the CUDA kernels).
    """
    n_head_kv, n_kv, d = x.shape
    xr = rotate(x, rot) if rot else x
    rows = _xp.contiguous(xr.swapaxes(0, 1)).reshape(n_kv, n_head_kv * d)  # ne = [D*n_head_kv, n_kv]
    qt = quantize(rows, type_name, flavor)
    deq = dequantize(qt).reshape(n_kv, n_head_kv, d)                           # (n_kv, n_head_kv, D)
    raw = qt.raw.reshape(n_kv, n_head_kv, -1)                                  # (n_kv, n_head_kv, row_bytes)
    return _xp.contiguous(deq.swapaxes(0, 1)), _xp.contiguous(raw.swapaxes(0, 1))


def unrotate(x, rot: int | None):
    """x @ H_rot per rot-chunk of the last dim, in x's precision (H is its own inverse)."""
    if not rot:
        return x
    chunks = x.reshape(*x.shape[:-1], x.shape[-1] // rot, rot)  # (..., D/rot, rot)
    return (chunks @ _xp.copy_like(hadamard(rot), x)).reshape(x.shape)


# ---- what each backend does to Q -----------------------------------------------------------------

def _fp16(x):
    return _xp.cast(_xp.cast(x, "float16"), "float32")


def _bf16(x):
    """Round float32 to bfloat16 and back as ggml's fp32_to_bf16 does: the bf16 cache type's own kernels."""
    return dequantize(quantize(_xp.contiguous(x), "bf16"))


def q8_blocks(x, rounding: str):
    """Q as the q8_0/q8_1 activation quantizers give it back (values d*q), per 32 values.

    rounding="cpu": x86 AVX quantize_row_q8_0/q8_1 (id = 127/amax, round half to even, d as fp16);
    rounding="cuda": quantize_q8_1_to_shared (q = roundf(x/d), d = amax/127 kept in float32).
    """
    xp = _xp.namespace(x)
    blocks = _xp.cast(x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32), "float32")  # (..., D/32, 32)
    amax = xp.amax(xp.abs(blocks), axis=-1, keepdims=True)
    d = amax / 127.0  # Python floats keep float32 math in float32 (numpy and torch alike)
    with np.errstate(divide="ignore", invalid="ignore"):
        if rounding == "cpu":
            q = xp.round(blocks * xp.where(amax > 0, 127.0 / amax, 0.0))  # round half to even, as rint
            d = _fp16(d)
        else:
            ratio = xp.where(d > 0, blocks / d, 0.0)
            q = xp.sign(ratio) * xp.floor(xp.abs(ratio) + 0.5)  # roundf: halves away from 0
    return _xp.cast(d * q, "float32").reshape(x.shape)


def backend_query(q_rot, type_k: str, backend: str, scale: float):
    """Q as the backend's K.Q dot product sees it, already multiplied by the softmax scale."""
    scale32 = float(np.float32(scale))  # ggml keeps the scale as a float
    if backend == "ref":
        return _xp.cast(q_rot, "float64") * scale
    if backend == "cpu":
        kind = cpu_fa.VEC_DOT_TYPE[type_k]
        q = {"f32": lambda x: x, "f16": _fp16, "bf16": _bf16}.get(kind, lambda x: q8_blocks(x, "cpu"))(q_rot)
        return _xp.cast(q, "float64") * scale32
    scaled = q_rot * scale32  # float32 product
    return _xp.cast(scaled if type_k in ("f16", "bf16") else q8_blocks(scaled, "cuda"), "float64")


def backend_cache(values, type_name: str, backend: str, read_as: str):
    """The cache values the backend reads: f16 where the pair path converts to it (f32 on the CPU,
    whatever kvlab.split.cuda.cuda_flash_attn says on CUDA)."""
    if backend != "ref" and read_as == "f16" and type_name != "f16":
        return _fp16(values)
    return values


# ---- softmax and the V accumulation --------------------------------------------------------------

def softmax_rows(logits):
    xp = _xp.namespace(logits)
    e = xp.exp(logits - xp.amax(logits, axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attend(logits, v_stack, backend: str, v_f16_accumulator: bool, tiled: bool = False, kv_chunk: int = 0):
    """Softmax(logits) @ V for several V caches at once.

    logits: (n_head_kv, n_rows, n_kv) (float64 for ref, float32 values otherwise); v_stack: (n_v, n_head_kv,
    n_kv, D) float32. Returns (n_v, n_head_kv, n_rows, D): float64 for ref, float32 for cpu/cuda. cpu is
    ggml's online softmax (kvlab.accuracy.cpu_fa; tiled: `PairPath.kernel == "cpu-tiled"`; kv_chunk:
    `PairPath.kv_chunk`, the split-KV decode), cuda a float32 softmax in matmul order.
    """
    if backend == "ref":
        return softmax_rows(logits)[None] @ _xp.cast(v_stack, "float64")
    logits = _xp.cast(logits, "float32")
    if backend == "cpu":  # ggml's online softmax token by token (Numba), wherever the arrays live
        host_logits = np.ascontiguousarray(_xp.to_host(logits))
        host_v = _xp.to_host(v_stack)
        out = np.empty((host_v.shape[0],) + host_logits.shape[:2] + (host_v.shape[-1],), np.float32)
        with kernel_lock():
            for i in range(host_v.shape[0]):
                v_i = np.ascontiguousarray(host_v[i])
                if tiled:
                    cpu_fa.tiled_softmax(host_logits, v_i, out[i])
                else:
                    cpu_fa.online_softmax(host_logits, v_i, v_f16_accumulator, out[i], kv_chunk)
        return _xp.to_device(out, _xp.place_of(logits))
    xp = _xp.namespace(logits)
    e = xp.exp(logits - xp.amax(logits, axis=-1, keepdims=True))  # float32, expf(s - M)
    weighted = e[None] @ v_stack  # (n_v, n_head_kv, n_rows, D) float32 sums of expf(s - M) * v
    return weighted / e.sum(axis=-1, keepdims=True)[None]


# ---- one cell ------------------------------------------------------------------------------------

@dataclass
class Exact:
    """Exact float64 attention on the unrotated, unquantized input, grouped by KV head, on the host."""
    logits: np.ndarray  # (n_head_kv, n_rows, n_kv)
    out: np.ndarray     # (n_head_kv, n_rows, D)
    scale: float


def exact_attention(q, k, v) -> Exact:
    """q (n_head, n_q, D), k and v (n_head_kv, n_kv, D), numpy or torch on any device."""
    scale = float(1.0 / np.sqrt(q.shape[-1]))
    k64, v64 = _xp.cast(k, "float64"), _xp.cast(v, "float64")
    logits = _xp.cast(group_queries(q, k.shape[0]), "float64") @ k64.swapaxes(1, 2) * scale
    return Exact(_xp.to_host(logits), _xp.to_host(softmax_rows(logits) @ v64), scale)


def cache_rel_l2(stored, rot, exact) -> np.ndarray:
    """rel_l2 of a cache (n_head_kv, n_kv, D) (un-rotated) against the exact K or V over the first n cells, for
    every n: (n_kv,) on the host (a shorter context is a prefix: the sweep reads every length from one call)."""
    exact = _xp.cast(exact, "float64")
    diff2 = _xp.to_host(((unrotate(_xp.cast(stored, "float64"), rot) - exact) ** 2).sum(axis=(0, 2)))  # (n_kv,)
    norm2 = _xp.to_host((exact ** 2).sum(axis=(0, 2)))
    return np.sqrt(np.cumsum(diff2) / np.maximum(np.cumsum(norm2), np.finfo(np.float64).tiny))


def quantized_logits(q, k_cache, type_k: str, backend: str, scale: float, k_raw=None, tiled: bool = False):
    """K.Q * scale over the cache as the backend computes it (float64 array, float32 values if not ref).

    cpu: given the cache bytes k_raw (`store_bytes`), K's vec_dot exactly (kvlab.accuracy.cpu_fa);
    tiled (`PairPath.kernel == "cpu-tiled"`): ggml's tiled path, Q kept float32.
    """
    if backend == "cpu" and (k_raw is not None or tiled):
        raw = None if k_raw is None else _xp.to_host(k_raw)
        with kernel_lock():
            host = cpu_fa.logits(_xp.to_host(group_queries(q, k_cache.shape[0])), raw, _xp.to_host(k_cache),
                                 type_k, scale, tiled)
        return _xp.cast(_xp.to_device(host, _xp.place_of(q)), "float64")
    qb = backend_query(group_queries(q, k_cache.shape[0]), type_k, backend, scale)
    logits = qb @ _xp.cast(k_cache, "float64").swapaxes(1, 2)
    return logits if backend == "ref" else _xp.cast(_xp.cast(logits, "float32"), "float64")


@dataclass(frozen=True)
class PairPath:
    """How one backend runs one K-V pair: which code path, and the K/V types its kernel reads."""
    backend: str         # the backend that really runs it ("cuda" with iq4_nl falls back to "cpu")
    read_k: str
    read_v: str
    f16_accumulator: bool
    kernel: str          # "exact", "cpu", "cpu-tiled", "cpu-split-kv", "vec", "vec-f16"
    kv_chunk: int = 0    # cpu-split-kv: cells per thread


def pair_path(type_k: str, type_v: str, backend: str, n_tokens: int = 1, head_dim: int = 128, n_kv: int = 0,
              threads: int = 1) -> PairPath:
    """n_tokens: the batch (queries per head); ggml-cpu takes its tiled path for large f16 batches, and
    with threads > 1 its split-KV path for an f16 decode over >= 512 cells (n_kv as llama.cpp pads it).
    cuda: the default build of ggml-cuda 0.3.36 (kvlab.split.cuda); where it has no kernel, the CPU runs the op."""
    if backend == "cuda":
        fa = cuda_flash_attn(type_k, type_v, head_dim)
        if fa.runs:
            return PairPath("cuda", fa.read_k, fa.read_v, False, "vec" if fa.kernel == "vec" else "vec-f16")
        backend = "cpu"
    if backend == "cpu":
        read_k, read_v = cpu_fa.read_type(type_k), cpu_fa.read_type(type_v)   # f32 K/V are cast to f16
        if cpu_fa.takes_tiled_path(type_k, type_v, n_tokens):
            return PairPath("cpu", read_k, read_v, False, "cpu-tiled")
        chunk = cpu_fa.kv_chunk(type_k, type_v, n_tokens, cpu_fa.padded_n_kv(n_kv), threads)
        return PairPath("cpu", read_k, read_v, read_v == "f16", "cpu-split-kv" if chunk else "cpu", chunk)
    return PairPath("ref", type_k, type_v, False, "exact")


def v_form(path: PairPath) -> str:
    """How the pair's kernel reads V: "f64" (exact attention), "f16" (converted to f16), "f32" (as stored)."""
    return "f64" if path.backend == "ref" else "f16" if path.read_v == "f16" else "f32"


class VCaches:
    """V caches of several types side by side, (n_head_kv, n_kv, n_v, D) float32 in the rotated basis, each
    converted once into the forms the kernels read (`v_form`) and sliced per context length.
    raws: {type: (n_head_kv, n_kv, row_bytes) uint8}, the bytes behind each cache (`store_bytes`), which the
    flash-decoding kernels read (`kernel_runs`); without them every backend runs on the values."""

    def __init__(self, caches: dict, raws: dict | None = None):
        self.types = list(caches)
        xp = _xp.namespace(caches[self.types[0]])
        self.stored = xp.stack([caches[t] for t in self.types], axis=2)  # (n_head_kv, n_kv, n_v, D)
        self.raws = [raws[t] for t in self.types] if raws else None
        self._forms = {}

    def raw(self, i: int, read_as: str):
        """V cache i's bytes as a kernel reading it as `read_as` takes them (`read_bytes`), all cells, made once:
        a row's conversion does not depend on the others, so a shorter context slices it."""
        key = (i, read_as)
        if key not in self._forms:
            self._forms[key] = read_bytes(self.stored[:, :, i], self.raws[i], self.types[i], read_as)
        return self._forms[key]

    def form(self, kind: str):
        if kind not in self._forms:
            convert = {"f32": lambda x: x, "f64": lambda x: _xp.cast(x, "float64"), "f16": _fp16}[kind]
            self._forms[kind] = convert(self.stored)
        return self._forms[kind]

    def attend(self, logits, path: PairPath, indices: list, n_kv: int) -> dict:
        """softmax @ V over the first n_kv cells for the V types at `indices`, which read V as `path` does:
        {index: (n_head_kv, n_rows, D)}."""
        v = self.form(v_form(path))[:, :n_kv]  # (n_head_kv, n_kv, n_v, D)
        tiled = path.kernel == "cpu-tiled"
        if path.f16_accumulator or tiled:  # ggml-cpu's fp16 accumulator / tiles: one V cache at a time
            return {i: attend(logits, v[None, :, :, i], path.backend, path.f16_accumulator, tiled, path.kv_chunk)[0]
                    for i in indices}
        chosen = v[:, :, indices]  # (n_head_kv, n_kv, n_chosen, D)
        g, n, c, d = chosen.shape
        out = attend(logits, chosen.reshape(g, n, c * d)[None], path.backend, False)[0]  # V types side by side:
        out = out.reshape(g, -1, c, d)                                                    # (n_head_kv, n_rows, c, D)
        return {i: out[:, :, j] for j, i in enumerate(indices)}


def attend_cache(q_rot, k_stored, type_k: str, v: VCaches, n_kv: int, backend: str, scale: float,
                 threads: int = 1, keep=None) -> list:
    """Quantized attention of Q (rotated) over the first n_kv cells of one K cache (k_stored: `store_bytes`'s
    (values, raw)) with every V cache of `v`: [(logits, [(V index, PairPath, out_rot)])], one entry per K.Q
    product. V types whose pairs read K alike share the product and one batched softmax @ V.
    logits (n_head_kv, n_rows, n_kv) float64 (float32 values unless ref), out_rot (n_head_kv, n_rows, D).
    threads: ggml-cpu's thread count (`pair_path`). keep: None, or a bool mask broadcasting against the logits
    (False: the cell gets -inf, as from ggml's KQ mask)."""
    k_cache, k_raw = (a[:, :n_kv] for a in k_stored)
    groups = {}
    for i, type_v in enumerate(v.types):
        path = pair_path(type_k, type_v, backend, q_rot.shape[1], q_rot.shape[-1], n_kv, threads)
        key = (path.backend, path.read_k, path.kernel == "cpu-tiled", path.f16_accumulator, v_form(path), path.kv_chunk)
        groups.setdefault(key, []).append((i, path))
    results = []
    for (runs_on, read_k, tiled, *_), members in groups.items():
        k_read = backend_cache(k_cache, type_k, runs_on, read_k)
        logits = quantized_logits(q_rot, k_read, read_k, runs_on, scale, k_raw=k_raw if runs_on == "cpu" else None,
                                  tiled=tiled)
        if keep is not None:
            logits = _xp.namespace(logits).where(keep, logits, -np.inf)
        path = members[0][1]
        if keep is None and v.raws is not None and kernel_runs(path, q_rot):
            k_bytes = read_bytes(k_cache, k_raw, type_k, path.read_k)
            outs = {i: kernel_attention(q_rot, k_bytes, path.read_k, v.raw(i, p.read_v)[:, :n_kv], p.read_v, scale)
                    for i, p in members}
        else:
            outs = v.attend(logits, path, [i for i, _ in members], n_kv)
        results.append((logits, [(i, path, outs[i]) for i, path in members]))
    return results


# ---- the flash-decoding kernels (kvlab.flash) ----------------------------------------------------

def kernel_runs(path: PairPath, q) -> bool:
    """Whether a flash-decoding kernel computes this path's output (the logits for the metrics still come from
    `quantized_logits`): ggml-cpu's one-chunk decode path (kvlab.kernels.flash_decode, bit-exact with
    flash_attn_ext, as cpu_fa's online softmax), and ggml-cuda's vector kernel where the arrays live on a GPU
    (kvlab.kernels.cuda.flash_decode: ggml-cuda's numerics in its own summation order; on the host the cuda
    backend stays the float32 model above)."""
    if path.kernel == "cpu":
        return True
    return path.backend == "cuda" and _xp.is_cuda(q) and q.shape[-1] % 64 == 0


def read_bytes(values, raw, type_name: str, read_as: str):
    """The rows a kernel reads: the stored bytes, or f16 rows where the path converts the cache to f16 first
    (ggml-cuda for the pairs it has no vector kernel for; exact for f32, a rounding of the dequantized values
    otherwise, as ggml's to-f16 conversion)."""
    return raw if read_as == type_name else quantize(_xp.contiguous(values), read_as).raw


def kernel_attention(q_rot, k_raw, type_k: str, v_raw, type_v: str, scale: float):
    """out_rot (n_head_kv, n_rows, Dv) float32: every query row a decode step of its own over all cells of
    k_raw/v_raw (n_head_kv, n_kv, row_bytes), by kvlab.flash.flash_decode (the CPU kernel for host arrays,
    the CUDA one for GPU arrays)."""
    from kvlab.flash import flash_decode
    n_head_kv = k_raw.shape[0]
    q = group_queries(q_rot, n_head_kv)                           # (n_head_kv, n_rows, D)
    rows, d = q.shape[1], q.shape[2]
    q = _xp.contiguous(_xp.cast(q, "float32")).reshape(1, n_head_kv * rows, d)   # query h' reads KV head h' // rows
    if not _xp.is_cuda(q):
        q, k_raw, v_raw = (np.ascontiguousarray(_xp.to_host(a)) for a in (q, k_raw, v_raw))
    out = flash_decode(q, k_raw[None], v_raw[None], type_k, type_v, scale=scale)    # (1, n_head_kv * rows, Dv)
    if not _xp.is_cuda(out):
        out = _xp.to_device(out, _xp.place_of(q_rot))
    return out.reshape(n_head_kv, rows, -1)                                          # (n_head_kv, n_rows, Dv)


def cell_metrics(exact: Exact, logits, out_rot, rot_v, topk: int) -> dict:
    """attention_metrics of one cell (k_rel_l2, v_rel_l2 come from `cache_rel_l2`): the output un-rotated."""
    out = _xp.to_host(unrotate(_xp.cast(out_rot, "float64"), rot_v))
    return attention_metrics(exact.logits, _xp.to_host(logits), exact.out, out, topk)


@dataclass
class CacheAttention:
    """One backend's attention over the quantized cache, in the rotated basis, with what it read."""
    path: PairPath
    q_rot: np.ndarray     # (n_head, n_q, D) Q as flash attention gets it
    k_cache: np.ndarray   # (n_head_kv, n_kv, D) float32, the dequantized cache (rotated basis)
    v_cache: np.ndarray
    k_raw: np.ndarray     # (n_head_kv, n_kv, row_bytes) uint8, the bytes set_rows wrote
    v_raw: np.ndarray
    logits: np.ndarray    # (n_head_kv, n_rows, n_kv) float64 (float32 values unless ref)
    out_rot: np.ndarray   # (n_head_kv, n_rows, D): float64 for ref, float32 otherwise (before un-rotating)


def cache_attention(q, k, v, type_k: str, type_v: str, plan, flavor: str, backend: str,
                    threads: int = 1) -> CacheAttention:
    """Store K and V as llama.cpp does (rotation `plan`, set_rows in `flavor`) and attend as `backend`."""
    return stored_attention(q, store_bytes(k, type_k, flavor, plan.k), store_bytes(v, type_v, flavor, plan.v),
                            type_k, type_v, plan, backend, threads)


def stored_attention(q, k_stored, v_stored, type_k: str, type_v: str, plan, backend: str,
                     threads: int = 1) -> CacheAttention:
    """`cache_attention` over caches already stored: k_stored, v_stored are `store_bytes` results."""
    (k_cache, k_raw), (v_cache, v_raw) = k_stored, v_stored
    q_rot = rotate(q, plan.k) if plan.k else q
    [(logits, [(_, path, out_rot)])] = attend_cache(q_rot, k_stored, type_k, VCaches({type_v: v_cache}, {type_v: v_raw}),
                                                    k_cache.shape[1], backend, float(1.0 / np.sqrt(q.shape[-1])),
                                                    threads)
    return CacheAttention(path, q_rot, k_cache, v_cache, k_raw, v_raw, logits, out_rot)


def attention_error(q, k, v, type_k: str = "f16", type_v: str = "f16", rotation: bool = True,
                    flavor: str = "ref", backend: str = "ref", topk: int = 8, threads: int = 1) -> dict:
    """Error metrics of llama.cpp's quantized-KV attention against exact float64 attention.

    q: (n_head, n_q, head_dim); k, v: (n_head_kv, n_kv, head_dim); float32 numpy or torch; GQA when
    n_head is a multiple of n_head_kv; no mask. `rotation` follows `rotation_plan` (llama.cpp's gate)
    when True and disables it when False. Returns a dict of floats: kl, out_rel_l2, out_cos,
    logit_rel_l2, k_rel_l2, v_rel_l2, topk_overlap (see kvlab.accuracy.metrics). threads: ggml-cpu's
    thread count, which decides its split-KV path (an f16 decode over >= 512 cells).
    """
    q, k, v = check_qkv(q, k, v)
    type_k, type_v = type_info(type_k).name, type_info(type_v).name   # any case: Q8_0 is q8_0
    flavor_code(flavor), check_backend(backend), check_topk(topk)
    check_head_dim(k.shape[-1], (type_k, type_v), "attention_error")
    plan = rotation_plan(type_k, type_v, k.shape[-1], v.shape[-1], disable=not rotation)
    exact = exact_attention(q, k, v)
    att = cache_attention(q, k, v, type_k, type_v, plan, flavor, backend, threads)
    return {**cell_metrics(exact, att.logits, att.out_rot, plan.v, topk),
            "k_rel_l2": float(cache_rel_l2(att.k_cache, plan.k, k)[-1]),
            "v_rel_l2": float(cache_rel_l2(att.v_cache, plan.v, v)[-1])}
