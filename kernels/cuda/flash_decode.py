"""Flash decoding over ggml bytes on the GPU (Numba CUDA), laid out and rounded as ggml-cuda's vector
kernel (ggml-cuda/fattn-vec.cuh flash_attn_ext_vec with ncols = 1, fattn-common.cuh), for all 9 types.

One CUDA block of 128 threads (4 warps) per (query row, split); split y reads the 128-token tiles
y, y + splits, ... of the context (split-K), and a combine kernel merges the splits
(flash_attn_combine_results). In a block, as in ggml:
  - Q is multiplied by the scale (float32) and, for a quantized K, quantized to q8_1 per 32 values
    (quantize_q8_1_to_shared: 4 values a thread, amax and the float sum over 8 threads by xor
    shuffles, d = amax * (1/127), q = roundf(x * rcp(d))); for f16/bf16/f32 K it stays float32.
  - each warp is an independent online-softmax stream over its 32 tokens of every tile: K.Q of a
    token by TK lanes (quantized K: one q8_1 word of 4 values a lane, TK = min(D/4, 32), the
    per-type dp4a formulas of vec_dot_fattn_vec_KQ_*; plain K: 8 lanes of 8 values), summed by xor
    shuffles; the tile's maximum + FATTN_KQ_MAX_OFFSET; p = expf(s - max); float32 V accumulators,
    4 values a lane (quantized V, TV = min(D/4, 32) lanes a token) or 8 (plain V, 8 lanes a token);
  - the 4 warps are merged through shared memory in ggml's order; with one split the block divides
    by the sum, otherwise it writes (max, sum) beside its partial output.
Compiled with fastmath (ftz, contraction, approximate expf/division), as ggml-cuda is with
-use_fast_math. Differences from ggml-cuda, named: ggml compiles vector kernels only for the
GGML_CUDA_FA_QUANTS pairs (default q4_0-q4_0, q8_0-q8_0, f16-f16, bf16-bf16) and converts K and V
of any other pair, and f32, to f16 first; iq4_nl has no CUDA kernel at all. Here every pair runs
natively (iq4_nl K as q8_0's formula with the kvalues table; f32 K/V read as float32). The number of
splits is kvlab's choice (ggml picks it from occupancy), which changes only the summation order;
fastmath contraction is NVVM's choice for this code, not verified against ggml-cuda's PTX.

Under the Numba CUDA simulator the shuffles go through shared memory (same values) and expf is the
correctly rounded float32 exp (the hardware's ex2.approx differs in the last bits).
"""
import functools
import math

import numpy as np
from numba import cuda, float32, int32

from .ops import SIM, device, f16_bits_to_f32, f32_from_bits, ld_u16, rcp_approx, roundf

from ..flash_decode import BF16, F16, F32, IQ4_NL, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0   # enum ggml_type, one copy
from ..flash_decode import type_size
from ..iq4_nl import KVALUES as _LEVELS

TYPE_SIZES = {t: type_size(t) for t in (F32, F16, BF16, Q8_0, Q4_0, IQ4_NL, Q4_1, Q5_0, Q5_1)}
PLAIN = (F32, F16, BF16)
NTHREADS = 128
WARP = 32
NWARPS = NTHREADS // WARP
KQ_MAX_OFFSET = np.float32(3.0) * np.float32(0.6931)       # FATTN_KQ_MAX_OFFSET
HALF_NEG_FLT_MAX = np.float32(-3.4028234663852886e38 / 2)  # -FLT_MAX/2.0f, the initial maximum
INV_127 = np.float32(1.0) / np.float32(127.0)
NEG_INF = np.float32(-np.inf)
ZERO = np.float32(0.0)
KVALUES = tuple(int(v) for v in _LEVELS)    # a tuple: a compile-time constant of the kernel
JIT = dict(cache=True) if SIM else dict(cache=True, fastmath=True)

if SIM:
    @device
    def xor_shuffle(scratch, x, offset):
        """__shfl_xor_sync within the warp, through shared memory (every thread of the block calls it)."""
        t = cuda.threadIdx.x
        cuda.syncthreads()
        scratch[t] = x
        cuda.syncthreads()
        return scratch[(t & ~31) | ((t & 31) ^ offset)]

    @device
    def expf(x):
        return np.float32(np.exp(np.float32(x)))
