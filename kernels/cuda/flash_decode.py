"""Flash decoding over ggml bytes on the GPU (Numba CUDA), with ggml-cuda's vector-kernel numerics
(ggml-cuda/fattn-vec.cuh flash_attn_ext_vec, fattn-common.cuh), for all 9 types.

Layout (for memory bandwidth: every K/V byte is read and decoded once per step):
  - one CUDA block of 128 threads per (sequence, KV head, G query heads of its GQA group, split):
    G = every query head of the group (ratio 1..8), fewer for large heads (G * D <= 1024; at most 4
    for f16/bf16 V), as ggml's vector kernel runs ncols query columns per block. Split y of S reads the
    128-token tiles y, y + S, y + 2 S, ... of the context (split-K, as ggml's parallel blocks), a
    combine kernel merges the splits (flash_attn_combine_results); splits give ~16 blocks per SM.
    With quantized K and V, at the start of a tile the block asks L2 for the tile's V rows (read after its
    K.Q and softmax) and the next tile's K rows (prefetch.L2, a hint; PREFETCH / KVLAB_FD_PREFETCH set it;
    ggml has no such step, same values).
  - Q: multiplied by the scale (float32) and, for a quantized K, quantized to q8_1 per 32 values
    (quantize_q8_1_to_shared: 4 values a thread, amax and the float sum over 8 threads by xor
    shuffles, d = amax * (1/127), q = roundf(x * rcp(d))), kept in shared memory; for f16/bf16/f32 K
    it stays float32.
  - per tile, (a) scores: thread t owns token t of the tile and computes K.Q for all G heads from its
    K row, Q read from shared memory (broadcast). A quantized K row of <= 160 bytes (every type at
    D <= 128) and an f16/bf16 row of <= 256 (D <= 128) come from shared memory: each warp copies its 32
    rows (contiguous) there by cp.async (4-byte words of a quantized row; 16-byte chunks of an f16/bf16
    row, chunk c of row r at c ^ (r % 8) so that a 16-byte read of 8 threads' rows meets no bank
    conflict), the next tile's rows issued as soon as the warp has read this tile's, so they fly under
    this tile's softmax and V (H200, 32k: f16/bf16 0.65 -> 0.77-0.78 of copy_, q8_0 0.63 -> 0.66, q4_0
    unchanged; the same output bits); otherwise the thread loads its row itself (4-byte words of 2
    blocks at a time). An f16/bf16/f32 row is summed in ggml's order (vec_dot_fattn_vec_KQ_f16:
    8 lanes, lane l the 8-value groups 64 c + 8 l, fma from 0, then xor shuffles 4, 2, 1): the thread
    loads KG groups (16 bytes per 64 values each; VARIANT's third field, at most 32 words) together,
    then sums them one by one, and adds the 8 partial sums as that tree does;
    (b) softmax: each warp keeps its own running maximum per head (+ FATTN_KQ_MAX_OFFSET), as ggml's
    vector kernel does, rescales by expf(old - new); p = expf(s - max); (c) V: each warp takes its 32
    tokens, lanes own columns (8 values of a 4-bit block word, or 16 bytes of f16/bf16 with 8 lanes a
    token as ggml's nthreads_V, 4 values of q8_0 or f32), loads a few tokens' bytes before use (the
    first ones before the softmax; a 4-bit or 5-bit V row of <= 160 bytes, or an f16/bf16 row of <= 256,
    from shared memory, where the warp copied its 32 rows by cp.async at the tile's start, under its K.Q
    and softmax: 3-8% faster at 32k, slower for q8_0, see VARIANT; the f16/bf16 tile (32 KB at D 128) in
    dynamic shared memory beyond the 48 KB of static, 3 blocks an SM at 168 registers: H200, 32k, 0.77-0.79
    -> 0.85-0.87 of copy_), and
    accumulates p * V in float32 for all G heads (the tile's first token as fma(rescale, acc, p * v): nvcc
    contracts ggml's rescale into its first FMA so, in fattn-vec.cuh's sm_90 PTX); each V value is
    dequantized once (d * (q - 8) etc. exactly as dequantize_V).
  - the end, per head as ggml's: the block's maximum over the warps', each warp's sum and accumulators
    rescaled to it; the sums added by xor shuffles within a warp, then (w0 + w2) + (w1 + w3); a column
    the sum from 0 of the 4 warps x (32 / lanes a token) token streams in (warp, stream) order; with one
    split divided by the sum, otherwise (max, sum) written beside the partial output.
Host side (`flash_decode`, `launcher`): both kernels go to the caller's stream (torch's current stream, else
the arrays' __cuda_array_interface__ stream) and a call never waits for the GPU; the first call of a key
(shapes, strides, alignments, types, scale, splits) checks and launches through numba's dispatcher, later
ones replay its launches with their own addresses (kvlab.kernels.cuda's _call, cuLaunchKernel), the
partials/meta scratch reused per (device, stream): the output is the only allocation.
Compiled with fastmath (ftz, contraction, approximate expf; division by div.approx.ftz as nvcc's), as
ggml-cuda is with -use_fast_math; int-to-float of quants by the exact 2^23 trick (prmt + subtract: the
same values), and a V value d * (q - off) of q8_0/q4_0/q5_0/iq4_nl as fma(d, 2^15 + q, -(2^15 + off) d)
(scaled_byte: exact, the same value). Inside a tile V's steps and K's staged words are loaded at constant
offsets from one 64-bit address per lane (rows are back to back: kst[2], vst[2] are the row sizes, taken
as constants), the bounds of predicated loads are 32-bit, and shared arrays take unsigned indices (no
negative-index wrap-around code). f16/f16 and bf16/bf16 are bit-exact with ggml-cuda's vector kernel at
equal split counts (bench/fa_cuda_ggml.py on an H200, this file at 55c94fa: 54 of 54 cases at ggml's
counts and at kvlab's; at ec12308 the f16/bf16 output bytes equal that kernel's (14be599) on the H200 in
8 of 8 cases with 1, 2 and 4 K groups: 4k and 32k, masked, one split).

Differences from ggml-cuda, named:
  - the summation order, where it is not ggml's: V of a quantized type accumulated by its own lane
    layout (ggml: 4 consecutive values a lane, min(D/4, 32) lanes a token), which changes the streams
    added at the end; the number of splits is kvlab's choice; f32 K/V see below.
  - K.Q of a quantized block: the integer dp4a sums of its 8 words added first, then the block's
    float term d_k * (d_q * sumi - 8 s) (q4_0; -16 s for q5_0; d_k d_q sumi + m_k s for q4_1/q5_1;
    d_k d_q sumi for q8_0/iq4_nl), as ggml's vecdotq.cuh (mmvq) writes a block; ggml's vector kernel
    adds one float term per 4-value word (the same formula with s/8 per word) and the lanes' sums by
    xor shuffles. The integer sum is exact, so this differs only by the float rounding of the terms
    (a few ulp of the logit).
  - ggml compiles vector kernels only for the GGML_CUDA_FA_QUANTS pairs (default q4_0-q4_0,
    q8_0-q8_0, f16-f16, bf16-bf16) and converts K and V of any other pair, and f32, to f16 first;
    iq4_nl has no CUDA kernel at all. Here every pair runs natively (iq4_nl K as q8_0's formula
    with the kvalues levels, looked up by prmt as ggml's get_int_from_table_16 does; f32 K/V read as float32).
  - fastmath contraction is NVVM's choice for this code: for the f16/bf16 paths it gives ggml's bits
    (checked on the GPU); for the quantized types' dequantize and K.Q terms it is not verified.

Under the Numba CUDA simulator the shuffles go through shared memory (same values; a warp's reductions
exchange all lanes' values at once and repeat the shuffles' additions in numpy), device functions are
plain Python (the simulator's wrapper costs more than the work), and expf and the division are correctly
rounded (the hardware's ex2.approx and div.approx differ in the last bits).
"""
import functools
import os
import sys
import types

import numpy as np
from numba import cuda, float32, int32, uint8, uint32
from numba.cuda import libdevice

from .. import cuda as kc                                  # the launch mechanism (_call, _launch), this package
from .kernels import _instantiate
from .ops import SIM, cp_async4, cp_async16, cp_async_commit, cp_async_wait_all, cp_async_wait_one, device
from .ops import f16_bits_to_f32, f32_bits, f32_from_bits, ld_f32x4, ld_u16, ld_u32, ld_u32x4
from .ops import fma_ftz, mul_ftz, prefetch_l2, rcp_approx, roundf
from .unroll import unrolled

from ..flash_decode import BF16, F16, F32, IQ4_NL, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0   # enum ggml_type, one copy
from ..flash_decode import type_size
from ..iq4_nl import KVALUES as _LEVELS

TYPE_SIZES = {t: type_size(t) for t in (F32, F16, BF16, Q8_0, Q4_0, IQ4_NL, Q4_1, Q5_0, Q5_1)}
PLAIN = (F32, F16, BF16)
NIBBLES = (Q4_0, IQ4_NL, Q4_1, Q5_0, Q5_1)
NT = 128                                                   # threads of a block = tokens of a tile
WARP = 32
NWARPS = NT // WARP
MAX_COLS = 8                                               # query heads per block at most
NB_MAX = 8                                                 # V steps whose loads are issued together
KQ_MAX_OFFSET = np.float32(3.0) * np.float32(0.6931)       # FATTN_KQ_MAX_OFFSET
HALF_NEG_FLT_MAX = np.float32(-3.4028234663852886e38 / 2)  # -FLT_MAX/2.0f, the initial maximum
INV_127 = np.float32(1.0) / np.float32(127.0)
NEG_INF = np.float32(-np.inf)
ZERO = np.float32(0.0)
# the 16 iq4_nl levels as 4 little-endian words of int8 (kvalues_iq4nl), the table prmt selects from
IQ4_T = tuple(np.int32(x) for x in np.asarray(_LEVELS, np.int8).view(np.int32))
IQ4_T0, IQ4_T1, IQ4_T2, IQ4_T3 = IQ4_T
JIT = dict(cache=True) if SIM else dict(cache=True, fastmath=True)
# what a block asks L2 for at the start of a tile (a hint: values unchanged). N > 0: the K and V rows of its tile
# N tiles ahead; -1: this tile's V rows (read after its K.Q and softmax) and the next tile's K rows; -2: this
# tile's V rows only; 0: nothing. None: -1 when K and V are both quantized, else 0. H200, Llama-3-8B layer, 32k,
# fraction of copy_ with 0 / 1 / -1 / -2, two rounds (session 9, bench/README): q8_0 0.617-0.613 / 0.594-0.577 /
# 0.635-0.623 / 0.635-0.628, q4_0 0.364-0.359 / 0.378-0.366 / 0.378-0.373 / 0.372-0.366, f16 0.653-0.643 /
# 0.487-0.476 / 0.522-0.516 / 0.600-0.602 (bf16 alike), f32 0.833-0.824 / 0.564-0.551 / 0.568-0.556 / 0.676-0.672;
# the same output bits in every mode. KVLAB_FD_PREFETCH=N, or this set to N before launcher(), forces N.
def _setting(name: str, allowed: tuple):
    """A measuring knob's value from the environment (None when unset), refused at load unless one of `allowed`."""
    text = os.environ.get(name)
    if not text:
        return None
    if text.strip() not in allowed:
        raise ValueError(f"{name}={text!r}: expected one of {', '.join(allowed)}")
    return int(text)


