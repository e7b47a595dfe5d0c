"""ggml-cpu's flash_attn_ext value by value: the `cpu` backend of kvlab.accuracy.attention.

What ggml-cpu (ops.cpp, ggml_compute_forward_flash_attn_ext_f16_one_chunk) does for one query row,
as built for x86-64 with AVX512 (F, VNNI, BF16; no AVX512-FP16), reproduced operation by operation
so the float32 result is bit-exact where the inputs are the same bytes:
  - an f32 K or V cache is first cast to f16 by llama.cpp (build_attn_mha), so it is read as f16;
  - Q is converted to K's vec_dot_type with the CPU from_float (q8_0 / q8_1 by the AVX rounding:
    id = 127/amax, round half to even, d as fp16; q8_1's s = fp16(d * sum q); f16 / bf16 round to
    nearest even);
  - K.Q is K's vec_dot with its SIMD summation order (`kq_dot`): the quantized types keep 8 float
    lanes of 4 consecutive values each, fma(d_k * d_q, lane integer sum, acc) per block (iq4_nl in
    two accumulators, even and odd blocks), then hsum_float_8; q4_1/q5_1 add sum(m * s) afterwards;
    f16 keeps 4 x 16 lanes of fma, bf16 2 x 16 lanes of vdpbf16ps, both reduced as GCC's
    _mm512_reduce_add_ps does;
  - the logit is s * scale (float32), the softmax is online with glibc's expf, a new maximum rescales
    the accumulator, S = fma(S, ms, vs) (GCC contracts S*ms + vs); V is accumulated with fma into float32 (v_to_float for quantized V) or, for an f16
    V, into an fp16 vector that every update rounds (ggml_vec_mad_f16 / ggml_vec_scale_f16);
  - the result is acc * (1/S).
Prompt batches of >= 64 tokens over an f16 K and V (after the cast) take ggml's tiled path instead
(ggml_compute_forward_flash_attn_ext_tiled, `kq_chain`, `tiled_softmax`): Q stays float32, K.Q is a chain of
fma over the head dimension (simd_gemm vectorizes over cells, so each sum is sequential), scaled;
the softmax runs per tile of 64 cells: the tile's maximum rescales the float32 accumulator and S with
expf, the weights come from ggml_v_expf (AVX512 polynomial) and their sum, per 16 lanes, is added
in double; P.V is again a sequential fma chain over the cells. Also bit-exact.
A decode over f16 K and V (after the cast) with >= 512 cells in ggml's view takes the split-KV path
when ggml runs more than one thread (`kv_chunk`): one chunk of cells per thread, merged in order.
Where this was checked: kvlab.ggml.fa runs the real op (ggml-python 0.0.45's ggml 0.15.3 and
llama-cpp-python 0.3.36's ggml 0.25.3, both built -march=native on an AVX512 Zen 4; llama-cpp-python's
on a Sapphire Rapids too, where AVX512-FP16 sends ggml 0.15.3's f16 dot into half precision:
kvlab.ggml.fa.llama_lib).
Shapes use kvlab.accuracy.attention's axes in short: G = n_head_kv (K/V heads), R = n_rows = n_gqa * n_q
(the query rows that read one K/V head), L = n_kv (cache cells), D the head size.
"""
import math

import numpy as np
from numba import njit, prange

from kvlab.kernels.flash_decode import hsum8, reduce16   # ggml's horizontal sums, one copy
from kvlab.kernels.fp import fma32, fp16_to_fp32, fp32_to_fp16
from kvlab.kernels.iq4_nl import KVALUES
from kvlab.flash import CPU_VEC_DOT_TYPE as VEC_DOT_TYPE   # f32 K is read as f16 (the cast)
from kvlab.quant import dequantize, quantize
from kvlab.types import type_info

