"""Scalar float32 operations for the CUDA kernels, each pinned to one PTX instruction.

Why not plain ``*`` and ``+``: NVVM contracts a multiply and an add into an FMA by default, and
under fast-math it flushes subnormals everywhere. ggml's C reference does separate IEEE roundings,
ggml-cuda does fast-math with FMA in some places (tools/cuda_golden/PTX_NOTES.md). Writing every op
as its own instruction (``mul.rn.f32``, ``fma.rn.ftz.f32``, ``rcp.approx.ftz.f32`` ...) makes the
bytes independent of compiler flags: ``.rn`` ops are never contracted.

Under the Numba CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) the same names are plain Python on
numpy float32 with the same results, so the kernels run unchanged in CI without a GPU.
Names: ``mul/add/sub/fma/div`` round to nearest, ``*_ftz`` flush subnormal inputs and results,
``rcp_approx`` is rcp.approx.ftz.f32 (tabled from the H100 for the simulator); ``fmin``/``fmax``
drop a NaN operand (min.f32 / max.f32; ``*_ftz`` compare flushed values and return them; the sign
of a zero result is not relied on); ``floor_i32`` is cvt.rmi.s32.f32.

Wide memory access (why: one 16-byte load per thread instead of four 4-byte ones, and output bytes
staged in shared memory leave as whole words): ``ld_f32x4(a, i)`` -> 4 float32 at element i of a
C-contiguous float32 array (i a multiple of 4, address 16-byte aligned), ``st_f32x4(a, i, v0..v3)``;
on uint8 arrays at byte offset i (aligned to the width): ``ld_u16``/``st_u16``, ``ld_u32``/``st_u32``, ``ld_u32x2``/
``st_u32x2``, ``ld_u32x4``/``st_u32x4`` (several words come and go as tuples).
``cp_async16(dst, i, src, j)``: cp.async.cg of the 16 bytes at element j of the global src to element i of
the shared dst (both 16-byte aligned), no registers between: the copy flies while the thread goes on;
``cp_async4`` the same for 4 bytes (cp.async.ca: both 4-byte aligned);
``cp_async_wait_all()`` waits for the thread's copies (a barrier after it publishes them to the block);
``cp_async_commit()`` closes the thread's copies issued since the last into a group, ``cp_async_wait_one()``
waits for every group but the newest.
``prefetch_l2(a, i)``: prefetch.L2 of the 128-byte line holding element i of a (a hint: no result, no
fault, no effect on any value; nothing in the simulator). ``warp_barrier()``: bar.warp.sync of the
whole warp (the simulator, whose blocks are under a warp, has no syncwarp: a block barrier there).
"""
import os

import numpy as np
from numba import cuda as _cuda
from numba.cuda import config

SIM = bool(config.ENABLE_CUDASIM) or os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

# Device functions are inlined by NVVM (forceinline): numba's own IR inlining (inline=True) re-types
# every inlined body, ~90 s per kernel with the loops written out (unroll.py); the simulator has no
# such option.
device = _cuda.jit(device=True) if SIM else _cuda.jit(device=True, forceinline=True)

if SIM:
    from .sim_ops import *  # noqa: F401,F403  (the Python twins of the instructions below)

    @device
    def warp_barrier():
        _cuda.syncthreads()                 # the simulator's _cuda, swapped in while a kernel runs