PREFETCH = _setting("KVLAB_FD_PREFETCH", tuple(str(n) for n in range(-2, 17)))
ALIGN = None if SIM else 16                 # shared arrays read 16 bytes at a time (the simulator has no alignment)
LO4 = np.uint32(0x0F0F0F0F)
SIGN8 = np.uint32(0x80808080)
U4, U16 = np.uint32(4), np.uint32(16)
LOW16 = np.uint32(0xFFFF)
HIGH16 = np.uint32(0xFFFF0000)

if SIM:
    import threading

    def device(fn):
        """Under the simulator a device function here is the plain Python function: the simulator's own
        wrapper swaps the module's globals on every call (several microseconds, the bulk of the run)."""
        return fn

    def unrolled(step, count, n_args, start=0):
        """unroll.unrolled's simulator twin: the same steps in the same order, as a loop."""
        ks = range(start, count)

        def run(*a):
            for k in ks:
                step(*a, k)
        return run

    def xor_shuffle(scratch, x, offset):
        """__shfl_xor_sync within the warp, through shared memory (every thread of the block calls it;
        the simulator's thread object, as the plain functions here do not see its cuda module)."""
        th = threading.current_thread()
        t = th.threadIdx.x
        th.syncthreads()
        scratch[t] = x
        th.syncthreads()
        return scratch[(t & ~31) | ((t & 31) ^ offset)]

    def warp_sync():
        threading.current_thread().syncthreads()

    def div_approx(a, b):
        """div.approx.ftz.f32's twin: the correctly rounded quotient (the hardware's differs in the last bits)."""
        return np.float32(np.float32(a) / np.float32(b))

    def prmt(a, b, c):
        """prmt.b32 (default mode): byte n of the result is byte (c's nibble n & 7) of {b, a}, replaced by
        its sign (0x00 or 0xFF) when the nibble's bit 3 is set."""
        x = (int(a) & 0xFFFFFFFF) | ((int(b) & 0xFFFFFFFF) << 32)
        r = 0
        for n in range(4):
            sel = (int(c) >> (4 * n)) & 0xF
            byte = (x >> (8 * (sel & 7))) & 0xFF
            if sel & 8:
                byte = 0xFF if byte & 0x80 else 0
            r |= byte << (8 * n)
        return np.uint32(r)

    _LANES = np.arange(WARP)

    def warp_rows(scratch, vals):
        """Every thread of the block passes n float32 values (one n for all): its warp's (32, n) of
        them, lane order. One exchange through shared memory stands for many shuffles."""
        th = threading.current_thread()
        t = th.threadIdx.x
        n = len(vals)
        th.syncthreads()
        scratch[t * n:(t + 1) * n] = vals
        th.syncthreads()
        w0 = t & ~31
        return scratch[w0 * n:(w0 + WARP) * n].reshape(WARP, n).copy()

    def butterfly(m, offsets):
        """x_l += x_(l ^ off) for every lane l, per offset: the xor-shuffle sums of (32, n) values (the
        same float32 additions in the same order as the shuffles)."""
        for off in offsets:
            m = m + m[_LANES ^ off]
        return m

    def q8_reduce(scratch, amax, total):
        """The maximum and the sum over the 8 lanes of a q8_1 block (xor offsets 4, 2, 1)."""
        m = warp_rows(scratch, np.array([amax, total], np.float32))
        lane = threading.current_thread().threadIdx.x & 31
        return np.float32(m[lane ^ _LANES[:8], 0].max()), butterfly(m[:, 1:], (4, 2, 1))[lane, 0]

    def warp_sum(scratch, x):
        """The warp's sum of x by xor shuffles 16 .. 1 (the same additions)."""
        m = butterfly(warp_rows(scratch, np.array([x], np.float32)), (16, 8, 4, 2, 1))
        return m[threading.current_thread().threadIdx.x & 31, 0]

    def block_sync():
        threading.current_thread().syncthreads()

    def _sim_softmax(s, kq_max, lsum, rs, ps, scratch, tid):
        m = warp_rows(scratch, s[:G] + KQ_MAX_OFFSET).max(axis=0)
        for j in range(G):
            SOFTMAX_HEAD(s, kq_max, lsum, rs, ps, tid, j, max(kq_max[j], m[j]))

    @device
    def expf(x):
        return np.float32(np.exp(np.float32(x)))

    @device
    def dp4a(v, u, c, signed_v):
        """__dp4a(v, u, c): c + the sum of the 4 byte products of two words (u signed; v signed or not)."""
        s = int32(c)
        for b in range(4):
            s += (sbyte(v, b) if signed_v else ubyte(v, b)) * sbyte(u, b)
        return s

    @device
    def byte_f32(w, e, off):
        """Byte e of w (unsigned) minus off (a small integer), as float32 (exact)."""
        return np.float32(ubyte(w, e) - off)

    @device
    def scaled_byte(d, w, e, off):
        """d * (byte e of w - off): the product of two exact float32 values, itself exact."""
        return np.float32(d) * np.float32(ubyte(w, e) - off)
else:
    from llvmlite import ir
    from numba.cuda import types as nb_types
    from numba.cuda.extending import intrinsic

    def _asm3(text):
        """An intrinsic (uint32, int32, int32) -> int32 of one PTX instruction."""
        @intrinsic
        def op(typingctx, a, b, c):
            def codegen(context, builder, signature, args):
                i32 = ir.IntType(32)
                fty = ir.FunctionType(i32, [i32, i32, i32])
                return builder.call(ir.InlineAsm(fty, text, "=r,r,r,r"), args)
            return nb_types.int32(nb_types.uint32, nb_types.int32, nb_types.int32), codegen
        return op

    _dp4a_us = _asm3("dp4a.u32.s32 $0, $1, $2, $3;")
    _dp4a_ss = _asm3("dp4a.s32.s32 $0, $1, $2, $3;")
    _prmt = _asm3("prmt.b32 $0, $1, $2, $3;")

    @intrinsic
    def div_approx(typingctx, a, b):
        """div.approx.ftz.f32, as nvcc -use_fast_math compiles ggml's `/` (NVVM's fastmath `/` may give div.full)."""
        def codegen(context, builder, signature, args):
            f32 = ir.FloatType()
            return builder.call(ir.InlineAsm(ir.FunctionType(f32, [f32, f32]), "div.approx.ftz.f32 $0, $1, $2;",
                                             "=f,f,f"), args)
        return nb_types.float32(nb_types.float32, nb_types.float32), codegen
    MAGIC = np.int32(0x4B000000)                           # the float 2^23: its low bits take an integer
    MAGIC_F = np.float32(8388608.0)

    @device
    def xor_shuffle(scratch, x, offset):
        return cuda.shfl_xor_sync(0xFFFFFFFF, x, offset)

    @device
    def warp_sync():
        cuda.syncwarp()

    @device
    def warp_sum(scratch, x):
        for off in (16, 8, 4, 2, 1):
            x += xor_shuffle(scratch, x, off)
        return x

    @device
    def block_sync():
        cuda.syncthreads()

    @device
    def q8_reduce(scratch, amax, total):
        """The maximum and the sum over the 8 lanes of a q8_1 block (xor offsets 4, 2, 1)."""
        for off in (4, 2, 1):
            amax = max(amax, xor_shuffle(scratch, amax, off))
            total += xor_shuffle(scratch, total, off)
        return amax, total

    @device
    def expf(x):
        # nvcc's -use_fast_math expf is __expf: ex2.approx.ftz(x * log2(e)), which libdevice's fast_expf is;
        # math.exp even under fastmath is __nv_expf (a range reduction around ex2.approx): other bits
        return libdevice.fast_expf(x)

    @device
    def dp4a(v, u, c, signed_v):
        """__dp4a(v, u, c): one dp4a instruction (v's bytes signed or not, u's signed)."""
        if signed_v:
            return _dp4a_ss(np.uint32(v), int32(u), int32(c))
        return _dp4a_us(np.uint32(v), int32(u), int32(c))

    @device
    def prmt(a, b, c):
        """prmt.b32 (default mode) of words a, b (a's bytes 0..3, b's 4..7) by the 4 selector nibbles of c."""
        return np.uint32(_prmt(np.uint32(a), int32(b), int32(c)))

    @device
    def byte_f32(w, e, off):
        """Byte e of w (unsigned) minus off (a small integer), as float32: one prmt puts the byte under
        the exponent of 2^23, one subtraction of 2^23 + off (exact) leaves byte - off, instead of a
        conversion instruction (1/8 rate) and a subtraction."""
        return f32_from_bits(np.uint32(_prmt(np.uint32(w), MAGIC, int32(0x7440 + e)))) - (MAGIC_F + np.float32(off))

    MAGIC15 = np.int32(0x47000000)                         # the float 2^15: bits 8..15 take a byte b as 2^15 + b

    @device
    def scaled_byte(d, w, e, off):
        """d * (byte e of w - off) (off <= 128, d a float16's value) in two instructions, exact as
        dequantize_V's d * (q - off): one prmt puts the byte b at bits 8..15 of 2^15 (x = 2^15 + b), one
        fma(d, x, c) with c = -(2^15 + off) d adds the exact product d x to c, exact itself (2^15 + off
        <= 13 significant bits times d's 11), and rounds their sum, d (b - off), which float32 holds
        exactly (<= 19 bits): the value d * float(b - off) has (a zero is +0 here, d's sign there: a V
        value's zero times p adds nothing either way, and a sum from +0 ends +0). c is one multiply a
        block; an Inf/NaN d gives NaN for every value of its block (there Inf where b != off)."""
        x = f32_from_bits(np.uint32(_prmt(np.uint32(MAGIC15), int32(w), int32(0x3240 + 16 * e))))
        return fma_ftz(d, x, d * np.float32(-(32768 + off)))


