"""ggml's own flash_attn_ext on the CPU backend, through ctypes, fed with kvlab's cache bytes.

kvlab.accuracy.attention models what ggml-cpu's flash attention does to Q, the logits and the V
accumulator; this module runs the real op on the same bytes so the model can be held against it.
The graph is the one llama.cpp builds (src/llama-graph.cpp build_attn_mha, llama_kv_cache::get_k/get_v,
one stream, flash attention on, V not transposed):

    q      f32  ne [D, n_head, n_q]  -> permute(0, 2, 1, 3) -> [D, n_q, n_head]
    cache  K/V  ne [D * n_head_kv, n_cells]   (rows as set_rows writes them: token-major, heads inside)
    view        ne [D, n_head_kv, n_kv]       -> permute(0, 2, 1, 3) -> [D, n_kv, n_head_kv]
    f32 K/V are cast to f16 first (build_attn_mha: "FA wants f16 rather than f32 K/V")
    mask   f16  ne [n_kv, n_q]: 0 where a query sees a cell, -inf elsewhere (padding included)
    out    f32  ne [D, n_head, n_q]           (flash_attn_ext writes the permuted result)

n_kv is padded as llama_kv_cache::get_n_kv pads it (to a multiple of 256, at most the cache size);
the padded cells hold zero bytes (a fresh llama.cpp cache buffer is cleared) and are masked.
Computed with ggml_graph_compute_with_ctx on n_threads threads (with more than one, a decode over f16
K and V of >= 512 cells takes ggml's split-KV path: kvlab.accuracy.cpu_fa.kv_chunk).
"""
import ctypes
import os

import numpy as np

from kvlab.accuracy.cpu_fa import padded_n_kv
from kvlab.ggml.lib import GGML, llama_cpp_lib_dir, load
from kvlab.types import type_info

GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1
# The SIMD build kvlab.accuracy.cpu_fa reproduces bit for bit (ggml_cpu_has_<name>): its f16 and bf16
# dot products are AVX512 (-F, -BF16) lanes, the tiled path's expf is AVX512's; the quantized dot
# products are the AVX2 code, which an AVX512 build runs too.
MODELLED_ISA = ("avx2", "fma", "f16c", "avx512", "avx512_bf16")


class _InitParams(ctypes.Structure):      # struct ggml_init_params
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


_P, _I64, _SZ = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
_BASE = {   # libggml-base: name -> (restype, argtypes); tensors are plain addresses
    "ggml_init": (_P, [_InitParams]),
    "ggml_free": (None, [_P]),
    "ggml_tensor_overhead": (_SZ, []),
    "ggml_graph_overhead": (_SZ, []),
    "ggml_new_tensor_2d": (_P, [_P, ctypes.c_int, _I64, _I64]),
    "ggml_new_tensor_3d": (_P, [_P, ctypes.c_int, _I64, _I64, _I64]),
    "ggml_get_data": (_P, [_P]),
    "ggml_nbytes": (_SZ, [_P]),
    "ggml_row_size": (_SZ, [ctypes.c_int, _I64]),
    "ggml_view_3d": (_P, [_P, _P, _I64, _I64, _I64, _SZ, _SZ, _SZ]),
    "ggml_permute": (_P, [_P, _P, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]),
    "ggml_cast": (_P, [_P, _P, ctypes.c_int]),
    "ggml_flash_attn_ext": (_P, [_P, _P, _P, _P, _P, ctypes.c_float, ctypes.c_float, ctypes.c_float]),
    "ggml_new_graph": (_P, [_P]),
    "ggml_build_forward_expand": (None, [_P, _P]),
}
_CPU = {"ggml_graph_compute_with_ctx": (ctypes.c_int, [_P, _P, ctypes.c_int])}


