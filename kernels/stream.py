"""Rows written past the caches: nontemporal 64-byte stores for large outputs of the plain types.

Why: a cached store first reads the line it writes into (read for ownership), so an output costs twice
its bytes in memory traffic; a nontemporal store writes whole lines without reading them. f16/bf16 convert
at memory speed, so on outputs larger than the caches that traffic is the time (bf16 to_float: 6 bytes a
value instead of 10). A smaller output, likely read again soon, stays cached (STREAM_MIN_BYTES).

``write_row(row, n, stream, convert, args)``: row[c] for c < n, where ``convert(dst, at, a, b, args)`` writes
the values [a, b) of the row to dst[at ..] (a jitted function; one loop per flavor inside it keeps LLVM's
vectorizer): with stream, from the row's first 64-byte boundary to its last, 64 bytes at a time through a
small buffer and one nontemporal store, then a fence; the head and tail (and every value without stream)
by ordinary stores. The same values either way.
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

STREAM_MIN_BYTES = 16 << 20   # beyond a core's share of the last-level cache


@intrinsic
def _store64_nontemporal(typingctx, dst, j, chunk):
    """dst[j ..] = the 64 bytes of chunk, one nontemporal store (both 1-D contiguous; dst + j 64-byte aligned)."""
    def codegen(context, builder, sig, args):
        v = ir.VectorType(ir.IntType(32), 16)
        src = context.make_array(sig.args[2])(context, builder, args[2]).data
        dst_ptr = builder.gep(context.make_array(sig.args[0])(context, builder, args[0]).data, [args[1]])
        x = builder.load(builder.bitcast(src, v.as_pointer()), align=sig.args[2].dtype.bitwidth // 8)
        store = builder.store(x, builder.bitcast(dst_ptr, v.as_pointer()), align=64)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()
    return types.void(dst, j, chunk), codegen


@intrinsic
def _fence(typingctx):
    """A full fence: the thread's nontemporal stores are visible before it goes on (x86: mfence)."""
    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()
    return types.void(), codegen


@njit(cache=True)
def streams(out) -> bool:
    """Whether a (rows, cols) output takes the nontemporal stores: large, and its rows contiguous."""
    return out.size * out.itemsize >= STREAM_MIN_BYTES and out.strides[1] == out.itemsize


@njit(inline="always")
def write_row(row, n, stream, convert, args):
    per = 64 // row.itemsize                              # values a store
    c0 = c1 = n                                           # the streamed values [c0, c1)
    if stream:
        c0 = min(n, (-row.ctypes.data % 64) // row.itemsize)
        c1 = c0 + (n - c0) // per * per
    convert(row, 0, 0, c0, args)
    if c1 > c0:
        chunk = np.empty(per, row.dtype)
        for c in range(c0, c1, per):
            convert(chunk, 0, c, c + per, args)
            _store64_nontemporal(row, c, chunk)
        _fence()
    convert(row, c1, c1, n, args)
