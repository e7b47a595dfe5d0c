"""Per-block quantizers and dequantizers as CUDA device functions, for all three flavors, and the
per-value conversions of f32/f16/bf16: each type's pair is a DeviceCodec (end of the file), which
kvlab.types' TypeInfo.gpu_codec() returns and kernels.py instantiates its kernels with.

A block's 32 float32 are in registers: ``row``, a 32-element local array that only constant indices
touch (every per-value loop is written out by unroll.unrolled). ``quantize_<type>(row, y, o, flavor,
lut, kv)`` writes the block's type_size bytes at byte ``o`` of the flat uint8 ``y`` (the shared staging
buffer); ``dequantize_<type>(y, o, row, kv)`` is the reverse. Every quantizer takes the shared tables
lut and kv (BEST_INDEX_LUT and the iq4_nl levels; only iq4_nl reads them) so that one kernel template
calls any of them, as set-rows.cu calls any ``quantize_f32_<type>_block``. Every field of every
block struct starts on an even byte (o too), so bytes move as 16-bit accesses; packed nibbles and
bytes (qs, qh) are gathered in 32-bit words in registers first (``words``, a local array too).
The arithmetic is spelled with kernels/cuda/ops.py so every rounding is the one the flavor's C code
does: ``ref``/``cpu`` as ggml-quants.c (and x86's q8_0), ``cuda`` as ggml-cuda's cpy-utils.cuh
under -use_fast_math (tools/cuda_golden/PTX_NOTES.md). The CPU kernels
(kvlab.kernels.<type>) define the same bytes; tests/kernels/test_cuda_sim.py checks both agree.
"""
from typing import Callable, NamedTuple

import numpy as np
from numba import cuda

from .. import CPU, CUDA, QK, REF
from ..fp import bf16_bits as cpu_bf16_bits
from ..iq4_nl import KVALUES_F32 as KVALUES
from .ops import (SIM, add, add_ftz, add_rm, device, div, f16_bits_to_f32, f32_bits, f32_from_bits,
                  f32_to_f16_bits, fma_ftz, fma_rm, fmax, fmax_ftz, fmin, fmin_ftz, ftz, ld_u16, mul, mul_ftz, ptx_i32, ptx_u32, rcp_approx,
                  round_even, roundf, st_u16, sub, sub_ftz)
from .unroll import unrolled

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
_GROUP_MAX_EPS = F(1e-15)
_KV_FIRST = F(-127.0)
_MAGIC_BITS = 0x4B000000        # the bits of 2^23: floats from there to 2^24 are the integers
_TWO23_PLUS_8 = F(2.0 ** 23 + 8)


# best_index's floors, on floats 1 apart (2^23 .. 2^24), where rounding toward -inf floors: for y in
# [-256, 256), RM(y + _U_MAGIC) has the bits _MAGIC_BITS + u, u = floor(y) + 256 (0 .. 511), and
# RM(y / 4 + _U4_MAGIC) (an fma: y / 4 exact) has _MAGIC_BITS + floor(u / 4), whose bits 2 .. 6 are
# 4 * floor(u / 16): the byte offset of u's bucket in a 32-word table.
_U_MAGIC = F(2.0 ** 23 + 256)
_U4_MAGIC = F(2.0 ** 23 + 64)
_BUCKET_BYTES = np.uint32(0x7C)
_INDEX_SHIFT = 28                            # the index is the top 4 bits of the bits of RM(y + _U_MAGIC) + entry


def _best_index_lut():
    """best_index's table, for u = floor(2x) + 256 (doubling is exact, and every decision point
    m = (KVALUES[k] + KVALUES[k + 1]) / 2 is a multiple of 1/2, so x >= m iff u >= 2m + 256). Entry b
    covers u = 16b .. 16b + 15, which holds at most one point (they are >= 23 apart in u): with c the
    points below the bucket and p the one inside (16b + 16 for none), entry b = (c + 1) 2^28 - p -
    _MAGIC_BITS mod 2^32, so that (_MAGIC_BITS + u) + entry b = (c + 1) 2^28 + (u - p): its top 4 bits
    are c + 1 when u >= p, else c (the borrow). c = 15 has no point inside: (c + 1) 2^28 wraps to 0,
    and u - p < 0 borrows back to 15."""
    points = (KVALUES[:-1] + KVALUES[1:]).astype(np.int64) + 256          # 2m + 256, increasing
    lut = np.zeros(32, np.uint32)
    for b in range(32):
        inside = points[(points > 16 * b) & (points <= 16 * b + 15)]
        p = int(inside[0]) if inside.size else 16 * b + 16
        c = int((points <= 16 * b).sum())
        lut[b] = ((c + 1) << _INDEX_SHIFT) - p - _MAGIC_BITS & 0xFFFFFFFF
    return lut


