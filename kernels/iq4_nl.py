"""iq4_nl: 32 values per block, 18 bytes, x = d * KVALUES[q], q in 0..15 indexing a fixed table.

Block (ggml-common.h ``block_iq4_nl``)::

    bytes 0..1   d      ggml_half, little-endian
    bytes 2..17  qs[16] qs[j] = q[j] | q[j + 16] << 4

Quantize (``quantize_row_iq4_nl_ref``; the cpu flavor, ggml-cpu/quants.c ``quantize_row_iq4_nl``,
calls it). The ref runs ``quantize_row_iq4_nl_impl`` with no quant weights and ntry = -1, so there is
no scale search (the ntry = 7 search is ``quantize_iq4_nl``'s, llama-quantize's path, not the KV
cache's): with max the first value of largest magnitude, ``q[j] = best_index(x[j] * 1/(max / -127))``,
and the stored scale is the weighted least-squares scale of those indices,
``d = sum(w q x) / sum(w q^2)`` with ``w = x^2`` and q the table value, summed in order j = 0..31
(d = 0 when the sum of w q^2 is not > 0, e.g. with a NaN in the block).

cuda (``quantize_f32_iq4_nl_block``, -use_fast_math): the same indices, but the sums run over the
pairs (j, j+16), ``sum += w0*q0*x0 + w1*q1*x1`` (nvcc fuses the first product of each pair into an
FMA), there is no 1e-15 early exit, and d falls back to ``max / -127`` when the sum of w q^2 is not
> 0; subnormals flush, ``1/d`` and the divisions are approximate (emulated as correctly rounded: see
scalar.cuda_rcp).

Bytes kvlab defines: when a block's largest magnitude is below 1e-15 (all zeros, all subnormal, all
NaN), the ref stores d = 0 and packs qs from a stack array it did not write for this block (the
previous block's indices, or garbage). kvlab writes qs = 0x88 there: index 8 (table value +1) is what
best_index gives for 0, so the block dequantizes to +0.0 (ggml's bytes give +-0.0), and it is what the
cuda flavor writes for an all-zero block.
"""
import numpy as np
from numba import njit, prange

from . import CUDA, REF
from .fp import fma32, fp32_to_fp16
from .scalar import cuda_div, cuda_fp32_to_fp16, first_absmax, load_half, scale_inverse, store_half

_QS = 2            # byte offset of qs

# kvalues_iq4nl (ggml-common.h): the 16 levels, the one copy in kvlab (the GPU kernels and
# kvlab.viz.blocks_view read it from here)
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
KVALUES_F32 = KVALUES.astype(np.float32)    # ggml converts each int8 entry to float where it is used
GROUP_MAX_EPS = np.float32(1e-15)           # ggml-quants.c: below this a block is quantized to zero
ZERO_INDEX = 8                              # best_index(0): KVALUES[8] = 1 is nearer 0 than -10
_FLT_MIN = np.float32(1.1754943508222875e-38)


@njit(cache=True)
def best_index(x):
    """best_index_int8(16, kvalues_iq4nl, x): the nearest table entry, a tie goes up; NaN gives 15.

    ggml finds the pair KVALUES[hi-1] <= x < KVALUES[hi] by binary search; counting the entries <= x
    gives the same hi without branches, so the loops around it vectorize."""
    hi = 1
    for k in range(1, 15):
        hi += np.int32(KVALUES_F32[k] <= x)
    q = hi - 1 if x - KVALUES_F32[hi - 1] < KVALUES_F32[hi] - x else hi
    if x <= KVALUES_F32[0]:
        q = 0
    if x >= KVALUES_F32[15] or x != x:
        q = 15
    return q


