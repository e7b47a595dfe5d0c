"""bf16: bfloat16 (the top half of a float32), one value per 2-byte little-endian element.

The kernels take any (rows, cols) float32 array and write (rows, 2 * cols) bytes.

- ref, cpu  ``ggml_compute_fp32_to_bf16`` (ggml_cpu_fp32_to_bf16 is the same scalar loop):
  round to nearest even on the bits (subnormals kept, overflow to Inf), NaN -> top half | 0x0040.
- cuda  ``__float2bfloat16`` (cvt.rn.bf16.f32): the same rounding, NaN -> canonical 0x7FFF.
Dequantize shifts the half back up (exact). An output of STREAM_MIN_BYTES or more is written by nontemporal
64-byte stores (past the caches: no read of the output's lines before they are written, 2 + 4 bytes of
memory traffic a value instead of 2 + 8), the same bits; a smaller one, likely read again soon, stays cached.
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .fp import bf16_bits, bf16_to_fp32, f32_bits

# 16 MiB: beyond the last-level cache share of a core or two (2 threads, 2^24 values: 1.04-1.55x ggml-cpu's
# to_float where the cached stores read 0.87-1.06x, bench/README's cpu_quant section)
STREAM_MIN_BYTES = 16 << 20


@njit(parallel=True, cache=True)
def quantize_row_bf16(x, out, flavor, rcp_table=None):
    """x: (rows, cols) float32 -> out: (rows, 2 * cols) uint8; no flavor divides, so rcp_table is unused."""
    n_rows, n_cols = x.shape
    halves = out.view(np.uint16)  # (rows, cols)
    for r in prange(n_rows):
        for c in range(n_cols):
            halves[r, c] = bf16_bits(f32_bits(x[r, c]), flavor)


@intrinsic
def _widen16_stream(typingctx, halves, i, out, j):
    """out[j .. j + 15] = halves[i .. i + 15] << 16 (as float32 bits) by one nontemporal store; both 1-D and
    contiguous, out + j 64-byte aligned."""
    def codegen(context, builder, sig, args):
        src = context.make_array(sig.args[0])(context, builder, args[0]).data
        dst = context.make_array(sig.args[2])(context, builder, args[2]).data
        v16, v32 = ir.VectorType(ir.IntType(16), 16), ir.VectorType(ir.IntType(32), 16)
        x = builder.load(builder.bitcast(builder.gep(src, [args[1]]), v16.as_pointer()), align=2)
        y = builder.shl(builder.zext(x, v32), ir.Constant(v32, [16] * 16))
        store = builder.store(y, builder.bitcast(builder.gep(dst, [args[3]]), v32.as_pointer()), align=64)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()
    return types.void(halves, i, out, j), codegen


@intrinsic
def _fence(typingctx):
    """A full memory fence: the thread's nontemporal stores are visible before it goes on (x86 mfence)."""
    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()
    return types.void(), codegen


@njit(parallel=True, cache=True)
def dequantize_row_bf16(raw, out):
    """raw: (rows, 2 * cols) uint8 -> out: (rows, cols) float32."""
    halves = raw.view(np.uint16)  # (rows, cols)
    n_rows, n_cols = out.shape
    stream = out.size * 4 >= STREAM_MIN_BYTES and out.strides[1] == 4 and halves.strides[1] == 2
    for r in prange(n_rows):
        c0 = c1 = n_cols                   # the row's streamed values [c0, c1): from its first 64-byte boundary
        if stream:
            row = out[r]
            c0 = min(n_cols, (-row.ctypes.data % 64) // 4)
            c1 = c0 + (n_cols - c0) // 16 * 16
            for c in range(c0, c1, 16):
                _widen16_stream(halves[r], c, row, c)
            _fence()
        for c in range(c0):
            out[r, c] = bf16_to_fp32(halves[r, c])
        for c in range(c1, n_cols):
            out[r, c] = bf16_to_fp32(halves[r, c])