else:
    @device
    def xor_shuffle(scratch, x, offset):
        return cuda.shfl_xor_sync(0xFFFFFFFF, x, offset)

    @device
    def expf(x):
        return math.exp(x)   # fastmath: ex2.approx of x * log2(e), as nvcc's -use_fast_math expf


@device
def u32(a, o):
    """The little-endian 32-bit word at byte o (even) of a flat uint8 array, as two 16-bit loads
    (ggml_cuda_memcpy_1<4, 2>: the blocks of q4_0, q5_0, q8_0 are only 2-byte aligned)."""
    return np.uint32(ld_u16(a, o)) | (np.uint32(ld_u16(a, o + 2)) << np.uint32(16))


@device
def half(a, o):
    """The ggml_half at byte o (even), as float32."""
    return f16_bits_to_f32(ld_u16(a, o))


@device
def plain(a, o, t):
    """Value of an f32/f16/bf16 element at byte o, as float32."""
    if t == F16:
        return half(a, o)
    if t == BF16:
        return f32_from_bits(np.uint32(ld_u16(a, o)) << np.uint32(16))
    return f32_from_bits(u32(a, o))


@device
def sbyte(w, b):
    """Signed byte b of a 32-bit word."""
    x = int32((w >> np.uint32(8 * b)) & np.uint32(0xFF))
    return x - 256 if x > 127 else x


@device
def ubyte(w, b):
    return int32((w >> np.uint32(8 * b)) & np.uint32(0xFF))


if SIM:
    @device
    def dp4a(v, u, signed_v):
        """__dp4a(v, u, 0): the sum of the 4 byte products of two words (u signed; v signed or not)."""
        s = int32(0)
        for b in range(4):
            s += (sbyte(v, b) if signed_v else ubyte(v, b)) * sbyte(u, b)
        return s
else:
    from llvmlite import ir
    from numba.cuda import types as nb_types
    from numba.cuda.extending import intrinsic

    def _dp4a_asm(text):
        @intrinsic
        def dp4a_op(typingctx, v, u):
            def codegen(context, builder, signature, args):
                i32 = ir.IntType(32)
                fty = ir.FunctionType(i32, [i32, i32])
                return builder.call(ir.InlineAsm(fty, text, "=r,r,r"), args)
            return nb_types.int32(nb_types.uint32, nb_types.int32), codegen
        return dp4a_op

    _dp4a_us = _dp4a_asm("dp4a.u32.s32 $0, $1, $2, 0;")
    _dp4a_ss = _dp4a_asm("dp4a.s32.s32 $0, $1, $2, 0;")

    @device
    def dp4a(v, u, signed_v):
        """__dp4a(v, u, 0): one dp4a instruction (v's bytes signed or not, u's signed)."""
        if signed_v:
            return _dp4a_ss(np.uint32(v), int32(u))
        return _dp4a_us(np.uint32(v), int32(u))


@device
def q5_high(qh, shift):
    """The 5th bits of 4 values (qh >> shift, bits 0..3) placed as bit 4 of each byte (fattn-common.cuh)."""
    vh = qh >> np.uint32(shift)
    return (((vh << np.uint32(4)) & np.uint32(0x00000010)) | ((vh << np.uint32(11)) & np.uint32(0x00001000))
            | ((vh << np.uint32(18)) & np.uint32(0x00100000)) | ((vh << np.uint32(25)) & np.uint32(0x10000000)))


@device
def kq_word(k, o, j, t, qw, qd, qs):
    """One lane's term of K.Q for q8_1 word j of Q (values 4j..4j+3): vec_dot_fattn_vec_KQ_<t>.
    k: flat uint8, o: the K row's first byte."""
    ib = j // 8
    iw = j % 8
    u = qw[j]
    qdf = qd[ib]
    if t == Q8_0:
        b = o + ib * 34
        return (half(k, b) * qdf) * np.float32(dp4a(u32(k, b + 2 + 4 * iw), u, True))
    if t == Q4_0 or t == IQ4_NL:
        b = o + ib * 18
        v = (u32(k, b + 2 + 4 * (iw % 4)) >> np.uint32(4 if iw >= 4 else 0)) & np.uint32(0x0F0F0F0F)
        if t == Q4_0:
            return half(k, b) * (np.float32(dp4a(v, u, False)) * qdf - qs[ib])
        s = int32(0)
        for c in range(4):
            s += KVALUES[ubyte(v, c)] * sbyte(u, c)
        return (half(k, b) * qdf) * np.float32(s)
    if t == Q5_0:
        b = o + ib * 22
        v = (u32(k, b + 6 + 4 * (iw % 4)) >> np.uint32(4 if iw >= 4 else 0)) & np.uint32(0x0F0F0F0F)
        v |= q5_high(u32(k, b + 2), 4 * iw)
        return half(k, b) * (np.float32(dp4a(v, u, False)) * qdf - np.float32(2.0) * qs[ib])
    # q4_1, q5_1: d*Qd*sumi + m*Qs/QI8_1
    ts = 20 if t == Q4_1 else 24
    b = o + ib * ts
    qs_at = b + (4 if t == Q4_1 else 8)
    v = (u32(k, qs_at + 4 * (iw % 4)) >> np.uint32(4 if iw >= 4 else 0)) & np.uint32(0x0F0F0F0F)
    if t == Q5_1:
        v |= q5_high(u32(k, b + 4), 4 * iw)
    return (half(k, b) * qdf) * np.float32(dp4a(v, u, False)) + half(k, b + 2) * qs[ib] / np.float32(8.0)