else:
    from llvmlite import ir
    from numba.cuda import types
    from numba.cuda.core import caching as _caching
    from numba.cuda.extending import intrinsic

    from ..numba_cache import register
    register(_caching)      # the GPU kernels' disk cache keyed by every kernel source (numba_cache.py)

    _F32 = ir.FloatType()
    _I32 = ir.IntType(32)
    _I16 = ir.IntType(16)

    def _asm(text, n_args, ret=_F32, arg=_F32, ret_c="f", arg_c="f", nb_ret=types.float32,
             nb_arg=types.float32):
        """An intrinsic that emits one PTX instruction block, result $0, operands $1.."""
        constraints = ",".join([f"={ret_c}"] + [arg_c] * n_args)

        def impl(typingctx, *args):
            sig = nb_ret(*([nb_arg] * n_args))

            def codegen(context, builder, signature, llargs):
                fty = ir.FunctionType(ret, [arg] * n_args)
                return builder.call(ir.InlineAsm(fty, text, constraints), llargs)

            return sig, codegen

        # intrinsic needs a function with the right number of named parameters
        names = ", ".join(f"a{k}" for k in range(n_args))
        scope = {"impl": impl}
        exec(f"def wrapper(typingctx, {names}):\n    return impl(typingctx, {names})", scope)
        return intrinsic(scope["wrapper"])

    mul = _asm("mul.rn.f32 $0, $1, $2;", 2)
    add = _asm("add.rn.f32 $0, $1, $2;", 2)
    sub = _asm("sub.rn.f32 $0, $1, $2;", 2)
    div = _asm("div.rn.f32 $0, $1, $2;", 2)
    fma = _asm("fma.rn.f32 $0, $1, $2, $3;", 3)
    # rounding toward -inf: an FP32-pipe floor on floats 1 apart (quantizers.best_index)
    add_rm = _asm("add.rm.f32 $0, $1, $2;", 2)
    fma_rm = _asm("fma.rm.f32 $0, $1, $2, $3;", 3)
    mul_ftz = _asm("mul.rn.ftz.f32 $0, $1, $2;", 2)
    add_ftz = _asm("add.rn.ftz.f32 $0, $1, $2;", 2)
    sub_ftz = _asm("sub.rn.ftz.f32 $0, $1, $2;", 2)
    fma_ftz = _asm("fma.rn.ftz.f32 $0, $1, $2, $3;", 3)
    rcp_approx = _asm("rcp.approx.ftz.f32 $0, $1;", 1)
    ftz = _asm("add.ftz.f32 $0, $1, 0f80000000;", 1)          # x + (-0): flushes, keeps the sign
    # roundf (half away from zero), as nvcc writes it: trunc(x + copysign(0.5, x)) with .rz add
    roundf = _asm("{ .reg .f32 h; copysign.f32 h, $1, 0f3F000000; add.rz.f32 h, $1, h; "
                  "cvt.rzi.f32.f32 $0, h; }", 1)
    round_even = _asm("cvt.rni.f32.f32 $0, $1;", 1)
    # float -> int as PTX does it: truncate, saturate, NaN -> 0
    ptx_i32 = _asm("cvt.rzi.s32.f32 $0, $1;", 1, ret=_I32, ret_c="r", nb_ret=types.int32)
    ptx_u32 = _asm("cvt.rzi.u32.f32 $0, $1;", 1, ret=_I32, ret_c="r", nb_ret=types.uint32)
    # half <-> float, IEEE round to nearest even (a NaN comes out 0x7FFF: callers decide NaN first)
    f32_to_f16_bits = _asm("cvt.rn.f16.f32 $0, $1;", 1, ret=_I16, ret_c="h", nb_ret=types.uint16)
    f16_bits_to_f32 = _asm("cvt.f32.f16 $0, $1;", 1, arg=_I16, arg_c="h", nb_arg=types.uint16)
    floor_i32 = _asm("cvt.rmi.s32.f32 $0, $1;", 1, ret=_I32, ret_c="r", nb_ret=types.int32)
    fmin = _asm("min.f32 $0, $1, $2;", 2)           # a NaN operand loses (returns the other)
    fmax = _asm("max.f32 $0, $1, $2;", 2)
    fmin_ftz = _asm("min.ftz.f32 $0, $1, $2;", 2)
    fmax_ftz = _asm("max.ftz.f32 $0, $1, $2;", 2)
    f32_bits = _asm("mov.b32 $0, $1;", 1, ret=_I32, ret_c="r", nb_ret=types.uint32)
    f32_from_bits = _asm("mov.b32 $0, $1;", 1, arg=_I32, arg_c="r", nb_arg=types.uint32)

    def _byte_pointer(context, builder, aryty, ary, idx, idxty):
        """Pointer (i8*) to element idx of the array ary."""
        data = context.make_array(aryty)(context, builder, ary).data
        i = context.cast(builder, idx, idxty, types.int64)
        return builder.gep(builder.bitcast(data, ir.IntType(8).as_pointer()),
                           [builder.mul(i, ir.Constant(ir.IntType(64), aryty.dtype.bitwidth // 8))])

    def _vector_access(elem, nb_elem, count, store):
        """ld/st of `count` consecutive elements of a C-contiguous array at element index i, one access."""
        vec = elem if count == 1 else ir.VectorType(elem, count)
        nb_val = nb_elem if count == 1 else types.UniTuple(nb_elem, count)

        def pointer(context, builder, aryty, ary, idx, idxty):
            return builder.bitcast(_byte_pointer(context, builder, aryty, ary, idx, idxty), vec.as_pointer())

        def load(typingctx, ary, idx):
            def codegen(context, builder, sig, args):
                v = builder.load(pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1]),
                                 align=count * nb_elem.bitwidth // 8)
                if count == 1:
                    return v
                parts = [builder.extract_element(v, ir.Constant(_I32, k)) for k in range(count)]
                return context.make_tuple(builder, nb_val, parts)
            return nb_val(ary, idx), codegen

        def store_(typingctx, ary, idx, val):
            def codegen(context, builder, sig, args):
                v = args[2]
                if count > 1:
                    parts = [builder.extract_value(v, k) for k in range(count)]
                    v = ir.Constant(vec, ir.Undefined)
                    for k, part in enumerate(parts):
                        v = builder.insert_element(v, context.cast(builder, part, sig.args[2].dtype, nb_elem),
                                                   ir.Constant(_I32, k))
                else:
                    v = context.cast(builder, v, sig.args[2], nb_elem)
                builder.store(v, pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1]),
                              align=count * nb_elem.bitwidth // 8)
                return context.get_dummy_value()
            return types.void(ary, idx, val), codegen

        return intrinsic(store_ if store else load)

    ld_f32x4 = _vector_access(_F32, types.float32, 4, False)
    _st_f32x4 = _vector_access(_F32, types.float32, 4, True)
    ld_u16 = _vector_access(_I16, types.uint16, 1, False)
    st_u16 = _vector_access(_I16, types.uint16, 1, True)
    ld_u32 = _vector_access(_I32, types.uint32, 1, False)
    st_u32 = _vector_access(_I32, types.uint32, 1, True)
    ld_u32x2 = _vector_access(_I32, types.uint32, 2, False)
    _st_u32x2 = _vector_access(_I32, types.uint32, 2, True)
    ld_u32x4 = _vector_access(_I32, types.uint32, 4, False)
    _st_u32x4 = _vector_access(_I32, types.uint32, 4, True)

    def _prefetch(typingctx, ary, idx):
        def codegen(context, builder, sig, args):
            byte = _byte_pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            fty = ir.FunctionType(ir.VoidType(), [ir.IntType(64)])
            builder.call(ir.InlineAsm(fty, "prefetch.L2 [$0];", "l", side_effect=True),
                         [builder.ptrtoint(byte, ir.IntType(64))])
            return context.get_dummy_value()
        return types.void(ary, idx), codegen

    prefetch_l2 = intrinsic(_prefetch)

    def _cp_async(size, cache):
        """cp.async.<cache> of `size` bytes from element si of the global src to element di of the shared dst."""
        text = f"cp.async.{cache}.shared.global [$0], [$1], {size};"

        def op(typingctx, dst, di, src, si):
            def codegen(context, builder, sig, args):
                # the shared side as a 32-bit shared-window address: the generic pointer cast back to the
                # shared address space (NVVM folds the casts: no cvta, the base once for every copy)
                dst_ptr = builder.ptrtoint(builder.addrspacecast(
                    _byte_pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1]),
                    ir.IntType(8).as_pointer(3)), _I32)
                src_ptr = builder.ptrtoint(_byte_pointer(context, builder, sig.args[2], args[2], args[3], sig.args[3]),
                                           ir.IntType(64))
                fty = ir.FunctionType(ir.VoidType(), [_I32, ir.IntType(64)])
                builder.call(ir.InlineAsm(fty, text, "r,l,~{memory}", side_effect=True), [dst_ptr, src_ptr])
                return context.get_dummy_value()
            return types.void(dst, di, src, si), codegen
        return intrinsic(op)

    cp_async16 = _cp_async(16, "cg")
    cp_async4 = _cp_async(4, "ca")                 # .cg takes only 16 bytes

    def _cp_async_op(text):
        """An intrinsic of one cp.async bookkeeping instruction (no operands; a compiler barrier to memory)."""
        def op(typingctx):
            def codegen(context, builder, sig, args):
                builder.call(ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), text, "~{memory}", side_effect=True), [])
                return context.get_dummy_value()
            return types.void(), codegen
        return intrinsic(op)

    cp_async_wait_all = _cp_async_op("cp.async.wait_all;")
    cp_async_commit = _cp_async_op("cp.async.commit_group;")
    cp_async_wait_one = _cp_async_op("cp.async.wait_group 1;")

    @device
    def warp_barrier():
        _cuda.syncwarp()

    @device
    def st_f32x4(a, i, v0, v1, v2, v3):
        _st_f32x4(a, i, (np.float32(v0), np.float32(v1), np.float32(v2), np.float32(v3)))

    @device
    def st_u32x2(a, i, v0, v1):
        _st_u32x2(a, i, (np.uint32(v0), np.uint32(v1)))

    @device
    def st_u32x4(a, i, v0, v1, v2, v3):
        _st_u32x4(a, i, (np.uint32(v0), np.uint32(v1), np.uint32(v2), np.uint32(v3)))


# st_f32x4_cs(a, i, v0..v3): st_f32x4 with the streaming hint (st.global.cs: evict first from L2), for
# an output written once and not read back by the kernel: the input lines prefetched into L2 for later
# tiles stay. A hint: the bytes are the same; the simulator's is st_f32x4.
if SIM:
    st_f32x4_cs = st_f32x4
else:
    def _st_f32x4_cs(typingctx, ary, idx, v0, v1, v2, v3):
        def codegen(context, builder, sig, args):
            byte = _byte_pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            values = [context.cast(builder, v, t, types.float32) for v, t in zip(args[2:], sig.args[2:])]
            fty = ir.FunctionType(ir.VoidType(), [ir.IntType(64)] + [_F32] * 4)
            builder.call(ir.InlineAsm(fty, "st.global.cs.v4.f32 [$0], {$1, $2, $3, $4};", "l,f,f,f,f",
                                      side_effect=True), [builder.ptrtoint(byte, ir.IntType(64)), *values])
            return context.get_dummy_value()
        return types.void(ary, idx, v0, v1, v2, v3), codegen

    st_f32x4_cs = intrinsic(_st_f32x4_cs)
