"""q4_1: 32 values per block, 20 bytes, x = d * q + m, q in 0..15.

Block (ggml-common.h ``block_q4_1``)::

    bytes 0..1   d      ggml_half, little-endian
    bytes 2..3   m      ggml_half (the block minimum)
    bytes 4..19  qs[16] qs[j] = q[j] | q[j + 16] << 4

Quantize (``quantize_row_q4_1_ref``; the cpu flavor is the same code): min and max searched from
FLT_MAX / -FLT_MAX with ``v < min`` / ``v > max`` (NaN never taken), ``d = (max - min) / 15``,
``id = d ? 1/d : 0``, ``q = min(15, (int8_t)((x - min)*id + 0.5f))``. A constant block stores
d = 0, m = the constant, q = 0.

cuda (``quantize_f32_q4_1_block``, -use_fast_math; same FLT_MAX start as ref in this ggml):
subnormals flush in compares and arithmetic, ``(x - min)*id + 0.5f`` is one fused multiply-add,
``/15`` and ``1/d`` approximate: ``/15`` is exactly ``* RN(1/15)`` (measured), ``1/d`` is exact given
the measured rcp table, else correctly rounded (see scalar.cuda_rcp).

NaN/Inf: a NaN value gets q = 0 (x86 cvttss2si low byte; CUDA cvt of NaN). An all-NaN block keeps
min = FLT_MAX, max = -FLT_MAX: d = -Inf, m = +Inf (fp16 overflow). Any +-Inf in a block makes
d = Inf and every q 0.

Row kernels: a block without NaN, all |x| <= 2**100, min != 0 and d = 0 or >= 2**-100
(scalar.ordinary_min_max) takes a fast path (ref, cpu): min and max are integer reductions, and every
(x - min)*id + 0.5 lies in [0.5, 15.6], so the int8 cast needs no range select. Any other block, and the
cuda flavor, go through quantize_block.
"""
import numpy as np
from numba import njit, prange

from . import CUDA, REF
from .fp import fma32, fp32_to_fp16, ftz
from .scalar import (cuda_div, cuda_fp32_to_fp16, load_half, min_max, ordinary_min_max, pack_nibbles, ptx_trunc_i8,
                     scale_add, scale_inverse, store_half, trunc_i8)

_QS = 4  # byte offset of qs
_15 = np.float32(15.0)
_HALF = np.float32(0.5)


@njit(cache=True)
def _q_ref(v, vmin, idv):
    return min(15, trunc_i8((v - vmin) * idv + _HALF))


@njit(cache=True)
def _q_cuda(v, vmin, idv):
    return min(15, ptx_trunc_i8(fma32(ftz(ftz(v) - ftz(vmin)), idv, _HALF)))


@njit(cache=True)
def quantize_block(x, y, i, flavor, rcp_table=None):
    """Block i: x (n_blocks, 32) float32 -> y (n_blocks, 20) uint8."""
    vmin, vmax = min_max(x, i, flavor == CUDA, False)
    if flavor == CUDA:
        d = cuda_div(ftz(ftz(vmax) - ftz(vmin)), _15)
        store_half(y, i, 0, cuda_fp32_to_fp16(d))
        store_half(y, i, 2, cuda_fp32_to_fp16(vmin))
    else:
        d = (vmax - vmin) / _15
        store_half(y, i, 0, fp32_to_fp16(d))
        store_half(y, i, 2, fp32_to_fp16(vmin))
    idv = scale_inverse(d, flavor, rcp_table)
    half = x.shape[1] // 2
    for j in range(half):
        if flavor == CUDA:
            lo, hi = _q_cuda(x[i, j], vmin, idv), _q_cuda(x[i, j + half], vmin, idv)
        else:
            lo, hi = _q_ref(x[i, j], vmin, idv), _q_ref(x[i, j + half], vmin, idv)
        y[i, _QS + j] = pack_nibbles(lo, hi)


@njit(cache=True, inline="always")
def _quantize_ordinary(x, y, i):
    """Block i by the ref (= cpu) flavor if it is ordinary (see the docstring); False if not."""
    ok, vmin, vmax, d = ordinary_min_max(x, i, _15)
    if not ok:
        return False
    store_half(y, i, 0, fp32_to_fp16(d))
    store_half(y, i, 2, fp32_to_fp16(vmin))
    idv = scale_inverse(d, REF)
    half = x.shape[1] // 2
    for j in range(half):
        lo = min(np.int32(15), np.int32((x[i, j] - vmin) * idv + _HALF))
        hi = min(np.int32(15), np.int32((x[i, j + half] - vmin) * idv + _HALF))
        y[i, _QS + j] = np.uint8(lo | (hi << np.int32(4)))
    return True


@njit(cache=True, inline="always")
def dequantize_block(y, x, i):
    """Block i: y (n_blocks, 20) uint8 -> x (n_blocks, 32) float32."""
    d = load_half(y, i, 0)
    m = load_half(y, i, 2)
    half = x.shape[1] // 2
    for j in range(half):
        b = y[i, _QS + j]
        x[i, j] = scale_add(np.float32(b & 0x0F) * d, m)
        x[i, j + half] = scale_add(np.float32(b >> 4) * d, m)


@njit(parallel=True, cache=True)
def quantize_row_q4_1(x, out, flavor, rcp_table=None):
    """x: (n_blocks, 32) float32 -> out: (n_blocks, 20) uint8.

    rcp_table: scalar.rcp_approx_table() makes the cuda flavor's ``1/d`` exact (None: one ulp off
    for some scales; other flavors ignore it)."""
    for i in prange(x.shape[0]):
        if flavor == CUDA or not _quantize_ordinary(x, out, i):
            quantize_block(x, out, i, flavor, rcp_table)


@njit(parallel=True, cache=True)
def dequantize_row_q4_1(raw, out):
    """raw: (n_blocks, 20) uint8 -> out: (n_blocks, 32) float32."""
    for i in prange(raw.shape[0]):
        dequantize_block(raw, out, i)
