"""Scalar float helpers shared by every kernel: bit casts, fused multiply-add and
ggml's half/bfloat16 conversions, written so that each matches ggml bit for bit.

All arithmetic here is float32 unless a name says otherwise: a Python float
literal would silently promote a Numba expression to float64, so constants are
``np.float32``.
"""
import numpy as np
from numba import njit, types
from numba.extending import intrinsic
from llvmlite import ir

from . import CUDA


@intrinsic
def f32_bits(typingctx, x):
    """Reinterpret a float32 as uint32 (C's union trick in ggml-impl.h)."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def f32_from_bits(typingctx, u):
    """Reinterpret a uint32 as float32."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def fma32(typingctx, a, b, c):
    """a*b + c with one rounding (llvm.fma.f32): what nvcc emits when it contracts."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        f = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(f, args)

    return sig, codegen


@njit(cache=True, inline="always")
def fp16_to_fp32(h):
    """ggml_compute_fp16_to_fp32 (ggml-impl.h): exact for every half, NaN payload kept."""
    # Numba widens uint32 arithmetic to 64 bits: wrap explicitly where C relies on it.
    w = np.uint32(np.uint32(h) << np.uint32(16))
    sign = w & np.uint32(0x80000000)
    two_w = np.uint32((w + w) & np.uint32(0xFFFFFFFF))
    exp_offset = np.uint32(0xE0 << 23)
    normalized = f32_from_bits(np.uint32((two_w >> np.uint32(4)) + exp_offset)) * np.float32(2.0 ** -112)
    denormalized = f32_from_bits(np.uint32((two_w >> np.uint32(17)) | np.uint32(126 << 23))) - np.float32(0.5)
    if two_w < (np.uint32(1) << np.uint32(27)):
        return f32_from_bits(np.uint32(sign | f32_bits(denormalized)))
    return f32_from_bits(np.uint32(sign | f32_bits(normalized)))


@intrinsic
def f16c_fp32_to_fp16(typingctx, f):
    """x86's vcvtps2ph with round to nearest even (ggml-cpu's F16C row body), as the uint16 half bits.

    LLVM's ``fptrunc`` to half: with F16C (every x86-64 CPU since 2012) LLVM emits vcvtps2ph itself,
    16 lanes per instruction in a vectorized loop, so the bytes are the instruction's on every input,
    NaN included (sign, quiet bit and the top 9 payload bits kept). Without F16C LLVM calls the compiler
    runtime's __truncsfhf2, which rounds the same and keeps NaN the same way.
    tests/kernels/test_f16_bf16_bits.py holds it against ggml's from_float over a dense sample of all
    float32 bit patterns."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


@njit(cache=True, inline="always")
def nan_as(h, nan):
    """The half h, or nan where h is a NaN (a select, so that a loop around it vectorizes)."""
    return nan if (h & np.uint16(0x7FFF)) > np.uint16(0x7C00) else h


@njit(cache=True, inline="always")
def fp32_to_fp16(f):
    """ggml_compute_fp32_to_fp16 (ggml-impl.h, GGML_FP32_TO_FP16, what quantize_row_*_ref stores): round
    to nearest even, NaN -> 0x7E00 | sign.

    Every other float32 rounds exactly as F16C's instruction does, so this is that one instruction and a
    select for NaN (F16C's NaN is sign | 0x7E00 | payload bits: masking with 0xFE00 leaves ggml's); ggml's
    software formula took ~25 dependent scalar instructions, a third of a q8_0 block's work."""
    h = f16c_fp32_to_fp16(f)
    return nan_as(h, h & np.uint16(0xFE00))


@njit(cache=True, inline="always")
def bf16_to_fp32(h):
    """ggml_compute_bf16_to_fp32: the top half of a float32."""
    return f32_from_bits(np.uint32(np.uint32(h) << np.uint32(16)))


@njit(cache=True, inline="always")
def bf16_bits(u, flavor):
    """The bfloat16 bits a flavor writes for the float32 bits u: ggml_compute_fp32_to_bf16 (ggml-impl.h;
    ggml-cpu's loop is the same), round to nearest even, NaN made quiet (top half | 0x0040); cuda's
    __float2bfloat16 (cvt.rn.bf16.f32) rounds the same and writes NaN as the canonical 0x7FFF.

    Plain integer code on the bits, so its source (``bf16_bits.py_func``) also compiles as a CUDA device
    function (kernels/cuda/quantizers.py): one rounding, two targets."""
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16(0x7FFF) if flavor == CUDA else np.uint16((u >> np.uint32(16)) | np.uint32(64))
    return np.uint16((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16))


@njit(cache=True, inline="always")
def ftz(x):
    """Flush a float32 subnormal to signed zero, as CUDA's fast-math (-ftz=true) does."""
    u = f32_bits(x)
    if (u & np.uint32(0x7F800000)) == np.uint32(0):
        return f32_from_bits(u & np.uint32(0x80000000))
    return x