@device
def u32(a, o):
    """The little-endian 32-bit word at byte o (even) of a flat uint8 array, as two 16-bit loads
    (ggml_cuda_memcpy_1<4, 2>: the blocks of q4_0, q5_0, q8_0 are only 2-byte aligned)."""
    return np.uint32(ld_u16(a, o)) | (np.uint32(ld_u16(a, o + 2)) << U16)


@device
def sbyte(w, b):
    """Signed byte b of a 32-bit word."""
    x = int32((w >> np.uint32(8 * b)) & np.uint32(0xFF))
    return x - 256 if x > 127 else x


@device
def ubyte(w, b):
    return int32((w >> np.uint32(8 * b)) & np.uint32(0xFF))


@device
def half_bits(w, high):
    """The ggml_half in the low (high False) or high 16 bits of w, as float32."""
    return f16_bits_to_f32(np.uint16((w >> U16) if high else (w & LOW16)))


@device
def bf16_bits(w, high):
    return f32_from_bits((w & HIGH16) if high else (w << U16))


@device
def q5_high(qh, shift):
    """The 5th bits of 4 values (qh >> shift, bits 0..3) placed as bit 4 of each byte (fattn-common.cuh)."""
    vh = qh >> np.uint32(shift)
    return (((vh << np.uint32(4)) & np.uint32(0x00000010)) | ((vh << np.uint32(11)) & np.uint32(0x00001000))
            | ((vh << np.uint32(18)) & np.uint32(0x00100000)) | ((vh << np.uint32(25)) & np.uint32(0x10000000)))


@device
def iq4_pair(w):
    """The 8 nibbles of a qs word w mapped through the iq4_nl levels: (the low nibbles' 4 int8 levels as a
    word, the high nibbles'), as ggml's get_int_from_table_16 does it with __byte_perm: per 4 nibbles a
    prmt from the table's low half and one from its high half by the nibbles' low 3 bits, a third
    choosing by their bit 3, then two to gather the low and high nibbles' bytes. Registers only (a table
    indexed at run time would live in local memory). prmt reads a selector nibble's bit 3 as "replicate
    the sign", so the selectors are masked to 3 bits (__byte_perm does so itself)."""
    idx = w & np.uint32(0x77777777)
    pick = np.uint32(0x32103210) | ((w & np.uint32(0x88888888)) >> np.uint32(1))
    t0 = prmt(prmt(IQ4_T0, IQ4_T1, idx), prmt(IQ4_T2, IQ4_T3, idx), pick)
    idx = idx >> U16
    t1 = prmt(prmt(IQ4_T0, IQ4_T1, idx), prmt(IQ4_T2, IQ4_T3, idx), pick >> U16)
    return prmt(t0, t1, 0x6420), prmt(t0, t1, 0x7531)


@device
def word_at(w, off):
    """The 32-bit word at byte off (even, a constant) of the words w (local array)."""
    i = off // 4
    if off % 4 == 0:
        return w[i]
    return (w[i] >> U16) | (w[i + 1] << U16)


@device
def qword(x):
    """A q8_1 word kept in a float32 shared array (its bits), as int32."""
    return int32(f32_bits(x))


@device
def nibble_dot(w0, w1, w2, w3, qh, qa, qb, t):
    """The integer sum of a 4-bit block's 8 dp4a (vec_dot_fattn_vec_KQ_<t> words): qs words w0..w3
    (values i..i+3 low nibbles, 16+i.. high), qh the 5th bits (q5_0/q5_1), qa/qb the q8_1 words."""
    a0, a1, a2, a3 = qa
    b0, b1, b2, b3 = qb
    five = t == Q5_0 or t == Q5_1
    iq4 = t == IQ4_NL
    s = int32(0)
    i = 0
    for w, u_lo, u_hi in ((w0, a0, b0), (w1, a1, b1), (w2, a2, b2), (w3, a3, b3)):
        if iq4:
            lo, hi = iq4_pair(w)
        else:
            lo = w & LO4
            hi = (w >> U4) & LO4
        if five:
            lo |= q5_high(qh, 4 * i)
            hi |= q5_high(qh, 16 + 4 * i)
        s = dp4a(lo, qword(u_lo), s, iq4)
        s = dp4a(hi, qword(u_hi), s, iq4)
        i += 1
    return s


@device
def kq_block(wd, base, qa, qb, dq, sq, t):
    """K.Q term of one quantized K block at byte base (a constant) of the chunk words wd, against
    the q8_1 block (qa, qb words; dq scale; sq float sum): the block form of vec_dot_fattn_vec_KQ_<t>."""
    d = half_bits(word_at(wd, base), False)
    if t == Q8_0:
        a0, a1, a2, a3 = qa
        b0, b1, b2, b3 = qb
        s = dp4a(word_at(wd, base + 2), qword(a0), 0, True)
        s = dp4a(word_at(wd, base + 6), qword(a1), s, True)
        s = dp4a(word_at(wd, base + 10), qword(a2), s, True)
        s = dp4a(word_at(wd, base + 14), qword(a3), s, True)
        s = dp4a(word_at(wd, base + 18), qword(b0), s, True)
        s = dp4a(word_at(wd, base + 22), qword(b1), s, True)
        s = dp4a(word_at(wd, base + 26), qword(b2), s, True)
        s = dp4a(word_at(wd, base + 30), qword(b3), s, True)
        return (d * dq) * np.float32(s)
    qs_at = base + (2 if t == Q4_0 or t == IQ4_NL else 4 if t == Q4_1 else 6 if t == Q5_0 else 8)
    qh = word_at(wd, base + (2 if t == Q5_0 else 4)) if t == Q5_0 or t == Q5_1 else np.uint32(0)
    s = nibble_dot(word_at(wd, qs_at), word_at(wd, qs_at + 4), word_at(wd, qs_at + 8), word_at(wd, qs_at + 12),
                   qh, qa, qb, t)
    if t == Q4_0:
        return d * (np.float32(s) * dq - np.float32(8.0) * sq)
    if t == Q5_0:
        return d * (np.float32(s) * dq - np.float32(16.0) * sq)
    if t == IQ4_NL:
        return (d * dq) * np.float32(s)
    m = half_bits(word_at(wd, base), True)                  # q4_1, q5_1
    return (d * dq) * np.float32(s) + m * sq



