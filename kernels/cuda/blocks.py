"""Per-block quantizers and dequantizers as CUDA device functions, for all three flavors.

Each ``quantize_<type>(src, r, y, o, flavor)`` reads the 32 float32 of row ``r`` of ``src`` (a
shared-memory tile) and writes the block's type_size bytes at byte ``o`` of the flat uint8 ``y`` (a
shared-memory staging buffer); ``dequantize_<type>(y, o, out, r)`` is the reverse.
The arithmetic is spelled with kernels/cuda/ops.py so every rounding is the one the flavor's C code
does: ``ref``/``cpu`` as ggml-quants.c (and x86's q8_0), ``cuda`` as ggml-cuda's cpy-utils.cuh
under -use_fast_math (tools/cuda_golden/PTX_NOTES.md). The CPU kernels
(kvlab.kernels.<type>) define the same bytes; tests/test_cuda_sim.py checks both agree.
"""
import numpy as np
from numba import cuda

from .ops import (add, add_ftz, div, f16_bits_to_f32, f32_bits, f32_from_bits, f32_to_f16_bits, fma_ftz,
                  ftz, mul, mul_ftz, ptx_i32, ptx_u32, rcp_approx, round_even, roundf, sub, sub_ftz)

REF, CPU, CUDA = 0, 1, 2
QK = 32
F = np.float32
_ONE = F(1.0)
_ZERO = F(0.0)
_HALF = F(0.5)
_FLT_MAX = F(3.4028234663852886e38)
_TWO31 = F(2147483648.0)
_INT_MIN = np.int32(-2147483648)
# nvcc turns `x / C` into x * RN(1/C) (measured: PTX_NOTES.md); float32 division gives RN(1/C)
_INV_127 = F(1.0) / F(127.0)
_INV_M127 = F(1.0) / F(-127.0)
_INV_15 = F(1.0) / F(15.0)
_INV_31 = F(1.0) / F(31.0)
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
# the 16 int8 levels packed eight to a 64-bit word: a lookup by a data-dependent index is then one
# select and a shift in registers, not a constant-memory load that serializes when the lanes of a
# warp ask different entries (nor branches)
_KV_LO, _KV_HI = (np.uint64(w) for w in KVALUES.astype(np.int8).view(np.uint64))
# best_index's decision points: x at or above (KVALUES[k] + KVALUES[k + 1]) / 2 (exact in float32)
_KV_MIDPOINTS = (KVALUES[:-1] + KVALUES[1:]) / F(2.0)
_GROUP_MAX_EPS = F(1e-15)
_KV_FIRST = F(-127.0)

device = cuda.jit(device=True, inline=True)
# Indices are cast to uint32: numba adds a negative-index wrap-around to every signed index, which
# was most of the instructions per value (ncu: the quantizers were SM-bound); r and o come unsigned.
_u = np.uint32


# ---- bytes and casts --------------------------------------------------------------------------
@device
def half_bits(v, flavor):
    """float32 -> ggml_half bits: RNE; NaN -> 0x7E00|sign (ggml's C) or 0x7FFF (cvt.rn.f16.f32)."""
    if v != v:
        if flavor == CUDA:
            return np.uint16(0x7FFF)
        return np.uint16(np.uint32(0x7E00) | ((f32_bits(v) >> np.uint32(16)) & np.uint32(0x8000)))
    return f32_to_f16_bits(v)


@device
def store_u16(y, o, off, h):
    y[_u(o + off)] = np.uint8(h & np.uint16(0xFF))
    y[_u(o + off + 1)] = np.uint8(h >> np.uint16(8))


@device
def load_half(y, o, off):
    return f16_bits_to_f32(np.uint16(np.uint16(y[_u(o + off)]) | (np.uint16(y[_u(o + off + 1)]) << np.uint16(8))))


@device
def store_u32(y, o, off, v):
    for k in range(4):
        y[_u(o + off + k)] = np.uint8((v >> np.uint32(8 * k)) & np.uint32(0xFF))


