"""bf16: bfloat16 (the top half of a float32), one value per 2-byte little-endian element.

The kernels take any (rows, cols) float32 array and write (rows, 2 * cols) bytes.

- ref, cpu  ``ggml_compute_fp32_to_bf16`` (ggml_cpu_fp32_to_bf16 is the same scalar loop):
  round to nearest even on the bits (subnormals kept, overflow to Inf), NaN -> top half | 0x0040.
- cuda  ``__float2bfloat16`` (cvt.rn.bf16.f32): the same rounding, NaN -> canonical 0x7FFF.
Dequantize shifts the half back up (exact). Outputs of 16 MiB or more are written past the caches
(stream.py), the same bits.
"""
import numpy as np
from numba import njit, prange

from .fp import bf16_bits, bf16_to_fp32, f32_bits
from .stream import streams, write_row


@njit(cache=True, inline="always")
def _halves(dst, at, a, b, args):
    """dst[at + c - a] = the bf16 bits of x[r, c] for c in [a, b); args = (x, r, flavor)."""
    x, r, flavor = args
    for c in range(a, b):
        dst[at + c - a] = bf16_bits(f32_bits(x[r, c]), flavor)


@njit(cache=True, inline="always")
def _floats(dst, at, a, b, args):
    """dst[at + c - a] = the float32 of halves[r, c] for c in [a, b); args = (halves, r)."""
    halves, r = args
    for c in range(a, b):
        dst[at + c - a] = bf16_to_fp32(halves[r, c])


@njit(parallel=True, cache=True)
def quantize_row_bf16(x, out, flavor, rcp_table=None):
    """x: (rows, cols) float32 -> out: (rows, 2 * cols) uint8; no flavor divides, so rcp_table is unused."""
    n_rows, n_cols = x.shape
    halves = out.view(np.uint16)  # (rows, cols)
    stream = streams(halves)
    for r in prange(n_rows):
        write_row(halves[r], n_cols, stream, _halves, (x, r, flavor))


@njit(parallel=True, cache=True)
def dequantize_row_bf16(raw, out):
    """raw: (rows, 2 * cols) uint8 -> out: (rows, cols) float32."""
    halves = raw.view(np.uint16)  # (rows, cols)
    n_rows, n_cols = out.shape
    stream = streams(out)
    for r in prange(n_rows):
        write_row(out[r], n_cols, stream, _floats, (halves, r))