@device
def v_plain(v, o, c, t):
    """Value c of an f32/f16/bf16 V row starting at byte o (dequantize_V_f16/bf16; f32 read as is)."""
    return plain(v, o + (4 if t == F32 else 2) * c, t)


@device
def v_value(w, e, d, m, t):
    """Value e (0..3) of a quad of quants packed in w, as float32."""
    if t == Q8_0:
        return d * np.float32(sbyte(w, e))
    q = ubyte(w, e)
    if t == Q4_0:
        return d * np.float32(q - 8)
    if t == Q5_0:
        return d * np.float32(q - 16)
    if t == IQ4_NL:
        return d * np.float32(KVALUES[q])
    return d * np.float32(q) + m                            # q4_1, q5_1


@device
def v_quad(v, o, c, t):
    """Values c..c+3 (c a multiple of 4) of a quantized V row starting at byte o, one word of quants and
    the block's scale read once (dequantize_V_<t> with ne = 4)."""
    ib = c // 32
    j = c % 32
    m = ZERO
    if t == Q8_0:
        b = o + ib * 34
        w = u32(v, b + 2 + j)
    else:
        plain_nibbles = t == Q4_0 or t == IQ4_NL
        b = o + ib * (18 if plain_nibbles else 20 if t == Q4_1 else 22 if t == Q5_0 else 24)
        qs_at = b + (2 if plain_nibbles else 4 if t == Q4_1 else 6 if t == Q5_0 else 8)
        w = (u32(v, qs_at + j % 16) >> np.uint32(4 if j >= 16 else 0)) & np.uint32(0x0F0F0F0F)
        if t == Q5_0 or t == Q5_1:
            w |= q5_high(u32(v, b + (2 if t == Q5_0 else 4)), j)
        if t == Q4_1 or t == Q5_1:
            m = half(v, b + 2)
    d = half(v, b)
    return v_value(w, 0, d, m, t), v_value(w, 1, d, m, t), v_value(w, 2, d, m, t), v_value(w, 3, d, m, t)


