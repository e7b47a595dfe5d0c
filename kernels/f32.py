"""f32: the float32 bits themselves, 4 bytes little-endian per value (block size 1).

All three flavors copy the bits (NaN payloads included): ggml's CPU and CUDA set_rows move an
f32 row unchanged. The kernels take any (rows, cols) float32 array and write (rows, 4 * cols) bytes.
"""
import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def quantize_row_f32(x, out, flavor, rcp_table=None):
    """x: (rows, cols) float32 -> out: (rows, 4 * cols) uint8; flavor and rcp_table are accepted and unused."""
    src = x.view(np.uint32)   # (rows, cols): integers, so no float load can touch a NaN
    dst = out.view(np.uint32)  # (rows, cols)
    for r in prange(src.shape[0]):
        for c in range(src.shape[1]):
            dst[r, c] = src[r, c]


@njit(parallel=True, cache=True)
def dequantize_row_f32(raw, out):
    """raw: (rows, 4 * cols) uint8 -> out: (rows, cols) float32."""
    src = raw.view(np.uint32)  # (rows, cols)
    dst = out.view(np.uint32)  # (rows, cols)
    for r in prange(src.shape[0]):
        for c in range(src.shape[1]):
            dst[r, c] = src[r, c]
