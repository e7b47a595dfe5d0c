"""q5_0: 32 values per block, 22 bytes, x = d * (q - 16), q in 0..31.

Block (ggml-common.h ``block_q5_0``)::

    bytes 0..1   d      ggml_half, little-endian
    bytes 2..5   qh[4]  bit j of the little-endian uint32 = bit 4 of q[j]
    bytes 6..21  qs[16] qs[j] = (q[j] & 15) | (q[j + 16] & 15) << 4

Quantize (``quantize_row_q5_0_ref``; the cpu flavor, ggml-cpu/quants.c ``quantize_row_q5_0``, calls
it): max is the first value of largest magnitude, ``d = max / -16``, ``id = d ? 1/d : 0``,
``q = MIN(31, (int8_t)(x*id + 16.5f))``, float32 throughout. An all-zero block stores d = -0.

cuda (``quantize_f32_q5_0_block``, -use_fast_math): the same formulas, but subnormals flush in
compares and arithmetic, ``x*id + 16.5f`` is one fused multiply-add and ``1/d`` is approximate
(emulated exactly with the measured rcp.approx table: see scalar.cuda_rcp).

NaN/Inf: a NaN value gets q = 0 (x86 cvttss2si gives INT_MIN, low byte 0; CUDA converts NaN to 0).
A +-Inf in a block makes d = -+Inf, id = -+0: every finite value gets q = 16, the Inf q = 0.

Row kernels: a block whose largest |x| is 0 or in [2**-100, 2**100] (scalar.is_ordinary) takes a fast path
(ref, cpu): no NaN, and every x*id + 16.5 lies in [0.4, 32.6], so the int8 cast needs no range select.
Any other block, and the cuda flavor, go through quantize_block.

The 5-bit packing (qs and qh) here is shared with q5_1.
"""
import numpy as np
from numba import njit, prange

from . import CUDA, REF
from .fp import fma32, fp32_to_fp16, ftz
from .scalar import (cuda_fp32_to_fp16, first_absmax, first_of_abs_bits, is_ordinary, load_half, max_abs_bits,
                     ptx_trunc_i8, scale_inverse, store_half, store_u32, trunc_i8)

_QH, _QS = 2, 6    # byte offsets of qh and qs
_16_5 = np.float32(16.5)
# qh bit j as a table: a shift by a run-time j is done in 64-bit lanes (Numba widens uint32), a load is not
_BIT = np.array([1 << j for j in range(32)], np.uint32)
_NO_BIT = np.uint32(0)


# ---- the 5-bit layout, shared with q5_1 --------------------------------------------------------

@njit(cache=True)
def store_q5_pair(y, i, qs_off, j, lo, hi):
    """Write q[j] = lo and q[j+16] = hi (ints, low 5 bits kept, as C's uint8_t & masks keep them)
    into block i's qs; return their two qh bits."""
    y[i, qs_off + j] = np.uint8((lo & 0x0F) | ((hi & 0x0F) << 4))
    return (np.uint32((lo >> 4) & 1) << np.uint32(j)) | (np.uint32((hi >> 4) & 1) << np.uint32(j + 16))


@njit(cache=True, inline="always")
def store_q5_values(y, i, qh_off, qs_off, q_of, x, params):
    """Block i's q[j] = q_of(x[i, j], params) (ints in 0..31) into qs and qh, all loops vectorized."""
    half = x.shape[1] // 2
    qh = np.uint32(0)
    for j in range(half):
        lo = np.int32(q_of(x[i, j], params))
        hi = np.int32(q_of(x[i, j + half], params))
        y[i, qs_off + j] = np.uint8((lo & np.int32(0x0F)) | ((hi & np.int32(0x0F)) << np.int32(4)))
        qh = np.uint32(qh | (_BIT[j] if lo >= 16 else _NO_BIT) | (_BIT[j + half] if hi >= 16 else _NO_BIT))
    store_u32(y, i, qh_off, qh)


