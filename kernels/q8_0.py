"""q8_0: 32 values per block, 34 bytes, x = d * q.

Block (ggml-common.h ``block_q8_0``)::

    bytes 0..1   d      ggml_half, little-endian
    bytes 2..33  qs[32] int8, value j in byte 2 + j

Flavors (quantize; dequantize is the same for all):
- ref  ``quantize_row_q8_0_ref``: amax through ``MAX(a, b) = a > b ? a : b`` (so a NaN is kept only
  until the next element replaces it), ``d = amax/127``, ``id = d ? 1/d : 0``, ``q = roundf(x*id)``
  (halves away from zero).
- cpu  x86 AVX2 ``quantize_row_q8_0``: amax by a ``_mm256_max_ps`` lane tree (max_ps returns its
  second operand when either is NaN), ``id = amax ? 127/amax : 0`` (may differ from 1/d by an ulp),
  halves to even (``_mm256_round_ps``), int32 -> int8 by saturating packs.
- cuda ``quantize_f32_q8_0_block`` with -use_fast_math: ``fmaxf`` (ignores NaN), subnormals flushed,
  ``amax/127`` = ``amax * RN(1/127)`` (measured), ``1/d`` approximate: exact given the measured rcp
  table, else correctly rounded (see scalar.cuda_rcp); halves away from zero.

NaN/Inf (C leaves float->int8 of NaN or of an out-of-range value undefined; kvlab writes what
the x86 build writes): ref stores the low byte of cvttss2si's INT_MIN, 0x00; cpu saturates
INT_MIN to 0x80 (-128); cuda's cvt gives 0 for NaN. ``d`` NaN is stored as 0x7E00|sign (ref, cpu)
and 0x7FFF (cuda).

Row kernels: a block whose largest |x| is 0 or in [2**-100, 2**100] (scalar.is_ordinary) takes a fast path
(ref, cpu): no NaN, so the max is an integer max, and every |x*id| <= 127, so the casts need neither
their range selects nor saturation; with rows back to back (scalar.contiguous_blocks, what kvlab.quantize
passes) the block is one 32-lane vector load, reduce and store (scalar.block_abs_max_bits,
store_i8_round_*). Any other block, and the cuda flavor, go through quantize_block.
"""
import numpy as np
from numba import njit, prange

from . import CPU, CUDA, REF
from .fp import f32_from_bits, fp32_to_fp16, ftz
from .scalar import (block_abs_max_bits, c_cast_i32, contiguous_blocks, cuda_div, cuda_fp32_to_fp16, is_ordinary,
                     load_half, low_byte, max_abs_bits, ptx_cast_i32, round_even32, roundf32, saturate_i8,
                     scale_inverse, store_half, store_i8_round_even, store_i8_round_half_away)

_QS = 2  # byte offset of qs
_TYPE_SIZE = _QS + 32
_127 = np.float32(127.0)
_INF_BITS = np.uint32(0x7F800000)  # |x| bits above this are NaN


@njit(cache=True)
def _ref_absmax(x, i):
    bits = max_abs_bits(x, i, False, False)
    if bits <= _INF_BITS:
        return f32_from_bits(bits)
    amax = np.float32(0.0)  # a NaN is there: replay ggml's MAX macro, which keeps it only briefly
    for j in range(x.shape[1]):
        a = abs(x[i, j])
        amax = amax if amax > a else a
    return amax


@njit(cache=True)
def _quantize_block_ref(x, y, i):
    amax = _ref_absmax(x, i)
    d = amax / _127
    idv = scale_inverse(d, REF)
    store_half(y, i, 0, fp32_to_fp16(d))
    for j in range(x.shape[1]):
        y[i, _QS + j] = low_byte(c_cast_i32(roundf32(x[i, j] * idv)))


@njit(cache=True)
def _max_ps(a, b):
    return a if a > b else b  # maxps: the second operand when either is NaN


@njit(cache=True)
def _lane_absmax(x, i, lane):
    m = abs(x[i, lane])
    for k in range(1, 4):
        m = _max_ps(m, abs(x[i, 8 * k + lane]))
    return m


