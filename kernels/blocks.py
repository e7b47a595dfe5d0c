"""Scalar helpers shared by the 32-value block kernels (q8_0, q4_0, q4_1, q5_*, iq4_nl).

Every function here is scalar ``@njit`` (no array creation), so the same code
compiles for numba-cuda device functions. Stable API, used by other kernel modules:

Bytes of a block (``blk`` is one block's uint8 row, ``off`` a byte offset):
  ``load_f16(blk, off)``          -> float32: the little-endian ggml_half at ``off``, widened exactly
  ``store_u16(blk, off, h)``      write uint16 ``h`` little-endian at ``off``
  ``pack_nibbles(lo, hi)``        -> uint8: the low byte of ``lo | hi << 4``, unmasked as in C
                                  (ggml: value j low, value j+16 high; q5 callers mask first)
  ``trunc_i8(v)``                 -> int: C's ``(int8_t)v`` on x86 (the low byte of c_cast_i32, signed)

C casts of float to integer, as the x86-64 build does them (C leaves NaN and
out-of-range undefined; these are the bytes x86 writes, kept as kvlab's definition):
  ``c_cast_i32(v)``               (int)v: truncate; NaN/out of range -> INT_MIN (cvttss2si, cvtps2dq)
  ``roundf32(v)``                 C roundf: halves away from zero (float32 result)
  ``round_even32(v)``             _mm256_round_ps(_MM_ROUND_NEAREST): halves to even (float32 result)
  ``low_byte(i)``                 -> uint8: what storing an int into an int8_t/uint8_t keeps (mod 256)
  ``saturate_i8(i)``              -> uint8: packs_epi32 + packs_epi16 saturation, as int8 bits
  ``ptx_cast_i32(v)``             CUDA cvt.rzi.s32.f32: truncate, saturate, NaN -> 0
  ``ptx_trunc_i8(v)``             -> int: CUDA's ``(int8_t)v`` (low byte of ptx_cast_i32, signed)

CUDA fast-math emulation (nvcc -use_fast_math: ftz, approximate division, fma). ``rcp_table`` is
None or ``rcp_approx_table()``: int8[2**23], measured on an H100 (tools/cuda_golden/approx_probe.cu),
bits(rcp.approx.ftz(1.m)) - bits(RN(1/1.m)) per mantissa m; the hardware result for any exponent
is that table shifted (0 mismatches measured). Without it, rcp is the correctly rounded 1/x, which
the hardware misses by one ulp for 13% of mantissas (never for the constants 127, 15, 31, 8, 16).
  ``cuda_rcp(x, rcp_table=None)``     rcp.approx.ftz.f32
  ``cuda_div(a, b, rcp_table=None)``  div.approx.ftz.f32 = mul.ftz(a, rcp.approx(b)) (measured: always)
  ``cuda_fp32_to_fp16(f)``            __float2half (cvt.rn.f16.f32): RNE, NaN -> canonical 0x7FFF
  ``rcp_approx_table()``              the table (numpy, loaded once) or None where the file is absent

Block searches, per flavor (``REF``/``CPU`` are IEEE; ``CUDA`` flushes subnormals in compares):
  ``first_absmax(xb, flavor)``    the signed value of the first element of largest |x| (q4_0, q5_0, iq4_nl)
  ``min_max(xb, flavor)``         (min, max) from FLT_MAX / -FLT_MAX, NaN ignored (q4_1, q5_1 ref)
  ``max_abs_key(xb, skip_nan, flush)`` -> uint32: the largest |x| as bits (NaN above Inf unless
                                  skipped; flush: subnormals count as 0); ``f32_from_bits`` gives |x|
The searches reduce integer keys (float order as integers) so that LLVM vectorizes them.
  ``scale_inverse(d, flavor, rcp_table=None)``  ``d ? 1.0f/d : 0.0f``
"""
from pathlib import Path

import numpy as np
from numba import njit

from .fp import CUDA, f32_bits, f32_from_bits, fp32_to_fp16, fp16_to_fp32, ftz

