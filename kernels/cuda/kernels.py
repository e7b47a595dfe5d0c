"""The @cuda.jit kernels: quantize, dequantize, set_rows, fused rotate+quantize, dequantize+unrotate.

One kernel per job serves every type: a uniform branch on a small type code picks the device
function (kernels/cuda/blocks.py), so there are few kernels to compile and cache. Quantized types
run one thread per 32-value block over a shared-memory tile: the threads of a CUDA block load
TPB x 32 floats coalesced, then each thread quantizes its own row of the tile (stride 33, so the
32 threads of a warp hit 32 different banks). f32/f16/bf16 run one thread per value.
"""
import numpy as np
from numba import cuda, float32

from . import blocks as B
from .ops import SIM, add, mul, sub

QUANT_CODES = {"q8_0": 0, "q4_0": 1, "q4_1": 2, "iq4_nl": 3, "q5_0": 4, "q5_1": 5}
SCALAR_CODES = {"f32": 0, "f16": 1, "bf16": 2}
# threads (= 32-value blocks) per CUDA block; the simulator runs each thread as a Python thread
TPB = 8 if SIM else 128
TILE_W = 33                   # padded tile row


@cuda.jit(device=True, inline=True)
def quantize_block(code, src, r, y, i, flavor):
    if code == 0:
        B.quantize_q8_0(src, r, y, i, flavor)
    elif code == 1:
        B.quantize_q4_0(src, r, y, i, flavor)
    elif code == 2:
        B.quantize_q4_1(src, r, y, i, flavor)
    elif code == 3:
        B.quantize_iq4_nl(src, r, y, i, flavor)
    elif code == 4:
        B.quantize_q5_0(src, r, y, i, flavor)
    else:
        B.quantize_q5_1(src, r, y, i, flavor)


@cuda.jit(device=True, inline=True)
def dequantize_block(code, y, i, out, r):
    if code == 0:
        B.dequantize_q8_0(y, i, out, r)
    elif code == 1:
        B.dequantize_q4_0(y, i, out, r)
    elif code == 2:
        B.dequantize_q4_1(y, i, out, r)
    elif code == 3:
        B.dequantize_iq4_nl(y, i, out, r)
    elif code == 4:
        B.dequantize_q5_0(y, i, out, r)
    else:
        B.dequantize_q5_1(y, i, out, r)


