"""Scalar helpers shared by the 32-value block kernels (q8_0, q4_0, q4_1, q5_*, iq4_nl), CPU only
(the GPU kernels spell the same operations as PTX instructions: kernels/cuda/ops.py).

Every helper works on block ``i`` of the whole arrays, ``x[i, j]`` / ``y[i, off]`` on the
(n_blocks, 32) float32 values and the (n_blocks, type_size) uint8 bytes, and is inlined into the
prange loop. Slicing ``x[i]`` there would cost an atomic reference count per block (shared by all
threads), more than the block's own work; loops run to ``x.shape[1]``, a run-time trip count, because
LLVM unrolls a constant 32 and then cannot vectorize the stores (it cannot tell x and y apart), while a
loop gets a run-time overlap check.

Bytes of block i:
  ``load_half(y, i, off)``        -> float32: the little-endian ggml_half at byte ``off``, widened exactly
  ``store_half(y, i, off, h)``    write uint16 ``h`` little-endian at ``off``
  ``store_u32(y, i, off, v)``     write uint32 ``v`` little-endian at ``off`` (q5's qh)
  ``pack_nibbles(lo, hi)``        -> uint8: the low byte of ``lo | hi << 4``, unmasked as in C
                                  (ggml: value j low, value j+16 high; q5 callers mask first)

C casts of float to integer, as the x86-64 build does them (C leaves NaN and
out-of-range undefined; these are the bytes x86 writes, kept as kvlab's definition):
  ``c_cast_i32(v)``               (int)v: truncate; NaN/out of range -> INT_MIN (cvttss2si, cvtps2dq)
  ``trunc_i8(v)``                 -> int: C's ``(int8_t)v`` on x86 (the low byte of c_cast_i32, signed)
  ``roundf32(v)``                 C roundf: halves away from zero (float32 result)
  ``round_even32(v)``             _mm256_round_ps(_MM_ROUND_NEAREST): halves to even (float32 result)
  ``add_half_away(v)``            v + copysign(0.49999997f, v): c_cast_i32 of it is c_cast_i32(roundf32(v))
                                  for all 2**32 floats (checked exhaustively), in two vector operations
  ``low_byte(i)``                 -> uint8: what storing an int into an int8_t/uint8_t keeps (mod 256)
  ``saturate_i8(i)``              -> uint8: packs_epi32 + packs_epi16 saturation, as int8 bits
  ``ptx_cast_i32(v)``             CUDA cvt.rzi.s32.f32: truncate, saturate, NaN -> 0
  ``ptx_trunc_i8(v)``             -> int: CUDA's ``(int8_t)v`` (low byte of ptx_cast_i32, signed)

CUDA fast-math emulation (nvcc -use_fast_math: ftz, approximate division, fma). ``rcp_table`` is
None or ``rcp_approx_table()``: int8[2**23], measured on an H100 (tools/cuda_golden/approx_probe.cu),
bits(rcp.approx.ftz(1.m)) - bits(RN(1/1.m)) per mantissa m; the hardware result for any exponent
is that table shifted (0 mismatches measured). Without it, rcp is the correctly rounded 1/x, which
the hardware misses by one ulp for 13% of mantissas (never for the constants 127, 15, 31, 8, 16).
  ``cuda_rcp(x, rcp_table=None)``     rcp.approx.ftz.f32
  ``cuda_div(a, b, rcp_table=None)``  div.approx.ftz.f32 = mul.ftz(a, rcp.approx(b)) (measured: always)
  ``cuda_fp32_to_fp16(f)``            __float2half (cvt.rn.f16.f32): RNE, NaN -> canonical 0x7FFF
  ``rcp_approx_table()``              the table (numpy, loaded once from the package's rcp_approx_sm90.npz;
                                  the CUDA simulator's rcp.approx reads it too)

Block searches, per flavor (``REF``/``CPU`` are IEEE; ``CUDA`` flushes subnormals in compares):
  ``first_absmax(x, i, flavor)``  ggml's ``max``: the signed value of the first element of largest |x|
                                  (NaN never wins, +0 for a block of zeros; q4_0, q5_0, iq4_nl)
  ``max_abs_bits(x, i, skip_nan, flush)`` -> uint32: the largest |x| as bits (NaN above Inf unless
                                  skipped; flush: subnormals count as 0); ``f32_from_bits`` gives |x|
  ``first_of_abs_bits(x, i, bits, flush)`` -> the first x[i, j] whose |x| has those bits, +0 when bits
                                  is 0: with max_abs_bits, the two halves of first_absmax, which the
                                  fast paths call apart (they test the bits first)
  ``min_max(x, i, flush, from_first)`` -> (min, max) as ``if (v < min) min = v`` (and max): from
                                  FLT_MAX / -FLT_MAX, or from x[i, 0]; NaN never taken (q4_1, q5_1)
  ``scale_inverse(d, flavor, rcp_table=None)``  ``d ? 1.0f/d : 0.0f``
The searches reduce integer keys (float order as integers) so that LLVM vectorizes them.

Fast paths (ref and cpu flavors, blocks where no C cast can meet NaN or overflow):
  ``is_ordinary(bits)``           |x| bits of 0, or in [2**-100, 2**100]: the window where ggml's scales and
                                  their inverses are normal floats and every q lands in range, so the C
                                  casts' NaN and overflow cases (and their selects) cannot occur.
  ``order_key(v)`` / ``from_order_key(k)``  float32 <-> int32 whose order is float order (-0 < +0, NaN
                                  beyond +-Inf)
  ``ordinary_min_max(x, i, levels)`` -> (ok, min, max, d): block i's min and max (as min_max) and
                                  d = (max - min) / levels; ok when all |x| <= 2**100, no NaN, min != 0
                                  (a zero's sign would depend on its position) and d is 0 or >= 2**-100
  ``contiguous_blocks(x, y, type_size)``  x (n, 32) float32 and y (n, type_size) uint8 with each row's
                                  elements back to back: the whole-block vector helpers below may run
  ``block_abs_max_bits(x, i)``    max_abs_bits(x, i, False, False) as one <32 x i32> load, mask and reduce
  ``store_i8_round_even(x, y, i, off, idv)`` / ``store_i8_round_half_away(..)``  y[i, off + j] = the int8 of
                                  round_even32 / add_half_away of x[i, j] * idv, j < 32, as one <32 x float>
                                  load and <32 x i8> store; only in the ordinary window (every |x * idv| <= 127, no
                                  NaN), since LLVM's fptosi of a NaN or out-of-range value has no defined result. A loop
                                  of 32 runs on 8 lanes with its overlap checks (LLVM vectorizes 32-trip loops
                                  at half width), a third of q8_0's block time on the CPU
  ``scale_add(qd, m)``            qd + m in its own rounding (ggml-base is built without FMA), with x86's NaN
                                  rule: when both are NaN, addss keeps the first operand's payload, qd's
"""
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import CUDA, QK
from .fp import f32_bits, f32_from_bits, fp32_to_fp16, fp16_to_fp32, ftz