def _bind(lib: GGML):
    """The functions above on the library kvlab.ggml.lib loaded (signatures set once per library)."""
    if getattr(lib, "_fa_fns", None) is None:
        fns = {}
        for handle, table in ((lib.base, _BASE), (lib.cpu, _CPU)):
            for name, (restype, argtypes) in table.items():
                fn = getattr(handle, name)
                fn.restype, fn.argtypes = restype, argtypes
                fns[name[len("ggml_"):]] = fn
        lib._fa_fns = fns
    return lib._fa_fns


def llama_lib() -> GGML:
    """The libggml kvlab's ggml-cpu attention is held against: $KVLAB_GGML_LIB, else llama-cpp-python's own
    (the ggml llama.cpp 0.3.36 runs), else ggml-python's. The version matters on CPUs with AVX512-FP16
    (Sapphire Rapids and later): ggml-python 0.0.45's older ggml (0.15.3) sums ggml_vec_dot_f16 in half
    precision there (its GGML_F16_VEC lanes are _Float16), so its flash attention over an f16 (or f32) K
    differs; llama.cpp 0.3.36's sums in float32 lanes (GGML_F16_DOT_*), as on every other x86-64 CPU."""
    return load(os.environ.get("KVLAB_GGML_LIB") or llama_cpp_lib_dir())


def cpu_features(lib: GGML) -> dict:
    """What the library's ggml-cpu was compiled for: name -> bool, for MODELLED_ISA."""
    return {name: bool(getattr(lib.cpu, f"ggml_cpu_has_{name}")()) for name in MODELLED_ISA}


def cache_rows(values, type_name: str) -> np.ndarray:
    """(n_kv, n_head_kv * row_bytes) uint8 from a QTensor or raw bytes of shape (n_head_kv, n_kv, row_bytes)."""
    raw = np.asarray(getattr(values, "raw", values))
    if raw.dtype != np.uint8 or raw.ndim != 3:
        raise ValueError(f"{type_name} cache: expected uint8 bytes (n_head_kv, n_kv, row_bytes), "
                         f"got {raw.dtype} {raw.shape}")
    return np.ascontiguousarray(raw.swapaxes(0, 1)).reshape(raw.shape[1], -1)  # ne = [D*n_head_kv, n_kv] in bytes


