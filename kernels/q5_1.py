"""q5_1: 32 values per block, 24 bytes, x = d * q + m, q in 0..31.

Block (ggml-common.h ``block_q5_1``)::

    bytes 0..1   d      ggml_half, little-endian
    bytes 2..3   m      ggml_half (the block minimum)
    bytes 4..7   qh[4]  bit j of the little-endian uint32 = bit 4 of q[j]
    bytes 8..23  qs[16] qs[j] = (q[j] & 15) | (q[j + 16] & 15) << 4

Quantize (``quantize_row_q5_1_ref``; the cpu flavor, ggml-cpu/quants.c ``quantize_row_q5_1``, calls
it): min and max searched from FLT_MAX / -FLT_MAX (NaN never taken), ``d = (max - min) / 31``,
``id = d ? 1/d : 0``, ``q = (uint8_t)((x - min)*id + 0.5f)`` with no clamp.

cuda (``quantize_f32_q5_1_block``, -use_fast_math): min and max start from x[0] and run
``min = v < min ? v : min`` over the rest (a NaN in x[0] stays); subnormals flush in compares and
arithmetic, ``(x - min)*id + 0.5f`` is one fused multiply-add, ``/31`` and ``1/d`` are approximate
(emulated exactly with the rcp.approx table measured on an H100: see scalar.cuda_rcp; without the
table, a correctly rounded reciprocal is one ulp off for 13% of divisors).

NaN/Inf: a NaN value gets q = 0 (x86 cvttss2si low byte; CUDA converts NaN to 0). An all-NaN block
gives ref d = -Inf, m = +Inf (FLT_MAX rounds to the half infinity), cuda d = m = NaN (0x7FFF).

Row kernels: a block without NaN, all |x| <= 2**100, min != 0 and d = 0 or >= 2**-100
(scalar.ordinary_min_max) takes a fast path (ref, cpu): min and max are integer reductions, and every
(x - min)*id + 0.5 lies in [0.5, 31.6], so the int cast needs no range select. Any other block, and the
cuda flavor, go through quantize_block.
"""
import numpy as np
from numba import njit, prange

from . import CUDA, REF
from .fp import fma32, fp32_to_fp16, ftz
from .q5_0 import load_q5_values, store_q5_pair, store_q5_values
from .scalar import (c_cast_i32, cuda_div, cuda_fp32_to_fp16, load_half, min_max, ordinary_min_max, ptx_cast_i32,
                     scale_add, scale_inverse, store_half, store_u32)

_QH, _QS = 4, 8    # byte offsets of qh and qs
_31 = np.float32(31.0)
_HALF = np.float32(0.5)


@njit(cache=True)
def _q_ref(v, vmin, idv):
    return c_cast_i32((v - vmin) * idv + _HALF)


@njit(cache=True)
def _q_cuda(v, vmin, idv):
    return ptx_cast_i32(ftz(fma32(ftz(ftz(v) - ftz(vmin)), idv, _HALF)))


@njit(cache=True)
def quantize_block(x, y, i, flavor, rcp_table=None):
    """Block i: x (n_blocks, 32) float32 -> y (n_blocks, 24) uint8."""
    cuda = flavor == CUDA
    vmin, vmax = min_max(x, i, cuda, cuda)      # ggml-cuda starts from x[0]
    if cuda:
        d = cuda_div(ftz(ftz(vmax) - ftz(vmin)), _31, rcp_table)
        store_half(y, i, 0, cuda_fp32_to_fp16(d))
        store_half(y, i, 2, cuda_fp32_to_fp16(vmin))
    else:
        d = (vmax - vmin) / _31
        store_half(y, i, 0, fp32_to_fp16(d))
        store_half(y, i, 2, fp32_to_fp16(vmin))
    idv = scale_inverse(d, flavor, rcp_table)
    half = x.shape[1] // 2
    qh = np.uint32(0)
    for j in range(half):
        if cuda:
            lo, hi = _q_cuda(x[i, j], vmin, idv), _q_cuda(x[i, j + half], vmin, idv)
        else:
            lo, hi = _q_ref(x[i, j], vmin, idv), _q_ref(x[i, j + half], vmin, idv)
        qh |= store_q5_pair(y, i, _QS, j, lo, hi)
    store_u32(y, i, _QH, qh)


@njit(cache=True, inline="always")
def _q_ordinary(v, params):
    vmin, idv = params
    return np.int32((v - vmin) * idv + _HALF)


@njit(cache=True, inline="always")
def _quantize_ordinary(x, y, i):
    """Block i by the ref (= cpu) flavor if it is ordinary (see the docstring); False if not."""
    ok, vmin, vmax, d = ordinary_min_max(x, i, _31)
    if not ok:
        return False
    store_half(y, i, 0, fp32_to_fp16(d))
    store_half(y, i, 2, fp32_to_fp16(vmin))
    store_q5_values(y, i, _QH, _QS, _q_ordinary, x, (vmin, scale_inverse(d, REF)))
    return True


@njit(cache=True, inline="always")
def _value(q, params):
    d, m = params
    return scale_add(np.float32(q) * d, m)


@njit(cache=True, inline="always")
def dequantize_block(y, x, i):
    """Block i: y (n_blocks, 24) uint8 -> x (n_blocks, 32) float32."""
    load_q5_values(y, i, _QH, _QS, x, _value, (load_half(y, i, 0), load_half(y, i, 2)))


@njit(parallel=True, cache=True)
def quantize_row_q5_1(x, out, flavor, rcp_table=None):
    """x: (n_blocks, 32) float32 -> out: (n_blocks, 24) uint8."""
    for i in prange(x.shape[0]):
        if flavor == CUDA or not _quantize_ordinary(x, out, i):
            quantize_block(x, out, i, flavor, rcp_table)


@njit(parallel=True, cache=True)
def dequantize_row_q5_1(raw, out):
    """raw: (n_blocks, 24) uint8 -> out: (n_blocks, 32) float32."""
    for i in prange(raw.shape[0]):
        dequantize_block(raw, out, i)
