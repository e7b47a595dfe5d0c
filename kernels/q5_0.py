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
(emulated exactly with the measured rcp.approx table: see blocks.cuda_rcp).

NaN/Inf: a NaN value gets q = 0 (x86 cvttss2si gives INT_MIN, low byte 0; CUDA converts NaN to 0).
A +-Inf in a block makes d = -+Inf, id = -+0: every finite value gets q = 16, the Inf q = 0.

The qh packing here is shared with q5_1.
"""
import numpy as np
from numba import njit, prange

from .blocks import (cuda_fp32_to_fp16, load_f16, ptx_trunc_i8, scale_inverse, store_u16,
                     trunc_i8)
from .fp import CUDA, fma32, fp32_to_fp16, ftz

QK = 32
TYPE_SIZE = 22
_QH, _QS = 2, 6    # byte offsets of qh and qs
_HALF_QK = QK // 2
_16_5 = np.float32(16.5)


# ---- the 5-bit layout, shared with q5_1 --------------------------------------------------------

@njit(cache=True)
def store_q5_pair(yb, qs_off, j, lo, hi):
    """Write q[j] = lo and q[j+16] = hi (ints, low 5 bits kept, as C's uint8_t & masks keep them)
    into qs; return their two qh bits."""
    yb[qs_off + j] = np.uint8((lo & 0x0F) | ((hi & 0x0F) << 4))
    return (np.uint32((lo >> 4) & 1) << np.uint32(j)) | (np.uint32((hi >> 4) & 1) << np.uint32(j + _HALF_QK))


@njit(cache=True)
def store_u32(yb, off, v):
    for k in range(4):
        yb[off + k] = np.uint8((v >> np.uint32(8 * k)) & np.uint32(0xFF))


@njit(cache=True)
def load_u32(yb, off):
    v = np.uint32(0)
    for k in range(4):
        v |= np.uint32(yb[off + k]) << np.uint32(8 * k)
    return v


@njit(cache=True)
def load_q5_pair(yb, qs_off, qh, j):
    """(q[j], q[j+16]) for j in 0..15, from qs and the qh word."""
    b = np.int32(yb[qs_off + j])
    bit_lo = np.int32((qh >> np.uint32(j)) & np.uint32(1))
    bit_hi = np.int32((qh >> np.uint32(j + _HALF_QK)) & np.uint32(1))
    return (b & 0x0F) | (bit_lo << 4), (b >> 4) | (bit_hi << 4)


# ---- the scale search, shared with iq4_nl -----------------------------------------------------

@njit(cache=True)
def signed_absmax(xb, flavor):
    """ggml's `max`: the first value of largest magnitude, from amax = max = +0 with a strict compare,
    so NaN never wins, nor does a subnormal under CUDA's ftz, and a block of zeros gives +0.

    blocks.first_absmax answers the same question with vectorized integer keys, but is 3x slower on
    32 values and returns xb[0] (maybe -0, or a subnormal) where ggml keeps its +0."""
    amax = np.float32(0.0)
    vmax = np.float32(0.0)
    for j in range(QK):
        v = xb[j]
        a = abs(ftz(v)) if flavor == CUDA else abs(v)
        if a > amax:
            amax = a
            vmax = v
    return vmax


# ---- q5_0 --------------------------------------------------------------------------------------

@njit(cache=True)
def _q_ref(v, idv):
    return min(31, trunc_i8(v * idv + _16_5))


@njit(cache=True)
def _q_cuda(v, idv):
    return min(31, ptx_trunc_i8(ftz(fma32(ftz(v), idv, _16_5))))


@njit(cache=True)
def quantize_block(xb, yb, flavor, rcp_table=None):
    """One block: xb (32,) float32 -> yb (22,) uint8."""
    vmax = signed_absmax(xb, flavor)
    if flavor == CUDA:
        d = ftz(ftz(vmax) * np.float32(-1.0 / 16))    # / -16 is exact: nvcc multiplies
        store_u16(yb, 0, cuda_fp32_to_fp16(d))
    else:
        d = vmax / np.float32(-16.0)
        store_u16(yb, 0, fp32_to_fp16(d))
    idv = scale_inverse(d, flavor, rcp_table)
    qh = np.uint32(0)
    for j in range(_HALF_QK):
        if flavor == CUDA:
            lo, hi = _q_cuda(xb[j], idv), _q_cuda(xb[j + _HALF_QK], idv)
        else:
            lo, hi = _q_ref(xb[j], idv), _q_ref(xb[j + _HALF_QK], idv)
        qh |= store_q5_pair(yb, _QS, j, lo, hi)
    store_u32(yb, _QH, qh)


@njit(cache=True)
def dequantize_block(yb, xb):
    d = load_f16(yb, 0)
    qh = load_u32(yb, _QH)
    for j in range(_HALF_QK):
        lo, hi = load_q5_pair(yb, _QS, qh, j)
        xb[j] = np.float32(lo - 16) * d
        xb[j + _HALF_QK] = np.float32(hi - 16) * d


@njit(parallel=True, cache=True)
def quantize_row_q5_0(x, out, flavor, rcp_table=None):
    """x: (n_blocks, 32) float32 -> out: (n_blocks, 22) uint8."""
    for i in prange(x.shape[0]):
        quantize_block(x[i], out[i], flavor, rcp_table)


@njit(parallel=True, cache=True)
def dequantize_row_q5_0(raw, out):
    """raw: (n_blocks, 22) uint8 -> out: (n_blocks, 32) float32."""
    for i in prange(raw.shape[0]):
        dequantize_block(raw[i], out[i])
