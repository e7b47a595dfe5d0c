"""Flash decoding over ggml bytes on the CPU: attention of one query row per head against a K/V cache
held only as ggml rows, as ggml-cpu's flash_attn_ext runs it (ggml-cpu/ops.cpp,
ggml_compute_forward_flash_attn_ext_f16_one_chunk), dequantizing block by block inside the loop.

Per query row (one head of one sequence), in ggml's order:
  s  = vec_dot(K row, Q converted to K's vec_dot_type) * scale      (float32; Q conversion by the caller)
  s += mask; a -inf mask skips the row
  online softmax: M, S in float32, ms = expf(Mold - M) on a new maximum, else vs = expf(s - M);
  V accumulator: float32 (acc = fma(v, vs, acc), ggml_vec_mad_f32's AVX FMA), or fp16 for an f16 V
  (every update stored as fp16: ggml_vec_mad_f16 / ggml_vec_scale_f16);
  out = acc * (1/S)  (0 when S == 0).
vec_dot is ggml-cpu's generic C (ggml-cpu/quants.c ``ggml_vec_dot_<K>_<vec_dot_type>_generic``,
vec.cpp): per 32-block an exact integer sum, then a float32 running sum with each type's own order of
products; f32/f16/bf16 K: float32 products summed in double. The x86 SIMD builds sum the same block
terms in 8-lane order: the last bits of s can differ from such a build, nothing else.

Types are ggml's enum values (kvlab.types TypeInfo.ggml_type). Arrays are indexed per row, never
sliced, so the prange loop takes no reference counts.
"""
import numpy as np
from numba import njit, prange

from .fp import bf16_to_fp32, f32_from_bits, fma32, fp16_to_fp32, fp32_to_fp16

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, BF16 = 0, 1, 2, 3, 6, 7, 8, 20, 30   # enum ggml_type
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int32)
QK = 32


@njit(cache=True, inline="always")
def type_size(t):
    """Bytes per block (per value for f32/f16/bf16), ggml_type_size."""
    if t == F32:
        return 4
    if t == F16 or t == BF16:
        return 2
    if t == Q8_0:
        return 34
    if t == Q4_0 or t == IQ4_NL:
        return 18
    if t == Q4_1:
        return 20
    if t == Q5_0:
        return 22
    return 24  # Q5_1


@njit(cache=True, inline="always")
def _u16(raw, b, h, i, o):
    return np.uint16(raw[b, h, i, o]) | np.uint16(np.uint16(raw[b, h, i, o + 1]) << np.uint16(8))


@njit(cache=True, inline="always")
def _u32(raw, b, h, i, o):
    return (np.uint32(raw[b, h, i, o]) | (np.uint32(raw[b, h, i, o + 1]) << np.uint32(8))
            | (np.uint32(raw[b, h, i, o + 2]) << np.uint32(16)) | (np.uint32(raw[b, h, i, o + 3]) << np.uint32(24)))


@njit(cache=True, inline="always")
def _nibble(raw, b, h, i, qs, j):
    """Value j of 32 packed nibbles at byte qs: qs[j] low for j < 16, qs[j - 16] high (ggml-common.h)."""
    byte = np.int32(raw[b, h, i, qs + (j & 15)])
    return (byte >> 4) if j >= 16 else (byte & 0x0F)


@njit(cache=True, inline="always")
def quant(raw, b, h, i, o, j, t):
    """Integer value j (0..31) of the block at byte o of row raw[b, h, i], as ggml's vec_dot and
    dequantize_row read it: x = d * quant (+ m for q4_1/q5_1; iq4_nl: the kvalues entry)."""
    if t == Q8_0:
        q = np.int32(raw[b, h, i, o + 2 + j])
        return q - 256 if q > 127 else q
    if t == Q4_0:
        return _nibble(raw, b, h, i, o + 2, j) - 8
    if t == IQ4_NL:
        return KVALUES_IQ4NL[_nibble(raw, b, h, i, o + 2, j)]
    if t == Q4_1:
        return _nibble(raw, b, h, i, o + 4, j)
    if t == Q5_0:
        high = np.int32((_u32(raw, b, h, i, o + 2) >> np.uint32(j)) & np.uint32(1)) << 4
        return (_nibble(raw, b, h, i, o + 6, j) | high) - 16
    high = np.int32((_u32(raw, b, h, i, o + 4) >> np.uint32(j)) & np.uint32(1)) << 4      # Q5_1
    return _nibble(raw, b, h, i, o + 8, j) | high


@njit(cache=True, inline="always")
def has_min(t):
    return t == Q4_1 or t == Q5_1


@njit(cache=True, inline="always")
def plain_value(raw, b, h, i, c, t):
    """Value c of an f32/f16/bf16 row, as float32 (exact)."""
    if t == F16:
        return fp16_to_fp32(_u16(raw, b, h, i, 2 * c))
    if t == BF16:
        return bf16_to_fp32(_u16(raw, b, h, i, 2 * c))
    return f32_from_bits(_u32(raw, b, h, i, 4 * c))


