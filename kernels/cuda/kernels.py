"""The @cuda.jit kernels: quantize (also set_rows and the fused rotation), dequantize (also the fused
un-rotation), rotate, and the per-value f32/f16/bf16 conversions.

Block types. A CUDA block of TPB threads owns TPB consecutive 32-value blocks, one tile (tile.py):
  1. the tile's TPB * 32 floats arrive by coalesced 16-byte loads, all issued before the first is
     used, into shared memory;
  2. thread t takes row t into registers (8 16-byte reads), and optionally rotates it (fwht.py);
  3. thread t quantizes its row into a shared staging buffer laid out as the ggml block structs;
  4. the staged TPB * type_size bytes leave as coalesced 16-byte words (4-byte words, or single
     bytes, to row_ids' rows for set_rows or when the output is not aligned).
Dequantize runs these steps backwards (the bytes arrive as 16-byte words). Every thread runs steps
2-3, rows past the end too (zeros, never stored): no divergence around the barriers. The type's code
and type_size (and for quantize the flavor) are compile-time constants of a per-type kernel (a
closure), so a kernel holds one type's (and flavor's) code only, and numba caches each on disk.
f32/f16/bf16: a thread converts 4 consecutive values per step (16-byte loads), grid-stride; rows
whose length is not a multiple of 4, or unaligned arrays, take a one-value-per-step kernel.
"""
import functools

import numpy as np
from numba import cuda, float32, uint8, uint32

from . import blocks as B
from .fwht import rotate_row
from .ops import (SIM, device, f16_bits_to_f32, f32_bits, f32_from_bits, ld_f32x4, ld_u32, ld_u32x2, ld_u32x4, st_f32x4,
                  st_u32, st_u32x2, st_u32x4)
from .tile import ALIGN, TILE_W, TPB, load_tile, read_row, store_tile, write_row

QUANT_CODES = {"q8_0": 0, "q4_0": 1, "q4_1": 2, "iq4_nl": 3, "q5_0": 4, "q5_1": 5}
TYPE_SIZES = (34, 18, 20, 18, 22, 24)
SCALAR_CODES = {"f32": 0, "f16": 1, "bf16": 2}
SCALAR_TPB = 32 if SIM else 256
# 64 registers hold a row (32) and its packed words without spills (ptxas -v); 8 CUDA blocks per SM
TILE_JIT = dict(cache=True) if SIM else dict(cache=True, max_registers=64)
_LUT = B.BEST_INDEX_LUT
_KV = B.KVALUES



# ---- staging buffer <-> global bytes -----------------------------------------------------------
@device
def _dest(g, row_bytes, row_ids):
    """Byte g of the source rows lands here: the same place, or row row_ids[g // row_bytes] (set_rows)."""
    if row_bytes == 0:
        return g
    r = g // row_bytes
    return row_ids[r] * row_bytes + (g - r * row_bytes)


@device
def store_bytes(stage, y, base, count, width, row_ids, row_bytes):
    """stage[0:count] -> bytes base .. of the flat uint8 y (rows remapped when row_bytes > 0).
    width 16: y + base is 16-byte aligned and no rows are remapped; 4: y and every destination row
    are 4-byte aligned; 1: neither."""
    t = cuda.threadIdx.x
    if width == 16:
        n16 = count >> 4
        for w in range(t, n16, TPB):
            v = ld_u32x4(stage, 16 * w)
            st_u32x4(y, base + 16 * w, v[0], v[1], v[2], v[3])
        for k in range(16 * n16 + t, count, TPB):
            y[base + k] = stage[k]
        return
    for w in range(t, (count + 3) >> 2, TPB):
        b = 4 * w
        if width == 4 and b + 4 <= count:
            st_u32(y, _dest(base + b, row_bytes, row_ids), ld_u32(stage, b))
        else:
            for k in range(4):
                if b + k < count:
                    y[_dest(base + b + k, row_bytes, row_ids)] = stage[b + k]


@device
def load_bytes(stage, y, base, count, wide):
    """Bytes base .. base + count of the flat uint8 y -> stage[0:count].
    wide: y is 16-byte aligned; a thread then loads at most 3 words of 16 (type_size <= 34), all first."""
    t = cuda.threadIdx.x
    n16 = count >> 4 if wide else 0
    w1 = t + TPB
    w2 = t + 2 * TPB
    zero = np.uint32(0)
    a = b = c = (zero, zero, zero, zero)
    if t < n16:
        a = ld_u32x4(y, base + 16 * t)
    if w1 < n16:
        b = ld_u32x4(y, base + 16 * w1)
    if w2 < n16:
        c = ld_u32x4(y, base + 16 * w2)
    if t < n16:
        st_u32x4(stage, 16 * t, a[0], a[1], a[2], a[3])
    if w1 < n16:
        st_u32x4(stage, 16 * w1, b[0], b[1], b[2], b[3])
    if w2 < n16:
        st_u32x4(stage, 16 * w2, c[0], c[1], c[2], c[3])
    for k in range(16 * n16 + t, count, TPB):
        stage[k] = y[base + k]