BEST_INDEX_LUT = _best_index_lut()

# Array indices are unsigned: numba adds a negative-index wrap-around to every signed index, which was
# most of the instructions per value (ncu: the quantizers were SM-bound); o comes unsigned. The 16-bit
# accesses (ld_u16/st_u16, no wrap-around) take o + offset as it is, 64-bit: a cast back to uint32
# would mask every address (its wrap), and the offsets would not fold into the shared stores.


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
def load_half(y, o, off):
    return f16_bits_to_f32(ld_u16(y, o + off))


@device
def put_u32(y, at, v):
    st_u16(y, at, np.uint16(v & np.uint32(0xFFFF)))
    st_u16(y, at + 2, np.uint16(v >> np.uint32(16)))


@device
def get_u32(y, at):
    return np.uint32(ld_u16(y, at)) | (np.uint32(ld_u16(y, at + 2)) << np.uint32(16))


@device
def _put_word(y, at, words, w):
    put_u32(y, at + 4 * w, words[w])


@device
def _get_word(y, at, words, w):
    words[w] = get_u32(y, at + 4 * w)


@device
def _fill_word(words, v, w):
    words[w] = v


put_words_4 = unrolled(_put_word, 4, 3)     # (y, at, words): words[0:4] -> bytes at .. at + 16
put_words_8 = unrolled(_put_word, 8, 3)
get_words_4 = unrolled(_get_word, 4, 3)     # (y, at, words): bytes at .. at + 16 -> words[0:4]
get_words_8 = unrolled(_get_word, 8, 3)
fill_words_4 = unrolled(_fill_word, 4, 2)     # (words, v): words[0:4] <- v
fill_words_5 = unrolled(_fill_word, 5, 2)
fill_words_8 = unrolled(_fill_word, 8, 2)


@device
def set_byte(words, j, b):
    """Byte j of the little-endian words <- the low byte of b (byte j still zero)."""
    words[j >> 2] |= (np.uint32(b) & np.uint32(0xFF)) << np.uint32(8 * (j & 3))


@device
def get_byte(words, j):
    return np.int32((words[j >> 2] >> np.uint32(8 * (j & 3))) & np.uint32(0xFF))


@device
def add_nibble(words, q, j):
    """The qs nibble of value j (still zero) <- q <= 15 (uint32): an add, which the compiler makes one
    LEA or IMAD where an or would take a shift and a LOP3."""
    words[(j & 15) >> 2] += q << np.uint32(8 * (j & 3) + 4 * (j >> 4))


@device
def get_nibble(words, j):
    """The qs nibble of value j (byte j % 16: its low nibble, the high one for j >= 16), as uint32."""
    return (words[(j & 15) >> 2] >> np.uint32(8 * (j & 3) + 4 * (j >> 4))) & np.uint32(0xF)


@device
def nibble_plus_2_23(words, j):
    """2^23 + nibble j as a float32, made from its bits: less 2^23 (+ an offset), one exact subtraction,
    it is the nibble's value with no int -> float conversion."""
    return f32_from_bits(get_nibble(words, j) | np.uint32(_MAGIC_BITS))


@device
def x86_i32(v):
    """(int)v as x86 cvttss2si: NaN and out of range -> INT_MIN (kvlab's definition of C's UB).
    cvt.rzi saturates, so below -2^31 it already gives INT_MIN: one compare (false for NaN) and a select."""
    return ptx_i32(v) if v < _TWO31 else _INT_MIN


@device
def low_i8(n):
    """The signed low byte of an int: C's (int8_t) store."""
    return np.int32(((np.int32(n) & np.int32(0xFF)) ^ np.int32(0x80)) - np.int32(0x80))


@device
def to_i8(v, flavor):
    return low_i8(ptx_i32(v) if flavor == CUDA else x86_i32(v))


@device
def in_range(idv):
    """A block's 1/d is finite: then every t the quantizers convert is NaN or within [-129, 129] (|x| d^-1
    <= levels (1 + 2^-21), d >= 2^-128 normal enough), where cvttss2si, cvt.rzi and the int8 cast all give
    the same int: the fast path converts with cvt.rzi alone (3 instructions a value fewer). Not for q8_0's
    cpu flavor, which saturates NaN to -128."""
    return abs(idv) < np.float32(np.inf)


