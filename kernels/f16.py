"""f16: IEEE binary16, one value per 2-byte little-endian element (block size 1).

The kernels take any (rows, cols) float32 array and write (rows, 2 * cols) bytes, so a whole
ggml row can be passed as one row: the cpu flavor depends on where a value sits in its row.

Flavors differ only for NaN (every other float32 rounds to nearest even in all three, so all three
convert with F16C's instruction, ``f16c_fp32_to_fp16``, and ref and cuda replace its NaN):
- ref  ``GGML_FP32_TO_FP16`` (software): NaN -> 0x7E00 | sign, payload dropped.
- cpu  ``ggml_cpu_fp32_to_fp16`` on x86 F16C: ``vcvtps2ph`` on chunks of 16/8/4 values, which keeps
  the sign and the top 9 payload bits and sets the quiet bit (0x7E00 | sign | mantissa >> 13); the
  last ``cols % 4`` values of a row go through the software conversion, as in ref.
- cuda ``__float2half`` (cvt.rn.f16.f32): NaN -> canonical 0x7FFF.
Dequantize is exact for every half (``ggml_compute_fp16_to_fp32``; NaN payload kept).
Outputs of 16 MiB or more are written past the caches (stream.py), the same bits.
"""
import numpy as np
from numba import njit, prange

from . import CPU, CUDA
from .fp import f16c_fp32_to_fp16, fp16_to_fp32, fp32_to_fp16, nan_as
from .stream import streams, write_row

_SIMD_WIDTH = 4  # the narrowest F16C chunk ggml_cpu_fp32_to_fp16 uses before its scalar tail


@njit(cache=True, inline="always")
def _halves(dst, at, a, b, args):
    """dst[at + c - a] = x[r, c] as the flavor's half for c in [a, b); args = (x, r, flavor, simd_cols).
    One loop per flavor: a flavor test inside the loop would keep LLVM from vectorizing it."""
    x, r, flavor, simd_cols = args
    if flavor == CPU:
        for c in range(a, min(b, simd_cols)):
            dst[at + c - a] = f16c_fp32_to_fp16(x[r, c])
        for c in range(max(a, simd_cols), b):
            dst[at + c - a] = fp32_to_fp16(x[r, c])  # ggml's scalar tail
    elif flavor == CUDA:
        for c in range(a, b):
            dst[at + c - a] = nan_as(f16c_fp32_to_fp16(x[r, c]), np.uint16(0x7FFF))
    else:
        for c in range(a, b):
            dst[at + c - a] = fp32_to_fp16(x[r, c])


@njit(cache=True, inline="always")
def _floats(dst, at, a, b, args):
    """dst[at + c - a] = the float32 of halves[r, c] for c in [a, b); args = (halves, r)."""
    halves, r = args
    for c in range(a, b):
        dst[at + c - a] = fp16_to_fp32(halves[r, c])


@njit(parallel=True, cache=True)
def quantize_row_f16(x, out, flavor, rcp_table=None):
    """x: (rows, cols) float32 -> out: (rows, 2 * cols) uint8; no flavor divides, so rcp_table is unused."""
    n_rows, n_cols = x.shape
    halves = out.view(np.uint16)  # (rows, cols)
    stream = streams(halves)
    for r in prange(n_rows):
        write_row(halves[r], n_cols, stream, _halves, (x, r, flavor, n_cols - n_cols % _SIMD_WIDTH))


@njit(parallel=True, cache=True)
def dequantize_row_f16(raw, out):
    """raw: (rows, 2 * cols) uint8 -> out: (rows, cols) float32."""
    halves = raw.view(np.uint16)  # (rows, cols)
    n_rows, n_cols = out.shape
    stream = streams(out)
    for r in prange(n_rows):
        write_row(out[r], n_cols, stream, _floats, (halves, r))