FLT_MAX = np.float32(3.4028234663852886e38)
INT_MIN = np.int32(-2147483648)
_TWO31 = np.float32(2147483648.0)
_ABS = np.uint32(0x7FFFFFFF)
_INF_BITS = np.uint32(0x7F800000)
_MIN_NORMAL_BITS = np.uint32(0x00800000)
_MANTISSA = np.uint32(0x007FFFFF)
_RCP_TABLE_FILE = Path(__file__).with_name("rcp_approx_sm90.npz")
_rcp_table = None
_HALF = np.float32(0.5)


@njit(cache=True, inline="always")
def load_half(y, i, off):
    return fp16_to_fp32(np.uint16(np.uint16(y[i, off]) | (np.uint16(y[i, off + 1]) << np.uint16(8))))


@njit(cache=True, inline="always")
def store_half(y, i, off, h):
    y[i, off] = np.uint8(h & np.uint16(0xFF))
    y[i, off + 1] = np.uint8(h >> np.uint16(8))


@njit(cache=True, inline="always")
def store_u32(y, i, off, v):
    for k in range(4):
        y[i, off + k] = np.uint8((v >> np.uint32(8 * k)) & np.uint32(0xFF))


@njit(cache=True)
def pack_nibbles(lo, hi):
    return np.uint8((np.int64(lo) | (np.int64(hi) << 4)) & 0xFF)