@njit(cache=True)
def _avx_absmax(x, i):
    bits = max_abs_bits(x, i, False, False)
    if bits <= _INF_BITS:
        return f32_from_bits(bits)
    # a NaN is there: where it ends up depends on the lane tree, 8 lanes of 4 loads each, then
    # 128-bit halves (high, low), movehl, movehdup
    q0 = _max_ps(_lane_absmax(x, i, 4), _lane_absmax(x, i, 0))
    q1 = _max_ps(_lane_absmax(x, i, 5), _lane_absmax(x, i, 1))
    q2 = _max_ps(_lane_absmax(x, i, 6), _lane_absmax(x, i, 2))
    q3 = _max_ps(_lane_absmax(x, i, 7), _lane_absmax(x, i, 3))
    return _max_ps(_max_ps(q0, q2), _max_ps(q1, q3))


@njit(cache=True)
def _quantize_block_cpu(x, y, i):
    amax = _avx_absmax(x, i)
    store_half(y, i, 0, fp32_to_fp16(amax / _127))  # GGML_CPU_FP32_TO_FP16 is the software one on x86
    idv = _127 / amax if amax != np.float32(0.0) else np.float32(0.0)
    for j in range(x.shape[1]):
        y[i, _QS + j] = saturate_i8(c_cast_i32(round_even32(x[i, j] * idv)))


@njit(cache=True)
def _quantize_block_cuda(x, y, i, rcp_table):
    amax = f32_from_bits(max_abs_bits(x, i, True, True))  # fmaxf drops NaN; max.ftz flushes
    d = cuda_div(amax, _127)
    idv = scale_inverse(d, CUDA, rcp_table)
    store_half(y, i, 0, cuda_fp32_to_fp16(d))
    for j in range(x.shape[1]):
        y[i, _QS + j] = low_byte(ptx_cast_i32(roundf32(ftz(ftz(x[i, j]) * idv))))


@njit(cache=True)
def quantize_block(x, y, i, flavor, rcp_table=None):
    """Block i: x (n_blocks, 32) float32 -> y (n_blocks, 34) uint8."""
    if flavor == CPU:
        _quantize_block_cpu(x, y, i)
    elif flavor == CUDA:
        _quantize_block_cuda(x, y, i, rcp_table)
    else:
        _quantize_block_ref(x, y, i)


@njit(cache=True, inline="always")
def _quantize_ordinary(x, y, i, flavor):
    """Block i by the ref or cpu flavor if it is ordinary (see the docstring; x and y are
    contiguous_blocks); False if not."""
    bits = block_abs_max_bits(x, i)
    if not is_ordinary(bits):
        return False
    amax = f32_from_bits(bits)
    d = amax / _127
    store_half(y, i, 0, fp32_to_fp16(d))
    if flavor == CPU:
        store_i8_round_even(x, y, i, _QS, _127 / amax if amax != np.float32(0.0) else np.float32(0.0))
    else:
        store_i8_round_half_away(x, y, i, _QS, scale_inverse(d, REF))
    return True


@njit(cache=True, inline="always")
def dequantize_block(y, x, i):
    """Block i: y (n_blocks, 34) uint8 -> x (n_blocks, 32) float32."""
    d = load_half(y, i, 0)
    for j in range(x.shape[1]):
        x[i, j] = np.float32(np.int8(y[i, _QS + j])) * d


@njit(parallel=True, cache=True)
def quantize_row_q8_0(x, out, flavor, rcp_table=None):
    """x: (n_blocks, 32) float32 -> out: (n_blocks, 34) uint8.

    rcp_table: scalar.rcp_approx_table() makes the cuda flavor's ``1/d`` exact (None: one ulp off
    for some scales; other flavors ignore it)."""
    fast = flavor != CUDA and contiguous_blocks(x, out, _TYPE_SIZE)
    for i in prange(x.shape[0]):
        if not (fast and _quantize_ordinary(x, out, i, flavor)):
            quantize_block(x, out, i, flavor, rcp_table)


@njit(parallel=True, cache=True)
def dequantize_row_q8_0(raw, out):
    """raw: (n_blocks, 34) uint8 -> out: (n_blocks, 32) float32."""
    for i in prange(raw.shape[0]):
        dequantize_block(raw, out, i)
