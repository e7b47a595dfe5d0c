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
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from . import CPU, CUDA
from .fp import fp16_to_fp32, fp32_to_fp16

_SIMD_WIDTH = 4  # the narrowest F16C chunk ggml_cpu_fp32_to_fp16 uses before its scalar tail


@intrinsic
def f16c_fp32_to_fp16(typingctx, f):
    """x86's vcvtps2ph with round to nearest even (ggml-cpu's row body), as the uint16 half bits.

    LLVM's ``fptrunc`` to half: with F16C (every x86-64 CPU since 2012) LLVM emits vcvtps2ph itself,
    16 lanes per instruction in a vectorized loop, so the bytes are the instruction's on every input,
    NaN included, with no NaN path of kvlab's own (a software formula that keeps F16C's NaN payloads
    ran at a third of ggml's speed). Without F16C LLVM calls the compiler runtime's __truncsfhf2,
    which rounds the same and keeps NaN the same way. tests/kernels/test_f16_bf16_bits.py
    holds it against ggml's from_float over a dense sample of all float32 bit patterns."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


@njit(cache=True, inline="always")
def nan_as(h, nan):
    """The half h, or nan where h is a NaN: ref and cuda round every other value as F16C does, so they
    take its fast conversion and replace only the NaN rule (a select, so that the loop vectorizes)."""
    return nan if (h & np.uint16(0x7FFF)) > np.uint16(0x7C00) else h


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
                h = f16c_fp32_to_fp16(x[r, c])
                halves[r, c] = nan_as(h, h & np.uint16(0xFE00))  # sign | 0x7E00, as fp32_to_fp16


@njit(parallel=True, cache=True)
def dequantize_row_f16(raw, out):
    """raw: (rows, 2 * cols) uint8 -> out: (rows, cols) float32."""
    halves = raw.view(np.uint16)  # (rows, cols)
    n_rows, n_cols = out.shape
    for r in prange(n_rows):
        for c in range(n_cols):
            out[r, c] = fp16_to_fp32(halves[r, c])
