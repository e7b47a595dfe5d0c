"""Flash decoding over ggml bytes on the CPU: attention of one query row per head against a K/V cache
held only as ggml rows, as ggml-cpu's flash_attn_ext runs it (ggml-cpu/ops.cpp,
ggml_compute_forward_flash_attn_ext_f16_one_chunk), dequantizing block by block inside the loop.

Per query row (one head of one sequence), in ggml's order, as the x86-64 AVX512 build computes it
(kvlab.accuracy.cpu_fa models the same build op by op, checked against libggml; the two agree bit
for bit, tests/test_flash.py):
  s  = vec_dot(K row, Q converted to K's vec_dot_type) * scale      (Q conversion by the caller;
       `block_dot` / `plain_dot` give the SIMD lane order); s += mask, and a -inf mask entry skips the row;
  online softmax: ms = expf(Mold - M) on a new maximum, else vs = expf(s - M); S = fma(S, ms, vs);
  V accumulator: float32, acc = fma(v, vs, acc) (ggml_vec_mad_f32), or an fp16 vector for an f16 V
  (and an f32 V, which llama.cpp casts to f16, as it casts an f32 K): every update stored as fp16
  (ggml_vec_mad_f16 / ggml_vec_scale_f16); out = acc * (1/S)  (0 when S == 0).

Types are ggml's enum values (kvlab.types TypeInfo.ggml_type). Arrays are indexed per row, never
sliced, so the prange loop takes no reference counts.
"""
import numpy as np
from numba import njit, prange

from . import QK
from .fp import bf16_to_fp32, f32_from_bits, fma32, fp16_to_fp32, fp32_to_fp16
from .iq4_nl import KVALUES

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, BF16 = 0, 1, 2, 3, 6, 7, 8, 20, 30   # enum ggml_type
KVALUES_IQ4NL = KVALUES.astype(np.int32)


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
def hsum8(a):
    """hsum_float_8: (a4+a0, a5+a1, a6+a2, a7+a3), then (r0+r2) + (r1+r3)."""
    r0, r1 = np.float32(a[4] + a[0]), np.float32(a[5] + a[1])
    r2, r3 = np.float32(a[6] + a[2]), np.float32(a[7] + a[3])
    return np.float32(np.float32(r0 + r2) + np.float32(r1 + r3))


@njit(cache=True, inline="always")
def reduce16(a, o):
    """GCC's _mm512_reduce_add_ps of a[o:o+16]: halves of 8, of 4, then (t0+t2) + (t1+t3)."""
    t0 = np.float32(np.float32(a[o + 12] + a[o + 4]) + np.float32(a[o + 8] + a[o]))
    t1 = np.float32(np.float32(a[o + 13] + a[o + 5]) + np.float32(a[o + 9] + a[o + 1]))
    t2 = np.float32(np.float32(a[o + 14] + a[o + 6]) + np.float32(a[o + 10] + a[o + 2]))
    t3 = np.float32(np.float32(a[o + 15] + a[o + 7]) + np.float32(a[o + 11] + a[o + 3]))
    return np.float32(np.float32(t0 + t2) + np.float32(t1 + t3))


@njit(cache=True, inline="always")
def read_f16(raw, b, h, i, c, t):
    """Value c of an f16 row, or of an f32 row cast to f16 first (llama.cpp's build_attn_mha casts an
    f32 K/V cache to f16 before flash attention)."""
    if t == F32:
        return fp16_to_fp32(fp32_to_fp16(plain_value(raw, b, h, i, c, t)))
    return plain_value(raw, b, h, i, c, t)