@device
def load_u32(y, o, off):
    v = np.uint32(0)
    for k in range(4):
        v |= np.uint32(y[_u(o + off + k)]) << np.uint32(8 * k)
    return v


@device
def x86_i32(v):
    """(int)v as x86 cvttss2si: NaN and out of range -> INT_MIN (kvlab's definition of C's UB).
    The conversion runs unconditionally and a select picks: a branch around it (numba's `and`, or an
    if) costs more than the cvt, and the inline-asm cvt is never hoisted out of one."""
    n = ptx_i32(v)
    in_range = (v >= -_TWO31) & (v < _TWO31)
    return n if in_range else _INT_MIN


@device
def low_i8(n):
    """The signed low byte of an int: C's (int8_t) store."""
    return np.int32(((np.int32(n) & np.int32(0xFF)) ^ np.int32(0x80)) - np.int32(0x80))


@device
def to_i8(v, flavor):
    return low_i8(ptx_i32(v) if flavor == CUDA else x86_i32(v))


@device
def recip(d, flavor):
    """`d ? 1.0f/d : 0.0f`: IEEE, or rcp.approx.ftz with a subnormal d counting as 0."""
    if flavor == CUDA:
        return rcp_approx(d) if ftz(d) != _ZERO else _ZERO
    return div(_ONE, d) if d != _ZERO else _ZERO


@device
def absmax_signed(src, r, flavor):
    """(amax, vmax): the first value of largest magnitude, strict compare (NaN never wins)."""
    amax = _ZERO
    vmax = _ZERO
    for j in range(QK):
        v = src[r, _u(j)]
        a = ftz(abs(v)) if flavor == CUDA else abs(v)
        if a > amax:
            amax = a
            vmax = v
    return amax, vmax


# ---- q8_0 -------------------------------------------------------------------------------------
@device
def _max_ps(a, b):
    return a if a > b else b        # maxps / ggml's MAX: the second operand when either is NaN


@device
def _avx_absmax(src, r):
    """x86 AVX2 quantize_row_q8_0's reduction order: 8 lanes of 4, then halves, movehl, movehdup."""
    q = cuda.local.array(8, np.float32)
    for lane in range(8):
        m = abs(src[r, _u(lane)])
        for k in range(1, 4):
            m = _max_ps(m, abs(src[r, _u(8 * k + lane)]))
        q[lane] = m
    return _max_ps(_max_ps(_max_ps(q[4], q[0]), _max_ps(q[6], q[2])),
                   _max_ps(_max_ps(q[5], q[1]), _max_ps(q[7], q[3])))


@device
def quantize_q8_0(src, r, y, o, flavor):
    if flavor == CPU:
        amax = _avx_absmax(src, r)
        store_u16(y, o, 0, half_bits(div(amax, F(127.0)), flavor))
        idv = div(F(127.0), amax) if amax != _ZERO else _ZERO
        for j in range(QK):
            n = x86_i32(round_even(mul(src[r, _u(j)], idv)))
            y[_u(o + 2 + j)] = np.uint8(np.int32(min(max(n, -128), 127)) & 0xFF)   # packs saturate
        return
    amax = _ZERO
    for j in range(QK):
        if flavor == CUDA:
            a = ftz(abs(src[r, _u(j)]))
            if a > amax:                # fmaxf: NaN loses
                amax = a
        else:
            amax = _max_ps(amax, abs(src[r, _u(j)]))
    d = mul_ftz(amax, _INV_127) if flavor == CUDA else div(amax, F(127.0))
    idv = recip(d, flavor)
    store_u16(y, o, 0, half_bits(d, flavor))
    for j in range(QK):
        t = mul_ftz(src[r, _u(j)], idv) if flavor == CUDA else mul(src[r, _u(j)], idv)
        y[_u(o + 2 + j)] = np.uint8(to_i8(roundf(t), flavor) & 0xFF)


