"""q4_0: 32 values per block, 18 bytes, x = d * (q - 8), q in 0..15.

Block (ggml-common.h ``block_q4_0``)::

    bytes 0..1   d      ggml_half, little-endian
    bytes 2..17  qs[16] qs[j] = q[j] | q[j + 16] << 4

Quantize (``quantize_row_q4_0_ref``; the cpu flavor is the same code): ``max`` is the signed value
of the first element of largest |x|, ``d = max / -8`` (so that element gets q = 0),
``id = d ? 1/d : 0``, ``q = min(15, (int8_t)(x*id + 8.5f))`` with the float32 add rounded first.
An all-zero block stores d = -0.0 (0x8000) and q = 8.

cuda (``quantize_f32_q4_0_block``, -use_fast_math): subnormals flush to zero in the search and in
every arithmetic op, ``x*id + 8.5f`` is one fused multiply-add, ``1/d`` approximate: exact given the
measured rcp table, else correctly rounded (see scalar.cuda_rcp).

NaN/Inf (C's float->int8 of NaN is undefined): kvlab writes what x86 writes, q = 0 for a NaN
(cvttss2si's INT_MIN, low byte 0); CUDA's cvt also gives 0. A block holding +-Inf has d = -+Inf,
id = -+0, so finite values get q = 8 and the Inf itself q = 0.

Row kernels: a block whose largest |x| is 0 or in [2**-100, 2**100] (scalar.is_ordinary) takes a fast path
(ref, cpu): no NaN, and every x*id + 8.5 lies in [0.4, 16.6], so the int8 cast needs no range select.
Any other block, and the cuda flavor, go through quantize_block.
"""
import numpy as np
from numba import njit, prange

from . import CUDA, REF
from .fp import fma32, fp32_to_fp16, ftz
from .scalar import (cuda_div, cuda_fp32_to_fp16, first_absmax, first_of_abs_bits, is_ordinary, load_half,
                     max_abs_bits, pack_nibbles, ptx_trunc_i8, scale_inverse, store_half, trunc_i8)

_QS = 2  # byte offset of qs
_MINUS_8 = np.float32(-8.0)
_OFFSET = np.float32(8.5)  # +8 to centre, +0.5 so truncation rounds


@njit(cache=True)
def _q_ref(v, idv):
    return min(15, trunc_i8(v * idv + _OFFSET))


@njit(cache=True)
def _q_cuda(v, idv):
    return min(15, ptx_trunc_i8(fma32(ftz(v), idv, _OFFSET)))


@njit(cache=True)
def quantize_block(x, y, i, flavor, rcp_table=None):
    """Block i: x (n_blocks, 32) float32 -> y (n_blocks, 18) uint8."""
    vmax = first_absmax(x, i, flavor)
    if flavor == CUDA:
        d = cuda_div(vmax, _MINUS_8)
        store_half(y, i, 0, cuda_fp32_to_fp16(d))
    else:
        d = vmax / _MINUS_8
        store_half(y, i, 0, fp32_to_fp16(d))
    idv = scale_inverse(d, flavor, rcp_table)
    half = x.shape[1] // 2
    for j in range(half):
        if flavor == CUDA:
            lo, hi = _q_cuda(x[i, j], idv), _q_cuda(x[i, j + half], idv)
        else:
            lo, hi = _q_ref(x[i, j], idv), _q_ref(x[i, j + half], idv)
        y[i, _QS + j] = pack_nibbles(lo, hi)


@njit(cache=True, inline="always")
def _quantize_ordinary(x, y, i):
    """Block i by the ref (= cpu) flavor if it is ordinary (see the docstring); False if not."""
    bits = max_abs_bits(x, i, False, False)
    if not is_ordinary(bits):
        return False
    d = first_of_abs_bits(x, i, bits, False) / _MINUS_8
    store_half(y, i, 0, fp32_to_fp16(d))
    idv = scale_inverse(d, REF)
    half = x.shape[1] // 2
    for j in range(half):
        lo = min(15, np.int32(x[i, j] * idv + _OFFSET))
        hi = min(15, np.int32(x[i, j + half] * idv + _OFFSET))
        y[i, _QS + j] = np.uint8(lo | (hi << 4))
    return True


@njit(cache=True, inline="always")
def dequantize_block(y, x, i):
    """Block i: y (n_blocks, 18) uint8 -> x (n_blocks, 32) float32."""
    d = load_half(y, i, 0)
    half = x.shape[1] // 2
    for j in range(half):
        b = y[i, _QS + j]
        x[i, j] = np.float32(np.int32(b & 0x0F) - 8) * d
        x[i, j + half] = np.float32(np.int32(b >> 4) - 8) * d


@njit(parallel=True, cache=True)
def quantize_row_q4_0(x, out, flavor, rcp_table=None):
    """x: (n_blocks, 32) float32 -> out: (n_blocks, 18) uint8.

    rcp_table: scalar.rcp_approx_table() makes the cuda flavor's ``1/d`` exact (None: one ulp off
    for some scales; other flavors ignore it)."""
    for i in prange(x.shape[0]):
        if flavor == CUDA or not _quantize_ordinary(x, out, i):
            quantize_block(x, out, i, flavor, rcp_table)


@njit(parallel=True, cache=True)
def dequantize_row_q4_0(raw, out):
    """raw: (n_blocks, 18) uint8 -> out: (n_blocks, 32) float32."""
    for i in prange(raw.shape[0]):
        dequantize_block(raw, out, i)