@njit(cache=True)
def _quantize_block_ref(x, y, i):
    vmax = first_absmax(x, i, REF)
    half = x.shape[1] // 2
    if abs(vmax) < GROUP_MAX_EPS:
        store_half(y, i, 0, fp32_to_fp16(np.float32(0.0)))
        for j in range(half):
            y[i, _QS + j] = np.uint8(ZERO_INDEX | ZERO_INDEX << 4)
        return
    idv = np.float32(1.0) / (vmax / KVALUES_F32[0])
    for j in range(half):
        y[i, _QS + j] = np.uint8(best_index(idv * x[i, j]) | best_index(idv * x[i, j + half]) << 4)
    sumqx = np.float32(0.0)        # in order j = 0..31: the low nibbles, then the high ones
    sumq2 = np.float32(0.0)
    for h in range(2):
        for j in range(half):
            v = x[i, half * h + j]
            q = KVALUES_F32[(y[i, _QS + j] >> (4 * h)) & 0x0F]
            wq = (v * v) * q
            sumqx += wq * v
            sumq2 += wq * q
    store_half(y, i, 0, fp32_to_fp16(sumqx / sumq2 if sumq2 > 0 else np.float32(0.0)))


@njit(cache=True)
def _flush(a):
    """fp.ftz's result computed in float registers (x*0 keeps the sign): the sums below are a chain
    of dependent operations, where fp.ftz's round trip through the integer bits costs 3x more."""
    return a * np.float32(0.0) if abs(a) < _FLT_MIN else a


@njit(cache=True)
def _mul(a, b):
    return _flush(_flush(a) * _flush(b))


@njit(cache=True)
def _quantize_block_cuda(x, y, i, rcp_table):
    d = cuda_div(first_absmax(x, i, CUDA), KVALUES_F32[0], rcp_table)
    idv = scale_inverse(d, CUDA, rcp_table)
    half = x.shape[1] // 2
    for j in range(half):
        y[i, _QS + j] = np.uint8(best_index(_mul(x[i, j], idv)) | best_index(_mul(x[i, j + half], idv)) << 4)
    sumqx = np.float32(0.0)
    sumq2 = np.float32(0.0)
    for j in range(half):
        v0 = x[i, j]
        v1 = x[i, j + half]
        q0 = KVALUES_F32[y[i, _QS + j] & 0x0F]
        q1 = KVALUES_F32[y[i, _QS + j] >> 4]
        wq0 = _mul(_mul(v0, v0), q0)
        wq1 = _mul(_mul(v1, v1), q1)
        sumqx = _flush(sumqx + _flush(fma32(wq0, _flush(v0), _mul(wq1, v1))))
        sumq2 = _flush(sumq2 + _flush(fma32(wq0, q0, _mul(wq1, q1))))
    store_half(y, i, 0, cuda_fp32_to_fp16(cuda_div(sumqx, sumq2, rcp_table) if sumq2 > 0 else d))


@njit(cache=True)
def quantize_block(x, y, i, flavor, rcp_table=None):
    """Block i: x (n_blocks, 32) float32 -> y (n_blocks, 18) uint8."""
    if flavor == CUDA:
        _quantize_block_cuda(x, y, i, rcp_table)
    else:
        _quantize_block_ref(x, y, i)


@njit(cache=True, inline="always")
def dequantize_block(y, x, i):
    """Block i: y (n_blocks, 18) uint8 -> x (n_blocks, 32) float32."""
    d = load_half(y, i, 0)
    half = x.shape[1] // 2
    for j in range(half):
        b = y[i, _QS + j]
        x[i, j] = d * KVALUES_F32[b & 0x0F]
        x[i, j + half] = d * KVALUES_F32[b >> 4]


@njit(parallel=True, cache=True)
def quantize_row_iq4_nl(x, out, flavor, rcp_table=None):
    """x: (n_blocks, 32) float32 -> out: (n_blocks, 18) uint8."""
    for i in prange(x.shape[0]):
        quantize_block(x, out, i, flavor, rcp_table)


@njit(parallel=True, cache=True)
def dequantize_row_iq4_nl(raw, out):
    """raw: (n_blocks, 18) uint8 -> out: (n_blocks, 32) float32."""
    for i in prange(raw.shape[0]):
        dequantize_block(raw, out, i)