@device
def dequantize_q8_0(y, o, out, r):
    d = load_half(y, o, 0)
    for j in range(QK):
        out[r, _u(j)] = mul(F(low_i8(y[_u(o + 2 + j)])), d)


# ---- q4_0 / q5_0: d = max / -8 (-16), x*id + 8.5 (16.5) ----------------------------------------
@device
def _sym_scale(src, r, y, o, flavor, neg_levels, inv_levels):
    vmax = absmax_signed(src, r, flavor)[1]
    d = mul_ftz(vmax, inv_levels) if flavor == CUDA else div(vmax, neg_levels)
    store_u16(y, o, 0, half_bits(d, flavor))
    return recip(d, flavor)


@device
def _sym_q(v, idv, offset, top, flavor):
    t = fma_ftz(v, idv, offset) if flavor == CUDA else add(mul(v, idv), offset)
    return min(top, to_i8(t, flavor))


@device
def quantize_q4_0(src, r, y, o, flavor):
    idv = _sym_scale(src, r, y, o, flavor, F(-8.0), F(-0.125))
    for j in range(16):
        lo = _sym_q(src[r, _u(j)], idv, F(8.5), 15, flavor)
        hi = _sym_q(src[r, _u(j + 16)], idv, F(8.5), 15, flavor)
        y[_u(o + 2 + j)] = np.uint8((lo | (hi << 4)) & 0xFF)      # unmasked, as in C


@device
def dequantize_q4_0(y, o, out, r):
    d = load_half(y, o, 0)
    for j in range(16):
        b = np.int32(y[_u(o + 2 + j)])
        out[r, _u(j)] = mul(F((b & 0x0F) - 8), d)
        out[r, _u(j + 16)] = mul(F((b >> 4) - 8), d)


@device
def _q5_bits(y, o, qs, j, q0, q1):
    y[_u(o + qs + j)] = np.uint8((q0 & 0x0F) | ((q1 & 0x0F) << 4))
    return (np.uint32((q0 >> 4) & 1) << np.uint32(j)) | (np.uint32((q1 >> 4) & 1) << np.uint32(j + 16))


@device
def _q5_pair(y, o, qs, qh, j):
    b = np.int32(y[_u(o + qs + j)])
    h0 = np.int32((qh >> np.uint32(j)) & np.uint32(1))
    h1 = np.int32((qh >> np.uint32(j + 16)) & np.uint32(1))
    return (b & 0x0F) | (h0 << 4), (b >> 4) | (h1 << 4)


@device
def quantize_q5_0(src, r, y, o, flavor):
    idv = _sym_scale(src, r, y, o, flavor, F(-16.0), F(-0.0625))
    qh = np.uint32(0)
    for j in range(16):
        q0 = _sym_q(src[r, _u(j)], idv, F(16.5), 31, flavor)
        q1 = _sym_q(src[r, _u(j + 16)], idv, F(16.5), 31, flavor)
        qh |= _q5_bits(y, o, 6, j, q0, q1)
    store_u32(y, o, 2, qh)


@device
def dequantize_q5_0(y, o, out, r):
    d = load_half(y, o, 0)
    qh = load_u32(y, o, 2)
    for j in range(16):
        q0, q1 = _q5_pair(y, o, 6, qh, j)
        out[r, _u(j)] = mul(F(q0 - 16), d)
        out[r, _u(j + 16)] = mul(F(q1 - 16), d)


# ---- q4_1 / q5_1: d = (max - min) / 15 (31), (x - min)*id + 0.5 -------------------------------
@device
def _min_max(src, r, flavor, from_first):
    lo = src[r, _u(0)] if from_first else _FLT_MAX
    hi = src[r, _u(0)] if from_first else -_FLT_MAX
    flo = ftz(lo)                       # ftz(lo), ftz(hi), kept beside them (one flush per value)
    fhi = ftz(hi)
    for j in range(1 if from_first else 0, QK):
        v = src[r, _u(j)]
        if flavor == CUDA:              # setp.*.ftz compares flushed values, keeps v
            fv = ftz(v)
            if fv < flo:
                lo = v
                flo = fv
            if fv > fhi:
                hi = v
                fhi = fv
        else:
            if v < lo:
                lo = v
            if v > hi:
                hi = v
    return lo, hi


