"""The @cuda.jit kernels: quantize (also set_rows and the fused rotation), dequantize (also the fused
un-rotation), rotate, and the per-value f32/f16/bf16 conversions.

Block types. A CUDA block of TPB threads owns TPB consecutive 32-value blocks, one tile (tile.py):
  1. the tile's TPB * 32 floats arrive by coalesced 16-byte loads, all issued before the first is
     used, into shared memory (a lookahead type's quantize block takes TILES_PER_BLOCK tiles, the next
     one's loads by cp.async in flight while it quantizes one);
  2. thread t takes row t into registers (8 16-byte reads), and optionally rotates it (fwht.py);
  3. thread t quantizes its row into a shared staging buffer laid out as the ggml block structs;
  4. the staged TPB * type_size bytes leave as coalesced 16-byte words (4-byte words, or single
     bytes, to row_ids' rows for set_rows or when the output is not aligned).
Dequantize runs these steps backwards (the bytes arrive as 16-byte words), each warp on its own 32
rows: it loads their bytes, dequantizes, writes the rows and stores them between warp barriers, with no
block barrier (but iq4_nl's table's, and a rotation's for n > 256), so that one warp's stores overlap
another's loads. Every thread runs steps 2-3, rows past the end too (never stored): no divergence
around the barriers.
Before step 1, a large call's CUDA block may ask L2 for the input of the tile `ahead` tiles further
(prefetch.L2, one 128-byte line per thread; ahead a fraction of the CUDA blocks the GPU holds at once,
so that tile is one a block starts a while later): a block then finds its input in L2, and the memory
has later reads in flight while this wave computes. A hint: no value depends on it. The host chooses
ahead (kvlab.kernels.cuda._PREFETCH): half a wave for dequantize, none for quantize (slower with it).
f32/f16/bf16: a thread converts 4 consecutive values per step (16-byte loads), grid-stride; rows
whose length is not a multiple of 4, or unaligned arrays, take a one-value-per-step kernel.
Every kernel that writes through set_rows' ids first asks rows_refused: the ids are checked on the
GPU, before any byte is written, so that the host never waits for them.

Kernels per type are templates instantiated with the type's device functions (its DeviceCodec, from
kvlab.types' TypeInfo.gpu_codec()), as set-rows.cu instantiates its kernel with
``quantize_f32_<type>_block``: the codec's functions, the type size and the flavor are bound as the
instance's globals (UPPER CASE names below), which numba compiles as constants, so an instance holds
one type's (and flavor's) code only. Not a closure: numba keys a closure's disk cache by its pickled
cells, and a device function pickles with a fresh id in every process; each instance has its own name,
which keeps its disk cache apart.
"""
import functools
import os
import types
from typing import NamedTuple

import numpy as np
from numba import cuda, float32, uint8, uint32

from .. import FLAVORS
from .fwht import rotate_into_tile, rotate_row
from .ops import (SIM, cp_async_wait_all, device, ld_f32x4, ld_u32, ld_u32x2, ld_u32x4, prefetch_l2, st_f32x4,
                  st_u32, st_u32x2, st_u32x4, warp_barrier)
from .quantizers import BEST_INDEX_LUT, KVALUES
from .tile import ALIGN, TILE_W, TPB, WARP_ROWS, load_tile, read_row, store_tile, store_warp_rows, write_row


def _load_array_overloads():
    """numba-cuda 0.30.4 registers an overload of np.row_stack when it loads its array overloads (at
    the first compile), and numpy 2.5 has no np.row_stack: load them now, with an alias there for that
    moment only, so that numpy stays as it is for everyone else."""
    missing = not hasattr(np, "row_stack")
    if missing:
        np.row_stack = np.vstack
    try:
        from numba.cuda.np import arrayobj  # noqa: F401
    finally:
        if missing:
            del np.row_stack


if not SIM:
    _load_array_overloads()