@functools.cache
def partials_kernel(type_k: int, type_v: int, d: int):
    """kernel(q, k, v, kst, vst, n_kv, n_head, group, mask, use_mask, scale, parts, meta).

    q (R, D) float32, R = B * H; k, v flat uint8 of the caches (B, Hkv, capacity, row bytes); kst, vst:
    (batch, head, row) strides in bytes; mask (B, L) float32; parts (R, splits, D), meta (R, splits, 2)."""
    plain_k, plain_v = type_k in PLAIN, type_v in PLAIN
    tk = 8 if plain_k else min(d // 4, WARP)               # lanes per token for K.Q
    tv = 8 if plain_v else min(d // 4, WARP)               # lanes per token for V
    rv = 8 if plain_v else 4                               # V values a lane takes per step
    v_step = tv * rv                                       # values covered by one step of a token's lanes
    n_acc = d // tv                                        # V accumulators per lane
    v_cols = WARP // tv                                    # tokens a warp accumulates per step
    words = d // 4
    n_blocks = d // 32
    k_esize = 4 if type_k == F32 else 2
    n_comb = NWARPS * v_cols * d

    @cuda.jit(**JIT)
    def kernel(q, k, v, kst, vst, n_kv, n_head, group, mask, use_mask, scale, parts, meta):
        row = cuda.blockIdx.x
        split = cuda.blockIdx.y
        splits = cuda.gridDim.y
        tid = cuda.threadIdx.x
        warp = tid // WARP
        lane = tid % WARP
        b = row // n_head
        hk = (row - b * n_head) // group
        scratch = cuda.shared.array(NTHREADS, float32)
        qf = cuda.shared.array(d, float32)
        qw = cuda.shared.array(words, int32)
        qd = cuda.shared.array(n_blocks, float32)
        qs = cuda.shared.array(n_blocks, float32)
        kq = cuda.shared.array(NTHREADS, float32)
        comb = cuda.shared.array(n_comb, float32)
        max_sh = cuda.shared.array(WARP, float32)
        sum_sh = cuda.shared.array(WARP, float32)

        # ---- Q: scaled, and q8_1 for a quantized K (quantize_q8_1_to_shared) ----
        if plain_k:
            for c in range(tid, d, NTHREADS):
                qf[c] = scale * q[row, c]
        else:
            for w0 in range(0, words, NTHREADS):       # every thread runs the shuffles
                w = w0 + tid
                x0 = x1 = x2 = x3 = ZERO
                if w < words:
                    x0 = scale * q[row, 4 * w]
                    x1 = scale * q[row, 4 * w + 1]
                    x2 = scale * q[row, 4 * w + 2]
                    x3 = scale * q[row, 4 * w + 3]
                amax = max(max(max(abs(x0), abs(x1)), abs(x2)), abs(x3))
                total = x0 + x1 + x2 + x3
                for off in (4, 2, 1):
                    amax = max(amax, xor_shuffle(scratch, amax, off))
                    total += xor_shuffle(scratch, total, off)
                dq = amax * INV_127
                word = int32(0)
                if dq != ZERO:
                    r = rcp_approx(dq)
                    word = ((int32(roundf(x0 * r)) & 0xFF) | ((int32(roundf(x1 * r)) & 0xFF) << 8)
                            | ((int32(roundf(x2 * r)) & 0xFF) << 16) | (int32(roundf(x3 * r)) << 24))
                if w < words:
                    qw[w] = word
                    if w % 8 == 0:
                        qd[w // 8] = dq
                        qs[w // 8] = total
        if warp == 0:
            max_sh[lane] = HALF_NEG_FLT_MAX
            sum_sh[lane] = ZERO
        cuda.syncthreads()

        # ---- each warp: online softmax over its 32 tokens of every tile ----
        kq_max = HALF_NEG_FLT_MAX
        kq_sum = ZERO
        acc = cuda.local.array(n_acc, float32)
        for i in range(n_acc):
            acc[i] = ZERO
        tile = split * NTHREADS
        while tile < n_kv:
            kq_max_new = kq_max
            kq_reg = ZERO
            for p in range(tk):
                tok = tile + warp * WARP + (lane // tk) * tk + p
                s = ZERO
                if tok < n_kv:
                    o = b * kst[0] + hk * kst[1] + tok * kst[2]
                    if plain_k:
                        for c0 in range(0, d, tk * 8):
                            c = c0 + (lane % tk) * 8
                            for e in range(8):
                                s += plain(k, o + (c + e) * k_esize, type_k) * qf[c + e]
                    else:
                        for j0 in range(0, words, tk):
                            s += kq_word(k, o, j0 + lane % tk, type_k, qw, qd, qs)
                off = tk // 2
                while off > 0:
                    s += xor_shuffle(scratch, s, off)
                    off //= 2
                if tok < n_kv:
                    if use_mask:
                        s += mask[b, tok]
                else:
                    s = NEG_INF
                kq_max_new = max(kq_max_new, s + KQ_MAX_OFFSET)
                if lane % tk == p:
                    kq_reg = s
            off = tk
            while off < WARP:
                kq_max_new = max(kq_max_new, xor_shuffle(scratch, kq_max_new, off))
                off *= 2
            rescale = expf(kq_max - kq_max_new)
            kq_max = kq_max_new
            kq_reg = expf(kq_reg - kq_max)
            kq_sum = kq_sum * rescale + kq_reg
            kq[tid] = kq_reg
            for i in range(n_acc):
                acc[i] *= rescale
            cuda.syncthreads()
            for k0 in range(0, WARP, v_cols):
                local = warp * WARP + k0 + lane // tv
                tok = tile + local
                if tok < n_kv:
                    p_tok = kq[local]
                    o = b * vst[0] + hk * vst[1] + tok * vst[2]
                    for step in range(d // v_step):
                        c = step * v_step + (lane % tv) * rv
                        if plain_v:
                            for e in range(rv):
                                acc[step * rv + e] += v_plain(v, o, c + e, type_v) * p_tok
                        else:
                            x0, x1, x2, x3 = v_quad(v, o, c, type_v)
                            acc[step * rv] += x0 * p_tok
                            acc[step * rv + 1] += x1 * p_tok
                            acc[step * rv + 2] += x2 * p_tok
                            acc[step * rv + 3] += x3 * p_tok
            cuda.syncthreads()
            tile += splits * NTHREADS

        # ---- merge the 4 warps (ggml's order), write this split's output ----
        if lane == 0:
            max_sh[warp] = kq_max
        cuda.syncthreads()
        m = max_sh[lane]
        for off in (16, 8, 4, 2, 1):
            m = max(m, xor_shuffle(scratch, m, off))
        rescale = expf(kq_max - m)
        kq_max = m
        for step in range(d // v_step):
            c = step * v_step + (lane % tv) * rv
            for e in range(rv):
                comb[(warp * v_cols + lane // tv) * d + c + e] = acc[step * rv + e] * rescale
        kq_sum *= rescale
        for off in (16, 8, 4, 2, 1):
            kq_sum += xor_shuffle(scratch, kq_sum, off)
        if lane == 0:
            sum_sh[warp] = kq_sum
        cuda.syncthreads()
        total = sum_sh[lane]
        for off in (16, 8, 4, 2, 1):
            total += xor_shuffle(scratch, total, off)
        for c0 in range(0, d, NTHREADS):
            c = c0 + tid
            if c < d:
                val = ZERO
                for w in range(NWARPS):
                    for vc in range(v_cols):
                        val += comb[(w * v_cols + vc) * d + c]
                if splits == 1:
                    val /= total
                parts[row, split, c] = val
        if tid == 0:
            meta[row, split, 0] = kq_max
            meta[row, split, 1] = total

    return kernel


@functools.cache
def combine_kernel(d: int):
    """flash_attn_combine_results: out[r] = sum_l e^(max_l - max) parts[r, l] / sum_l e^(max_l - max) sum_l."""
    @cuda.jit(**JIT)
    def kernel(parts, meta, out):
        row = cuda.blockIdx.x
        c = cuda.threadIdx.x
        splits = parts.shape[1]
        kq_max = meta[row, 0, 0]
        for s in range(1, splits):
            kq_max = max(kq_max, meta[row, s, 0])
        num = ZERO
        den = ZERO
        for s in range(splits):
            f = expf(meta[row, s, 0] - kq_max)
            num += f * parts[row, s, c]
            den += f * meta[row, s, 1]
        out[row, c] = num / den

    return kernel


def n_splits(n_rows: int, n_kv: int, n_sm: int = 132) -> int:
    """Splits of the context: enough CUDA blocks for ~4 per SM, at most one per 128-token tile."""
    tiles = -(-n_kv // NTHREADS)
    return max(1, min(tiles, -(-4 * n_sm // max(1, n_rows))))


# ---- host side -------------------------------------------------------------------------------------
def _device_array(a, what):
    from numba import cuda as _cuda
    if hasattr(a, "copy_to_host"):
        return a
    if hasattr(a, "__cuda_array_interface__"):
        return _cuda.as_cuda_array(a)
    raise TypeError(f"flash_decode: {what} must be a CUDA array (__cuda_array_interface__), got {type(a).__name__}")


def _rows(raw, what):
    """(flat uint8 view from the first row, (batch, head, row) strides in bytes) of a (B, Hkv, L, row_bytes)
    cache whose rows sit in a C-contiguous (B, Hkv, capacity, row_bytes) buffer (L <= capacity)."""
    b, h, n, row_bytes = (int(x) for x in raw.shape)
    if hasattr(raw, "stride") and callable(raw.stride):                       # torch
        strides = tuple(int(x) for x in raw.stride())
    else:
        strides = tuple(int(x) for x in _device_array(raw, what).strides)     # numba: bytes = elements
    s0, s1, s2, s3 = strides
    if s3 != 1 or s2 != row_bytes or s1 % row_bytes or s1 // row_bytes < n or (b > 1 and s0 != h * s1):
        raise ValueError(f"flash_decode: {what} must be rows of a C-contiguous (B, Hkv, capacity, row_bytes) "
                         f"buffer, got strides {strides} for shape {tuple(raw.shape)}")
    size = b * h * s1
    if hasattr(raw, "stride") and callable(raw.stride):
        import torch
        flat = torch.as_strided(raw, (size,), (1,))                            # (B * Hkv * capacity * row_bytes,)
    else:
        flat = _device_array(raw, what).reshape(size) if n * row_bytes == s1 else None
        if flat is None:
            raise ValueError(f"flash_decode: a numba device array {what} must be contiguous")
    return _device_array(flat, what), (s0, s1, s2)


def flash_decode(q, k_raw, v_raw, type_k: int, type_v: int, mask, scale, splits: int | None = None):
    """Attention of q (B, H, Dk) float32 (CUDA) over the ggml rows k_raw (B, Hkv, L, Dk row bytes) and
    v_raw (B, Hkv, L, Dv row bytes) uint8 (CUDA), of ggml types type_k, type_v (enum ggml_type values);
    mask None or (B, L) bool (True = attend); scale a float.
    Returns (B, H, Dv) float32: a torch tensor when q is one, else a numba device array.
    Inputs are checked by kvlab.flash.check_inputs; here only what the kernel itself needs."""
    launch, out = launcher(q, k_raw, v_raw, type_k, type_v, mask, scale, splits)
    launch()
    return out


def launcher(q, k_raw, v_raw, type_k: int, type_v: int, mask, scale, splits: int | None = None):
    """(launch, out): every host-side step of flash_decode done once (arrays, strides, kernels), so that
    launch() only enqueues the partials and combine kernels writing out (B, H, Dv). For benchmarks: the
    kernels' own time without the Python preparation around them."""
    from numba import cuda as _cuda
    b, h, dk = (int(x) for x in q.shape)
    n_hkv, n_kv = int(k_raw.shape[1]), int(k_raw.shape[2])
    dv = int(v_raw.shape[3]) // TYPE_SIZES[type_v] * (1 if type_v in PLAIN else 32)
    if dk != dv or dk % 64 or dk > 512:
        raise ValueError(f"flash_decode (CUDA): head sizes must be equal multiples of 64 up to 512 "
                         f"(ggml's vector kernel: D % 64 == 0), got K {dk}, V {dv}")
    if n_kv == 0:
        raise ValueError("flash_decode: the cache holds no rows")
    is_torch = hasattr(q, "stride") and callable(q.stride)
    rows = b * h
    n_sm = 1 if SIM else _cuda.get_current_device().MULTIPROCESSOR_COUNT
    splits = splits or n_splits(rows, n_kv, n_sm)
    if is_torch:
        import torch
        q2 = q.reshape(rows, dk).float().contiguous()                           # (B*H, D)
        parts = torch.empty((rows, splits, dv), dtype=torch.float32, device=q.device)
        meta = torch.empty((rows, splits, 2), dtype=torch.float32, device=q.device)
        out = torch.empty((rows, dv), dtype=torch.float32, device=q.device)
        add = (torch.zeros((b, 1), dtype=torch.float32, device=q.device) if mask is None else
               torch.where(mask.to(q.device), 0.0, float("-inf")).float().contiguous())   # (B, L)
    else:
        q2 = _device_array(q, "q").reshape(rows, dk)
        parts = _cuda.device_array((rows, splits, dv), np.float32)
        meta = _cuda.device_array((rows, splits, 2), np.float32)
        out = _cuda.device_array((rows, dv), np.float32)
        host = np.zeros((b, 1), np.float32) if mask is None else np.where(np.asarray(mask), 0, -np.inf)
        add = _cuda.to_device(np.ascontiguousarray(host, np.float32))
    k_flat, kst = _rows(k_raw, "k_raw")
    v_flat, vst = _rows(v_raw, "v_raw")
    partials = partials_kernel(type_k, type_v, dk)[(rows, splits), NTHREADS]
    args = (_device_array(q2, "q"), k_flat, v_flat, kst, vst, n_kv, h, h // n_hkv, _device_array(add, "mask"),
            mask is not None, np.float32(scale), _device_array(parts, "parts"), _device_array(meta, "meta"))
    if splits == 1:
        return (lambda: partials(*args)), parts.reshape(b, h, dv)
    combine = combine_kernel(dv)[rows, dv]
    combine_args = (args[-2], args[-1], _device_array(out, "out"))

    def launch():
        partials(*args)
        combine(*combine_args)

    return launch, out.reshape(b, h, dv)