TILE_Q = 64   # GGML_FA_TILE_Q (ggml-cpu/common.h): prompt batches of this many tokens take the tiled path
# dot kinds of kq_dot: 0 = one accumulator, 1 = iq4_nl's two, 2 = with q4_1/q5_1's sum(m * s)
_DOT_KIND = {"q8_0": 0, "q4_0": 0, "q5_0": 0, "iq4_nl": 1, "q4_1": 2, "q5_1": 2}
KV_PAD = 256  # llama_kv_cache::get_n_kv: n_pad_cur = max(n_pad, 256)


def padded_n_kv(n_kv: int, n_cells: int | None = None) -> int:
    """The n_kv llama.cpp gives flash attention: n_kv rounded up to 256, at most the cache size."""
    pad = -(-n_kv // KV_PAD) * KV_PAD
    return min(pad, n_cells) if n_cells is not None else pad


def read_type(type_name: str) -> str:
    """The type flash attention reads for a cache type: llama.cpp casts f32 K/V to f16."""
    return "f16" if type_name == "f32" else type_name


def takes_tiled_path(type_k: str, type_v: str, n_tokens: int) -> bool:
    """ggml-cpu's use_tiled: Q f32, K and V both f16 (f32 after the cast), at least TILE_Q tokens."""
    return read_type(type_k) == read_type(type_v) == "f16" and n_tokens >= TILE_Q


# ---- operands as the SIMD code sees them ---------------------------------------------------------

def _fp16(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def _bf16(x):
    """Round float32 to bfloat16 and back as ggml-cpu's from_float does: the bf16 cache type's own kernel."""
    return dequantize(quantize(np.ascontiguousarray(x, dtype=np.float32), "bf16", "cpu"))


def quantize_q8(x, with_sum: bool):
    """quantize_row_q8_0 / q8_1 (x86 AVX): (ints (..., nb, 32) int32, d (..., nb) f32, s (..., nb) f32)."""
    blocks = np.asarray(x, np.float32).reshape(*x.shape[:-1], x.shape[-1] // 32, 32)  # (..., nb, 32)
    amax = np.abs(blocks).max(axis=-1)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(blocks * inv[..., None]).astype(np.int32)   # _mm256_round_ps(_MM_ROUND_NEAREST)
    s = _fp16(d * q.sum(axis=-1).astype(np.float32)) if with_sum else np.zeros_like(d)
    return q, _fp16(d), s


def _le16(raw, at):
    return raw[..., at].astype(np.uint16) | (raw[..., at + 1].astype(np.uint16) << 8)


def _half(raw, at):
    return _le16(raw, at).view(np.float16).astype(np.float32)


def _nibbles(qs):
    """qs (..., 16) -> (..., 32): low nibbles are values 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=-1).astype(np.int32)


def _high_bits(raw, at):
    """The 32 fifth bits of a q5 block (qh, little endian): bit j belongs to value j."""
    qh = sum(raw[..., at + i].astype(np.uint32) << (8 * i) for i in range(4))
    return ((qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32)


def decode_blocks(raw, type_name: str):
    """The integers, scale and min of each block of a quantized row: (q (..., nb, 32), d, m) as the
    AVX2 dot products unpack them (q4_0/q5_0 offset to signed, iq4_nl through its table)."""
    raw = np.asarray(raw, np.uint8)
    size = type_info(type_name).type_size
    b = raw.reshape(*raw.shape[:-1], raw.shape[-1] // size, size)  # (..., nb, type_size)
    d, m = _half(b, 0), np.zeros(b.shape[:-1], np.float32)
    if type_name == "q8_0":
        q = b[..., 2:34].view(np.int8).astype(np.int32)
    elif type_name == "q4_0":
        q = _nibbles(b[..., 2:18]) - 8
    elif type_name == "iq4_nl":
        q = KVALUES.astype(np.int32)[_nibbles(b[..., 2:18])]
    elif type_name == "q5_0":
        q = (_nibbles(b[..., 6:22]) | (_high_bits(b, 2) << 4)) - 16
    else:
        m = _half(b, 2)
        at = 4 if type_name == "q4_1" else 8
        q = _nibbles(b[..., at:at + 16])
        if type_name == "q5_1":
            q = q | (_high_bits(b, 4) << 4)
    return q, d, m


# ---- K.Q -----------------------------------------------------------------------------------------

@njit(parallel=True, cache=True)
def kq_dot_blocks(kq, kd, km, qq, qd, qs, kind, out):
    """Block-quantized K.Q: kq (G, L, nb, 32) int32, kd/km (G, L, nb); qq (G, R, nb, 32), qd/qs (G, R, nb);
    out (G, R, L) float32. kind: 0 one accumulator, 1 two (even/odd blocks), 2 one plus sum(m * s)."""
    n_g, n_r, n_l = out.shape
    nb = kq.shape[2]
    for gr in prange(n_g * n_r):
        g, r = gr // n_r, gr % n_r
        acc = np.empty((2, 8), np.float32)
        for t in range(n_l):
            acc[:] = 0
            summs = np.float32(0)
            for b in range(nb):
                d = np.float32(kd[g, t, b] * qd[g, r, b])
                a = b & 1 if kind == 1 else 0
                for lane in range(8):
                    isum = 0
                    for j in range(4 * lane, 4 * lane + 4):
                        isum += kq[g, t, b, j] * qq[g, r, b, j]
                    acc[a, lane] = fma32(d, np.float32(isum), acc[a, lane])
                if kind == 2:
                    summs = np.float32(summs + np.float32(km[g, t, b] * qs[g, r, b]))
            if kind == 1:
                for lane in range(8):
                    acc[0, lane] = acc[0, lane] + acc[1, lane]
            out[g, r, t] = np.float32(hsum8(acc[0]) + summs)


@njit(parallel=True, cache=True)
def kq_dot_f16(k, q, out):
    """ggml_vec_dot_f16 (AVX512, no FP16): k (G, L, D), q (G, R, D) float32 holding halves; 4 x 16 lanes
    of fma over steps of 64, then (s0 + s2) + (s1 + s3) and the 16-lane reduction; the values past the
    last whole step (head_dim % 64) are added one by one in double, as its leftover loop does."""
    n_g, n_r, n_l = out.shape
    n_d = k.shape[2]
    n_steps = n_d - n_d % 64
    for gr in prange(n_g * n_r):
        g, r = gr // n_r, gr % n_r
        acc = np.empty((4, 16), np.float32)
        for t in range(n_l):
            acc[:] = 0
            for i in range(0, n_steps, 64):
                for j in range(4):
                    for lane in range(16):
                        x = i + 16 * j + lane
                        acc[j, lane] = fma32(k[g, t, x], q[g, r, x], acc[j, lane])
            for lane in range(16):
                acc[0, lane] = np.float32(acc[0, lane] + acc[2, lane]) + np.float32(acc[1, lane] + acc[3, lane])
            total = np.float64(reduce16(acc[0], 0))
            for x in range(n_steps, n_d):
                total += np.float64(np.float32(k[g, t, x] * q[g, r, x]))
            out[g, r, t] = np.float32(total)


@njit(parallel=True, cache=True)
def kq_dot_bf16(k, q, out):
    """ggml_vec_dot_bf16 (AVX512-BF16): k (G, L, D), q (G, R, D) float32 holding bfloats; two vdpbf16ps
    accumulators over steps of 64 (lane l: values 2l+1 then 2l, products exact), each reduced, summed
    in double; the values past the last whole step (head_dim % 64) follow one by one in double."""
    n_g, n_r, n_l = out.shape
    n_d = k.shape[2]
    n_steps = n_d - n_d % 64
    for gr in prange(n_g * n_r):
        g, r = gr // n_r, gr % n_r
        acc = np.empty((2, 16), np.float32)
        for t in range(n_l):
            acc[:] = 0
            for i in range(0, n_steps, 64):
                for c in range(2):
                    for lane in range(16):
                        x = i + 32 * c + 2 * lane
                        hi = np.float32(acc[c, lane] + np.float32(k[g, t, x + 1] * q[g, r, x + 1]))
                        acc[c, lane] = np.float32(hi + np.float32(k[g, t, x] * q[g, r, x]))
            total = np.float64(reduce16(acc[0], 0)) + np.float64(reduce16(acc[1], 0))
            for x in range(n_steps, n_d):
                total += np.float64(np.float32(k[g, t, x] * q[g, r, x]))
            out[g, r, t] = np.float32(total)


def kq_dot(q_rows, k_raw, k_values, type_k: str):
    """K.Q as K's vec_dot computes it: (G, R, L) float32, before the scale.

    q_rows: (G, R, D) float32 queries grouped by KV head; k_raw: (G, L, row_bytes) uint8 cache bytes
    (quantized K); k_values: (G, L, D) float32, the dequantized cache (f16/bf16/f32 K)."""
    n_g, n_r, n_d = q_rows.shape
    out = np.empty((n_g, n_r, k_values.shape[1]), np.float32)
    kind = VEC_DOT_TYPE[type_k]
    if kind == "f16":
        kq_dot_f16(np.ascontiguousarray(_fp16(k_values)), np.ascontiguousarray(_fp16(q_rows)), out)
    elif kind == "bf16":
        kq_dot_bf16(np.ascontiguousarray(k_values, np.float32), np.ascontiguousarray(_bf16(q_rows)), out)
    else:
        kq, kd, km = decode_blocks(k_raw, type_k)
        qq, qd, qs = quantize_q8(q_rows, kind == "q8_1")
        kq_dot_blocks(kq, kd, km, qq, qd, qs, _DOT_KIND[type_k], out)
    return out


# ---- softmax and V -------------------------------------------------------------------------------

@njit(parallel=True, cache=True)
def online_softmax(logits, v, f16_acc, out, chunk=0):
    """The online softmax and V accumulation of one_chunk: logits (G, R, L) float32 (scaled K.Q),
    v (G, L, D) float32 (V as read), out (G, R, D) float32.

    A new maximum M rescales the accumulator by expf(M_old - M) (0 the first time), any other logit adds
    expf(s - M) * v with one fma; with f16_acc the accumulator is an fp16 vector and every update
    (scale or fma) is rounded to fp16, as ggml_vec_scale_f16 / ggml_vec_mad_f16 store it.
    chunk > 0: ggml's split-KV decode (`kv_chunk`): each chunk of cells runs on its own, then
    ggml_flash_attn_ext_reduce_partials merges them in order (fma as GCC contracts it)."""
    n_g, n_r, n_l = logits.shape
    n_d = v.shape[2]
    step = chunk if chunk > 0 else max(n_l, 1)
    for gr in prange(n_g * n_r):
        g, r = gr // n_r, gr % n_r
        acc = np.empty(n_d, np.float32)
        total = np.zeros(n_d, np.float32)
        m_total = np.float32(-np.inf)
        s_total = np.float32(0)
        for c0 in range(0, n_l, step):
            acc[:] = 0
            m = np.float32(-np.inf)
            s = np.float32(0)
            for t in range(c0, min(c0 + step, n_l)):
                x = logits[g, r, t]
                ms = np.float32(1)
                vs = np.float32(1)
                if x > m:
                    ms = np.float32(np.exp(np.float32(m - x)))
                    m = x
                    for i in range(n_d):
                        acc[i] = np.float32(acc[i] * ms)
                        if f16_acc:
                            acc[i] = fp16_to_fp32(fp32_to_fp16(acc[i]))
                else:
                    vs = np.float32(np.exp(np.float32(x - m)))
                for i in range(n_d):
                    acc[i] = fma32(v[g, t, i], vs, acc[i])
                    if f16_acc:
                        acc[i] = fp16_to_fp32(fp32_to_fp16(acc[i]))
                s = fma32(s, ms, vs)
            if chunk <= 0:                     # one chunk: no partials to merge
                m_total, s_total = m, s
                total[:] = acc
            elif s != 0:                       # reduce_partials: chunks with no visible cell are skipped
                m_new = max(m_total, m)
                scale_old = np.float32(np.exp(np.float32(m_total - m_new)))
                scale_new = np.float32(np.exp(np.float32(m - m_new)))
                for i in range(n_d):
                    total[i] = fma32(total[i], scale_old, np.float32(acc[i] * scale_new))
                s_total = fma32(s_total, scale_old, np.float32(s * scale_new))
                m_total = m_new
        inv = np.float32(np.float32(1) / s_total) if s_total != 0 else np.float32(0)
        for i in range(n_d):
            out[g, r, i] = np.float32(total[i] * inv)


def kv_chunk(type_k: str, type_v: str, n_tokens: int, n_kv_padded: int, n_threads: int) -> int:
    """Cells per chunk of ggml's split-KV decode (0: not taken): one token, f16 K and V (f32 after the
    cast), at least 512 cells in the (padded) view, one chunk of ceil(n_kv / n_threads) per thread."""
    if n_tokens != 1 or n_threads < 2 or n_kv_padded < 512 or not read_type(type_k) == read_type(type_v) == "f16":
        return 0
    return -(-n_kv_padded // n_threads)


# ggml_v_expf's constants (vec.h, AVX512): exp(x) = 2^n * p(b), n = round(x / ln 2), b = x - n ln 2
_ROUND, _LOG2E = np.float32(float.fromhex("0x1.8p23")), np.float32(float.fromhex("0x1.715476p+0"))
_LN2_HI, _LN2_LO = np.float32(float.fromhex("0x1.62e4p-1")), np.float32(float.fromhex("0x1.7f7d1cp-20"))
_C = tuple(np.float32(float.fromhex(c)) for c in
           ("0x1.0e4020p-7", "0x1.573e2ep-5", "0x1.555e66p-3", "0x1.fffdb6p-2", "0x1.ffffecp-1"))
_C0, _C1, _C2, _C3, _C4 = _C


@njit(cache=True, inline="always")
def v_expf(x):
    """ggml_v_expf (AVX512F) for one lane: fma for every fmadd/fnmadd, scalef as an exact power of 2."""
    z = fma32(x, _LOG2E, _ROUND)
    n = np.float32(z - _ROUND)
    b = fma32(-n, _LN2_LO, fma32(-n, _LN2_HI, x))
    u = np.float32(b * b)
    j = fma32(fma32(fma32(_C0, b, _C1), u, fma32(_C2, b, _C3)), u, fma32(_C4, b, np.float32(1)))
    if abs(n) > 192:
        return np.float32(0) if n <= 0 else np.float32(np.inf)
    return np.float32(math.ldexp(np.float64(j), int(n)))   # one rounding, as _mm512_scalef_ps


@njit(parallel=True, cache=True)
def kq_chain(k, q, out):
    """The tiled path's K.Q (simd_gemm vectorizes over cells): one fma chain over the head dimension per
    cell; k (G, L, D), q (G, R, D), out (G, R, L) float32."""
    n_g, n_r, n_l = out.shape
    for gr in prange(n_g * n_r):
        g, r = gr // n_r, gr % n_r
        for t in range(n_l):
            a = np.float32(0)
            for i in range(k.shape[2]):
                a = fma32(q[g, r, i], k[g, t, i], a)
            out[g, r, t] = a


@njit(parallel=True, cache=True)
def tiled_softmax(logits, v, out):
    """The softmax and P.V of ggml_compute_forward_flash_attn_ext_tiled: logits (G, R, L) float32 (scaled
    K.Q), v (G, L, D) float32 holding halves, out (G, R, D) float32; tiles of TILE_Q cells from cell 0.

    Per tile: its maximum rescales acc and S by expf(M_old - M); the weights are ggml_v_expf(s - M),
    summed 16 lanes at a time in double and added to S; P.V is one fma chain over the tile's cells."""
    n_g, n_r, n_l = logits.shape
    n_d = v.shape[2]
    for gr in prange(n_g * n_r):
        g, r = gr // n_r, gr % n_r
        acc = np.zeros(n_d, np.float32)
        p = np.empty(TILE_Q, np.float32)
        lanes = np.empty(16, np.float32)
        m = np.float32(-np.inf)
        s = np.float32(0)
        for t0 in range(0, n_l, TILE_Q):
            n = min(TILE_Q, n_l - t0)
            m_new = m
            for t in range(n):
                m_new = max(m_new, logits[g, r, t0 + t])
            if m_new > m:
                ms = np.float32(np.exp(np.float32(m - m_new)))
                for i in range(n_d):
                    acc[i] = np.float32(acc[i] * ms)
                s = np.float32(s * ms)
            m = m_new
            total = np.float64(0)
            for c in range(0, TILE_Q, 16):
                for lane in range(16):
                    t = c + lane                               # cells past the cache are masked: weight 0
                    lanes[lane] = v_expf(np.float32(logits[g, r, t0 + t] - m)) if t < n else np.float32(0)
                    p[t] = lanes[lane]
                total += np.float64(reduce16(lanes, 0))
            s = np.float32(np.float64(s) + total)
            for i in range(n_d):
                a = acc[i]
                for t in range(n):
                    a = fma32(p[t], v[g, t0 + t, i], a)
                acc[i] = a
        inv = np.float32(np.float32(1) / s) if s != 0 else np.float32(0)
        for i in range(n_d):
            out[g, r, i] = np.float32(acc[i] * inv)


def logits(q_rows, k_raw, k_values, type_k: str, scale: float, tiled: bool = False):
    """s * scale for every query row and cache cell, (G, R, L) float32: K's vec_dot on Q in its
    vec_dot_type (`kq_dot`), or on the tiled path float32 Q against K as float32 (`kq_chain`)."""
    q_rows = np.ascontiguousarray(q_rows, np.float32)
    if tiled:
        out = np.empty(q_rows.shape[:2] + (k_values.shape[1],), np.float32)
        kq_chain(_fp16(k_values), q_rows, out)
        return out * np.float32(scale)
    return kq_dot(q_rows, k_raw, k_values, type_k) * np.float32(scale)


def softmax_v(logits, v_values, type_v: str, tiled: bool = False, chunk: int = 0):
    """Softmax(logits) @ V as ggml-cpu runs it: (G, R, D) float32 from logits (G, R, L) float32 and the
    dequantized V cache (G, L, D) float32; chunk: `kv_chunk`."""
    v_read = _fp16(v_values) if read_type(type_v) == "f16" else np.ascontiguousarray(v_values, np.float32)
    out = np.empty(logits.shape[:2] + (v_values.shape[2],), np.float32)
    if tiled:
        tiled_softmax(np.ascontiguousarray(logits, np.float32), v_read, out)
    else:
        online_softmax(np.ascontiguousarray(logits, np.float32), v_read, read_type(type_v) == "f16", out, chunk)
    return out


def flash_attn(q_rows, k_raw, k_values, v_values, type_k: str, type_v: str, scale: float, n_tokens: int,
               n_kv_padded: int = 0, n_threads: int = 1):
    """ggml-cpu's flash_attn_ext for queries grouped by KV head: (G, R, D) float32.

    q_rows: (G, R, D) float32, the (rotated) queries of KV head g, R = group * n_tokens; k_raw:
    (G, L, row_bytes) uint8 cache bytes; k_values / v_values: (G, L, D) float32, the dequantized cache;
    n_kv_padded: the cells of ggml's view (default: L as llama.cpp pads it); n_threads: ggml's threads."""
    tiled = takes_tiled_path(type_k, type_v, n_tokens)
    chunk = kv_chunk(type_k, type_v, n_tokens, n_kv_padded or padded_n_kv(k_values.shape[1]), n_threads)
    return softmax_v(logits(q_rows, k_raw, k_values, type_k, scale, tiled), v_values, type_v, tiled, chunk)