def flash_attn_ext(lib: GGML, q, k_raw, v_raw, type_k: str, type_v: str, visible=None,
                   n_cells: int | None = None, n_threads: int = 1) -> np.ndarray:
    """ggml_flash_attn_ext on ggml-cpu over a cache holding kvlab's bytes.

    q: (n_head, n_q, D) float32 (already rotated where llama.cpp rotates it);
    k_raw, v_raw: (n_head_kv, n_kv, row_bytes) uint8, the bytes set_rows wrote for each head's row
    (QTensor.raw of a quantize over (n_head_kv, n_kv, D)); visible: (n_q, n_kv) bool, which cells each
    query sees (default all); n_cells: cache size (default n_kv padded to 256). Returns (n_head, n_q, D)
    float32, the op's output (still rotated, as llama.cpp un-rotates it afterwards).
    """
    q = np.ascontiguousarray(q, dtype=np.float32)
    if q.ndim != 3:
        raise ValueError(f"q: expected (n_head, n_q, head_dim), got {q.shape}")
    n_head, n_q, d = q.shape
    k_rows, v_rows = cache_rows(k_raw, type_k), cache_rows(v_raw, type_v)
    n_head_kv, n_kv = np.shape(k_raw)[:2]
    ik, iv = type_info(type_k), type_info(type_v)
    for side, info, rows in (("k", ik, k_rows), ("v", iv, v_rows)):
        if rows.shape != (n_kv, n_head_kv * info.row_bytes(d)):
            raise ValueError(f"{side} cache: expected {n_head_kv} heads x {n_kv} cells of {info.row_bytes(d)} "
                             f"bytes ({info.name} rows of {d}), got {rows.shape}")
    if n_head % n_head_kv:
        raise ValueError(f"n_head ({n_head}) must be a multiple of n_head_kv ({n_head_kv})")
    n_pad = padded_n_kv(n_kv, n_cells)
    if n_cells is not None and n_cells < n_kv:
        raise ValueError(f"n_cells ({n_cells}) is smaller than n_kv ({n_kv})")
    visible = np.ones((n_q, n_kv), bool) if visible is None else np.asarray(visible, bool)
    if visible.shape != (n_q, n_kv):
        raise ValueError(f"visible: expected shape {(n_q, n_kv)}, got {visible.shape}")
    mask = np.full((n_q, n_pad), -np.inf, np.float16)  # ne = [n_pad, n_q]
    mask[:, :n_kv][visible] = 0

    fn = _bind(lib)
    cells = n_cells or n_pad
    data = sum(x.nbytes for x in (q, mask)) + (ik.row_bytes(d) + iv.row_bytes(d)) * n_head_kv * cells
    cast = 2 * d * n_head_kv * n_pad * 2                         # f16 copies of f32 K/V
    work = n_threads * 4 * (64 * d * 4 + 2 * 64 * 64) + 4 * n_head * n_threads * (d + 2)  # tiled / split-KV scratch
    mem = data + cast + work + 4 * n_head * n_q * d + 64 * fn["tensor_overhead"]() + fn["graph_overhead"]() + (1 << 20)
    ctx = fn["init"](_InitParams(mem, None, False))
    if not ctx:
        raise MemoryError(f"ggml_init of {mem} bytes failed")
    try:
        tq = fn["new_tensor_3d"](ctx, GGML_TYPE_F32, d, n_head, n_q)                     # ne = [D, n_head, n_q]
        _fill(fn, tq, q.swapaxes(0, 1))                                                  # (n_q, n_head, D)
        tq = fn["permute"](ctx, tq, 0, 2, 1, 3)                                          # ne = [D, n_q, n_head]
        views = []
        for info, rows in ((ik, k_rows), (iv, v_rows)):
            cache = fn["new_tensor_2d"](ctx, info.ggml_type, d * n_head_kv, cells)       # ne = [D*n_head_kv, cells]
            buf = np.zeros((cells, rows.shape[1]), np.uint8)
            buf[:n_kv] = rows
            _fill(fn, cache, buf)
            rs = fn["row_size"](info.ggml_type, d)
            view = fn["view_3d"](ctx, cache, d, n_head_kv, n_pad, rs, rs * n_head_kv, 0)  # ne = [D, n_head_kv, n_pad]
            view = fn["permute"](ctx, view, 0, 2, 1, 3)                                  # ne = [D, n_pad, n_head_kv]
            if info.ggml_type == GGML_TYPE_F32:
                view = fn["cast"](ctx, view, GGML_TYPE_F16)
            views.append(view)
        tm = fn["new_tensor_2d"](ctx, GGML_TYPE_F16, n_pad, n_q)                         # ne = [n_pad, n_q]
        _fill(fn, tm, mask)
        scale = float(np.float32(1) / np.sqrt(np.float32(d)))                            # 1.0f/sqrtf(D)
        out = fn["flash_attn_ext"](ctx, tq, views[0], views[1], tm, scale, 0.0, 0.0)
        graph = fn["new_graph"](ctx)
        fn["build_forward_expand"](graph, out)
        status = fn["graph_compute_with_ctx"](ctx, graph, n_threads)
        if status != 0:
            raise RuntimeError(f"ggml_graph_compute_with_ctx failed with status {status}")
        res = np.empty((n_q, n_head, d), np.float32)                                     # ne = [D, n_head, n_q]
        ctypes.memmove(res.ctypes.data, fn["get_data"](out), res.nbytes)
    finally:
        fn["free"](ctx)
    return np.ascontiguousarray(res.swapaxes(0, 1))                                      # (n_head, n_q, D)


def _fill(fn, tensor, array) -> None:
    array = np.ascontiguousarray(array)
    if array.nbytes != fn["nbytes"](tensor):
        raise AssertionError(f"{array.nbytes} bytes for a tensor of {fn['nbytes'](tensor)}")
    ctypes.memmove(fn["get_data"](tensor), array.ctypes.data, array.nbytes)