@device
def load_table(table, values):
    """A small constant table into shared memory (the caller's barrier publishes it)."""
    for i in range(cuda.threadIdx.x, values.shape[0], TPB):          # TPB may be 16 (the simulator)
        table[i] = values[i]


# ---- the block-type kernels --------------------------------------------------------------------
@functools.cache
def quantize_kernel(type_name, flavor):
    """kernel(x, y, n_blocks, vec, width, row_ids, row_bytes, n, scale): x flat float32
    (n_blocks * 32), y flat uint8; row_bytes > 0: source row k goes to row row_ids[k] of y;
    n > 0: quantize x @ H_n chunkwise (H_n[0, 0] == scale). The flavor is a compile-time constant
    too: a kernel then holds only its flavor's per-value code, not the other flavors' selects."""
    code = QUANT_CODES[type_name]
    ts = TYPE_SIZES[code]
    stage_bytes = TPB * ts          # a shared array's size must be one constant, not an expression

    @cuda.jit(**TILE_JIT)
    def kernel(x, y, n_blocks, vec, width, row_ids, row_bytes, n, scale):
        tile = cuda.shared.array((TPB, TILE_W), float32, alignment=ALIGN)
        stage = cuda.shared.array(stage_bytes, uint8, alignment=ALIGN)
        lut = cuda.shared.array(32, uint32)
        kv = cuda.shared.array(16, float32)
        first = np.int64(cuda.blockIdx.x) * TPB
        r = np.uint32(cuda.threadIdx.x)       # unsigned indices: no wrap-around code (blocks.py)
        if code == 3:                         # `code` is a constant: numba drops the other branches
            load_table(lut, _LUT)
            load_table(kv, _KV)
        load_tile(tile, x, first * 32, n_blocks * 32, vec)
        cuda.syncthreads()
        row = cuda.local.array(32, float32)
        read_row(tile, r, row)
        if n > 0:
            rotate_row(tile, row, n, scale, TPB)
        if code == 0:
            B.quantize_q8_0(row, stage, r * ts, flavor)
        elif code == 1:
            B.quantize_q4_0(row, stage, r * ts, flavor)
        elif code == 2:
            B.quantize_q4_1(row, stage, r * ts, flavor)
        elif code == 3:
            B.quantize_iq4_nl(row, stage, r * ts, flavor, lut, kv)
        elif code == 4:
            B.quantize_q5_0(row, stage, r * ts, flavor)
        else:
            B.quantize_q5_1(row, stage, r * ts, flavor)
        cuda.syncthreads()
        store_bytes(stage, y, first * ts, min(TPB, n_blocks - first) * ts, width, row_ids, row_bytes)

    return kernel


@functools.cache
def dequantize_kernel(type_name):
    """kernel(y, out, n_blocks, wide, vec, n, scale): y flat uint8 -> out flat float32;
    n > 0: out = dequantize(y) @ H_n chunkwise."""
    code = QUANT_CODES[type_name]
    ts = TYPE_SIZES[code]
    stage_bytes = TPB * ts          # a shared array's size must be one constant, not an expression

    @cuda.jit(**TILE_JIT)
    def kernel(y, out, n_blocks, wide, vec, n, scale):
        tile = cuda.shared.array((TPB, TILE_W), float32, alignment=ALIGN)
        stage = cuda.shared.array(stage_bytes, uint8, alignment=ALIGN)
        kv = cuda.shared.array(16, float32)
        first = np.int64(cuda.blockIdx.x) * TPB
        r = np.uint32(cuda.threadIdx.x)
        if code == 3:
            load_table(kv, _KV)
        load_bytes(stage, y, first * ts, min(TPB, n_blocks - first) * ts, wide)
        cuda.syncthreads()
        row = cuda.local.array(32, float32)
        if code == 0:
            B.dequantize_q8_0(stage, r * ts, row)
        elif code == 1:
            B.dequantize_q4_0(stage, r * ts, row)
        elif code == 2:
            B.dequantize_q4_1(stage, r * ts, row)
        elif code == 3:
            B.dequantize_iq4_nl(stage, r * ts, row, kv)
        elif code == 4:
            B.dequantize_q5_0(stage, r * ts, row)
        else:
            B.dequantize_q5_1(stage, r * ts, row)
        if n > 0:
            rotate_row(tile, row, n, scale, TPB)
        write_row(tile, r, row)
        cuda.syncthreads()
        store_tile(tile, out, first * 32, n_blocks * 32, vec)

    return kernel


