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
"""
import numpy as np
from numba import njit, prange

from . import CPU, CUDA
from .fp import f16c_fp32_to_fp16, fp16_to_fp32, fp32_to_fp16, nan_as

_SIMD_WIDTH = 4  # the narrowest F16C chunk ggml_cpu_fp32_to_fp16 uses before its scalar tail


@njit(parallel=True, cache=True)
def quantize_row_f16(x, out, flavor, rcp_table=None):
    """x: (rows, cols) float32 -> out: (rows, 2 * cols) uint8; no flavor divides, so rcp_table is unused."""
    n_rows, n_cols = x.shape
    halves = out.view(np.uint16)  # (rows, cols)
    simd_cols = n_cols - n_cols % _SIMD_WIDTH
    for r in prange(n_rows):
        # One loop per flavor: a flavor test inside the loop would keep LLVM from vectorizing it.
        if flavor == CPU:
            for c in range(simd_cols):
                halves[r, c] = f16c_fp32_to_fp16(x[r, c])
            for c in range(simd_cols, n_cols):
                halves[r, c] = fp32_to_fp16(x[r, c])  # ggml's scalar tail
        elif flavor == CUDA:
            for c in range(n_cols):
                halves[r, c] = nan_as(f16c_fp32_to_fp16(x[r, c]), np.uint16(0x7FFF))
        else:
            for c in range(n_cols):
                halves[r, c] = fp32_to_fp16(x[r, c])


@njit(parallel=True, cache=True)
def dequantize_row_f16(raw, out):
    """raw: (rows, 2 * cols) uint8 -> out: (rows, cols) float32."""
    halves = raw.view(np.uint16)  # (rows, cols)
    n_rows, n_cols = out.shape
    for r in prange(n_rows):
        for c in range(n_cols):
            out[r, c] = fp16_to_fp32(halves[r, c])