@njit(cache=True)
def _in_int32_range(v):
    # False for NaN too: the comparisons are ordered.
    return v >= -_TWO31 and v < _TWO31


@njit(cache=True)
def c_cast_i32(v):
    if not _in_int32_range(v):
        return INT_MIN
    return np.int32(v)  # in range: LLVM fptosi truncates toward zero


_TWO23 = np.float32(8388608.0)  # from here on every float32 is an integer


@njit(cache=True)
def roundf32(v):
    # Branch-free so that loops over a block vectorize.
    a = abs(v)
    r = (a + _TWO23) - _TWO23  # a < 2**23: the add rounds a to the nearest integer, halves to even
    r = r + np.float32(1.0) if a - r == _HALF else r  # roundf: halves go up
    signed = f32_from_bits(f32_bits(r) | (f32_bits(v) & np.uint32(0x80000000)))
    return signed if a < _TWO23 else v  # integral already, Inf or NaN: as is


@intrinsic
def _llvm_roundeven(typingctx, v):
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        return builder.call(builder.module.declare_intrinsic("llvm.roundeven", [f32], ir.FunctionType(f32, [f32])),
                            args)

    return sig, codegen


@njit(cache=True)
def round_even32(v):
    return _llvm_roundeven(v)  # halves to even, as _mm256_round_ps(_MM_ROUND_NEAREST): one vroundps


@njit(cache=True)
def trunc_i8(v):
    return np.int64(np.int8(low_byte(c_cast_i32(v))))


@njit(cache=True)
def low_byte(i):
    return np.uint8(np.int64(i) & 0xFF)


@njit(cache=True)
def saturate_i8(i):
    return np.uint8(np.int64(min(max(np.int64(i), -128), 127)) & 0xFF)


@njit(cache=True)
def ptx_cast_i32(v):
    if v != v:
        return np.int32(0)
    if v >= _TWO31:
        return np.int32(2147483647)
    if v <= -_TWO31:
        return INT_MIN
    return np.int32(v)


@njit(cache=True)
def ptx_trunc_i8(v):
    return np.int64(np.int8(low_byte(ptx_cast_i32(v))))


@njit(cache=True, error_model="numpy")  # 1/0 is Inf, as in hardware, not ZeroDivisionError
def cuda_rcp(x, rcp_table=None):
    x = ftz(x)
    r = ftz(np.float32(1.0) / x)
    if rcp_table is None:
        return r
    a = f32_bits(r) & _ABS
    if a < _MIN_NORMAL_BITS or a >= _INF_BITS:
        return r  # zero (flushed), Inf or NaN: the same in hardware
    return f32_from_bits(np.uint32(np.int64(f32_bits(r)) + np.int64(rcp_table[f32_bits(x) & _MANTISSA])))


@njit(cache=True)
def cuda_div(a, b, rcp_table=None):
    return ftz(ftz(a) * cuda_rcp(b, rcp_table))


def rcp_approx_table():
    """The measured rcp.approx table (see the docstring), loaded once from the package's data file."""
    global _rcp_table
    if _rcp_table is None:
        with np.load(_RCP_TABLE_FILE) as f:
            _rcp_table = np.ascontiguousarray(f["rcp_delta"], dtype=np.int8)
    return _rcp_table


@njit(cache=True)
def cuda_fp32_to_fp16(f):
    if f != f:
        return np.uint16(0x7FFF)
    return fp32_to_fp16(f)


@njit(cache=True, inline="always")
def _abs_bits(v, flush):
    """|v|'s bits: for non-negative floats integer order is float order (NaN above Inf).
    With flush, a subnormal counts as zero (CUDA's ftz compares)."""
    a = np.uint32(f32_bits(v) & _ABS)  # Numba widens uint32 & to 64 bits
    return np.uint32(0) if flush and a < _MIN_NORMAL_BITS else a


@njit(cache=True, inline="always")
def max_abs_bits(x, i, skip_nan, flush):
    # An integer max over a run-time trip count: LLVM vectorizes this, not a float compare chain.
    m = np.uint32(0)
    for j in range(x.shape[1]):
        a = _abs_bits(x[i, j], flush)
        m = max(m, np.uint32(0) if skip_nan and a > _INF_BITS else a)  # uint32 lanes: twice the width of uint64
    return m


