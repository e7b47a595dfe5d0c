"""The CUDA kernels under the Numba CUDA simulator: bytes equal to the CPU kernels (every type x
flavor) and to ggml-cuda's own bytes (tests/golden/cuda_<type>.npz) for the cuda flavor.

The simulator must be chosen before numba.cuda is first imported, so these run in a subprocess.
Shapes are tiny: the simulator runs every GPU thread as a Python thread.
"""
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.cudasim

SCRIPT = textwrap.dedent(r'''
    import importlib, sys
    import numpy as np
    from numba import cuda
    import kvlab.kernels.cuda as kc
    from kvlab.rotation import hadamard_scale
    from kvlab.types import TYPES
    from kvlab.kernels.blocks import rcp_approx_table
    inputs = np.load("tests/golden/inputs.npz")
    CASES = ("normal", "ties_pm", "subnormal_mixed", "nan", "inf", "zeros")
    bad = []
    for name, info in TYPES.items():
        cpu = importlib.import_module(f"kvlab.kernels.{name}")
        golden = np.load(f"tests/golden/cuda_{name}.npz")
        for case in CASES:
            x = np.ascontiguousarray(inputs[case][1:2])                  # (1, 256): one row
            xb = x.reshape(-1, 32) if info.is_quantized else x          # (8, 32) for block types
            for flavor in (0, 1, 2):
                out = cuda.to_device(np.zeros((1, info.row_bytes(256)), np.uint8))
                kc.quantize(cuda.to_device(x), out, name, flavor)
                got = out.copy_to_host()
                want = np.zeros((xb.shape[0], info.type_size if info.is_quantized else info.row_bytes(256)),
                                np.uint8)
                getattr(cpu, f"quantize_row_{name}")(xb, want, flavor)
                if not np.array_equal(got.reshape(-1), want.reshape(-1)):
                    bad.append(f"{name} {case} flavor {flavor}: differs from the CPU kernel")
                if flavor == 2 and not np.array_equal(got[0], golden[case + ".cuda"][1]):
                    bad.append(f"{name} {case}: differs from ggml-cuda")
            deq = cuda.to_device(np.zeros((1, 256), np.float32))
            kc.dequantize(out, deq, name)
            want = np.zeros(xb.shape, np.float32)
            getattr(cpu, f"dequantize_row_{name}")(out.copy_to_host().reshape(xb.shape[0], -1), want)
            if not np.array_equal(deq.copy_to_host().reshape(-1).view(np.uint32), want.reshape(-1).view(np.uint32)):
                bad.append(f"{name} {case}: dequantize differs from the CPU kernel")
    # the rotation: plain (in-row stages only, register columns, shared-memory columns) and fused
    from kvlab.kernels import hadamard
    def rotated(a, n):                                                  # CPU reference, a (rows, cols)
        out = np.zeros((a.size // n, n), np.float32)
        hadamard.rotate_rows(np.ascontiguousarray(a).reshape(-1, n), out, hadamard_scale(n))
        return out.reshape(a.shape)
    x = np.ascontiguousarray(inputs["normal"][:2])                      # (2, 256)
    wide = np.ascontiguousarray(inputs["normal"][:4].reshape(2, 512))   # (2, 512): one 512-chunk per row
    for a, n in ((x, 1), (x, 4), (x, 64), (x, 256), (wide, 512)):
        out = cuda.to_device(np.zeros(a.shape, np.float32))
        kc.rotate(cuda.to_device(a), out, n, hadamard_scale(n))
        if not np.array_equal(out.copy_to_host().view(np.uint32), rotated(a, n).view(np.uint32)):
            bad.append(f"rotate n={n} differs from rotate_rows")
    q40 = importlib.import_module("kvlab.kernels.q4_0")
    for a, n, flavor in ((x, 64, 0), (x, 256, 2), (wide, 512, 1)):
        want = np.zeros((a.size // 32, 18), np.uint8)
        q40.quantize_row_q4_0(rotated(a, n).reshape(-1, 32), want, flavor, rcp_approx_table())
        want = want.reshape(2, -1)                                      # (2, row_bytes)
        cache = cuda.to_device(np.zeros((3, want.shape[1]), np.uint8))
        kc.rotate_quantize(cuda.to_device(a), cache, "q4_0", flavor, n, hadamard_scale(n),
                           row_ids=cuda.to_device(np.array([2, 0], np.int64)))
        c = cache.copy_to_host()
        if not (np.array_equal(c[2], want[0]) and np.array_equal(c[0], want[1]) and not c[1].any()):
            bad.append(f"rotate_quantize n={n} with row_ids differs from rotate_rows + quantize_row_q4_0")
        back = cuda.to_device(np.zeros(a.shape, np.float32))
        kc.dequantize_unrotate(cuda.to_device(want), back, "q4_0", n, hadamard_scale(n))
        deq = np.zeros((a.size // 32, 32), np.float32)
        q40.dequantize_row_q4_0(want.reshape(-1, 18), deq)
        if not np.array_equal(back.copy_to_host().view(np.uint32), rotated(deq.reshape(a.shape), n).view(np.uint32)):
            bad.append(f"dequantize_unrotate n={n} differs from dequantize_row_q4_0 + rotate_rows")
    # set_rows of a per-value type, and rows of 6 values (not whole 16-byte groups: the one-value kernel)
    for cols in (256, 6):
        v = np.ascontiguousarray(inputs["nan"][:2, :cols])
        want = np.zeros((2, 2 * cols), np.uint8)
        importlib.import_module("kvlab.kernels.f16").quantize_row_f16(v, want, 1)
        cache = cuda.to_device(np.zeros((3, 2 * cols), np.uint8))
        kc.set_rows(cache, cuda.to_device(np.array([1, 2], np.int32)), cuda.to_device(v), "f16", 1)
        c = cache.copy_to_host()
        if not (np.array_equal(c[1:], want) and not c[0].any()):
            bad.append(f"set_rows f16 (cols {cols}) differs from quantize_row_f16")
    # the public API routes device arrays to these kernels: same bytes as the same call on host arrays
    import kvlab
    h = np.ascontiguousarray(inputs["ties_pm"][:2, :64])                # (2, 64)
    dev = cuda.to_device(h)
    for name in ("q4_1", "f16"):
        q_dev, q_host = kvlab.quantize(dev, name, "cuda"), kvlab.quantize(h, name, "cuda")
        if not np.array_equal(q_dev.raw.copy_to_host(), q_host.raw):
            bad.append(f"kvlab.quantize({name}) on a device array differs from the host call")
        if not np.array_equal(kvlab.dequantize(q_dev).copy_to_host(), kvlab.dequantize(q_host)):
            bad.append(f"kvlab.dequantize({name}) on a device array differs from the host call")
    if not np.array_equal(kvlab.rotate(dev, 64).copy_to_host(), kvlab.rotate(h, 64)):
        bad.append("kvlab.rotate on a device array differs from the host call")
    cache_dev = kvlab.QTensor(cuda.to_device(np.zeros((4, 40), np.uint8)), "q4_1", (4, 64), "cuda")
    cache_host = kvlab.empty_cache(4, 64, "q4_1", "cuda")
    kvlab.set_rows(cache_dev, np.array([3, 1]), dev)
    kvlab.set_rows(cache_host, np.array([3, 1]), h)
    if not np.array_equal(cache_dev.raw.copy_to_host(), cache_host.raw):
        bad.append("kvlab.set_rows into a device cache differs from the host call")
    print("\n".join(bad) if bad else "ALL EQUAL")
''')


def test_cuda_kernels_match_cpu_kernels_and_ggml_cuda_under_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ALL EQUAL"), res.stdout[-3000:]