@device
def plain_value(w, base, e, t):
    """Value e (a constant) of f32/f16/bf16 values packed in the words w[base ..]."""
    if t == F32:
        return f32_from_bits(w[base + e])
    if t == F16:
        return half_bits(w[base + e // 2], e % 2 == 1)
    return bf16_bits(w[base + e // 2], e % 2 == 1)


@device
def v_value(r0, r1, r2, e, t):
    """Value e (a constant) of a quantized V unit: r0 its quants word, r1 the block's d (and m), r2 the
    5th bits shifted to the word (dequantize_V_<t>: d * (q - 8), d * q + m, ...)."""
    if t == Q8_0:
        return scaled_byte(half_bits(r1, False), r0 ^ SIGN8, e, 128)
    if t == IQ4_NL:                                         # the level as an int8 (kvalues_iq4nl), then as q8_0's
        return scaled_byte(half_bits(r1, False), iq4_pair(r0)[e // 4] ^ SIGN8, e % 4, 128)
    nib = r0 & LO4 if e < 4 else (r0 >> U4) & LO4
    if t == Q5_0 or t == Q5_1:
        nib |= q5_high(r2, 16 * (e // 4))
    d = half_bits(r1, False)
    if t == Q4_0:
        return scaled_byte(d, nib, e % 4, 8)
    if t == Q5_0:
        return scaled_byte(d, nib, e % 4, 16)
    return d * byte_f32(nib, e % 4, 0) + half_bits(r1, True)   # q4_1, q5_1


# ---- per-instance templates: the UPPER CASE names are the instance's constants (partials_kernel) ----
# Local arrays are indexed only by the unrolled step numbers (kk, n, ...), so they stay in registers.
def _fill_step(a, x, kk):
    a[kk] = x


def _v_col(ui, e):
    """Column of value e of V unit ui (a 4-bit block's word k holds values 4k..4k+3 and 16+4k..)."""
    if V_NIB:
        return 32 * (ui // 4) + 4 * (ui % 4) + (e % 4) + 16 * (e // 4)
    return ui * U + e


def _load_k_step(wd, k, o, i):
    """Word i of a quantized K chunk (rows are 4-byte aligned; o a word index of the staged rows when
    STAGE_K)."""
    if STAGE_K:
        wd[i] = k[o + np.uint32(i)]                        # o unsigned: no negative-index wrap-around code
    else:
        wd[i] = ld_u32(k, o + 4 * i)


def _kq_part_step(t1, wd, qsh, qd, qs, c, j, kk):
    """t1[0] += head j's K.Q over block kk of chunk c of a quantized K row."""
    ib = 2 * c + kk                                         # block of the row
    qi = j * (D // 4) + 8 * ib
    t1[0] += kq_block(wd, kk * K_TSIZE, ld_f32x4(qsh, qi), ld_f32x4(qsh, qi + 4),
                      qd[j * (D // 32) + ib], qs[j * (D // 32) + ib], TK)


# ---- K.Q of an f32/f16/bf16 K row in ggml-cuda's order (vec_dot_fattn_vec_KQ_f16/_bf16, nthreads_KQ = 8,
# 16-byte loads): lane l of 8 sums the 8-value groups at 64 c + 8 l (c = 0 .. D/64 - 1), value by value
# with fma from 0, and warp_reduce_sum<8> adds the 8 lanes by xor offsets 4, 2, 1:
# ((s0 + s4) + (s2 + s6)) + ((s1 + s5) + (s3 + s7)). Here one thread computes the 8 partial sums in the
# order 0 4 2 6 1 5 3 7, adding each pair as soon as it is complete (3 partials per head live at most);
# the loads of KG groups are issued together before their sums (bytes in flight: the K phase waits on
# memory 8 / KG times a tile, not 8), which moves no addition.
@device
def _group_lane(gi):
    """ggml's lane of the gi-th group summed: 0 4 2 6 1 5 3 7 (gi's 3 bits reversed)."""
    return ((gi & 1) << 2) | (gi & 2) | (gi >> 2)


def _load_group_step(wd, k, o, gi, x, c):
    """The 8 values of group _group_lane(gi) of 64-value chunk c of the row at byte o (word o of the staged
    rows when STAGE_K; 16 or 32 bytes) into slot x of wd (GW * D / 64 words a slot)."""
    w = GW * (D // 64) * x + GW * c
    at = (64 * c + 8 * _group_lane(gi)) * K_VB                # the group's first byte in the row
    if STAGE_K:     # an f16/bf16 group is one 16-byte chunk, swizzled in its staged row (see _stage_piece)
        v = ld_u32x4(k, o + np.uint32(4 * ((at // 16) ^ ((o // np.uint32(ROW_WORDS)) & np.uint32(7)))))
    else:
        v = ld_u32x4(k, o + at)
    wd[w] = v[0]
    wd[w + 1] = v[1]
    wd[w + 2] = v[2]
    wd[w + 3] = v[3]
    if TK == F32:
        y = ld_u32x4(k, o + at + 16)
        wd[w + 4] = y[0]
        wd[w + 5] = y[1]
        wd[w + 6] = y[2]
        wd[w + 7] = y[3]


def _load_groups_step(wd, k, o, gi0, x):
    LOAD_GROUP(wd, k, o, gi0 + x, x)


def _group_head_step(s, r, wd, qsh, gi, x, j):
    """Head j's sum over group _group_lane(gi) (ggml's lane), from slot x of wd, combined as the shuffle
    tree does: s[j] holds s0 + s4, then that + (s2 + s6); r[2 j] and r[2 j + 1] the pending pairs."""
    l = _group_lane(gi)
    acc = ZERO
    for c in range(D // 64):
        qo = j * D + 64 * c + 8 * l
        w = GW * (D // 64) * x + GW * c
        y0 = ld_f32x4(qsh, qo)
        y1 = ld_f32x4(qsh, qo + 4)
        acc += plain_value(wd, w, 0, TK) * y0[0]
        acc += plain_value(wd, w, 1, TK) * y0[1]
        acc += plain_value(wd, w, 2, TK) * y0[2]
        acc += plain_value(wd, w, 3, TK) * y0[3]
        acc += plain_value(wd, w, 4, TK) * y1[0]
        acc += plain_value(wd, w, 5, TK) * y1[1]
        acc += plain_value(wd, w, 6, TK) * y1[2]
        acc += plain_value(wd, w, 7, TK) * y1[3]
    if gi == 0:
        s[j] = acc
    elif gi == 1:
        s[j] += acc                                         # s0 + s4
    elif gi == 2:
        r[2 * j] = acc
    elif gi == 3:
        s[j] += r[2 * j] + acc                              # (s0 + s4) + (s2 + s6)
    elif gi == 4:
        r[2 * j] = acc
    elif gi == 5:
        r[2 * j] += acc                                     # s1 + s5
    elif gi == 6:
        r[2 * j + 1] = acc
    else:
        s[j] += r[2 * j] + (r[2 * j + 1] + acc)             # .. + ((s1 + s5) + (s3 + s7))


def _groups_heads_step(s, r, wd, qsh, gi0, x):
    GROUP_HEADS(s, r, wd, qsh, gi0 + x, x)


def _kq_plain(s, r, wd, k, o, qsh):
    """The 8 groups, KG at a time (a loop: KG groups' values live at a time, not the row's)."""
    for gi0 in range(0, 8, KG):
        LOAD_GROUPS(wd, k, o, gi0)
        GROUPS_HEADS(s, r, wd, qsh, gi0)


def _kq_plain_step(s, r, wd, k, o, qsh, n):
    """Groups n KG .. n KG + KG - 1 where the 8 are written out (K groups 0): each group's step of the
    shuffle tree a constant, not a branch on the loop index; ptxas then schedules the row's loads as
    it likes (sm_90, f16 D 128 G 4: ~1875 instructions a tile instead of ~2900, spills 160 bytes
    instead of 96)."""
    LOAD_GROUPS(wd, k, o, n * KG)
    GROUPS_HEADS(s, r, wd, qsh, n * KG)


def _get_step(a, j, t1, kk):
    if kk == j:
        t1[0] = a[kk]


def _put_step(a, j, x, kk):
    if kk == j:
        a[kk] = x


def _kq_token(s, k, o, qsh, qd, qs, wd, t1, n_cols):
    """s[j] += K.Q of the K row at byte o (word o of the staged rows) for every head j (Q pre-scaled,
    in shared memory). G <= 4 (KQ_UNROLL): the heads written out (sm_90 SASS of q4_0 at D 128, G 4:
    ~520 instructions a row instead of ~920: no run-time head index selecting s[j] and Q); more heads: a
    loop (n_cols = G, unknown to the compiler), one head's Q words live at a time (registers)."""
    KQ_CHUNKS(s, k, o, qsh, qd, qs, wd, t1, n_cols)


def _kq_chunk_step(s, k, o, qsh, qd, qs, wd, t1, n_cols, c):
    """Chunk c (2 blocks) of the row: its words, then every head's K.Q over it (c a constant: the Q
    addresses too)."""
    LOAD_K(wd, k, o + np.uint32(c * (K_WORDS if STAGE_K else K_CHUNK_BYTES)))
    if KQ_UNROLL:
        KQ_HEADS(s, wd, qsh, qd, qs, t1, c)
    else:
        for j in range(n_cols):
            GET_G(s, j, t1)
            KQ_PART(t1, wd, qsh, qd, qs, c, j)
            PUT_G(s, j, t1[0])


def _kq_head_step(s, wd, qsh, qd, qs, t1, c, j):
    """Head j's K.Q over chunk c, added to s[j] (the loop's steps, j a constant)."""
    t1[0] = s[j]
    KQ_PART(t1, wd, qsh, qd, qs, c, j)
    s[j] = t1[0]


# ---- rows staged in shared memory by cp.async: a warp copies its 32 rows of K (or V) and reads only those,
# so a warp barrier orders its copies and reads. One template for K and V: S_RB the row bytes, S_WORDS a row's
# words in the buffer, S_WIDE 16-byte chunks (f16/bf16 rows) or 4-byte words, S_UNIT the buffer's elements a
# word (1: uint32, 4: uint8).
def _stage_piece(buf, src_rows, src, dst, i):
    """Piece i of the warp's rows (contiguous from byte src) by cp.async into the warp's rows of buf (from
    element dst): a 4-byte word at the same place, or a 16-byte chunk of an f16/bf16 row: of a K row at chunk
    (its chunk ^ row % 8) of its row (S_SWIZZLE), so that the 8 threads of a 16-byte shared load (each its own
    row, S_WORDS apart: one bank group) read 8 bank groups; of a V row at its place (8 lanes read one row)."""
    if S_WIDE and S_SWIZZLE:
        row = i // (S_RB // 16)
        at = row * S_WORDS + 4 * ((i % (S_RB // 16)) ^ (row & 7))
        cp_async16(buf, dst + np.uint32(S_UNIT * at), src_rows, src + 16 * i)
    elif S_WIDE:
        cp_async16(buf, dst + np.uint32(S_UNIT * 4 * i), src_rows, src + 16 * i)
    else:
        cp_async4(buf, dst + np.uint32(S_UNIT * i), src_rows, src + 4 * i)


def _stage_copy_step(buf, src_rows, src, dst, lane, m):
    STAGE_PIECE(buf, src_rows, src, dst, lane + WARP * m)


def _stage_rows(buf, src_rows, base, tile, n_kv, warp, lane):
    """The warp's 32 rows of `tile` (fewer at the context's end; rows of S_RB bytes from byte base) on their
    way into its rows of buf: in flight until cp_async_wait_all / _wait_one, while the thread goes on."""
    first = tile * NT + warp * WARP
    n_rows = min(WARP, n_kv - first)
    src = base + first * S_RB
    dst = np.uint32(warp * WARP * S_WORDS * S_UNIT)
    if n_rows == WARP:                                     # written out: constant offsets, no predicates
        STAGE_COPY(buf, src_rows, src, dst, lane)
    else:
        for i in range(lane, n_rows * S_RB // (16 if S_WIDE else 4), WARP):
            STAGE_PIECE(buf, src_rows, src, dst, i)


def _softmax_step(s, kq_max, lsum, rs, ps, scratch, tid, j):
    """Head j: the warp's new maximum (its running one and the tile's s + FATTN_KQ_MAX_OFFSET of its 32
    tokens, as ggml's vector kernel keeps one per warp), the rescale rs[j], p of token tid."""
    m = s[j] + KQ_MAX_OFFSET
    for off in (16, 8, 4, 2, 1):
        m = max(m, xor_shuffle(scratch, m, off))
    m = max(kq_max[j], m)
    SOFTMAX_HEAD(s, kq_max, lsum, rs, ps, tid, j, m)


def _softmax_head(s, kq_max, lsum, rs, ps, tid, j, m):
    rs[j] = expf(kq_max[j] - m)
    kq_max[j] = m
    pj = expf(s[j] - m)
    lsum[j] = lsum[j] * rs[j] + pj
    ps[np.uint32(tid * GP + j)] = pj


def _load_v_step(raw, vq, vd, o0, step, n_left, shift, sl):
    """V unit u + ul * LV of slot sl = n * UL + ul (the token n * TS rows after the one at byte o0; step:
    TS rows in bytes) into raw[4 sl ..]: its words, or zeros from n * TS >= n_left (past the context).
    vq, vd: V from the lane's quants word (or 16 bytes) and its block of unit u, so that a load's
    address is the row's plus a constant; shift: 4 * (u % 4), the lane's 5th bits in qh."""
    n = sl // UL
    ul = sl % UL
    base = 4 * sl
    raw[base] = raw[base + 1] = raw[base + 2] = raw[base + 3] = np.uint32(0)
    if n * TS < n_left:
        on = o0 + n * step
        if PLAIN_V:
            x = ld_u32x4(vq, on + 16 * ul * LV)
            raw[base] = x[0]
            raw[base + 1] = x[1]
            raw[base + 2] = x[2]
            raw[base + 3] = x[3]
        else:
            b = on + (ul * LV // V_PER_BLOCK) * V_TSIZE        # LV is a multiple of V_PER_BLOCK
            if TV == Q4_1 or TV == Q5_1:
                raw[base] = ld_u32(vq, b)
                raw[base + 1] = ld_u32(vd, b)
            else:
                raw[base] = u32(vq, b)
                raw[base + 1] = np.uint32(ld_u16(vd, b))
            if TV == Q5_0:
                raw[base + 2] = u32(vd, b + 2) >> shift
            if TV == Q5_1:
                raw[base + 2] = ld_u32(vd, b + 4) >> shift


def _v_fma_step(acc, raw, p, rs, first, n, kk):
    """V value e of slot (n, ul), kk = ul * U + e, dequantized once, then its FMAs for the G heads."""
    e = kk % U
    ul = kk // U
    base = 4 * (n * UL + ul)
    if PLAIN_V:
        x = plain_value(raw, base, e, TV)
    else:
        x = v_value(raw[base], raw[base + 1], raw[base + 2], e, TV)
    V_HEADS(acc, x, p, rs, first, n, kk)


def _v_head_step(acc, x, p, rs, first, n, kk, j):
    """acc[(j * UL + ul) * U + e] += x * p[j], kk = ul * U + e. The tile's first token (first and n == 0)
    also applies the tile's rescale rs[j] as nvcc contracts ggml's `VKQ *= KQ_max_scale` with the first
    `VKQ += V * KQ`: fma(rs, acc, p * v) (the PTX of fattn-vec.cuh)."""
    i = (j * UL + kk // U) * U + kk % U
    if first and n == 0:
        acc[i] = fma_ftz(rs[j], acc[i], mul_ftz(p[j], x))
    else:
        acc[i] += x * p[j]


def _v_token_step(acc, raw, ps, lt, p, rs, first, n):
    """Step n's token (tile-local lt + n * TS): its G probabilities from shared memory, then the FMAs."""
    for i in range(GP // 4):
        x = ld_f32x4(ps, (lt + n * TS) * GP + 4 * i)
        p[4 * i] = x[0]
        p[4 * i + 1] = x[1]
        p[4 * i + 2] = x[2]
        p[4 * i + 3] = x[3]
    V_FMA(acc, raw, p, rs, first, n)


def _v_batch_step(acc, raw, ps, lt, p, rs, vq, vd, o_lane, n_left, shift, m):
    """V steps m NB .. m NB + NB - 1 of the tile (m >= 1, a constant: its rows at constant offsets from
    the lane's first), loads first; n_left >= WARP: every row of the lane's tile is in the context (one
    branch, so that the loads' bounds are constants there: no predicates, no zeroing moves)."""
    n0 = m * NB
    if not PLAIN_V and n_left >= WARP:             # (plain V: more spills with both paths)
        LOAD_V(raw, vq, vd, o_lane + n0 * TS * V_RB, TS * V_RB, int32(WARP), shift)
    else:
        LOAD_V(raw, vq, vd, o_lane + n0 * TS * V_RB, TS * V_RB, n_left - int32(n0 * TS), shift)
    V_TOKENS(acc, raw, ps, lt + n0 * TS, p, rs, False)


def _first_v(raw, vq, vd, o_lane, n_left, shift):
    """The loads of V's first NB steps."""
    if not PLAIN_V and n_left >= WARP:                     # the lane's rows all in the context (see _v_batch_step)
        LOAD_V(raw, vq, vd, o_lane, TS * V_RB, int32(WARP), shift)
    else:
        LOAD_V(raw, vq, vd, o_lane, TS * V_RB, n_left, shift)


def _put_max_step(red, kq_max, warp, j):
    red[warp * G + j] = kq_max[j]


def _store_acc_step(comb, acc, sc, row, u, j, kk):
    """Head j's acc[(j * UL + ul) * U + e] * sc, kk = ul * U + e, into comb[row, column]."""
    e = kk % U
    ul = kk // U
    comb[row * D + V_COL(u + ul * LV, e)] = acc[(j * UL + ul) * U + e] * sc


def _end_head_step(acc, lsum, kq_max, red, comb, scratch, parts, meta, row0, split, splits, tid, lane, warp,
                   row, u, lane_ok, j):
    """Head j's partial result, as the end of ggml's flash_attn_ext_vec: the block's maximum over the
    warps' ones; each warp's sum and V accumulators rescaled to it; the sums of a warp added by xor
    shuffles (16 .. 1), the warps' as warp_reduce_sum adds them ((w0 + w2) + (w1 + w3)); a column the
    sum of the NWARPS * TS token streams' accumulators in (warp, stream) order, from 0; divided by the
    sum with one split, else the maximum and the sum written beside it."""
    m = red[j]
    for w in range(1, NWARPS):
        m = max(m, red[w * G + j])
    sc = expf(kq_max[j] - m)
    t = warp_sum(scratch, lsum[j] * sc)
    if lane == 0:
        red[(NWARPS + warp) * G + j] = t
    if lane_ok:
        STORE_ACC(comb, acc, sc, row, u, j)
    block_sync()
    total = ((red[NWARPS * G + j] + red[(NWARPS + 2) * G + j])
             + (red[(NWARPS + 1) * G + j] + red[(NWARPS + 3) * G + j]))
    for col in range(tid, D, NT):
        val = ZERO
        for i in range(NWARPS * TS):
            val += comb[i * D + col]
        if splits == 1:
            val = div_approx(val, total)
        at = (row0 + j) * splits + split
        parts[at * D + col] = val
        if col == 0:
            meta[2 * at] = m
            meta[2 * at + 1] = total
    block_sync()


def _prefetch_tile(k, v, ko, vo, k_rows, v_rows, tid):
    """prefetch.L2 of k_rows K rows from byte ko and v_rows V rows from byte vo (each contiguous): 128-byte
    lines tid, tid + NT, ... (a hint: no result)."""
    for m in range(K_PF):
        if 128 * (tid + NT * m) < k_rows * K_RB:
            prefetch_l2(k, ko + 128 * (tid + NT * m))
    for m in range(V_PF):
        if 128 * (tid + NT * m) < v_rows * V_RB:
            prefetch_l2(v, vo + 128 * (tid + NT * m))


def _partials(q, k, v, kst, vst, n_kv, n_head, ratio, mask, use_mask, scale, prefetch, parts, meta):
    """One block: G query heads of one (sequence, KV head), the tiles split, split + splits, ... (as ggml's
    parallel blocks take them)."""
    grp = cuda.blockIdx.x
    split = cuda.blockIdx.y
    splits = cuda.gridDim.y
    tid = cuda.threadIdx.x
    warp = tid // WARP
    lane = tid % WARP
    per_kv = ratio // G
    bh = grp // per_kv                                     # b * Hkv + hk
    n_hkv = n_head // ratio
    b = bh // n_hkv
    hk = bh - b * n_hkv
    row0 = b * n_head + hk * ratio + (grp - bh * per_kv) * G
    qsh = cuda.shared.array(N_QSH, float32, alignment=ALIGN)     # Q: q8_1 words (as bits) or floats
    qd = cuda.shared.array(N_QBLK, float32)
    qs = cuda.shared.array(N_QBLK, float32)
    ps = cuda.shared.array(N_PS, float32, alignment=ALIGN)    # (token, head) probabilities of the tile
    red = cuda.shared.array(N_RED, float32)         # warps' maxima, warps' sums
    comb = cuda.shared.array(N_COMB, float32)
    scratch = cuda.shared.array(N_SCRATCH, float32)   # shuffles (the simulator's: all lanes' values at once)
    kbuf = cuda.shared.array(N_KBUF, uint32)   # the tile's K rows
    vbuf = cuda.shared.array(N_VBUF, uint8, alignment=ALIGN)   # the tile's V rows (STAGE_V)

    # ---- Q: scaled, and q8_1 for a quantized K (quantize_q8_1_to_shared) ----
    if PLAIN_K:
        for i in range(tid, G * D, NT):
            qsh[i] = scale * q[row0 * D + i]
    else:
        words = G * (D // 4)
        for w0 in range(0, words, NT):                   # every thread runs the shuffles
            w = w0 + tid
            x0 = x1 = x2 = x3 = ZERO
            if w < words:                                # values 4 w .. 4 w + 3 of the G heads' rows
                c = row0 * D + 4 * w
                x0 = scale * q[c]
                x1 = scale * q[c + 1]
                x2 = scale * q[c + 2]
                x3 = scale * q[c + 3]
            amax = max(max(max(abs(x0), abs(x1)), abs(x2)), abs(x3))
            total = x0 + x1 + x2 + x3
            amax, total = q8_reduce(scratch, amax, total)
            dq = amax * INV_127
            word = int32(0)
            if dq != ZERO:
                r = rcp_approx(dq)
                word = ((int32(roundf(x0 * r)) & 0xFF) | ((int32(roundf(x1 * r)) & 0xFF) << 8)
                        | ((int32(roundf(x2 * r)) & 0xFF) << 16) | (int32(roundf(x3 * r)) << 24))
            if w < words:
                qsh[w] = f32_from_bits(np.uint32(word))
                if w % 8 == 0:
                    qd[w // 8] = dq
                    qs[w // 8] = total

    s = cuda.local.array(G, float32)
    kq_max = cuda.local.array(G, float32)
    lsum = cuda.local.array(G, float32)
    rs = cuda.local.array(G, float32)
    p = cuda.local.array(GP, float32)
    acc = cuda.local.array(N_ACC, float32)
    wd = cuda.local.array(K_WORDS, uint32)
    r = cuda.local.array(N_R, float32)                     # plain K: pending pairs of the shuffle tree
    t1 = cuda.local.array(1, float32)
    n_cols = G if ratio > 0 else 0                         # G, as a value the compiler does not unroll
    raw = cuda.local.array(N_RAW, uint32)
    FILL_G(kq_max, HALF_NEG_FLT_MAX)
    FILL_G(lsum, ZERO)
    FILL_ACC(acc, ZERO)
    lane_ok = lane < TS * LV                               # D / U not a multiple of 32: idle lanes
    sub = lane // LV if lane_ok else 0                     # this lane's token of a V step
    u = lane - sub * LV                                    # and its first V unit
    v_rows = vbuf if STAGE_V else v                        # where the V stage reads the rows
    if PLAIN_V:
        vq = v_rows[16 * u:]
        vd = vq
    else:
        vd = v_rows[(u // V_PER_BLOCK) * V_TSIZE:]
        vq = vd[V_QS_AT + 4 * (u % V_PER_BLOCK):]
    shift = np.uint32(4 * (u % V_PER_BLOCK))
    tiles = (n_kv + NT - 1) // NT
    kbase = b * kst[0] + hk * kst[1]
    vbase = b * vst[0] + hk * vst[1]
    if STAGE_K and split < tiles:
        STAGE_K_ROWS(kbuf, k, kbase, split, n_kv, warp, lane)
    cp_async_commit()
    cuda.syncthreads()

    for tile in range(split, tiles, splits):
        if prefetch != 0:                                  # to L2: see PREFETCH's modes
            kt = tile + (prefetch if prefetch > 0 else 1) * splits
            vt = tile + prefetch * splits if prefetch > 0 else tile
            k_rows = min(NT, n_kv - kt * NT) if kt < tiles and prefetch != -2 else 0
            v_rows = min(NT, n_kv - vt * NT) if vt < tiles else 0
            PREFETCH(k, v, kbase + kt * NT * K_RB, vbase + vt * NT * V_RB,
                     k_rows, v_rows, tid)
        # (a) scores of token tid for every head, from the staged rows (or the row in global memory)
        tok = tile * NT + tid
        FILL_G(s, ZERO)
        if STAGE_V:                                        # this tile's V rows fly under its K.Q and softmax
            warp_sync()                                    # (the warp's reads of the last tile's are done)
            STAGE_V_ROWS(vbuf, v, vbase, tile, n_kv, warp, lane)
            cp_async_commit()
            cp_async_wait_one()                            # the K rows (the V rows may still fly)
        elif STAGE_K:
            cp_async_wait_all()
        warp_sync()                                        # the warp's reads of ps done, its staged rows landed
        if tok < n_kv:
            if PLAIN_K and STAGE_K:
                KQ_PLAIN(s, r, wd, kbuf, np.uint32(tid * ROW_WORDS), qsh)
            elif PLAIN_K:
                KQ_PLAIN(s, r, wd, k, kbase + tok * K_RB, qsh)
            elif STAGE_K:
                KQ_TOKEN(s, kbuf, np.uint32(tid * ROW_WORDS), qsh, qd, qs, wd, t1, n_cols)
            else:
                KQ_TOKEN(s, k, kbase + tok * K_RB, qsh, qd, qs, wd, t1, n_cols)
        if STAGE_K:                                        # the next tile's rows fly under this tile's softmax and V
            warp_sync()                                    # (every lane has read its row)
            if tile + splits < tiles:
                STAGE_K_ROWS(kbuf, k, kbase, tile + splits, n_kv, warp, lane)
            cp_async_commit()                              # (an empty group at the last tile: the count stays)
        if tok >= n_kv or (use_mask and not mask[b, tok]):     # past the context, or masked (ggml adds -inf)
            FILL_G(s, NEG_INF)
        lt = warp * WARP + sub                             # this lane's first token in the tile
        tok0 = tile * NT + lt
        # the lane's first V row (in the staged rows, or in global memory), and the rows left from it
        o_lane = lt * V_RB if STAGE_V else vbase + tok0 * V_RB
        n_left = int32(n_kv - tok0) if lane_ok else int32(0)
        # V's first NB steps: loads issued before the softmax (their latency under it)
        if not STAGE_V:
            FIRST_V(raw, vq, vd, o_lane, n_left, shift)
        # (b) the warp's maximum per head, the rescale, p
        SOFTMAX(s, kq_max, lsum, rs, ps, scratch, tid)
        if STAGE_V:
            cp_async_wait_one()                            # this tile's V rows (the next tile's K may fly)
            warp_sync()
            FIRST_V(raw, vq, vd, o_lane, n_left, shift)
        else:
            warp_sync()
        # (c) V of the warp's 32 tokens, NB steps of TS tokens at a time (loads first)
        V_TOKENS(acc, raw, ps, lt, p, rs, True)             # the first steps (the rescale with the first)
        V_BATCHES(acc, raw, ps, lt, p, rs, vq, vd, o_lane, n_left, shift)

    # ---- the end, per head (ggml's order): the warps' maxima, then each head's partial result ----
    if lane == 0:
        PUT_MAX(red, kq_max, warp)
    cuda.syncthreads()
    END_HEADS(acc, lsum, kq_max, red, comb, scratch, parts, meta, row0, split, splits, tid, lane, warp,
              warp * TS + sub, u, lane_ok)


def _divisor_at_most(n: int, cap: int) -> int:
    return max(x for x in range(1, cap + 1) if n % x == 0)


def v_layout(type_v: int, d: int) -> tuple:
    """(U, V_PER_BLOCK, LV): V values a lane takes from one unit (16 bytes of f16/bf16, a 4-bit word's 8
    nibbles, 4 of q8_0 or f32), units of a quantized block, lanes per token. f16/bf16 V: 8 lanes a token,
    4 tokens a step, lane l the columns 64 c + 8 (l % 8) .. + 7 (ggml's nthreads_V = 8, V_rows_per_thread 8)."""
    u = 8 if type_v in NIBBLES or type_v in (F16, BF16) else 4
    per_block = 8 if type_v == Q8_0 else 4
    if type_v in (F16, BF16):
        return u, per_block, 8
    return u, per_block, max(x for x in range(per_block, WARP + 1, per_block) if d // u % x == 0)


def cols_per_block(ratio: int, d: int, type_v: int) -> int:
    """Query heads a block computes (G): the most of the GQA group that divides it, at most 8 (4 for f16/bf16
    V), G * D <= 1024 and a lane's V accumulators (G * D / LV) <= 64 (they stay in registers)."""
    lv = v_layout(type_v, d)[2]
    cap = 4 if type_v in (F16, BF16) else MAX_COLS       # 8 lanes a token: 16 G accumulators at D 128
    return _divisor_at_most(ratio, min(cap, max(1, 1024 // d), max(1, 64 * lv // d)))


# (max_registers, V steps loaded together, plain K groups loaded together, V rows staged) of the kernels
# flash_decode takes; max_registers None: registers(...), 0: no limit. K groups (H200, Llama-3-8B layer, 32k,
# ec12308): 1 / 2 / 4 gave f16 0.547 / 0.611 / 0.580 of copy_, bf16 0.548 / 0.610 / 0.580, f32 0.627 /
# 0.829 / 0.833 (4 is 2 for f32: at most 32 words). 0: the 8 groups written out (_kq_plain_step, 2 at a
# time; sm_90 SASS, D 128 G 4, V steps written out too: f16 ~1800 instructions a tile instead of ~2800);
# measured at 32k on 5d84206 (run e, bench/README): f16 0.655 / 0.654 with 0 / 2, f32 0.882 / 0.882 at 168
# registers; the same bits. V rows staged: a quantized V row of <= 160 bytes or an f16/bf16 row of <= 256
# copied by cp.async into shared memory at the tile's start (under its K.Q and softmax), beside the staged K
# rows; None: every such V type but q8_0, True / False (KVLAB_FD_STAGE_V=1 / 0): all or none. H200, 32k,
# session 11 (run s11-2, two rounds, microseconds a launch staged / not, the same output bits): q4_0 194.3
# 194.3 / 200.6 198.1, q4_1 213.7 213.3 / 222.5 220.7, iq4_nl 238.9 238.6 / 253.7 253.0, q5_0 257.8 258.8 /
# 281.3 278.3, q5_1 274.3 273.3 / 281.4 284.9, q8_0 214.2 213.4 / 209.8 210.4 (its 34-byte blocks read from
# shared memory as 16-bit halves cost more than the latency saved). Session 12 (runs s12-1, s12-2, fraction
# of copy_ staged / not at 168 and 128 registers): f16/f16 0.869 0.847 / 0.787 0.772 at 168, 0.719 0.720 /
# 0.754 0.748 at 128; bf16/bf16 0.869 0.856 / 0.778 0.779 at 168, 0.718 0.716 / 0.759 0.751 at 128.
_STAGE_V = _setting("KVLAB_FD_STAGE_V", ("0", "1"))
VARIANT = (None, NB_MAX, 0, None if _STAGE_V is None else bool(_STAGE_V))


def registers(type_k: int, type_v: int, dynamic_v: bool) -> int:
    """The partials kernel's register limit: 168 where K or V is f32, or where f16/bf16 V rows are staged in
    dynamic shared memory (dynamic_v: 69,760 bytes of shared memory a block at D 128), 3 blocks an SM either
    way; else 128 (4 blocks). H200, Llama-3-8B layer, 32k cells, fraction of copy_ at 128 / 168 / no limit
    (ptxas takes 130-240): f32/f32 0.71-0.73 / 0.88 / 0.66 (at 128 it spills), q8_0/q8_0 0.58 / 0.57 / 0.59,
    q4_0/q4_0 0.38 / 0.35 / 0.35 (session 9); f16/f16 with V staged 0.72 / 0.85-0.87 (sm_90: 156 / 24 bytes
    spilled), not staged 0.75 / 0.77-0.79 (session 12, see VARIANT); q8_0 at 128 / 96 / 80 0.66 / 0.63 /
    0.62, q4_0 0.37 / 0.34 / 0.32 (s12-1: more blocks an SM do not pay for the spills)."""
    return 168 if F32 in (type_k, type_v) or dynamic_v else 128


@functools.cache
def layout(type_k: int, type_v: int, d: int, g: int, variant: tuple = VARIANT) -> dict:
    """The constants of a partials kernel instance (its templates' UPPER CASE names: types, lane layout, array
    sizes, what is staged), MAX_REGISTERS, and DYN_BYTES: the dynamic shared memory its launch gives (0: none)."""
    assert NWARPS == 4                                   # the warps' sums are added as (w0 + w2) + (w1 + w3)
    plain_k, plain_v = type_k in PLAIN, type_v in PLAIN
    u, per_block, lv = v_layout(type_v, d)
    ts = WARP // lv                                      # tokens per V step
    ul = d // u // lv                                    # units per lane
    steps = WARP // ts
    _, nb_max, k_groups, _ = variant
    nb = min(steps, max(1, nb_max // ul))                # V steps whose loads are issued together
    while nb > 1 and g * ul * u + 4 * nb * ul > 80:      # accumulators + loaded words: no spills at 128 registers
        nb //= 2
    k_chunk_bytes = 2 * TYPE_SIZES[type_k]               # quantized K: 2 blocks per chunk of loads
    group_words = d // 64 * (8 if type_k == F32 else 4)   # a plain K row's 8-value group: its words
    kg = min(k_groups or 2, max(1, 32 // group_words)) if plain_k else 1   # loaded together: <= 32 words
    assert 8 % kg == 0
    k_words = kg * group_words if plain_k else k_chunk_bytes // 4
    k_rb = d * TYPE_SIZES[type_k] if plain_k else d // 32 * TYPE_SIZES[type_k]        # row bytes
    v_rb = d * TYPE_SIZES[type_v] if plain_v else d // 32 * TYPE_SIZES[type_v]
    # the tile's K rows staged in shared memory (a quantized row of <= 160 bytes, an f16/bf16 row of <= 256),
    # where they fit beside the other shared arrays (48 KB of static shared memory)
    gp = 4 * (-(-g // 4))
    n_shared = dict(N_QSH=g * d, N_QBLK=g * d // 32, N_PS=NT * gp, N_RED=2 * NWARPS * g, N_COMB=NWARPS * ts * d,
                    N_SCRATCH=NT * max(2, g) if SIM else NT)
    others = sum(n_shared.values()) + n_shared["N_QBLK"]             # qd and qs
    stage_k = ((k_rb <= 160 if not plain_k else type_k != F32 and k_rb <= 256)
               and 4 * (others + NT * k_rb // 4) <= 48 * 1024)
    row_words = k_rb // 4 if stage_k else 1
    # the tile's V rows too, beside staged K rows (variant[3]; None: every quantized type but q8_0): a quantized
    # row of <= 160 bytes in static shared memory; an f16/bf16 row of <= 256 (32 KB a tile at D 128) in dynamic
    # shared memory (more than the 48 KB of static), shared with the end's column sums (comb: written after
    # the block's last V read, a block barrier between)
    want_v = type_v not in (Q8_0, F32) if variant[3] is None else variant[3]
    stage_v = (want_v and stage_k and not plain_v and v_rb <= 160
               and 4 * (others + NT * row_words) + NT * v_rb <= 48 * 1024)
    dyn_v = bool(want_v and stage_k and type_v in (F16, BF16) and v_rb <= 256)
    dyn_bytes = max(NT * v_rb, 4 * n_shared["N_COMB"]) if dyn_v else 0
    if dyn_v:
        n_shared["N_COMB"] = 0                             # 0: dynamic shared memory (numba's shared.array(0))
    ns = dict(TK=type_k, TV=type_v, D=d, G=g, GP=gp, PLAIN_K=plain_k, PLAIN_V=plain_v,
              V_NIB=type_v in NIBBLES, K_TSIZE=TYPE_SIZES[type_k], V_TSIZE=TYPE_SIZES[type_v], V_PER_BLOCK=per_block,
              V_QS_AT={Q8_0: 2, Q4_0: 2, IQ4_NL: 2, Q4_1: 4, Q5_0: 6, Q5_1: 8}.get(type_v, 0),
              K_CHUNK=64, K_CHUNK_BYTES=k_chunk_bytes, K_WORDS=k_words, KG=kg, GW=8 if type_k == F32 else 4,
              K_VB=4 if type_k == F32 else 2,
              U=u, LV=lv, TS=ts, UL=ul, STEPS=steps, NB=nb, N_ACC=g * ul * u, STAGE_K=stage_k,
              ROW_WORDS=row_words, STAGE_V=stage_v or dyn_v)
    ns.update(K_RB=k_rb, V_RB=v_rb, K_PF=-(-k_rb // 128), V_PF=-(-v_rb // 128))       # lines a thread prefetches
    # array sizes: numba takes only literal integers there
    ns.update(n_shared, N_KBUF=NT * row_words if stage_k else 1, N_VBUF=0 if dyn_v else NT * v_rb if stage_v else 16,
              N_RAW=4 * nb * ul, N_R=2 * g)
    ns.update(MAX_REGISTERS=registers(type_k, type_v, dyn_v) if variant[0] is None else variant[0],
              DYN_BYTES=dyn_bytes)
    return ns


@functools.cache
def partials_kernel(type_k: int, type_v: int, d: int, g: int, variant: tuple = VARIANT):
    """kernel(q, k, v, kst, vst, n_kv, n_head, ratio, mask, use_mask, scale, prefetch, parts, meta), run on a
    grid (B * H / g, splits) of NT threads with layout(...)["DYN_BYTES"] bytes of dynamic shared memory
    (prefetch: what goes to L2 at a tile's start, PREFETCH's modes).

    q (R * D,) float32, R = B * H; k, v flat uint8 of the caches (B, Hkv, capacity, row bytes); kst, vst:
    (batch, head, row) strides in bytes (row: the row size, which the kernel takes as the constant K_RB /
    V_RB); mask (B, L) bool (True: attend; read only with use_mask); parts (R * splits * D,), meta
    (R * splits * 2,): flat, row-major."""
    ns = dict(layout(type_k, type_v, d, g, variant))
    g, d, k_rb, v_rb = ns["G"], ns["D"], ns["K_RB"], ns["V_RB"]
    ul, u, nb, kg = ns["UL"], ns["U"], ns["NB"], ns["KG"]
    k_groups, steps, plain_k, plain_v = variant[2], ns["STEPS"], ns["PLAIN_K"], ns["PLAIN_V"]
    k_chunk_bytes, max_registers = ns["K_CHUNK_BYTES"], ns["MAX_REGISTERS"]

    def bind(names, template=None):
        """template as a device function whose globals include the instance's constants (`names`, else ns)."""
        if template is None:
            names, template = ns, names
        return device(types.FunctionType(template.__code__, {**template.__globals__, **names}, template.__name__))

    ns.update(FILL_G=unrolled(bind(_fill_step), g, 2),
              FILL_ACC=unrolled(bind(_fill_step), g * ul * u, 2), V_COL=bind(_v_col))
    ns.update(LOAD_K=unrolled(bind(_load_k_step), k_chunk_bytes // 4, 3),
              KQ_PART=unrolled(bind(_kq_part_step), 2, 7), KQ_UNROLL=g <= 4,
              GET_G=unrolled(bind(_get_step), g, 3), PUT_G=unrolled(bind(_put_step), g, 3))
    ns.update(LOAD_GROUP=unrolled(bind(_load_group_step), d // 64, 5),
              GROUP_HEADS=unrolled(bind(_group_head_step), g, 6))
    ns.update(LOAD_GROUPS=unrolled(bind(_load_groups_step), kg, 4),
              GROUPS_HEADS=unrolled(bind(_groups_heads_step), kg, 5))
    ns.update(KQ_PLAIN=unrolled(bind(_kq_plain_step), 8 // kg, 6) if k_groups == 0 else bind(_kq_plain))
    ns.update(KQ_HEADS=unrolled(bind(_kq_head_step), g, 7))
    def bind_stage(rb, wide, unit, swizzle):
        """_stage_rows for rows of rb bytes: 16-byte chunks (wide; swizzled or not) or words, into a buffer of
        `unit` elements a word."""
        c = dict(S_RB=rb, S_WORDS=rb // 4, S_WIDE=wide, S_UNIT=unit, S_SWIZZLE=swizzle)
        c.update(STAGE_PIECE=bind({**ns, **c}, _stage_piece))
        c.update(STAGE_COPY=unrolled(bind({**ns, **c}, _stage_copy_step), rb // 16 if wide else rb // 4, 5))
        return bind({**ns, **c}, _stage_rows)
    ns.update(STAGE_K_ROWS=bind_stage(k_rb, plain_k, 1, True), STAGE_V_ROWS=bind_stage(v_rb, plain_v, 4, False))
    ns.update(SOFTMAX_HEAD=bind(_softmax_head), PREFETCH=bind(_prefetch_tile))
    ns.update(KQ_CHUNKS=unrolled(bind(_kq_chunk_step), d // 64, 9))
    ns.update(KQ_TOKEN=bind(_kq_token), SOFTMAX=unrolled(bind(_softmax_step), g, 7),
              LOAD_V=unrolled(bind(_load_v_step), nb * ul, 7),
              V_HEADS=unrolled(bind(_v_head_step), g, 7))
    ns.update(V_FMA=unrolled(bind(_v_fma_step), ul * u, 6))
    ns.update(V_TOKENS=unrolled(bind(_v_token_step), nb, 7))
    ns.update(FIRST_V=bind(_first_v))
    ns.update(V_BATCHES=unrolled(bind(_v_batch_step), steps // nb, 11, start=1),
              PUT_MAX=unrolled(bind(_put_max_step), g, 3), STORE_ACC=unrolled(bind(_store_acc_step), ul * u, 6))
    ns.update(END_HEADS=unrolled(bind(_end_head_step), g, 17))
    if SIM:   # the same values through one exchange of all lanes' values instead of a shuffle each
        ns.update(SOFTMAX=bind(_sim_softmax))
    jit = dict(JIT, max_registers=max_registers) if max_registers and not SIM else JIT
    name = (f"flash_partials_{type_k}_{type_v}_{d}_{g}_{max_registers}_{variant[1]}_{kg}_{int(ns['STAGE_V'])}"
            f"{'d' if ns['DYN_BYTES'] else ''}")
    return _instantiate(_partials, name, jit, **ns)


@functools.cache
def combine_kernel(d: int):
    """flash_attn_combine_results: out[r] = sum_l e^(max_l - max) parts[r, l] / sum_l e^(max_l - max) sum_l."""
    @cuda.jit(**JIT)
    def kernel(parts, meta, out, splits):
        """parts (R * splits * d,), meta (R * splits * 2,), out (R * d,): flat, row-major."""
        row = cuda.blockIdx.x
        c = cuda.threadIdx.x
        at = row * splits
        kq_max = meta[2 * at]
        for s in range(1, splits):
            kq_max = max(kq_max, meta[2 * (at + s)])
        num = ZERO
        den = ZERO
        for s in range(splits):
            f = expf(meta[2 * (at + s)] - kq_max)
            num += f * parts[(at + s) * d + c]
            den += f * meta[2 * (at + s) + 1]
        out[row * d + c] = div_approx(num, den)

    return kernel


def plan(n_groups: int, n_kv: int, n_sm: int = 132, splits: int | None = None) -> tuple[int, int]:
    """(splits, tiles per split) of the context: ~16 blocks per SM over n_groups (sequence, KV head,
    G heads) blocks, whole 128-token tiles, equal shares (the last may be shorter or empty)."""
    tiles = -(-n_kv // NT)
    want = splits or max(1, -(-16 * n_sm // max(1, n_groups)))
    tps = max(1, -(-tiles // want))
    return (splits or -(-tiles // tps)), tps


# ---- host side -------------------------------------------------------------------------------------
# A call's host work, after the first of its shapes: its geometry and layout checks are cached by shape
# (_geometry, _row_layout), its scratch is the stream's (_scratch), and kvlab.kernels.cuda's _call replays
# the launches that the first call of the same key made through numba's dispatcher (cuLaunchKernel with
# this call's addresses): no allocation but the output, no host wait, microseconds.
_SCRATCH = {}   # (device, stream) -> (parts, meta), flat float32; ("no mask", device) -> (1, 1) bool


def _is_torch(a) -> bool:
    return hasattr(a, "stride") and callable(a.stride)


@functools.cache
def _sm_count() -> int:
    return cuda.get_current_device().MULTIPROCESSOR_COUNT


def launch_variant(type_k: int, type_v: int, d: int, g: int, variant: tuple, optin: int) -> tuple:
    """(variant, dynamic shared bytes) of a launch on a GPU that allows a block `optin` bytes of shared memory:
    the variant as it is, or without staged V where its dynamic shared memory does not fit beside up to 48 KB
    of static (sm_75 allows 64 KB: the V rows are read from global memory there)."""
    shared = layout(type_k, type_v, d, g, variant)["DYN_BYTES"]
    if shared and 48 * 1024 + shared > optin:
        return (*variant[:3], False), 0
    return variant, shared


@functools.cache
def _shared_optin() -> int:
    """The most shared memory (static + dynamic) a block may be allowed on this GPU, in bytes."""
    return cuda.get_current_device().MAX_SHARED_MEMORY_PER_BLOCK_OPTIN


@functools.lru_cache(maxsize=4096)
def _geometry(b, h, dk, n_hkv, n_kv, v_row_bytes, type_k, type_v, splits, n_sm):
    """(Dv, G, splits) of a call, its head sizes checked."""
    dv = v_row_bytes // TYPE_SIZES[type_v] * (1 if type_v in PLAIN else 32)
    if dk != dv or dk % 64 or dk > 512:
        raise ValueError(f"flash_decode (CUDA): head sizes must be equal multiples of 64 up to 512 "
                         f"(ggml's vector kernel: D % 64 == 0), got K {dk}, V {dv}")
    if n_kv == 0:
        raise ValueError("flash_decode: the cache holds no rows")
    g = cols_per_block(h // n_hkv, dk, type_v)
    return dv, g, plan(b * h // g, n_kv, n_sm, splits)[0]


def _byte_strides(raw) -> tuple:
    """The strides of a uint8 device array in bytes (torch's, in elements, are bytes here)."""
    if _is_torch(raw):
        return tuple(raw.stride())
    iface = getattr(raw, "__cuda_array_interface__", None)
    if iface is None:
        return tuple(raw.strides)                                             # the simulator's arrays
    return tuple(iface["strides"]) if iface.get("strides") else kc._c_strides(tuple(iface["shape"]), 1)


@functools.lru_cache(maxsize=4096)
def _row_layout(shape, strides, what):
    """((batch, head, row) strides in bytes, span: the bytes the kernel may address from the first row) of
    a (B, Hkv, L, row_bytes) cache whose rows sit in a C-contiguous (B, Hkv, capacity, row_bytes) buffer
    (L <= capacity)."""
    b, h, n, row_bytes = shape
    s0, s1, s2, s3 = strides
    if s3 != 1 or s2 != row_bytes or s1 % row_bytes or s1 // row_bytes < n or (b > 1 and s0 != h * s1):
        raise ValueError(f"flash_decode: {what} must be rows of a C-contiguous (B, Hkv, capacity, row_bytes) "
                         f"buffer, got strides {strides} for shape {shape}")
    return (s0, s1, s2), b * h * s1


def _flat_rows(raw, span, align, what):
    """raw as the kernel reads it: a flat uint8 array of `span` bytes from its first row, described by
    its address and span only (an _Interface), so that calls at other context lengths L share the key."""
    d = kc._describe(raw)
    if d is None:                                                              # the simulator's arrays
        return raw.reshape(span)
    if kc._dtype(d[1]) != np.uint8:
        raise ValueError(f"flash_decode: {what} must be uint8, got {kc._dtype(d[1])}")
    if d[3] % align:
        raise ValueError(f"flash_decode: {what} must start at a {align}-byte aligned address")
    return kc._Interface(dict(shape=(span,), typestr="|u1", data=(d[3], False), strides=None, version=3))


def _empty(like, n: int):
    """n float32 on the device: a torch tensor beside `like` (torch's allocator, its current stream), else
    a numba device array."""
    if like is None:
        return cuda.device_array(n, np.float32)
    torch = sys.modules["torch"]
    return torch.empty(n, dtype=torch.float32, device=like.device)


def _scratch(n_parts: int, n_meta: int, device, stream: int, like):
    """(parts, meta) of at least n_parts, n_meta float32 for a call on `stream`: one pair per (device,
    stream), reused by every call there (the stream orders them: a call's combine has read its partials
    before the next call's partials kernel writes), grown to powers of two. A CUDA graph captured with
    a call keeps its capture stream's pair: replay it on one stream at a time."""
    have = _SCRATCH.get((device, stream))
    if have is None or have[0].shape[0] < n_parts or have[1].shape[0] < n_meta:
        have = _SCRATCH[device, stream] = (_empty(like, 1 << (n_parts - 1).bit_length()),
                                           _empty(like, 1 << (n_meta - 1).bit_length()))
    return have


def _no_mask(device, like):
    """The (1, 1) bool array the kernel takes (and does not read) for mask None, one per device."""
    have = _SCRATCH.get(("no mask", device))
    if have is None:
        if like is None:
            have = cuda.to_device(np.ones((1, 1), np.bool_))
        else:
            torch = sys.modules["torch"]
            have = torch.ones((1, 1), dtype=torch.bool, device=like.device)
        _SCRATCH["no mask", device] = have
    return have


def flash_decode(q, k_raw, v_raw, type_k: int, type_v: int, mask, scale, splits: int | None = None):
    """Attention of q (B, H, Dk) float32 (CUDA) over the ggml rows k_raw (B, Hkv, L, Dk row bytes) and
    v_raw (B, Hkv, L, Dv row bytes) uint8 (CUDA), of ggml types type_k, type_v (enum ggml_type values);
    mask None or (B, L) bool (True = attend); scale a float.
    Returns (B, H, Dv) float32: a torch tensor when q is one, else a numba device array.
    Inputs are checked by kvlab.flash.check_inputs; here only what the kernel itself needs."""
    call, values, out = _prepare(q, k_raw, v_raw, type_k, type_v, mask, scale, splits)
    kc._call(*call, values=values)
    return out


def launcher(q, k_raw, v_raw, type_k: int, type_v: int, mask, scale, splits: int | None = None):
    """(launch, out): flash_decode's host preparation done once, so that launch() only enqueues the
    partials and combine kernels writing out (B, H, Dv) (the replay of kvlab.kernels.cuda's _call). For
    benchmarks: the kernels' own time without the Python preparation around them."""
    call, values, out = _prepare(q, k_raw, v_raw, type_k, type_v, mask, scale, splits)
    return (lambda: kc._call(*call, values=values)), out


def prefetch_mode(type_k: int, type_v: int) -> int:
    """The L2 prefetch mode of a launch (PREFETCH's): PREFETCH, or by default -1 (this tile's V, the next
    tile's K) for quantized K and V, 0 (none) otherwise."""
    if PREFETCH is not None:
        return int(PREFETCH)
    return -1 if type_k not in PLAIN and type_v not in PLAIN else 0


def _prepare(q, k_raw, v_raw, type_k, type_v, mask, scale, splits):
    """(kvlab.kernels.cuda._call's arguments, its values=, out) of a call. Launches go to the stream the
    arrays name (kvlab.kernels.cuda._implied_stream: torch's current stream for a CUDA tensor, else the
    __cuda_array_interface__ 'stream'), so the kernels follow the writes that made their inputs with no
    host wait, also inside torch.cuda.stream(s) and a CUDA-graph capture (the simulator: stream 0)."""
    is_torch = _is_torch(q)
    if is_torch:
        torch = sys.modules["torch"]
        if q.dtype != torch.float32 or not q.is_contiguous():
            q = q.float().contiguous()
        if mask is not None:
            mask = torch.as_tensor(mask, device=q.device).to(torch.bool).contiguous()
    elif mask is not None and not hasattr(mask, "copy_to_host") and not hasattr(mask, "__cuda_array_interface__"):
        mask = cuda.to_device(np.ascontiguousarray(mask, np.bool_))            # a host mask
    b, h, dk = q.shape
    k_shape, v_shape = tuple(k_raw.shape), tuple(v_raw.shape)
    dv, g, n_splits = _geometry(b, h, dk, k_shape[1], k_shape[2], v_shape[3], type_k, type_v, splits,
                                1 if SIM else _sm_count())
    kst, k_span = _row_layout(k_shape, _byte_strides(k_raw), "k_raw")
    vst, v_span = _row_layout(v_shape, _byte_strides(v_raw), "v_raw")
    n_kv = k_shape[2]
    if mask is not None and tuple(mask.shape) != (b, n_kv):
        raise ValueError(f"flash_decode: mask must be (B, L) = {(b, n_kv)}, got {tuple(mask.shape)}")
    stream = 0 if SIM else kc._implied_stream((q, k_raw, v_raw))
    k_flat = _flat_rows(k_raw, k_span, 16 if type_k in PLAIN else 4, "k_raw")
    v_flat = _flat_rows(v_raw, v_span, 16 if type_v in PLAIN else 4, "v_raw")
    device = q.get_device() if is_torch else "numba"
    like = q if is_torch else None
    rows = b * h
    parts, meta = _scratch(rows * n_splits * dv, rows * n_splits * 2, device, stream, like)
    if is_torch:
        out = torch.empty((b, h, dv), dtype=torch.float32, device=q.device)
    else:
        out = cuda.device_array((b, h, dv), np.float32)
    if n_splits == 1:
        parts = out                                        # the partials kernel writes the result itself
    no_mask = _no_mask(device, like) if mask is None else None
    # the key: shapes (the context length L only through the split count and a mask's shape), strides,
    # types, scale; L itself is a value the replay sets (kvlab.kernels.cuda._Value)
    scalars = (type_k, type_v, np.float32(scale), n_splits, kst, vst, prefetch_mode(type_k, type_v), VARIANT)
    arrays = (q, k_flat, v_flat, mask, parts, meta, out)
    call = ("flash_decode", scalars, None, arrays, stream, _launch_checked, *arrays, no_mask, k_shape[1], g, scalars,
            n_kv)
    return call, (n_kv,), out


def _launch_checked(q, k_flat, v_flat, mask, parts, meta, out, no_mask, n_hkv, g, scalars, n_kv, stream):
    """The partials and combine launches of a call (kvlab.kernels.cuda._launch: recorded by _call)."""
    type_k, type_v, scale, n_splits, kst, vst, prefetch, variant = scalars
    qv = kc._view(q, "q", np.float32, 3)
    b, h, dk = qv.shape
    kv = kc._view(k_flat, "k_raw", np.uint8, 1)
    vv = kc._view(v_flat, "v_raw", np.uint8, 1)
    mv = kc._view(no_mask if mask is None else mask, "mask", np.dtype(np.bool_), 2)
    pv = kc._view(parts, "parts", np.float32, len(parts.shape))
    mtv = kc._view(meta, "meta", np.float32, 1)
    ov = kc._view(out, "out", np.float32, 3)
    rows = b * h
    variant, shared = launch_variant(type_k, type_v, dk, g, variant, 1 << 30 if SIM else _shared_optin())
    kc._launch(partials_kernel(type_k, type_v, dk, g, variant), (rows // g, n_splits), NT,
               [kc._Flat(qv), kc._Flat(kv), kc._Flat(vv), kst, vst, kc._Value(0, n_kv), h, h // n_hkv, kc._Full(mv),
                mask is not None, scale, prefetch, kc._Flat(pv), kc._Flat(mtv)], stream, shared)
    if n_splits > 1:
        dv = ov.shape[2]
        kc._launch(combine_kernel(dv), rows, dv, [kc._Flat(pv), kc._Flat(mtv), kc._Flat(ov), n_splits], stream)