@njit(cache=True, inline="always")
def kq_dot(k, b, h, i, t, n, qq, qd, qs, qf, r):
    """ggml's vec_dot of K row k[b, h, i] (n values of type t) with query row r, generic C order.

    qq (R, n) int8, qd/qs (R, n/32) float32: Q as q8_0 (qs unused) or q8_1 blocks (d, s as ggml's fp16);
    qf (R, n) float32: Q as f32/f16/bf16 values (K of those types)."""
    if t == F32 or t == F16 or t == BF16:
        acc = 0.0                                   # ggml_float (double) sum of float32 products
        for c in range(n):
            acc += np.float64(plain_value(k, b, h, i, c, t) * qf[r, c])
        return np.float32(acc)
    ts = type_size(t)
    sumf = np.float32(0)
    for blk in range(n // QK):
        o = blk * ts
        sumi = np.int32(0)
        for j in range(QK):
            sumi += quant(k, b, h, i, o, j, t) * np.int32(qq[r, blk * QK + j])
        dk = fp16_to_fp32(_u16(k, b, h, i, o))
        dq = qd[r, blk]
        if t == Q4_0:
            sumf += (np.float32(sumi) * dk) * dq
        elif has_min(t):
            sumf += (dk * dq) * np.float32(sumi) + fp16_to_fp32(_u16(k, b, h, i, o + 2)) * qs[r, blk]
        else:
            sumf += np.float32(sumi) * (dk * dq)
    return sumf


@njit(cache=True, inline="always")
def dequantize_row(v, b, h, i, t, out):
    """out[:] = ggml's to_float of row v[b, h, i] (dequantize_row_<type>, float32)."""
    n = out.shape[0]
    if t == F32 or t == F16 or t == BF16:
        for c in range(n):
            out[c] = plain_value(v, b, h, i, c, t)
        return
    ts = type_size(t)
    for blk in range(n // QK):
        o = blk * ts
        d = fp16_to_fp32(_u16(v, b, h, i, o))
        if has_min(t):
            m = fp16_to_fp32(_u16(v, b, h, i, o + 2))
            for j in range(QK):
                out[blk * QK + j] = np.float32(quant(v, b, h, i, o, j, t)) * d + m
        else:
            for j in range(QK):
                out[blk * QK + j] = np.float32(quant(v, b, h, i, o, j, t)) * d


@njit(parallel=True, cache=True)
def flash_decode(qq, qd, qs, qf, k, v, type_k, type_v, n_dk, mask, scale, out):
    """out[b, h] = attention of query row (b, h) over the cache rows 0..L-1 of KV head h // group.

    qq (B*H, Dk) int8, qd/qs (B*H, Dk/32) float32, qf (B*H, Dk) float32: Q in K's vec_dot_type (see kq_dot;
    the arrays K's type does not read may be empty); n_dk = Dk;
    k (B, Hkv, >=L, Dk row bytes), v (B, Hkv, >=L, Dv row bytes) uint8, rows in ggml's layout;
    mask (B, L) float32 added to s (-inf skips the row), or (B, 0) for none; scale float32;
    out (B, H, Dv) float32. L = mask's length when given, else k.shape[2] (the caller passes the
    cache's filled part)."""
    n_b, n_h, n_dv = out.shape
    n_hkv = k.shape[1]
    group = n_h // n_hkv
    n_kv = k.shape[2]
    use_mask = mask.shape[1] > 0
    for row in prange(n_b * n_h):
        b = row // n_h
        h = row - b * n_h
        hk = h // group
        acc = np.zeros(n_dv, np.float32)
        v32 = np.empty(n_dv, np.float32)
        big_m = np.float32(-np.inf)
        big_s = np.float32(0)
        for i in range(n_kv):
            mv = mask[b, i] if use_mask else np.float32(0)
            if mv == -np.inf:
                continue
            s = kq_dot(k, b, hk, i, type_k, n_dk, qq, qd, qs, qf, row) * scale + mv
            ms = np.float32(1)
            vs = np.float32(1)
            if s > big_m:
                ms = np.float32(np.exp(np.float32(big_m - s)))
                big_m = s
                if type_v == F16:
                    for c in range(n_dv):
                        acc[c] = fp16_to_fp32(fp32_to_fp16(np.float32(acc[c] * ms)))
                else:
                    for c in range(n_dv):
                        acc[c] = np.float32(acc[c] * ms)
            else:
                vs = np.float32(np.exp(np.float32(s - big_m)))
            dequantize_row(v, b, hk, i, type_v, v32)
            if type_v == F16:
                for c in range(n_dv):
                    acc[c] = fp16_to_fp32(fp32_to_fp16(fma32(v32[c], vs, acc[c])))
            else:
                for c in range(n_dv):
                    acc[c] = fma32(v32[c], vs, acc[c])
            big_s = np.float32(big_s * ms + vs)
        inv = np.float32(0) if big_s == 0 else np.float32(1) / big_s
        for c in range(n_dv):
            out[b, h, c] = acc[c] * inv