@njit(cache=True, inline="always")
def load_q5_values(y, i, qh_off, qs_off, x, value_of, params):
    """x[i, j] = value_of(q[j], params) for the q of block i (ints in 0..31), vectorized."""
    half = x.shape[1] // 2
    qh = np.uint32(0)
    for k in range(4):
        qh = np.uint32(qh | (np.uint32(y[i, qh_off + k]) << np.uint32(8 * k)))
    for j in range(half):
        b = np.int32(y[i, qs_off + j])
        lo = (b & np.int32(0x0F)) | (np.int32(16) if qh & _BIT[j] else np.int32(0))
        hi = (b >> np.int32(4)) | (np.int32(16) if qh & _BIT[j + half] else np.int32(0))
        x[i, j] = value_of(lo, params)
        x[i, j + half] = value_of(hi, params)


# ---- q5_0 --------------------------------------------------------------------------------------

@njit(cache=True)
def _q_ref(v, idv):
    return min(31, trunc_i8(v * idv + _16_5))


@njit(cache=True)
def _q_cuda(v, idv):
    return min(31, ptx_trunc_i8(ftz(fma32(ftz(v), idv, _16_5))))


@njit(cache=True)
def quantize_block(x, y, i, flavor, rcp_table=None):
    """Block i: x (n_blocks, 32) float32 -> y (n_blocks, 22) uint8."""
    vmax = first_absmax(x, i, flavor)
    if flavor == CUDA:
        d = ftz(ftz(vmax) * np.float32(-1.0 / 16))    # / -16 is exact: nvcc multiplies
        store_half(y, i, 0, cuda_fp32_to_fp16(d))
    else:
        d = vmax / np.float32(-16.0)
        store_half(y, i, 0, fp32_to_fp16(d))
    idv = scale_inverse(d, flavor, rcp_table)
    half = x.shape[1] // 2
    qh = np.uint32(0)
    for j in range(half):
        if flavor == CUDA:
            lo, hi = _q_cuda(x[i, j], idv), _q_cuda(x[i, j + half], idv)
        else:
            lo, hi = _q_ref(x[i, j], idv), _q_ref(x[i, j + half], idv)
        qh |= store_q5_pair(y, i, _QS, j, lo, hi)
    store_u32(y, i, _QH, qh)


@njit(cache=True, inline="always")
def _q_ordinary(v, idv):
    return min(np.int32(31), np.int32(v * idv + _16_5))


@njit(cache=True, inline="always")
def _quantize_ordinary(x, y, i):
    """Block i by the ref (= cpu) flavor if it is ordinary (see the docstring); False if not."""
    bits = max_abs_bits(x, i, False, False)
    if not is_ordinary(bits):
        return False
    d = first_of_abs_bits(x, i, bits, False) / np.float32(-16.0)
    store_half(y, i, 0, fp32_to_fp16(d))
    store_q5_values(y, i, _QH, _QS, _q_ordinary, x, scale_inverse(d, REF))
    return True


@njit(cache=True, inline="always")
def _value(q, d):
    return np.float32(q - np.int32(16)) * d


@njit(cache=True, inline="always")
def dequantize_block(y, x, i):
    """Block i: y (n_blocks, 22) uint8 -> x (n_blocks, 32) float32."""
    load_q5_values(y, i, _QH, _QS, x, _value, load_half(y, i, 0))


@njit(parallel=True, cache=True)
def quantize_row_q5_0(x, out, flavor, rcp_table=None):
    """x: (n_blocks, 32) float32 -> out: (n_blocks, 22) uint8."""
    for i in prange(x.shape[0]):
        if flavor == CUDA or not _quantize_ordinary(x, out, i):
            quantize_block(x, out, i, flavor, rcp_table)


@njit(parallel=True, cache=True)
def dequantize_row_q5_0(raw, out):
    """raw: (n_blocks, 22) uint8 -> out: (n_blocks, 32) float32."""
    for i in prange(raw.shape[0]):
        dequantize_block(raw, out, i)