VALUE_TPB = 32 if SIM else 256
# 64 registers hold a row (32) and its packed words without spills (ptxas -v); 8 CUDA blocks per SM
TILE_JIT = dict(cache=True) if SIM else dict(cache=True, max_registers=64)
TILE_BLOCKS_PER_SM = 8        # 128 threads x 64 registers: 8 fill an SM's 65536 (shared: <= 23 KB each)


@functools.cache
def resident_tiles():
    """How many tile CUDA blocks the GPU holds at once (its SMs x TILE_BLOCKS_PER_SM): the prefetch
    distance; 0 in the simulator (no prefetch)."""
    if SIM:
        return 0
    return cuda.get_current_device().MULTIPROCESSOR_COUNT * TILE_BLOCKS_PER_SM


# Tiles a quantize CUDA block of a lookahead type (DeviceCodec.lookahead: iq4_nl) takes, one after another,
# each one's loads in flight (cp.async) while the one before it is quantized: a block loads only at its
# start otherwise, and during a long quantize its SM reads less. H200, 2^27 values, fraction of copy_ with
# 1 / 2 / 4 / 8 / 16 tiles (base: d2bfbce's one tile, plain loads): iq4_nl quantize ref 0.853 / 0.929 / 0.927 /
# 0.925 / 0.893 (base 0.841-0.848), fused ref n = 64 0.731 / 0.798 / 0.809 / 0.802 / 0.777 (base 0.730-0.734).
# The other types stay at one tile and plain loads: cp.async alone took q4_0 quantize from 1.03 to 0.96.
def _tiles_setting(text: str) -> int:
    """KVLAB_CUDA_TILES_PER_BLOCK's value, a positive integer; anything else is refused when the kernels load."""
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"KVLAB_CUDA_TILES_PER_BLOCK={text!r}: expected a positive integer (the tiles a quantize "
                         f"CUDA block of a lookahead type takes)")
    return int(text)


TILES_PER_BLOCK = 2 if SIM else _tiles_setting(os.environ.get("KVLAB_CUDA_TILES_PER_BLOCK", "4"))


def tiles_per_block(info):
    """Tiles a quantize CUDA block of this type takes (TILES_PER_BLOCK for a lookahead type, else 1)."""
    return TILES_PER_BLOCK if info.gpu_codec().lookahead else 1