FLT_MAX = np.float32(3.4028234663852886e38)
INT_MIN = np.int32(-2147483648)
_TWO31 = np.float32(2147483648.0)
_ABS = np.uint32(0x7FFFFFFF)
_INF_BITS = np.uint32(0x7F800000)
_MIN_NORMAL_BITS = np.uint32(0x00800000)
_MANTISSA = np.uint32(0x007FFFFF)
_FLT_MAX_KEY = np.int64(0x7F7FFFFF)  # FLT_MAX's bits: the start of ggml's min search
_RCP_TABLE_FILE = Path(__file__).with_name("rcp_approx_sm90.npz")
_rcp_table = None
_HALF = np.float32(0.5)


@njit(cache=True)
def load_f16(blk, off):
    return fp16_to_fp32(np.uint16(np.uint16(blk[off]) | (np.uint16(blk[off + 1]) << np.uint16(8))))


@njit(cache=True)
def store_u16(blk, off, h):
    blk[off] = np.uint8(h & np.uint16(0xFF))
    blk[off + 1] = np.uint8(h >> np.uint16(8))


@njit(cache=True)
def pack_nibbles(lo, hi):
    return np.uint8((np.int64(lo) | (np.int64(hi) << 4)) & 0xFF)


@njit(cache=True)
def _in_int32_range(v):
    # False for NaN too: the comparisons are ordered.
    return v >= -_TWO31 and v < _TWO31


@njit(cache=True)
def c_cast_i32(v):
    if not _in_int32_range(v):
        return INT_MIN
    return np.int32(v)  # in range: LLVM fptosi truncates toward zero


_TWO23 = np.float32(8388608.0)  # from here on every float32 is an integer


@njit(cache=True)
def _round_half(v, to_even):
    # Branch-free so that loops over a block vectorize.
    a = abs(v)
    r = (a + _TWO23) - _TWO23  # a < 2**23: the add rounds a to the nearest integer, halves to even
    r = r + np.float32(1.0) if (not to_even and a - r == _HALF) else r  # roundf: halves go up
    signed = f32_from_bits(f32_bits(r) | (f32_bits(v) & np.uint32(0x80000000)))
    return signed if a < _TWO23 else v  # integral already, Inf or NaN: as is


@njit(cache=True)
def roundf32(v):
    return _round_half(v, False)


@njit(cache=True)
def round_even32(v):
    return _round_half(v, True)


@njit(cache=True)
def trunc_i8(v):
    return np.int64(np.int8(low_byte(c_cast_i32(v))))


@njit(cache=True)
def low_byte(i):
    return np.uint8(np.int64(i) & 0xFF)


@njit(cache=True)
def saturate_i8(i):
    return np.uint8(np.int64(min(max(np.int64(i), -128), 127)) & 0xFF)


@njit(cache=True)
def ptx_cast_i32(v):
    if v != v:
        return np.int32(0)
    if v >= _TWO31:
        return np.int32(2147483647)
    if v <= -_TWO31:
        return INT_MIN
    return np.int32(v)


@njit(cache=True)
def ptx_trunc_i8(v):
    return np.int64(np.int8(low_byte(ptx_cast_i32(v))))


@njit(cache=True, error_model="numpy")  # 1/0 is Inf, as in hardware, not ZeroDivisionError
def cuda_rcp(x, rcp_table=None):
    x = ftz(x)
    r = ftz(np.float32(1.0) / x)
    if rcp_table is None:
        return r
    a = f32_bits(r) & _ABS
    if a < _MIN_NORMAL_BITS or a >= _INF_BITS:
        return r  # zero (flushed), Inf or NaN: the same in hardware
    return f32_from_bits(np.uint32(np.int64(f32_bits(r)) + np.int64(rcp_table[f32_bits(x) & _MANTISSA])))


@njit(cache=True)
def cuda_div(a, b, rcp_table=None):
    return ftz(ftz(a) * cuda_rcp(b, rcp_table))


