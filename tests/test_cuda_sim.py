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
    # set_rows and the fused rotation, on one type
    from kvlab.kernels import hadamard
    x = np.ascontiguousarray(inputs["normal"][:2])                      # (2, 256)
    rot = np.zeros((8, 64), np.float32)
    hadamard.rotate_rows(x.reshape(8, 64), rot, hadamard_scale(64))     # (8 chunks, 64)
    want = np.zeros((16, 18), np.uint8)
    importlib.import_module("kvlab.kernels.q4_0").quantize_row_q4_0(rot.reshape(16, 32), want, 0)
    cache = cuda.to_device(np.zeros((3, 144), np.uint8))
    kc.rotate_quantize(cuda.to_device(x), cache, "q4_0", 0, 64, hadamard_scale(64),
                       row_ids=cuda.to_device(np.array([2, 0], np.int64)))
    c = cache.copy_to_host()
    if not (np.array_equal(c[2], want.reshape(2, 144)[0]) and np.array_equal(c[0], want.reshape(2, 144)[1])
            and not c[1].any()):
        bad.append("rotate_quantize with row_ids differs from rotate_rows + quantize_row_q4_0")
    back = cuda.to_device(np.zeros((2, 256), np.float32))
    kc.dequantize_unrotate(cuda.to_device(np.ascontiguousarray(want.reshape(2, 144))), back, "q4_0", 64,
                           hadamard_scale(64))
    deq = np.zeros((16, 32), np.float32)
    importlib.import_module("kvlab.kernels.q4_0").dequantize_row_q4_0(want, deq)
    unrot = np.zeros((8, 64), np.float32)
    hadamard.rotate_rows(deq.reshape(8, 64), unrot, hadamard_scale(64))
    if not np.array_equal(back.copy_to_host().reshape(-1), unrot.reshape(-1)):
        bad.append("dequantize_unrotate differs from dequantize_row_q4_0 + rotate_rows")
    print("\n".join(bad) if bad else "ALL EQUAL")
''')


def test_cuda_kernels_match_cpu_kernels_and_ggml_cuda_under_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ALL EQUAL"), res.stdout[-3000:]
