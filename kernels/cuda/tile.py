"""The shared-memory tile a CUDA block works in, and its ways in and out.

A CUDA block of TPB threads owns TPB consecutive 32-value blocks: tile[r, 0:32] is value block r
(rows padded to TILE_W floats). Global memory <-> tile moves by coalesced 16-byte accesses (thread t
takes float4 number t, t + TPB, ..); tile <-> registers by row: thread t reads or writes its row r
with eight 16-byte accesses (``read_row`` / ``write_row``, into a 32-element local array that the
callers index with constants only, so it stays in registers).
Why TILE_W = 36: rows start on 16 bytes (vector access), and the 8 threads that a 16-byte shared
access serves together (a quarter warp), reading the same 16 bytes of 8 consecutive rows or 8
consecutive float4 of one row, hit 32 distinct banks (36 = 4 mod 32).
"""
import numpy as np
from numba import cuda, float32

from .ops import SIM, cp_async16, device, ld_f32x4, st_f32x4, st_f32x4_cs
from .unroll import unrolled

TPB = 16 if SIM else 128          # the simulator runs each thread as a Python thread
TILE_W = 36
ALIGN = None if SIM else 16       # the simulator's arrays are numpy's (aligned) and refuse the argument
WARP_ROWS = min(TPB, 32)          # the tile rows of one warp (the simulator's block is less than a warp)


@device
def _read4(tile, r, row, k):
    v = ld_f32x4(tile, r * TILE_W + 4 * k)
    row[4 * k] = v[0]
    row[4 * k + 1] = v[1]
    row[4 * k + 2] = v[2]
    row[4 * k + 3] = v[3]


@device
def _write4(tile, r, row, k):
    st_f32x4(tile, r * TILE_W + 4 * k, row[4 * k], row[4 * k + 1], row[4 * k + 2], row[4 * k + 3])


read_row = unrolled(_read4, 8, 3)         # read_row(tile, r, row): row[0:32] <- tile[r, 0:32]
write_row = unrolled(_write4, 8, 3)       # write_row(tile, r, row): tile[r, 0:32] <- row[0:32]


@device
def _float4_at(q):
    """Flat tile index of the tile's float4 number q (row q / 8, columns 4 * (q % 8) ..)."""
    return np.uint32(q >> 3) * np.uint32(TILE_W) + np.uint32((q & 7) * 4)


@device
def _put4(tile, at, k, v):
    """float4 number q + k * TPB of the tile, q's at flat index at: TPB / 8 rows further per k (a constant)."""
    st_f32x4(tile, at + np.uint32(k * (TPB // 8) * TILE_W), v[0], v[1], v[2], v[3])


@device
def _copy4(tile, at, x, p, k):
    """The same float4 by cp.async, from its values at p + 4 * TPB * k of x."""
    cp_async16(tile, at + np.uint32(k * (TPB // 8) * TILE_W), x, p + 4 * TPB * k)


_copy_float4s = unrolled(_copy4, 8, 4)


@device
def load_tile(tile, x, base, total, vec, async_copy):
    """Values base .. base + TPB*32 of the flat float32 x -> the tile (zeros past total).
    vec: x is 16-byte aligned, so a whole tile comes as 8 float4 per thread: with async_copy (a constant)
    by cp.async straight into shared memory, in flight while the thread goes on until cp_async_wait_all
    (then a barrier before the tile is read); else all 8 loads first, then the stores. Otherwise value
    by value. Landed on return but with async_copy and vec."""
    t = cuda.threadIdx.x
    if vec and base + TPB * 32 <= total:
        p = base + 4 * t
        at = _float4_at(np.uint32(t))
        if async_copy:
            _copy_float4s(tile, at, x, p)
            return
        v0 = ld_f32x4(x, p)
        v1 = ld_f32x4(x, p + 4 * TPB)
        v2 = ld_f32x4(x, p + 8 * TPB)
        v3 = ld_f32x4(x, p + 12 * TPB)
        v4 = ld_f32x4(x, p + 16 * TPB)
        v5 = ld_f32x4(x, p + 20 * TPB)
        v6 = ld_f32x4(x, p + 24 * TPB)
        v7 = ld_f32x4(x, p + 28 * TPB)
        _put4(tile, at, 0, v0)
        _put4(tile, at, 1, v1)
        _put4(tile, at, 2, v2)
        _put4(tile, at, 3, v3)
        _put4(tile, at, 4, v4)
        _put4(tile, at, 5, v5)
        _put4(tile, at, 6, v6)
        _put4(tile, at, 7, v7)
    else:
        for k in range(32):
            e = k * TPB + t
            tile[e >> 5, e & 31] = x[base + e] if base + e < total else float32(0)


@device
def store_tile(tile, out, base, total, vec):
    """The tile -> values base .. of the flat float32 out (none past total)."""
    t = cuda.threadIdx.x
    if vec and base + TPB * 32 <= total:
        at = _float4_at(np.uint32(t))
        p = base + 4 * t
        for k in range(8):              # a constant trip count: unrolled, constant offsets
            v = ld_f32x4(tile, at + np.uint32(k * (TPB // 8) * TILE_W))
            st_f32x4(out, p + 4 * TPB * k, v[0], v[1], v[2], v[3])
    else:
        for k in range(32):
            e = k * TPB + t
            if base + e < total:
                out[base + e] = tile[e >> 5, e & 31]


@device
def store_warp_rows(tile, out, base, total, vec):
    """The calling warp's WARP_ROWS tile rows -> their values of the flat float32 out, base .. being the
    tile's (none past total), as streaming stores (st_f32x4_cs: written once, never read back here).
    Reads only the warp's own rows: a warp barrier after the warp's writes suffices, and each warp
    stores as soon as its rows are ready (no block barrier holds it back for the others).
    vec: lane l stores float4 number l + k * WARP_ROWS of the warp's rows (k = 0 .. 7), each store
    instruction 512 contiguous bytes."""
    t = np.uint32(cuda.threadIdx.x)
    lane = t % np.uint32(WARP_ROWS)
    first_row = t - lane
    start = base + np.int64(32 * first_row)
    if vec and start + 32 * WARP_ROWS <= total:
        at = _float4_at(np.uint32(8) * first_row + lane)
        p = start + np.int64(4 * lane)
        for k in range(8):              # a constant trip count: unrolled, constant offsets
            v = ld_f32x4(tile, at + np.uint32(k * (WARP_ROWS // 8) * TILE_W))
            st_f32x4_cs(out, p + 4 * WARP_ROWS * k, v[0], v[1], v[2], v[3])
    else:
        for k in range(32):
            e = np.uint32(32) * first_row + np.uint32(k * WARP_ROWS) + lane
            if base + e < total:
                out[base + e] = tile[e >> 5, e & 31]