@device
def _affine_scale(src, r, y, o, flavor, levels, inv_levels, from_first):
    lo, hi = _min_max(src, r, flavor, from_first)
    d = mul_ftz(sub_ftz(hi, lo), inv_levels) if flavor == CUDA else div(sub(hi, lo), levels)
    store_u16(y, o, 0, half_bits(d, flavor))
    store_u16(y, o, 2, half_bits(lo, flavor))
    return lo, recip(d, flavor)


@device
def _affine_t(v, lo, idv, flavor):
    if flavor == CUDA:
        return fma_ftz(sub_ftz(v, lo), idv, _HALF)
    return add(mul(sub(v, lo), idv), _HALF)


@device
def quantize_q4_1(src, r, y, o, flavor):
    lo, idv = _affine_scale(src, r, y, o, flavor, F(15.0), _INV_15, False)
    for j in range(16):
        q0 = min(15, to_i8(_affine_t(src[r, _u(j)], lo, idv, flavor), flavor))
        q1 = min(15, to_i8(_affine_t(src[r, _u(j + 16)], lo, idv, flavor), flavor))
        y[_u(o + 4 + j)] = np.uint8((q0 | (q1 << 4)) & 0xFF)


@device
def dequantize_q4_1(y, o, out, r):
    d = load_half(y, o, 0)
    m = load_half(y, o, 2)
    for j in range(16):
        b = np.int32(y[_u(o + 4 + j)])
        out[r, _u(j)] = add(mul(F(b & 0x0F), d), m)
        out[r, _u(j + 16)] = add(mul(F(b >> 4), d), m)


@device
def _u8(t, flavor):
    """(uint8_t)t: low byte of cvt.rzi.u32 on CUDA, of cvttss2si on x86."""
    if flavor == CUDA:
        return np.int32(ptx_u32(t) & np.uint32(0xFF))
    return np.int32(x86_i32(t) & np.int32(0xFF))


@device
def quantize_q5_1(src, r, y, o, flavor):
    lo, idv = _affine_scale(src, r, y, o, flavor, F(31.0), _INV_31, flavor == CUDA)
    qh = np.uint32(0)
    for j in range(16):
        q0 = _u8(_affine_t(src[r, _u(j)], lo, idv, flavor), flavor)
        q1 = _u8(_affine_t(src[r, _u(j + 16)], lo, idv, flavor), flavor)
        qh |= _q5_bits(y, o, 8, j, q0, q1)
    store_u32(y, o, 4, qh)


@device
def dequantize_q5_1(y, o, out, r):
    d = load_half(y, o, 0)
    m = load_half(y, o, 2)
    qh = load_u32(y, o, 4)
    for j in range(16):
        q0, q1 = _q5_pair(y, o, 8, qh, j)
        out[r, _u(j)] = add(mul(F(q0), d), m)
        out[r, _u(j + 16)] = add(mul(F(q1), d), m)


# ---- iq4_nl -----------------------------------------------------------------------------------
@device
def kvalue(k):
    """KVALUES[k] for k in 0..15, from the packed words."""
    w = _KV_LO if k < 8 else _KV_HI
    return F(low_i8(np.int32((w >> np.uint64(8 * (k & 7))) & np.uint64(0xFF))))


@device
def best_index(x):
    """best_index_int8(16, kvalues_iq4nl, x) as ggml writes it: the nearest level, a tie going up,
    NaN -> 15. Both sides of its `x - lo < hi - x` round monotonically and are equal at the exact
    midpoint (lo + hi) / 2, so the answer is the number of midpoints m with !(x < m): 15 compares with
    immediates, no data-dependent lookups (checked against ggml's search on all 2^32 floats)."""
    q = _ZERO                           # counted in float32: numba would widen an int count to 64 bits
    for k in range(15):                 # unrolled: each _KV_MIDPOINTS[k] is a constant
        q += _ZERO if x < _KV_MIDPOINTS[k] else _ONE
    return np.int32(q)