def _instantiate(template, name, jit_options, **constants):
    """cuda.jit of `template` with `constants` as globals, under its own name."""
    fn = types.FunctionType(template.__code__, {**template.__globals__, **constants}, name)
    fn.__qualname__ = name
    return cuda.jit(**jit_options)(fn)


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
def store_full_tile(stage, y, base, count):
    """stage[0:count] -> bytes base .. of the flat uint8 y, 16-byte aligned, count a constant multiple of
    16 (a whole tile's STAGE_BYTES): a thread's words at constant offsets, no loop (store_bytes' width 16
    for a whole tile, without its 64-bit loop arithmetic)."""
    t = np.uint32(cuda.threadIdx.x)
    words = count >> 4
    for k in range((words + TPB - 1) // TPB):       # a constant trip count: unrolled
        w = t + np.uint32(k * TPB)
        if w < np.uint32(words):
            v = ld_u32x4(stage, np.uint32(16) * w)
            st_u32x4(y, base + np.int64(16 * w), v[0], v[1], v[2], v[3])


@device
def load_warp_bytes(stage, y, base, count, wide, warp_bytes):
    """The calling warp's share of a tile's bytes: bytes s .. s + warp_bytes of the tile's (base .. of
    the flat uint8 y; those below count only) -> stage[s ..], s = warp_bytes * the warp's number; its
    WARP_ROWS rows' blocks, warp_bytes = WARP_ROWS * type_size (a multiple of 16). Only the warp reads
    them: a warp barrier publishes them, no block barrier.
    wide: y is 16-byte aligned; a lane then loads at most 3 words of 16 (type_size <= 34), all first."""
    t = cuda.threadIdx.x
    lane = t % WARP_ROWS
    s = (t - lane) // WARP_ROWS * warp_bytes
    end = max(0, min(warp_bytes, count - s))          # this warp's bytes (0: past the end)
    n16 = end >> 4 if wide else 0
    w1 = lane + WARP_ROWS
    w2 = lane + 2 * WARP_ROWS
    zero = np.uint32(0)
    a = b = c = (zero, zero, zero, zero)
    if lane < n16:
        a = ld_u32x4(y, base + s + 16 * lane)
    if w1 < n16:
        b = ld_u32x4(y, base + s + 16 * w1)
    if w2 < n16:
        c = ld_u32x4(y, base + s + 16 * w2)
    if lane < n16:
        st_u32x4(stage, s + 16 * lane, a[0], a[1], a[2], a[3])
    if w1 < n16:
        st_u32x4(stage, s + 16 * w1, b[0], b[1], b[2], b[3])
    if w2 < n16:
        st_u32x4(stage, s + 16 * w2, c[0], c[1], c[2], c[3])
    for k in range(16 * n16 + lane, end, WARP_ROWS):
        stage[s + k] = y[base + s + k]


@device
def prefetch_tile(a, first, end, per_line):
    """Thread t asks L2 for the 128-byte line of element first + t * per_line of the flat a, if below
    end (a tile's input: TPB * 32 floats, or TPB * type_size bytes)."""
    e = first + np.int64(cuda.threadIdx.x) * per_line
    if e < end:
        prefetch_l2(a, e)


@device
def load_table(table, values):
    """A small constant table into shared memory (the caller's barrier publishes it)."""
    for i in range(cuda.threadIdx.x, values.shape[0], TPB):          # TPB may be 16 (the simulator)
        table[i] = values[i]


# ---- set_rows' ids, checked before anything is written ---------------------------------------------
CHECK_TPB = 32 if SIM else 1024
IDS_CHECKED_IN_KERNEL = 4 if SIM else 1024      # up to this many ids every CUDA block checks them all


@device
def _ids_outside(row_ids, n_ids, n_cache_rows):
    """Some id in row_ids[0:n_ids] lies outside [0, n_cache_rows): the block's answer, to every thread."""
    bad = 0
    for k in range(cuda.threadIdx.x, n_ids, cuda.blockDim.x):
        r = row_ids[k]
        if r < 0 or r >= n_cache_rows:
            bad = 1
    return cuda.syncthreads_or(bad) != 0


@device
def rows_refused(row_ids, n_check, n_cache_rows, flag, refused):
    """Every writing kernel asks this first, every thread of every CUDA block: n_check >= 0, check the
    first n_check ids here (every block all of them: the same answer everywhere, so a refused call
    writes nothing at all); n_check < 0, check_rows_kernel ran before and left its answer in flag[0].
    A refusal sets refused[0] (host memory, read by the host without a sync), from block 0 only. No ids:
    n_check 0."""
    if n_check == 0:
        return False
    if n_check > 0:
        bad = _ids_outside(row_ids, n_check, n_cache_rows)
    else:
        bad = flag[0] != 0
    if bad and cuda.threadIdx.x == 0 and cuda.blockIdx.x == 0:
        refused[0] = 1                    # once per call: the host, which clears it, may read it mid-call
    return bad


@cuda.jit(cache=True)
def check_rows_kernel(row_ids, n_cache_rows, flag):
    """One block of CHECK_TPB threads: flag[0] <- some id outside [0, n_cache_rows) (for set_rows with
    more ids than every CUDA block should read)."""
    bad = _ids_outside(row_ids, row_ids.shape[0], n_cache_rows)
    if cuda.threadIdx.x == 0:
        flag[0] = 1 if bad else 0


# ---- the block-type kernels --------------------------------------------------------------------
def _quantize(x, y, n_blocks, per_block, vec, width, row_bytes, n, scale, ahead, row_ids, n_check, n_cache_rows,
              flag, refused):
    """Template (QUANTIZE_BLOCK, TYPE_SIZE, STAGE_BYTES, FLAVOR, TABLES, LOOKAHEAD): see quantize_kernel."""
    if rows_refused(row_ids, n_check, n_cache_rows, flag, refused):
        return                            # the whole block: no barrier below waits for it
    tile = cuda.shared.array((TPB, TILE_W), float32, alignment=ALIGN)
    stage = cuda.shared.array(STAGE_BYTES, uint8, alignment=ALIGN)  # noqa: F821 (instance constants)
    lut = cuda.shared.array(32, uint32)
    kv = cuda.shared.array(16, float32)
    r = np.uint32(cuda.threadIdx.x)       # unsigned indices: no wrap-around code (quantizers.py)
    if TABLES:                            # noqa: F821  a constant: numba drops the branch for other types
        load_table(lut, BEST_INDEX_LUT)
        load_table(kv, KVALUES)
    t = np.int64(cuda.blockIdx.x) * per_block
    end = min(t + per_block, (n_blocks + TPB - 1) // TPB)
    load_tile(tile, x, t * TPB * 32, n_blocks * 32, vec, LOOKAHEAD)  # noqa: F821
    row = cuda.local.array(32, float32)
    while t < end:
        first = t * TPB
        cp_async_wait_all()
        cuda.syncthreads()                # the tile has landed; the previous tile's stores are done
        read_row(tile, r, row)
        if n > 0:
            rotate_row(tile, row, n, scale, TPB)        # n > 256 works in the tile
        t_next = t + 1
        if t_next < end:                  # (every thread alike) the next tile's loads fly while this one is quantized
            cuda.syncthreads()            # every row is in registers: the tile is free
            load_tile(tile, x, t_next * TPB * 32, n_blocks * 32, vec, LOOKAHEAD)  # noqa: F821
        if ahead > 0:
            later = (t + ahead) * TPB * 32
            prefetch_tile(x, later, min(later + TPB * 32, n_blocks * 32), 32)
        QUANTIZE_BLOCK(row, stage, r * TYPE_SIZE, FLAVOR, lut, kv)  # noqa: F821
        cuda.syncthreads()
        if width == 16 and first + TPB <= n_blocks:
            store_full_tile(stage, y, first * TYPE_SIZE, STAGE_BYTES)  # noqa: F821
        else:
            store_bytes(stage, y, first * TYPE_SIZE, min(TPB, n_blocks - first) * TYPE_SIZE,  # noqa: F821
                        width, row_ids, row_bytes)
        t = t_next


@functools.cache
def quantize_kernel(info, flavor):
    """kernel(x, y, n_blocks, per_block, vec, width, row_bytes, n, scale, ahead, row_ids, n_check, n_cache_rows,
    flag, refused) for a block type (a TypeInfo): x flat float32 (n_blocks * 32), y flat uint8; CUDA block b
    takes the per_block tiles from b * per_block (tiles_per_block(info); several for a LOOKAHEAD type);
    row_bytes > 0: source row k goes to row row_ids[k] of y, once rows_refused has passed the ids; n > 0: quantize
    x @ H_n chunkwise (H_n[0, 0] == scale); ahead > 0: prefetch the input of the tile that far on. The
    flavor is a compile-time constant too: a kernel then holds only its flavor's per-value code, not
    the other flavors' selects."""
    codec = info.gpu_codec()
    return _instantiate(_quantize, f"quantize_{info.name}_{FLAVORS[flavor]}", TILE_JIT,
                        QUANTIZE_BLOCK=codec.quantize, TYPE_SIZE=info.type_size,
                        STAGE_BYTES=TPB * info.type_size,  # a shared array's size: one constant
                        FLAVOR=flavor, TABLES=codec.tables, LOOKAHEAD=codec.lookahead)


def _dequantize(y, out, n_blocks, wide, vec, n, scale, ahead):
    """Template (DEQUANTIZE_BLOCK, TYPE_SIZE, STAGE_BYTES, TABLES): see dequantize_kernel. Each warp
    moves its own rows' bytes in and values out between warp barriers: no block barrier (but the
    table's, and a rotation's for n > 256), so a warp's stores overlap the other warps' loads."""
    if ahead > 0:
        later = (np.int64(cuda.blockIdx.x) + ahead) * TPB * TYPE_SIZE  # noqa: F821
        prefetch_tile(y, later, min(later + TPB * TYPE_SIZE, n_blocks * TYPE_SIZE), 128)  # noqa: F821
    tile = cuda.shared.array((TPB, TILE_W), float32, alignment=ALIGN)
    stage = cuda.shared.array(STAGE_BYTES, uint8, alignment=ALIGN)  # noqa: F821
    kv = cuda.shared.array(16, float32)
    first = np.int64(cuda.blockIdx.x) * TPB
    r = np.uint32(cuda.threadIdx.x)
    if TABLES:                            # noqa: F821
        load_table(kv, KVALUES)
        cuda.syncthreads()
    load_warp_bytes(stage, y, first * TYPE_SIZE, min(TPB, n_blocks - first) * TYPE_SIZE, wide,  # noqa: F821
                    WARP_ROWS * TYPE_SIZE)  # noqa: F821
    warp_barrier()
    row = cuda.local.array(32, float32)
    DEQUANTIZE_BLOCK(stage, r * TYPE_SIZE, row, kv)  # noqa: F821
    if n > 0:
        rotate_into_tile(tile, row, n, scale, TPB)    # n > 256: block barriers inside; the rows then the threads' own
    else:
        write_row(tile, r, row)
    warp_barrier()
    store_warp_rows(tile, out, first * 32, n_blocks * 32, vec)


@functools.cache
def dequantize_kernel(info):
    """kernel(y, out, n_blocks, wide, vec, n, scale, ahead) for a block type: y flat uint8 -> out flat
    float32; n > 0: out = dequantize(y) @ H_n chunkwise; ahead > 0: prefetch the bytes of the tile that
    far on."""
    codec = info.gpu_codec()
    return _instantiate(_dequantize, f"dequantize_{info.name}", TILE_JIT,
                        DEQUANTIZE_BLOCK=codec.dequantize, TYPE_SIZE=info.type_size,
                        STAGE_BYTES=TPB * info.type_size, TABLES=codec.tables)


@cuda.jit(**TILE_JIT)
def rotate_kernel(x, out, total, vec, n, scale):
    """out = x @ H_n on every n-chunk of the flat float32 x (total values, a multiple of n)."""
    tile = cuda.shared.array((TPB, TILE_W), float32, alignment=ALIGN)
    base = np.int64(cuda.blockIdx.x) * TPB * 32
    r = np.uint32(cuda.threadIdx.x)
    load_tile(tile, x, base, total, vec, False)
    cuda.syncthreads()
    row = cuda.local.array(32, float32)
    read_row(tile, r, row)
    rotate_into_tile(tile, row, n, scale, TPB)
    cuda.syncthreads()
    store_tile(tile, out, base, total, vec)


# ---- f32 / f16 / bf16 --------------------------------------------------------------------------
# Instance constants: VALUE_BITS(v, flavor, in_simd_chunk) -> bits, BITS_VALUE(bits) -> v (the type's
# DeviceCodec), WIDE: 4-byte values (f32), else 2-byte ones packed two to a 32-bit word.
@device
def _pack(lo, hi):
    return np.uint32(lo) | (np.uint32(hi) << np.uint32(16))


@device
def _low(w):
    return np.uint16(w & np.uint32(0xFFFF))


@device
def _high(w):
    return np.uint16(w >> np.uint32(16))


def _value_quantize(x, y, flavor, n_quads, cols, has_rows, row_ids, n_check, n_cache_rows, flag, refused):
    """Template: x flat float32, y flat uint8; rows of cols values (cols % 4 == 0: every row's values
    are then in ggml-cpu's F16C chunks)."""
    if rows_refused(row_ids, n_check, n_cache_rows, flag, refused):
        return
    for q in range(cuda.grid(1), n_quads, cuda.gridsize(1)):
        e = np.int64(q) * 4
        d = e
        if has_rows:
            r = e // cols
            d = row_ids[r] * cols + (e - r * cols)
        v = ld_f32x4(x, e)
        b0 = VALUE_BITS(v[0], flavor, True)   # noqa: F821
        b1 = VALUE_BITS(v[1], flavor, True)   # noqa: F821
        b2 = VALUE_BITS(v[2], flavor, True)   # noqa: F821
        b3 = VALUE_BITS(v[3], flavor, True)   # noqa: F821
        if WIDE:                              # noqa: F821
            st_u32x4(y, 4 * d, b0, b1, b2, b3)
        else:
            st_u32x2(y, 2 * d, _pack(b0, b1), _pack(b2, b3))


def _value_dequantize(y, out, n_quads):
    """Template: y flat uint8 -> out flat float32, 4 values per step."""
    for q in range(cuda.grid(1), n_quads, cuda.gridsize(1)):
        e = np.int64(q) * 4
        if WIDE:                              # noqa: F821
            w = ld_u32x4(y, 4 * e)
            st_f32x4(out, e, BITS_VALUE(w[0]), BITS_VALUE(w[1]), BITS_VALUE(w[2]), BITS_VALUE(w[3]))  # noqa: F821
        else:
            w = ld_u32x2(y, 2 * e)
            st_f32x4(out, e, BITS_VALUE(_low(w[0])), BITS_VALUE(_high(w[0])),  # noqa: F821
                     BITS_VALUE(_low(w[1])), BITS_VALUE(_high(w[1])))            # noqa: F821


def _value_quantize_any(x, y, flavor, has_rows, row_ids, n_check, n_cache_rows, flag, refused):
    """Template, one value per step: x (rows, cols) float32 -> y (dest_rows, cols) of value bits."""
    if rows_refused(row_ids, n_check, n_cache_rows, flag, refused):
        return
    n = x.shape[0] * x.shape[1]
    cols = x.shape[1]
    simd_end = cols - cols % 4          # ggml-cpu's F16C chunks end here; the tail is scalar code
    for e in range(cuda.grid(1), n, cuda.gridsize(1)):
        r = e // cols
        c = e % cols
        dr = row_ids[r] if has_rows else r
        y[dr, c] = VALUE_BITS(x[r, c], flavor, c < simd_end)  # noqa: F821


def _value_dequantize_any(y, out):
    """Template, one value per step: y (rows, cols) of value bits -> out (rows, cols) float32."""
    n = out.shape[0] * out.shape[1]
    cols = out.shape[1]
    for e in range(cuda.grid(1), n, cuda.gridsize(1)):
        r = e // cols
        c = e % cols
        out[r, c] = BITS_VALUE(y[r, c])        # noqa: F821


class ValueKernels(NamedTuple):
    quantize: object        # (x, y, flavor, n_quads, cols, has_rows, *ids check), 4 values a step
    dequantize: object      # (y, out, n_quads)
    quantize_any: object    # (x, y, flavor, has_rows, *ids check), one value a step
    dequantize_any: object  # (y, out)


@functools.cache
def value_kernels(info):
    """The four value kernels of f32, f16 or bf16 (a TypeInfo), instantiated with its DeviceCodec."""
    codec = info.gpu_codec()
    constants = dict(VALUE_BITS=codec.quantize, BITS_VALUE=codec.dequantize, WIDE=info.type_size == 4)
    return ValueKernels(*(_instantiate(t, f"{t.__name__[1:]}_{info.name}", dict(cache=True), **constants)
                          for t in (_value_quantize, _value_dequantize, _value_quantize_any, _value_dequantize_any)))
