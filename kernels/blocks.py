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

CUDA fast-math emulation (nvcc -use_fast_math: ftz, approximate division, fma):
  ``cuda_rcp(x)``                 rcp.approx.ftz.f32, emulated as the correctly rounded 1/x, flushed
  ``cuda_div(a, b)``              div.approx.ftz.f32 = a * rcp(b), flushed
  ``cuda_fp32_to_fp16(f)``        __float2half (cvt.rn.f16.f32): RNE, NaN -> canonical 0x7FFF

Block searches, per flavor (``REF``/``CPU`` are IEEE; ``CUDA`` flushes subnormals in compares):
  ``first_absmax(xb, flavor)``    the signed value of the first element of largest |x| (q4_0, q5_0, iq4_nl)
  ``min_max(xb, flavor)``         (min, max) from FLT_MAX / -FLT_MAX, NaN ignored (q4_1, q5_1 ref)
  ``max_abs_key(xb, skip_nan, flush)`` -> uint32: the largest |x| as bits (NaN above Inf unless
                                  skipped; flush: subnormals count as 0); ``f32_from_bits`` gives |x|
The searches reduce integer keys (float order as integers) so that LLVM vectorizes them.
  ``scale_inverse(d, flavor)``    ``d ? 1.0f/d : 0.0f``
"""
import numpy as np
from numba import njit

from .fp import CUDA, f32_bits, f32_from_bits, fp32_to_fp16, fp16_to_fp32, ftz

FLT_MAX = np.float32(3.4028234663852886e38)
INT_MIN = np.int32(-2147483648)
_TWO31 = np.float32(2147483648.0)
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


@njit(cache=True)
def cuda_rcp(x):
    return ftz(np.float32(1.0) / ftz(x))


@njit(cache=True)
def cuda_div(a, b):
    return ftz(ftz(a) * cuda_rcp(b))


@njit(cache=True)
def cuda_fp32_to_fp16(f):
    if f != f:
        return np.uint16(0x7FFF)
    return fp32_to_fp16(f)


_ABS = np.uint32(0x7FFFFFFF)
_INF_BITS = np.uint32(0x7F800000)
_MIN_NORMAL_BITS = np.uint32(0x00800000)
_FLT_MAX_KEY = np.int32(0x7F7FFFFF)


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


@njit(cache=True)
def first_with_abs_key(xb, key, flush):
    for j in range(xb.shape[0]):
        if _abs_key(xb[j], flush) == key:
            return xb[j]
    return np.float32(0.0)


@njit(cache=True)
def first_absmax(xb, flavor):
    # `if (amax < fabsf(v)) { amax = fabsf(v); max = v; }` from amax = max = 0: strict, so the first
    # of equal magnitudes wins, NaN never does, and an all-zero block gives +0.
    flush = flavor == CUDA
    return first_with_abs_key(xb, max_abs_key(xb, True, flush), flush)


@njit(cache=True)
def _signed_key(v, flush):
    """Integer whose order is v's float order, with -0 == +0 (a NaN's key is beyond any number's)."""
    u = f32_bits(v)
    a = np.int32(_abs_key(v, flush))
    return -a if (u >> np.uint32(31)) != np.uint32(0) else a


@njit(cache=True)
def _first_with_key(xb, key, flush):
    for j in range(xb.shape[0]):
        if _signed_key(xb[j], flush) == key:
            return xb[j]
    return np.float32(0.0)


@njit(cache=True)
def min_max(xb, flavor):
    # `if (v < min) min = v; if (v > max) max = v;` from FLT_MAX / -FLT_MAX: NaN never taken, the
    # first of equal values kept (so -0 vs +0 is decided by position), the start value kept on ties.
    flush = flavor == CUDA
    lo = _FLT_MAX_KEY
    hi = -_FLT_MAX_KEY
    for j in range(xb.shape[0]):
        v = xb[j]
        k = _signed_key(v, flush)
        nan = v != v
        lo = min(lo, _FLT_MAX_KEY if nan else k)
        hi = max(hi, -_FLT_MAX_KEY if nan else k)
    vmin = FLT_MAX if lo == _FLT_MAX_KEY else _first_with_key(xb, lo, flush)
    vmax = -FLT_MAX if hi == -_FLT_MAX_KEY else _first_with_key(xb, hi, flush)
    return vmin, vmax


@njit(cache=True)
def scale_inverse(d, flavor):
    if flavor == CUDA:
        return cuda_rcp(d) if ftz(d) != np.float32(0.0) else np.float32(0.0)
    return np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