@device
def quantize_iq4_nl(src, r, y, o, flavor):
    amax, vmax = absmax_signed(src, r, flavor)
    if flavor == CUDA:
        d = mul_ftz(vmax, _INV_M127)
        idv = recip(d, flavor)
        sumqx = _ZERO
        sumq2 = _ZERO
        for j in range(16):
            v0 = src[r, _u(j)]
            v1 = src[r, _u(j + 16)]
            q0 = best_index(mul_ftz(v0, idv))
            q1 = best_index(mul_ftz(v1, idv))
            y[_u(o + 2 + j)] = np.uint8(q0 | (q1 << 4))
            k0 = kvalue(q0)
            k1 = kvalue(q1)
            t0 = mul_ftz(mul_ftz(v0, v0), k0)
            t1 = mul_ftz(mul_ftz(v1, v1), k1)
            sumqx = add_ftz(sumqx, fma_ftz(v0, t0, mul_ftz(v1, t1)))
            sumq2 = add_ftz(sumq2, fma_ftz(t0, k0, mul_ftz(t1, k1)))
        if sumq2 > _ZERO:
            d = mul_ftz(sumqx, rcp_approx(sumq2))
        store_u16(y, o, 0, half_bits(d, flavor))
        return
    if amax < _GROUP_MAX_EPS:           # kvlab's bytes for ggml's stale-L[] case (see kernels/iq4_nl.py)
        store_u16(y, o, 0, np.uint16(0))
        for j in range(16):
            y[_u(o + 2 + j)] = np.uint8(0x88)
        return
    idv = div(_ONE, div(vmax, _KV_FIRST))
    for j in range(16):
        y[_u(o + 2 + j)] = np.uint8(best_index(mul(idv, src[r, _u(j)])) | (best_index(mul(idv, src[r, _u(j + 16)])) << 4))
    sumqx = _ZERO
    sumq2 = _ZERO
    for h in range(2):
        for j in range(16):
            v = src[r, _u(16 * h + j)]
            k = kvalue((np.int32(y[_u(o + 2 + j)]) >> (4 * h)) & 0x0F)
            wk = mul(mul(v, v), k)
            sumqx = add(sumqx, mul(wk, v))
            sumq2 = add(sumq2, mul(wk, k))
    d = div(sumqx, sumq2) if sumq2 > _ZERO else _ZERO
    store_u16(y, o, 0, half_bits(d, flavor))


@device
def dequantize_iq4_nl(y, o, out, r):
    d = load_half(y, o, 0)
    for j in range(16):
        b = np.int32(y[_u(o + 2 + j)])
        out[r, _u(j)] = mul(d, kvalue(b & 0x0F))
        out[r, _u(j + 16)] = mul(d, kvalue(b >> 4))


# ---- f32 / f16 / bf16: one value at a time ----------------------------------------------------
@device
def f16_bits(v, flavor, in_simd_chunk):
    """ref: software (NaN -> 0x7E00|sign); cpu: F16C inside a row's chunks of 4 (payload kept);
    cuda: cvt.rn.f16.f32 (NaN -> 0x7FFF)."""
    if v != v and flavor == CPU and in_simd_chunk:
        u = f32_bits(v)
        return np.uint16(((u >> np.uint32(16)) & np.uint32(0x8000)) | np.uint32(0x7E00)
                         | ((u & np.uint32(0x007FFFFF)) >> np.uint32(13)))
    return half_bits(v, flavor)


@device
def bf16_bits(v, flavor):
    u = f32_bits(v)
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        if flavor == CUDA:
            return np.uint16(0x7FFF)
        return np.uint16((u >> np.uint32(16)) | np.uint32(64))
    return np.uint16((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16))


@device
def bf16_to_f32(h):
    return f32_from_bits(np.uint32(h) << np.uint32(16))