@njit(cache=True, inline="always")
def first_of_abs_bits(x, i, bits, flush):
    # the first index is a min reduction over the matching positions: vectorized, no early exit
    n = np.int32(x.shape[1])
    first = n
    for j in range(x.shape[1]):
        first = min(first, np.int32(j) if _abs_bits(x[i, j], flush) == bits else n)
    return np.float32(0.0) if bits == np.uint32(0) else x[i, first]


@njit(cache=True, inline="always")
def first_absmax(x, i, flavor):
    # `if (amax < fabsf(v)) { amax = fabsf(v); max = v; }` from amax = max = 0: strict, so the first
    # of equal magnitudes wins, NaN never does (a NaN's bits are never the max of the others), and a
    # block of zeros gives +0.
    flush = flavor == CUDA
    return first_of_abs_bits(x, i, max_abs_bits(x, i, True, flush), flush)


@njit(cache=True, inline="always")
def min_max(x, i, flush, from_first):
    # `if (v < min) min = v; if (v > max) max = v;`: the first of equal values kept (so -0 vs +0 is
    # decided by position), NaN never taken; from FLT_MAX / -FLT_MAX (ggml-quants.c, ggml-cuda's
    # q4_1) or from x[0] over the rest (ggml-cuda's q5_1). flush: setp.ftz compares flushed values
    # and keeps v. Scalar code: per block it is faster than integer keys (fast paths: order_key_min_max).
    vmin = x[i, 0] if from_first else FLT_MAX
    vmax = x[i, 0] if from_first else -FLT_MAX
    for j in range(1 if from_first else 0, x.shape[1]):
        v = x[i, j]
        if flush:
            vmin = v if ftz(v) < ftz(vmin) else vmin
            vmax = v if ftz(v) > ftz(vmax) else vmax
        else:
            vmin = v if v < vmin else vmin
            vmax = v if v > vmax else vmax
    return vmin, vmax


@njit(cache=True)
def scale_inverse(d, flavor, rcp_table=None):
    if flavor == CUDA:
        return cuda_rcp(d, rcp_table) if ftz(d) != np.float32(0.0) else np.float32(0.0)
    return np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)


# ---- fast paths (see the docstring) ---------------------------------------------------------------

_ORDINARY_LO = np.uint32(0x0D800000)   # 2**-100
_ORDINARY_HI = np.uint32(0x71800000)   # 2**100
_ORDINARY_MIN = np.float32(2.0 ** -100)
_ORDINARY_MAX = np.float32(2.0 ** 100)
_SIGN = np.uint32(0x80000000)


@njit(cache=True, inline="always")
def order_key(v):
    k = np.int32(f32_bits(v))
    return np.int32(k ^ ((k >> np.int32(31)) & np.int32(0x7FFFFFFF)))  # negatives: reverse the magnitude order


@njit(cache=True, inline="always")
def from_order_key(k):
    return f32_from_bits(np.uint32(np.int32(k ^ ((k >> np.int32(31)) & np.int32(0x7FFFFFFF))) & np.int64(0xFFFFFFFF)))


@njit(cache=True, inline="always")
def order_key_min_max(x, i):
    lo = np.int32(0x7FFFFFFF)
    hi = np.int32(-0x80000000)
    for j in range(x.shape[1]):
        k = order_key(x[i, j])
        lo = min(lo, k)
        hi = max(hi, k)
    return lo, hi


@njit(cache=True, inline="always")
def is_ordinary(bits):
    return bits == np.uint32(0) or (bits >= _ORDINARY_LO and bits <= _ORDINARY_HI)


_BELOW_HALF = np.uint32(0x3EFFFFFF)  # 0.49999997f, the float just below 0.5


@njit(cache=True, inline="always")
def add_half_away(v):
    # the add itself rounds up what lies within half an ulp below a half: truncation then rounds halves away
    return v + f32_from_bits(_BELOW_HALF | (f32_bits(v) & _SIGN))