def rcp_approx_table():
    """The measured rcp.approx table, or None where kvlab ships without it (see the docstring)."""
    global _rcp_table
    if _rcp_table is None and _RCP_TABLE_FILE.exists():
        with np.load(_RCP_TABLE_FILE) as f:
            _rcp_table = np.ascontiguousarray(f["rcp_delta"], dtype=np.int8)
    return _rcp_table


@njit(cache=True)
def cuda_fp32_to_fp16(f):
    if f != f:
        return np.uint16(0x7FFF)
    return fp32_to_fp16(f)


@njit(cache=True)
def _abs_key(v, flush):
    """|v|'s bits: for non-negative floats integer order is float order (NaN above Inf).
    With flush, a subnormal counts as zero (CUDA's ftz compares)."""
    a = f32_bits(v) & _ABS
    return np.uint32(0) if flush and a < _MIN_NORMAL_BITS else a


@njit(cache=True)
def max_abs_key(xb, skip_nan, flush):
    # An integer max over a run-time trip count: LLVM vectorizes this, not a float compare chain.
    m = np.uint32(0)
    for j in range(xb.shape[0]):
        a = _abs_key(xb[j], flush)
        m = max(m, np.uint32(0) if skip_nan and a > _INF_BITS else a)
    return m


# The first index reaching an extreme, found in the same vectorized reduction: each value's key
# goes in the high 32 bits of a uint64, and an index term that prefers earlier positions below it.
_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_KEY_BIAS = np.int64(1 << 31)  # signed key -> unsigned, order kept


@njit(cache=True)
def first_absmax(xb, flavor):
    # `if (amax < fabsf(v)) { amax = fabsf(v); max = v; }` from amax = max = 0: strict, so the first
    # of equal magnitudes wins, NaN never does, and an all-zero block gives +0.
    flush = flavor == CUDA
    n = xb.shape[0]
    best = np.uint64(0)
    for j in range(n):
        a = _abs_key(xb[j], flush)
        a = np.uint32(0) if a > _INF_BITS else a
        best = max(best, (np.uint64(a) << _SHIFT32) | np.uint64(n - 1 - j))
    if (best >> _SHIFT32) == np.uint64(0):
        return np.float32(0.0)
    return xb[n - 1 - np.int64(best & _LOW32)]


@njit(cache=True)
def _signed_key(v, flush):
    """Integer whose order is v's float order, with -0 == +0 (a NaN's key is beyond any number's)."""
    a = np.int64(_abs_key(v, flush))
    return -a if (f32_bits(v) >> np.uint32(31)) != np.uint32(0) else a


@njit(cache=True)
def min_max(xb, flavor):
    # `if (v < min) min = v; if (v > max) max = v;` from FLT_MAX / -FLT_MAX: NaN never taken, the
    # first of equal values kept (so -0 vs +0 is decided by position), the start value kept on ties.
    flush = flavor == CUDA
    n = xb.shape[0]
    lo = np.uint64(0xFFFFFFFFFFFFFFFF)
    hi = np.uint64(0)
    for j in range(n):
        v = xb[j]
        k = np.uint64(_signed_key(v, flush) + _KEY_BIAS)
        nan = v != v
        lo = min(lo, np.uint64(0xFFFFFFFFFFFFFFFF) if nan else (k << _SHIFT32) | np.uint64(j))
        hi = max(hi, np.uint64(0) if nan else (k << _SHIFT32) | np.uint64(n - 1 - j))
    lo_key = np.int64(lo >> _SHIFT32) - _KEY_BIAS
    hi_key = np.int64(hi >> _SHIFT32) - _KEY_BIAS
    vmin = FLT_MAX if lo_key >= _FLT_MAX_KEY else xb[np.int64(lo & _LOW32)]
    vmax = -FLT_MAX if hi_key <= -_FLT_MAX_KEY else xb[n - 1 - np.int64(hi & _LOW32)]
    return vmin, vmax


@njit(cache=True)
def scale_inverse(d, flavor, rcp_table=None):
    if flavor == CUDA:
        return cuda_rcp(d, rcp_table) if ftz(d) != np.float32(0.0) else np.float32(0.0)
    return np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