@cuda.jit(**TILE_JIT)
def rotate_kernel(x, out, total, vec, n, scale):
    """out = x @ H_n on every n-chunk of the flat float32 x (total values, a multiple of n)."""
    tile = cuda.shared.array((TPB, TILE_W), float32, alignment=ALIGN)
    base = np.int64(cuda.blockIdx.x) * TPB * 32
    r = np.uint32(cuda.threadIdx.x)
    load_tile(tile, x, base, total, vec)
    cuda.syncthreads()
    row = cuda.local.array(32, float32)
    read_row(tile, r, row)
    rotate_row(tile, row, n, scale, TPB)
    write_row(tile, r, row)
    cuda.syncthreads()
    store_tile(tile, out, base, total, vec)


# ---- f32 / f16 / bf16 --------------------------------------------------------------------------
@device
def _pack(lo, hi):
    return np.uint32(lo) | (np.uint32(hi) << np.uint32(16))


@functools.cache
def scalar_quantize_kernel(type_name):
    """kernel(x, y, flavor, n_quads, cols, row_ids, has_rows): x flat float32, y flat uint8;
    rows of cols values (cols % 4 == 0; every row's values are then in ggml-cpu's F16C chunks)."""
    code = SCALAR_CODES[type_name]

    @cuda.jit(cache=True)
    def kernel(x, y, flavor, n_quads, cols, row_ids, has_rows):
        for q in range(cuda.grid(1), n_quads, cuda.gridsize(1)):
            e = np.int64(q) * 4
            d = e
            if has_rows:
                r = e // cols
                d = row_ids[r] * cols + (e - r * cols)
            v = ld_f32x4(x, e)
            if code == 0:
                st_u32x4(y, 4 * d, f32_bits(v[0]), f32_bits(v[1]), f32_bits(v[2]), f32_bits(v[3]))
            elif code == 1:
                st_u32x2(y, 2 * d, _pack(B.f16_bits(v[0], flavor, True), B.f16_bits(v[1], flavor, True)),
                         _pack(B.f16_bits(v[2], flavor, True), B.f16_bits(v[3], flavor, True)))
            else:
                st_u32x2(y, 2 * d, _pack(B.bf16_bits(v[0], flavor), B.bf16_bits(v[1], flavor)),
                         _pack(B.bf16_bits(v[2], flavor), B.bf16_bits(v[3], flavor)))

    return kernel


@device
def _half(w, k, code):
    h = np.uint16((w >> np.uint32(16 * k)) & np.uint32(0xFFFF))
    return f16_bits_to_f32(h) if code == 1 else B.bf16_to_f32(h)


@functools.cache
def scalar_dequantize_kernel(type_name):
    """kernel(y, out, n_quads): y flat uint8 -> out flat float32, 4 values per step."""
    code = SCALAR_CODES[type_name]

    @cuda.jit(cache=True)
    def kernel(y, out, n_quads):
        for q in range(cuda.grid(1), n_quads, cuda.gridsize(1)):
            e = np.int64(q) * 4
            if code == 0:
                w = ld_u32x4(y, 4 * e)
                st_f32x4(out, e, f32_from_bits(w[0]), f32_from_bits(w[1]), f32_from_bits(w[2]),
                         f32_from_bits(w[3]))
            else:
                w = ld_u32x2(y, 2 * e)
                st_f32x4(out, e, _half(w[0], 0, code), _half(w[0], 1, code), _half(w[1], 0, code),
                         _half(w[1], 1, code))

    return kernel


@cuda.jit(cache=True)
def scalar_quantize_kernel_any(code, x, y, flavor, row_ids, has_rows):
    """One value per step: x (rows, cols) float32 -> y (dest_rows, cols) of float32 / uint16 bits."""
    n = x.shape[0] * x.shape[1]
    cols = x.shape[1]
    simd_end = cols - cols % 4          # ggml-cpu's F16C chunks end here; the tail is scalar code
    for e in range(cuda.grid(1), n, cuda.gridsize(1)):
        r = e // cols
        c = e % cols
        dr = row_ids[r] if has_rows else r
        v = x[r, c]
        if code == 0:
            y[dr, c] = v
        elif code == 1:
            y[dr, c] = B.f16_bits(v, flavor, c < simd_end)
        else:
            y[dr, c] = B.bf16_bits(v, flavor)


@cuda.jit(cache=True)
def scalar_dequantize_kernel_any(code, y, out):
    n = out.shape[0] * out.shape[1]
    cols = out.shape[1]
    for e in range(cuda.grid(1), n, cuda.gridsize(1)):
        r = e // cols
        c = e % cols
        if code == 0:
            out[r, c] = y[r, c]
        elif code == 1:
            out[r, c] = f16_bits_to_f32(y[r, c])
        else:
            out[r, c] = B.bf16_to_f32(y[r, c])