@njit(cache=True, inline="always")
def plain_dot(k, b, h, i, t, n, qf, r, acc):
    """K's vec_dot (ggml-cpu, x86-64 AVX512 build) of f32/f16/bf16 row k[b, h, i] (n values of type t) with
    query row r: f16 (and f32, cast): 4 x 16 lanes of fma over steps of 64, (s0+s2) + (s1+s3), the 16-lane
    reduction; bf16: two vdpbf16ps accumulators (lane l: value 2l+1 then 2l), each reduced, summed in
    double. qf (R, n) float32: Q as f16/bf16 values. acc: float32 scratch of 64."""
    for x in range(64):
        acc[x] = np.float32(0)
    n_steps = n - n % 64     # the values past the last whole step: ggml's leftover loop, in double
    if t == F32 or t == F16:
        for c0 in range(0, n_steps, 64):
            for x in range(64):
                acc[x] = fma32(read_f16(k, b, h, i, c0 + x, t), qf[r, c0 + x], acc[x])
        for lane in range(16):
            acc[lane] = np.float32(acc[lane] + acc[32 + lane]) + np.float32(acc[16 + lane] + acc[48 + lane])
        total = np.float64(reduce16(acc, 0))
        for x in range(n_steps, n):
            total += np.float64(np.float32(read_f16(k, b, h, i, x, t) * qf[r, x]))
        return np.float32(total)
    for c0 in range(0, n_steps, 64):            # bf16
        for half in range(2):
            for lane in range(16):
                x = c0 + 32 * half + 2 * lane
                a = 16 * half + lane
                hi = np.float32(acc[a] + np.float32(plain_value(k, b, h, i, x + 1, t) * qf[r, x + 1]))
                acc[a] = np.float32(hi + np.float32(plain_value(k, b, h, i, x, t) * qf[r, x]))
    total = np.float64(reduce16(acc, 0)) + np.float64(reduce16(acc, 16))
    for x in range(n_steps, n):
        total += np.float64(np.float32(plain_value(k, b, h, i, x, t) * qf[r, x]))
    return np.float32(total)