@njit(cache=True, inline="always")
def ordinary_min_max(x, i, levels):
    kmin, kmax = order_key_min_max(x, i)
    vmin = from_order_key(kmin)
    vmax = from_order_key(kmax)
    d = (vmax - vmin) / levels
    ok = (vmin >= -_ORDINARY_MAX and vmax <= _ORDINARY_MAX and vmin != np.float32(0.0)
          and (d == np.float32(0.0) or d >= _ORDINARY_MIN))
    return ok, vmin, vmax, d


@njit(cache=True, inline="always")
def scale_add(qd, m):
    return qd if qd != qd else qd + m  # LLVM may swap an add's operands: say which NaN wins explicitly


# ---- whole-block vectors (see the docstring) ----------------------------------------------------------
def _vector(t):
    return ir.VectorType(t, QK)


def _splat(t, v):
    return ir.Constant(_vector(t), [ir.Constant(t, v)] * QK)


@njit(cache=True, inline="always")
def contiguous_blocks(x, y, type_size):
    return (x.shape[1] == QK and y.shape[1] == type_size and x.strides[1] == 4 and y.strides[1] == 1)


def _block_pointer(context, builder, array_type, array, i, off, vector_type):
    """The address of element (i, off) of a 2-D array as a pointer to vector_type (the row's elements are
    back to back: contiguous_blocks)."""
    a = context.make_array(array_type)(context, builder, array)
    stride0 = cgutils.unpack_tuple(builder, a.strides)[0]
    i64 = ir.IntType(64)

    def wide(v):
        return builder.sext(v, i64) if v.type.width < 64 else v
    item = context.get_constant(types.intp, array_type.dtype.bitwidth // 8)
    at = builder.add(builder.mul(wide(i), stride0), builder.mul(wide(off), item))
    byte0 = builder.bitcast(a.data, ir.IntType(8).as_pointer())
    return builder.bitcast(builder.gep(byte0, [at]), vector_type.as_pointer())


@intrinsic
def block_abs_max_bits(typingctx, x, i):
    sig = types.uint32(x, i)

    def codegen(context, builder, signature, args):
        i32, f32 = ir.IntType(32), ir.FloatType()
        zero = context.get_constant(types.intp, 0)
        v = builder.load(_block_pointer(context, builder, signature.args[0], args[0], args[1], zero, _vector(f32)),
                         align=4)
        bits = builder.and_(builder.bitcast(v, _vector(i32)), _splat(i32, 0x7FFFFFFF))
        umax = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32, [_vector(i32)]),
                                              "llvm.vector.reduce.umax.v32i32")
        return builder.call(umax, [bits])

    return sig, codegen


def _store_i8_rounded(half_away):
    def store(typingctx, x, y, i, off, idv):
        sig = types.void(x, y, i, off, idv)

        def codegen(context, builder, signature, args):
            i32, f32 = ir.IntType(32), ir.FloatType()
            x_type, y_type = signature.args[:2]
            zero = context.get_constant(types.intp, 0)
            v = builder.load(_block_pointer(context, builder, x_type, args[0], args[2], zero, _vector(f32)), align=4)
            scale = builder.insert_element(ir.Constant(_vector(f32), ir.Undefined), args[4], ir.Constant(i32, 0))
            scale = builder.shuffle_vector(scale, ir.Constant(_vector(f32), ir.Undefined),
                                           ir.Constant(_vector(i32), [0] * QK))
            p = builder.fmul(v, scale)
            if half_away:           # add_half_away: p + copysign(0.49999997f, p), truncated below
                half = builder.or_(builder.and_(builder.bitcast(p, _vector(i32)), _splat(i32, int(_SIGN))),
                                   _splat(i32, int(_BELOW_HALF)))
                r = builder.fadd(p, builder.bitcast(half, _vector(f32)))
            else:                   # round_even32
                roundeven = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(_vector(f32), [_vector(f32)]), "llvm.roundeven.v32f32")
                r = builder.call(roundeven, [p])
            q = builder.trunc(builder.fptosi(r, _vector(i32)), _vector(ir.IntType(8)))
            builder.store(q, _block_pointer(context, builder, y_type, args[1], args[2], args[3],
                                            _vector(ir.IntType(8))), align=1)
            return context.get_dummy_value()

        return sig, codegen
    return intrinsic(store)


store_i8_round_even = _store_i8_rounded(half_away=False)
store_i8_round_half_away = _store_i8_rounded(half_away=True)