@device
def recip(d, flavor):
    """`d ? 1.0f/d : 0.0f`: IEEE, or rcp.approx.ftz with a subnormal d counting as 0."""
    if flavor == CUDA:
        return rcp_approx(d) if ftz(d) != _ZERO else _ZERO
    return div(_ONE, d) if d != _ZERO else _ZERO


@device
def _lo(a, b, flavor):
    return fmin_ftz(a, b) if flavor == CUDA else fmin(a, b)


@device
def _hi(a, b, flavor):
    return fmax_ftz(a, b) if flavor == CUDA else fmax(a, b)


def _min_max_tree_source():
    """min_max_tree(row, flavor): (min, max) of the 32 values by a tree of min/max.f32 (flushed
    compares for cuda), NaN dropped (NaN only when all are); any order gives the same but for the sign
    of a zero result."""
    lines = [f"lo{k}, hi{k} = _lo(row[{2 * k}], row[{2 * k + 1}], flavor), _hi(row[{2 * k}], row[{2 * k + 1}], flavor)"
             for k in range(QK // 2)]
    w = QK // 4
    while w:
        lines += [f"lo{k}, hi{k} = _lo(lo{k}, lo{k + w}, flavor), _hi(hi{k}, hi{k + w}, flavor)" for k in range(w)]
        w //= 2
    return "def min_max_tree(row, flavor):\n" + "".join(f"    {line}\n" for line in lines) + "    return lo0, hi0\n"


def _compile_min_max_tree():
    scope = {"_lo": _lo, "_hi": _hi}
    exec(_min_max_tree_source(), scope)
    return device(scope["min_max_tree"])


min_max_tree = _compile_min_max_tree()


def _compile_abs_max_tree():
    """abs_max_ftz(row): max.ftz.f32 of the 32 |values| by a tree, NaN dropped (NaN only when all are)."""
    lines = [f"m{k} = fmax_ftz(abs(row[{2 * k}]), abs(row[{2 * k + 1}]))" for k in range(QK // 2)]
    w = QK // 4
    while w:
        lines += [f"m{k} = fmax_ftz(m{k}, m{k + w})" for k in range(w)]
        w //= 2
    scope = {"fmax_ftz": fmax_ftz}
    exec("def abs_max_ftz(row):\n" + "".join(f"    {line}\n" for line in lines) + "    return m0\n", scope)
    return device(scope["abs_max_ftz"])


abs_max_ftz = _compile_abs_max_tree()


@device
def _signed_absmax_step(row, acc, flavor, j):
    v = row[j]
    a = ftz(abs(v)) if flavor == CUDA else abs(v)
    if a > acc[0]:
        acc[0] = a
        acc[1] = v


_signed_absmax = unrolled(_signed_absmax_step, QK, 3)


@device
def _signed_absmax_serial(row, flavor):
    acc = cuda.local.array(2, np.float32)
    acc[0] = _ZERO
    acc[1] = _ZERO
    _signed_absmax(row, acc, flavor)
    return acc[0], acc[1]


@device
def signed_absmax(row, flavor):
    """(amax, vmax): the first value of largest magnitude, strict compare (NaN never wins; cuda: of the
    flushed magnitudes). From the row's min and max (a tree of min/max.f32, 2 instructions a value, not 3):
    when max > -min every value of largest magnitude is max (and max > 0, so not flushed), when -min > max
    every one is min; otherwise (a tie of +m and -m, all zeros or all NaN) the serial scan decides."""
    lo, hi = min_max_tree(row, flavor)
    if hi > -lo:
        return hi, hi
    if -lo > hi:
        return -lo, lo
    return _signed_absmax_serial(row, flavor)


# ---- q8_0 -------------------------------------------------------------------------------------
@device
def _max_ps(a, b):
    return a if a > b else b        # maxps / ggml's MAX: the second operand when either is NaN


@device
def _avx_lane(row, lane):
    return _max_ps(_max_ps(_max_ps(abs(row[lane]), abs(row[8 + lane])), abs(row[16 + lane])), abs(row[24 + lane]))


@device
def _avx_absmax(row):
    """x86 AVX2 quantize_row_q8_0's reduction order: 8 lanes of 4, then halves, movehl, movehdup."""
    low = _max_ps(_max_ps(_avx_lane(row, 4), _avx_lane(row, 0)), _max_ps(_avx_lane(row, 6), _avx_lane(row, 2)))
    high = _max_ps(_max_ps(_avx_lane(row, 5), _avx_lane(row, 1)), _max_ps(_avx_lane(row, 7), _avx_lane(row, 3)))
    return _max_ps(low, high)


@device
def _q8_absmax_step(row, acc, flavor, j):
    a = abs(row[j])
    if flavor == CUDA:
        a = ftz(a)
        if a > acc[0]:                  # fmaxf: NaN loses
            acc[0] = a
    else:
        acc[0] = _max_ps(acc[0], a)


_q8_absmax = unrolled(_q8_absmax_step, QK, 3)


@device
def _q8_byte(row, words, idv, flavor, fast, j):
    v = row[j]
    if flavor == CPU:
        n = min(max(x86_i32(round_even(mul(v, idv))), np.int32(-128)), np.int32(127))    # packs saturate
    elif flavor == CUDA:
        n = ptx_i32(roundf(mul_ftz(v, idv)))
    elif fast:
        n = ptx_i32(roundf(mul(v, idv)))
    else:
        n = x86_i32(roundf(mul(v, idv)))
    set_byte(words, j, n)


_q8_bytes = unrolled(_q8_byte, QK, 5)


@device
def quantize_q8_0(row, y, o, flavor, lut, kv):
    if flavor == CPU:
        amax = _avx_absmax(row)
        d = div(amax, F(127.0))
        idv = div(F(127.0), amax) if amax != _ZERO else _ZERO
    else:
        if flavor == CUDA:
            amax = abs_max_ftz(row)             # fmaxf of flushed magnitudes from 0: the serial loop's max
            if not amax > _ZERO:
                amax = _ZERO                    # all NaN (or all zero / subnormal)
            d = mul_ftz(amax, _INV_127)
        else:
            acc = cuda.local.array(1, np.float32)
            acc[0] = _ZERO
            _q8_absmax(row, acc, flavor)
            d = div(acc[0], F(127.0))
        idv = recip(d, flavor)
    st_u16(y, o, half_bits(d, flavor))
    words = cuda.local.array(8, np.uint32)
    fill_words_8(words, np.uint32(0))
    if flavor == REF and in_range(idv):
        _q8_bytes(row, words, idv, flavor, True)
    else:
        _q8_bytes(row, words, idv, flavor, False)
    put_words_8(y, o + 2, words)


@device
def _dq8_value(words, row, d, j):
    row[j] = mul(F(low_i8(get_byte(words, j))), d)


_dq8_values = unrolled(_dq8_value, QK, 3)


@device
def dequantize_q8_0(y, o, row, kv):
    words = cuda.local.array(8, np.uint32)
    get_words_8(y, o + 2, words)
    _dq8_values(words, row, load_half(y, o, 0))


# ---- q4_0 / q5_0: d = max / -8 (-16), x*id + 8.5 (16.5) ----------------------------------------
@device
def _sym_scale(row, y, o, flavor, neg_levels, inv_levels):
    vmax = signed_absmax(row, flavor)[1]
    d = mul_ftz(vmax, inv_levels) if flavor == CUDA else div(vmax, neg_levels)
    st_u16(y, o, half_bits(d, flavor))
    return recip(d, flavor)


@device
def _sym_q(v, idv, offset, top, flavor, fast):
    """fast (in_range): t in [0, 2 top + 2] or NaN, so the int8 cast is the int itself."""
    t = fma_ftz(v, idv, offset) if flavor == CUDA else add(mul(v, idv), offset)
    if fast:
        return min(np.int32(top), ptx_i32(t))
    return min(np.int32(top), to_i8(t, flavor))


@device
def _q4_0_byte(row, words, idv, flavor, fast, j):
    lo = _sym_q(row[j], idv, F(8.5), 15, flavor, fast)
    hi = _sym_q(row[j + 16], idv, F(8.5), 15, flavor, fast)
    set_byte(words, j, lo | (hi << 4))           # unmasked, as in C


_q4_0_bytes = unrolled(_q4_0_byte, 16, 5)


@device
def quantize_q4_0(row, y, o, flavor, lut, kv):
    idv = _sym_scale(row, y, o, flavor, F(-8.0), F(-0.125))
    words = cuda.local.array(4, np.uint32)
    fill_words_4(words, np.uint32(0))
    if in_range(idv):
        _q4_0_bytes(row, words, idv, flavor, True)
    else:
        _q4_0_bytes(row, words, idv, flavor, False)
    put_words_4(y, o + 2, words)


@device
def _dq4_0_value(words, row, d, j):
    row[j] = mul(sub(nibble_plus_2_23(words, j), _TWO23_PLUS_8), d)     # (q - 8) d: the subtraction is exact


_dq4_0_values = unrolled(_dq4_0_value, QK, 3)


@device
def dequantize_q4_0(y, o, row, kv):
    words = cuda.local.array(4, np.uint32)
    get_words_4(y, o + 2, words)
    _dq4_0_values(words, row, load_half(y, o, 0))


@device
def _q5_set(words, j, q0, q1):
    """qs byte j <- the low nibbles of q0, q1; qh (words[4]) bits j, j + 16 <- their fifth bits."""
    set_byte(words, j, (q0 & 0x0F) | ((q1 & 0x0F) << 4))
    words[4] |= (np.uint32((q0 >> 4) & 1) << np.uint32(j)) | (np.uint32((q1 >> 4) & 1) << np.uint32(j + 16))


@device
def _q5_get(words, qh, j):
    b = get_byte(words, j)
    return (b & 0x0F) | (np.int32((qh >> np.uint32(j)) & np.uint32(1)) << 4), \
        (b >> 4) | (np.int32((qh >> np.uint32(j + 16)) & np.uint32(1)) << 4)


@device
def _q5_0_pair(row, words, idv, flavor, fast, j):
    _q5_set(words, j, _sym_q(row[j], idv, F(16.5), 31, flavor, fast),
            _sym_q(row[j + 16], idv, F(16.5), 31, flavor, fast))


_q5_0_pairs = unrolled(_q5_0_pair, 16, 5)


@device
def quantize_q5_0(row, y, o, flavor, lut, kv):
    idv = _sym_scale(row, y, o, flavor, F(-16.0), F(-0.0625))
    words = cuda.local.array(5, np.uint32)
    fill_words_5(words, np.uint32(0))
    if in_range(idv):
        _q5_0_pairs(row, words, idv, flavor, True)
    else:
        _q5_0_pairs(row, words, idv, flavor, False)
    put_u32(y, o + 2, words[4])
    put_words_4(y, o + 6, words)


@device
def _dq5_0_pair(words, row, d, qh, j):
    q0, q1 = _q5_get(words, qh, j)
    row[j] = mul(F(q0 - 16), d)
    row[j + 16] = mul(F(q1 - 16), d)


_dq5_0_pairs = unrolled(_dq5_0_pair, 16, 4)


@device
def dequantize_q5_0(y, o, row, kv):
    words = cuda.local.array(4, np.uint32)
    get_words_4(y, o + 6, words)
    _dq5_0_pairs(words, row, load_half(y, o, 0), get_u32(y, o + 2))


# ---- q4_1 / q5_1: d = (max - min) / 15 (31), (x - min)*id + 0.5 -------------------------------


@device
def _zero_class(v, flavor):
    return (ftz(v) if flavor == CUDA else v) == _ZERO


@device
def _first_zero_step(row, acc, flavor, j):
    v = row[QK - 1 - j]                   # backwards: the first one is written last
    if _zero_class(v, flavor):
        acc[0] = v


_first_zero = unrolled(_first_zero_step, QK, 3)


@device
def first_zero(row, flavor):
    """The first value that compares equal to 0 (its sign, which the min/max tree loses)."""
    acc = cuda.local.array(1, np.float32)
    acc[0] = _ZERO
    _first_zero(row, acc, flavor)
    return acc[0]


@device
def min_max(row, flavor, from_first):
    """ggml's `if (v < min) min = v; if (v > max) max = v;` from FLT_MAX / -FLT_MAX, or from row[0]
    over the rest (from_first): the first of equal values kept, NaN never taken, setp.ftz comparing
    flushed values for cuda. The tree gives the same min and max except when one is 0: then it is the
    first value equal to 0 (the serial loop meets no smaller one before it). From a NaN row[0] the loop
    never moves."""
    lo, hi = min_max_tree(row, flavor)
    if from_first:
        if row[0] != row[0]:
            return row[0], row[0]
    else:
        lo = _lo(lo, _FLT_MAX, flavor)        # all NaN, or all +inf: FLT_MAX stays
        hi = _hi(hi, -_FLT_MAX, flavor)
    if _zero_class(lo, flavor):
        lo = first_zero(row, flavor)
    if _zero_class(hi, flavor):
        hi = first_zero(row, flavor)
    return lo, hi


@device
def _affine_scale(row, y, o, flavor, levels, inv_levels, from_first):
    lo, hi = min_max(row, flavor, from_first)
    d = mul_ftz(sub_ftz(hi, lo), inv_levels) if flavor == CUDA else div(sub(hi, lo), levels)
    st_u16(y, o, half_bits(d, flavor))
    st_u16(y, o + 2, half_bits(lo, flavor))
    return lo, recip(d, flavor)


@device
def _affine_t(v, lo, idv, flavor):
    if flavor == CUDA:
        return fma_ftz(sub_ftz(v, lo), idv, _HALF)
    return add(mul(sub(v, lo), idv), _HALF)


@device
def _i8_of(t, flavor, fast):
    return ptx_i32(t) if fast else to_i8(t, flavor)


@device
def _q4_1_byte(row, words, lo, idv, flavor, fast, j):
    q0 = min(np.int32(15), _i8_of(_affine_t(row[j], lo, idv, flavor), flavor, fast))
    q1 = min(np.int32(15), _i8_of(_affine_t(row[j + 16], lo, idv, flavor), flavor, fast))
    set_byte(words, j, q0 | (q1 << 4))


_q4_1_bytes = unrolled(_q4_1_byte, 16, 6)


@device
def quantize_q4_1(row, y, o, flavor, lut, kv):
    lo, idv = _affine_scale(row, y, o, flavor, F(15.0), _INV_15, False)
    words = cuda.local.array(4, np.uint32)
    fill_words_4(words, np.uint32(0))
    if in_range(idv):
        _q4_1_bytes(row, words, lo, idv, flavor, True)
    else:
        _q4_1_bytes(row, words, lo, idv, flavor, False)
    put_words_4(y, o + 4, words)


@device
def _dq4_1_value(words, row, d, m, j):
    row[j] = add(mul(F(get_nibble(words, j)), d), m)


_dq4_1_values = unrolled(_dq4_1_value, QK, 4)


@device
def dequantize_q4_1(y, o, row, kv):
    words = cuda.local.array(4, np.uint32)
    get_words_4(y, o + 4, words)
    _dq4_1_values(words, row, load_half(y, o, 0), load_half(y, o, 2))


@device
def _u8(t, flavor):
    """(uint8_t)t: low byte of cvt.rzi.u32 on CUDA, of cvttss2si on x86."""
    if flavor == CUDA:
        return np.int32(ptx_u32(t) & np.uint32(0xFF))
    return np.int32(x86_i32(t) & np.int32(0xFF))


@device
def _u8_of(t, flavor, fast):
    return ptx_i32(t) if fast else _u8(t, flavor)


@device
def _q5_1_pair(row, words, lo, idv, flavor, fast, j):
    _q5_set(words, j, _u8_of(_affine_t(row[j], lo, idv, flavor), flavor, fast),
            _u8_of(_affine_t(row[j + 16], lo, idv, flavor), flavor, fast))


_q5_1_pairs = unrolled(_q5_1_pair, 16, 6)


@device
def quantize_q5_1(row, y, o, flavor, lut, kv):
    lo, idv = _affine_scale(row, y, o, flavor, F(31.0), _INV_31, flavor == CUDA)
    words = cuda.local.array(5, np.uint32)
    fill_words_5(words, np.uint32(0))
    if in_range(idv):
        _q5_1_pairs(row, words, lo, idv, flavor, True)
    else:
        _q5_1_pairs(row, words, lo, idv, flavor, False)
    put_u32(y, o + 4, words[4])
    put_words_4(y, o + 8, words)


@device
def _dq5_1_pair(words, row, d, m, qh, j):
    q0, q1 = _q5_get(words, qh, j)
    row[j] = add(mul(F(q0), d), m)
    row[j + 16] = add(mul(F(q1), d), m)


_dq5_1_pairs = unrolled(_dq5_1_pair, 16, 5)


@device
def dequantize_q5_1(y, o, row, kv):
    words = cuda.local.array(4, np.uint32)
    get_words_4(y, o + 8, words)
    _dq5_1_pairs(words, row, load_half(y, o, 0), load_half(y, o, 2), get_u32(y, o + 4))


# ---- iq4_nl -----------------------------------------------------------------------------------
@device
def best_index(y, lut, clamp):
    """best_index_int8(16, kvalues_iq4nl, x) as ggml writes it, from y = 2x: the nearest level, a tie
    going up, NaN -> 15. Both sides of its `x - lo < hi - x` round monotonically and are equal at the
    exact midpoint m = (lo + hi) / 2, so the answer is the number of midpoints with !(x < m) (checked
    against ggml's search on all 2^32 floats); every m is a multiple of 1/2, so u = floor(y) + 256
    decides, and lut (BEST_INDEX_LUT in shared memory: 32 words, one per bank, so any lookups of a warp
    are one access) counts them: the index is the top 4 bits of u's bits plus its bucket's entry. Both
    floors round toward -inf on the FP32 pipe (no cvt), the entry is read at its byte offset: per value
    2 FP32 and 3 integer instructions and a load. Any y gives an index in 0 .. 15 from an entry of the
    table (a NaN one, a garbage index). clamp (a constant): fmin first, so a NaN becomes the top;
    without it y must be a number in [-256, 256) for the right index."""
    if clamp:
        y = fmax(fmin(y, F(255.0)), F(-256.0))
    e = lut[(f32_bits(fma_rm(y, F(0.25), _U4_MAGIC)) & _BUCKET_BYTES) >> np.uint32(2)]
    return np.uint32(f32_bits(add_rm(y, _U_MAGIC)) + e) >> np.uint32(_INDEX_SHIFT)     # 32-bit: the carry out drops


@device
def _twice_x(v, s, flavor, clamp):
    """2 idv v: clamp (s = idv) as 2 * (idv v); else s = 2 idv, and s v is that exactly (a power of two
    scales without rounding; below the normals only |2x| < 2^-125 can differ, which indexes 8 anyway)."""
    x = mul_ftz(v, s) if flavor == CUDA else mul(s, v)
    return add(x, x) if clamp else x


@device
def _iq4_ref_value(row, words, acc, idv, lut, kv, clamp, j):
    """ref: values in order 0 .. 31, the sums beside the indices (ggml sums in that order too)."""
    v = row[j]
    q = best_index(_twice_x(v, idv, REF, clamp), lut, clamp)
    k = kv[q]
    wk = mul(mul(v, v), k)
    acc[0] = add(acc[0], mul(wk, v))
    acc[1] = add(acc[1], mul(wk, k))
    add_nibble(words, q, j)


_iq4_ref_values = unrolled(_iq4_ref_value, QK, 7)


@device
def _iq4_cuda_pair(row, words, acc, idv, lut, kv, clamp, j):
    """cuda: the pairs (j, j + 16) in order j, the first product of a pair fused."""
    v0 = row[j]
    v1 = row[j + 16]
    q0 = best_index(_twice_x(v0, idv, CUDA, clamp), lut, clamp)
    q1 = best_index(_twice_x(v1, idv, CUDA, clamp), lut, clamp)
    add_nibble(words, q0, j)
    add_nibble(words, q1, j + 16)
    k0 = kv[q0]
    k1 = kv[q1]
    t0 = mul_ftz(mul_ftz(v0, v0), k0)
    t1 = mul_ftz(mul_ftz(v1, v1), k1)
    acc[0] = add_ftz(acc[0], fma_ftz(v0, t0, mul_ftz(v1, t1)))
    acc[1] = add_ftz(acc[1], fma_ftz(t0, k0, mul_ftz(t1, k1)))


_iq4_cuda_pairs = unrolled(_iq4_cuda_pair, 16, 7)


@device
def _iq4_indices_and_sums(row, words, acc, idv, lut, kv, flavor, clamp):
    """words[0:4] <- the packed indices, acc <- (sum of w q x, sum of w q^2); idv is 1/d with clamp,
    2/d without."""
    fill_words_4(words, np.uint32(0))
    acc[0] = _ZERO
    acc[1] = _ZERO
    if flavor == CUDA:
        _iq4_cuda_pairs(row, words, acc, idv, lut, kv, clamp)
    else:
        _iq4_ref_values(row, words, acc, idv, lut, kv, clamp)


@device
def _finite(v):
    return abs(v) < np.float32(np.inf)


@device
def quantize_iq4_nl(row, y, o, flavor, lut, kv):
    """lut: BEST_INDEX_LUT, kv: KVALUES, both in shared memory.
    With a finite 2/d every x = v / d is within 127 (1 + 1e-6) or NaN (v NaN, or v infinite and
    1/d = 0), so best_index runs on (2/d) v without its clamps; a NaN anywhere makes the sums NaN, and
    such blocks run again with them (NaN must index 15): three instructions a value fewer for the rest."""
    amax, vmax = signed_absmax(row, flavor)
    words = cuda.local.array(4, np.uint32)
    acc = cuda.local.array(2, np.float32)
    if flavor == CUDA:
        d = mul_ftz(vmax, _INV_M127)
        idv = recip(d, flavor)
    else:
        idv = div(_ONE, div(vmax, _KV_FIRST))
    idv2 = add(idv, idv)
    fast = _finite(idv2)
    if fast:
        _iq4_indices_and_sums(row, words, acc, idv2, lut, kv, flavor, False)
    if not (fast and _finite(acc[0]) and _finite(acc[1])):
        _iq4_indices_and_sums(row, words, acc, idv, lut, kv, flavor, True)
    if flavor == CUDA:
        if acc[1] > _ZERO:
            d = mul_ftz(acc[0], rcp_approx(acc[1]))
    else:
        d = div(acc[0], acc[1]) if acc[1] > _ZERO else _ZERO
        if amax < _GROUP_MAX_EPS:       # kvlab's bytes for ggml's stale-L[] case (see kernels/iq4_nl.py)
            d = _ZERO
            fill_words_4(words, np.uint32(0x88888888))
    st_u16(y, o, half_bits(d, flavor))
    put_words_4(y, o + 2, words)


@device
def _diq4_value(words, row, d, kv, j):
    row[j] = mul(d, kv[get_nibble(words, j)])


_diq4_values = unrolled(_diq4_value, QK, 4)


@device
def dequantize_iq4_nl(y, o, row, kv):
    words = cuda.local.array(4, np.uint32)
    get_words_4(y, o + 2, words)
    _diq4_values(words, row, load_half(y, o, 0), kv)


# ---- f32 / f16 / bf16: one value at a time, (v, flavor, in_simd_chunk) -> bits, bits -> v ----------
@device
def f32_value_bits(v, flavor, in_simd_chunk):
    return f32_bits(v)          # every flavor moves an f32 row unchanged, NaN payloads included


@device
def f16_bits(v, flavor, in_simd_chunk):
    """ref: software (NaN -> 0x7E00|sign); cpu: F16C inside a row's chunks of 4 (payload kept);
    cuda: cvt.rn.f16.f32 (NaN -> 0x7FFF)."""
    if v != v and flavor == CPU and in_simd_chunk:
        u = f32_bits(v)
        return np.uint16(((u >> np.uint32(16)) & np.uint32(0x8000)) | np.uint32(0x7E00)
                         | ((u & np.uint32(0x007FFFFF)) >> np.uint32(13)))
    return half_bits(v, flavor)


_bf16_round = device(cpu_bf16_bits.py_func)     # the CPU kernels' rounding, compiled for the GPU


@device
def bf16_bits(v, flavor, in_simd_chunk):
    return _bf16_round(f32_bits(v), flavor)


@device
def bf16_to_f32(h):
    return f32_from_bits(np.uint32(h) << np.uint32(16))


# ---- the codecs: what kernels.py instantiates its kernels with, per type ------------------------
class DeviceCodec(NamedTuple):
    """A type's device functions. Block types: quantize(row, y, o, flavor, lut, kv) and
    dequantize(y, o, row, kv) on one 32-value block; f32/f16/bf16: quantize(v, flavor, in_simd_chunk)
    -> the value's bits (uint32 / uint16) and dequantize(bits) -> float32. tables: the kernel stages
    BEST_INDEX_LUT and KVALUES in shared memory for it. lookahead: quantizing a tile takes long enough that
    a CUDA block takes several, loading the next while it quantizes one (kernels.TILES_PER_BLOCK)."""
    quantize: Callable
    dequantize: Callable
    tables: bool = False
    lookahead: bool = False


F32 = DeviceCodec(f32_value_bits, f32_from_bits)
F16 = DeviceCodec(f16_bits, f16_bits_to_f32)
BF16 = DeviceCodec(bf16_bits, bf16_to_f32)
Q8_0 = DeviceCodec(quantize_q8_0, dequantize_q8_0)
Q4_0 = DeviceCodec(quantize_q4_0, dequantize_q4_0)
Q4_1 = DeviceCodec(quantize_q4_1, dequantize_q4_1)
IQ4_NL = DeviceCodec(quantize_iq4_nl, dequantize_iq4_nl, tables=True, lookahead=True)
Q5_0 = DeviceCodec(quantize_q5_0, dequantize_q5_0)
Q5_1 = DeviceCodec(quantize_q5_1, dequantize_q5_1)