@cuda.jit(device=True, inline=True)
def _load_tile(tile, x, first, n_blocks):
    """x (n_blocks, 32) -> tile rows 0..TPB-1 for blocks first.. (coalesced reads)."""
    t = cuda.threadIdx.x
    for k in range(32):
        e = k * TPB + t
        b = first + e // 32
        if b < n_blocks:
            tile[e // 32, e % 32] = x[b, e % 32]


@cuda.jit(device=True, inline=True)
def _store_tile(tile, out, first, n_blocks):
    t = cuda.threadIdx.x
    for k in range(32):
        e = k * TPB + t
        b = first + e // 32
        if b < n_blocks:
            out[b, e % 32] = tile[e // 32, e % 32]


@cuda.jit(device=True, inline=True)
def _dest_block(i, row_ids, blocks_per_row):
    """Block i of the source goes to this block of the destination (set_rows: row_ids[row])."""
    if blocks_per_row == 0:
        return i
    return row_ids[i // blocks_per_row] * blocks_per_row + i % blocks_per_row


@cuda.jit(cache=True)
def quantize_kernel(code, x, y, flavor, row_ids, blocks_per_row):
    """x (n_blocks, 32) float32 -> y (n_dest_blocks, type_size) uint8; blocks_per_row = 0: y[i]."""
    tile = cuda.shared.array((TPB, TILE_W), float32)
    first = cuda.blockIdx.x * TPB
    _load_tile(tile, x, first, x.shape[0])
    cuda.syncthreads()
    i = first + cuda.threadIdx.x
    if i < x.shape[0]:
        quantize_block(code, tile, cuda.threadIdx.x, y, _dest_block(i, row_ids, blocks_per_row), flavor)


@cuda.jit(cache=True)
def dequantize_kernel(code, y, out):
    """y (n_blocks, type_size) uint8 -> out (n_blocks, 32) float32."""
    tile = cuda.shared.array((TPB, TILE_W), float32)
    first = cuda.blockIdx.x * TPB
    i = first + cuda.threadIdx.x
    if i < y.shape[0]:
        dequantize_block(code, y, i, tile, cuda.threadIdx.x)
    cuda.syncthreads()
    _store_tile(tile, out, first, y.shape[0])


@cuda.jit(cache=True)
def scalar_quantize_kernel(code, x, y, flavor, row_ids):
    """x (rows, cols) float32 -> y (dest_rows, cols) of float32 / uint16 bits; row_ids[0] < 0: y[r]."""
    n = x.shape[0] * x.shape[1]
    cols = x.shape[1]
    simd_end = cols - cols % 4          # ggml-cpu's F16C chunks end here; the tail is scalar code
    for e in range(cuda.grid(1), n, cuda.gridsize(1)):
        r = e // cols
        c = e % cols
        dr = r if row_ids[0] < 0 else row_ids[r]
        v = x[r, c]
        if code == 0:
            y[dr, c] = v
        elif code == 1:
            y[dr, c] = B.f16_bits(v, flavor, c < simd_end)
        else:
            y[dr, c] = B.bf16_bits(v, flavor)


@cuda.jit(cache=True)
def scalar_dequantize_kernel(code, y, out):
    n = out.shape[0] * out.shape[1]
    cols = out.shape[1]
    for e in range(cuda.grid(1), n, cuda.gridsize(1)):
        r = e // cols
        c = e % cols
        if code == 0:
            out[r, c] = y[r, c]
        elif code == 1:
            out[r, c] = B.f16_bits_to_f32(y[r, c])
        else:
            out[r, c] = B.bf16_to_f32(y[r, c])


@cuda.jit(device=True, inline=True)
def _fwht_tile(tile, n, scale):
    """Every n-chunk of the tile's TPB*32 values <- chunk @ H_n, in kernels/hadamard.py's order:
    butterflies (a+b, a-b) for h = 1, 2, 4 .. n/2, then one multiply by H_n[0, 0]."""
    t = cuda.threadIdx.x
    half = n // 2
    h = 1
    while h < n:
        cuda.syncthreads()
        for p in range(t, TPB * 16, TPB):          # TPB*32/2 butterflies per stage
            c = p // half
            q = p % half
            e = c * n + (q // h) * 2 * h + q % h
            a = tile[e // 32, e % 32]
            b = tile[(e + h) // 32, (e + h) % 32]
            tile[e // 32, e % 32] = add(a, b)
            tile[(e + h) // 32, (e + h) % 32] = sub(a, b)
        h *= 2
    cuda.syncthreads()
    for k in range(32):
        tile[t, k] = mul(tile[t, k], scale)
    cuda.syncthreads()


@cuda.jit(cache=True)
def rotate_quantize_kernel(code, x, y, flavor, n, scale, row_ids, blocks_per_row):
    """Quantize (x @ H_n chunkwise): the rotated values live only in shared memory."""
    tile = cuda.shared.array((TPB, TILE_W), float32)
    first = cuda.blockIdx.x * TPB
    _load_tile(tile, x, first, x.shape[0])
    _fwht_tile(tile, n, scale)
    i = first + cuda.threadIdx.x
    if i < x.shape[0]:
        quantize_block(code, tile, cuda.threadIdx.x, y, _dest_block(i, row_ids, blocks_per_row), flavor)


@cuda.jit(cache=True)
def dequantize_unrotate_kernel(code, y, out, n, scale):
    tile = cuda.shared.array((TPB, TILE_W), float32)
    first = cuda.blockIdx.x * TPB
    i = first + cuda.threadIdx.x
    if i < y.shape[0]:
        dequantize_block(code, y, i, tile, cuda.threadIdx.x)
    _fwht_tile(tile, n, scale)
    _store_tile(tile, out, first, y.shape[0])