@njit(cache=True, inline="always")
def decode_k_row(k, b, h, i, t, n, kint, kd, km):
    """Block-type row k[b, h, i] (n values of type t) as its integer values (as vec_dot reads them), and
    each block's d and m (q4_1/q5_1) as float32: what block_dot reads, decoded once for a GQA group."""
    ts = type_size(t)
    for blk in range(n // QK):
        o = blk * ts
        kd[blk] = fp16_to_fp32(_u16(k, b, h, i, o))
        km[blk] = fp16_to_fp32(_u16(k, b, h, i, o + 2)) if has_min(t) else np.float32(0)
        for j in range(QK):
            kint[blk * QK + j] = quant(k, b, h, i, o, j, t)


@njit(cache=True, inline="always")
def block_dot(kint, kd, km, t, n, qq, qd, qs, r, acc):
    """K's vec_dot (ggml-cpu, x86-64 AVX512 build) of a decoded block-type row with query row r: 8 float
    lanes of 4 consecutive values, acc = fma(d_k * d_q, lane integer sum, acc) per block (iq4_nl: even and
    odd blocks in two accumulators), hsum_float_8, then q4_1/q5_1's sum(m * s). qq (R, n) int8, qd/qs
    (R, n/32) float32: Q as q8_0 / q8_1 (d and s as ggml's fp16). acc: float32 scratch of 16."""
    for x in range(16):
        acc[x] = np.float32(0)
    summs = np.float32(0)
    for blk in range(n // QK):
        d = np.float32(kd[blk] * qd[r, blk])
        a = 8 * (blk & 1) if t == IQ4_NL else 0
        for lane in range(8):
            isum = np.int32(0)                  # exact: any order of the four products is ggml's
            for j in range(blk * QK + 4 * lane, blk * QK + 4 * lane + 4):
                isum += kint[j] * np.int32(qq[r, j])
            acc[a + lane] = fma32(d, np.float32(isum), acc[a + lane])
        if has_min(t):
            summs = np.float32(summs + np.float32(km[blk] * qs[r, blk]))
    if t == IQ4_NL:
        for lane in range(8):
            acc[lane] = acc[lane] + acc[8 + lane]
    return np.float32(hsum8(acc) + summs)


@njit(cache=True, inline="always")
def dequantize_row(v, b, h, i, t, out):
    """out[:] = ggml's to_float of row v[b, h, i] (dequantize_row_<type>, float32; f32 cast to f16 first)."""
    n = out.shape[0]
    if t == F32 or t == F16:
        for c in range(n):
            out[c] = read_f16(v, b, h, i, c, t)
        return
    if t == BF16:
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
def flash_decode(qq, qd, qs, qf, k, v, type_k, type_v, n_dk, mask, scale, out, n_threads):
    """out[b, h] = attention of query row (b, h) over the cache rows 0..L-1 of KV head h // group.

    qq (B*H, Dk) int8, qd/qs (B*H, Dk/32) float32, qf (B*H, Dk) float32: Q in K's vec_dot_type (see
    block_dot / plain_dot; the arrays K's type does not read may be empty); n_dk = Dk;
    k (B, Hkv, >=L, Dk row bytes), v (B, Hkv, >=L, Dv row bytes) uint8, rows in ggml's layout;
    mask (B, L) float32 added to s (-inf skips the row), or (B, 0) for none; scale float32;
    out (B, H, Dv) float32. L = mask's length when given, else k.shape[2] (the caller passes the
    cache's filled part). n_threads: numba's thread count (work items are split to give each one).

    A work item is one (sequence, KV head) with the query heads of its group, or a part of them when
    there are fewer groups than threads: each V row is dequantized and each block-type K row decoded once
    per item, not once per head (ggml does both for every query row), and every head keeps its own
    accumulator, maximum and sum in ggml's order, so the values are ggml's."""
    n_b, n_h, n_dv = out.shape
    n_hkv = k.shape[1]
    group = n_h // n_hkv
    n_groups = n_b * n_hkv
    per_part = -(-group // min(group, max(1, -(-n_threads // n_groups))))     # heads of an item
    parts = -(-group // per_part)                                              # items of a group
    for item in prange(n_groups * parts):
        bk = item // parts                              # b * Hkv + hk
        b = bk // n_hkv
        hk = bk - b * n_hkv
        h0 = hk * group + (item - bk * parts) * per_part
        _attend(qq, qd, qs, qf, k, v, type_k, type_v, n_dk, mask, scale, out, b, hk, h0,
                min(per_part, (hk + 1) * group - h0))


@njit(cache=True)
def _attend(qq, qd, qs, qf, k, v, type_k, type_v, n_dk, mask, scale, out, b, hk, h0, n_heads):
    """Query heads h0 .. h0 + n_heads - 1 of sequence b (all reading KV head hk), as ggml's one-chunk loop
    runs each of them."""
    n_h, n_dv = out.shape[1], out.shape[2]
    n_kv = k.shape[2]
    use_mask = mask.shape[1] > 0
    f16_acc = type_v == F16 or type_v == F32      # an f32 V is cast to f16: its accumulator is fp16 too
    acc = np.zeros((n_heads, n_dv), np.float32)
    big_m = np.full(n_heads, -np.inf, np.float32)
    big_s = np.zeros(n_heads, np.float32)
    v32 = np.empty(n_dv, np.float32)
    scratch = np.empty(64, np.float32)
    plain_k = type_k == F32 or type_k == F16 or type_k == BF16
    kint = np.empty(n_dk, np.int32)
    kd = np.empty(n_dk // QK, np.float32)
    km = np.empty(n_dk // QK, np.float32)
    for i in range(n_kv):
        mv = mask[b, i] if use_mask else np.float32(0)
        if mv == -np.inf:
            continue
        dequantize_row(v, b, hk, i, type_v, v32)
        if not plain_k:
            decode_k_row(k, b, hk, i, type_k, n_dk, kint, kd, km)
        for j in range(n_heads):
            row = b * n_h + h0 + j
            if plain_k:
                dot = plain_dot(k, b, hk, i, type_k, n_dk, qf, row, scratch)
            else:
                dot = block_dot(kint, kd, km, type_k, n_dk, qq, qd, qs, row, scratch)
            s = np.float32(dot * scale) + mv
            ms = np.float32(1)
            vs = np.float32(1)
            if s > big_m[j]:
                ms = np.float32(np.exp(np.float32(big_m[j] - s)))
                big_m[j] = s
                if f16_acc:
                    for c in range(n_dv):
                        acc[j, c] = fp16_to_fp32(fp32_to_fp16(np.float32(acc[j, c] * ms)))
                else:
                    for c in range(n_dv):
                        acc[j, c] = np.float32(acc[j, c] * ms)
            else:
                vs = np.float32(np.exp(np.float32(s - big_m[j])))
            if f16_acc:
                for c in range(n_dv):
                    acc[j, c] = fp16_to_fp32(fp32_to_fp16(fma32(v32[c], vs, acc[j, c])))
            else:
                for c in range(n_dv):
                    acc[j, c] = fma32(v32[c], vs, acc[j, c])
            big_s[j] = fma32(big_s[j], ms, vs)
    for j in range(n_heads):
        inv = np.float32(0) if big_s[j] == 0 else np.float32(1) / big_s[j]
        for c in range(n_dv):
            out[b, h0 + j, c] = acc[j, c] * inv
