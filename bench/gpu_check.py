"""The large on-GPU byte-equality run (needs a CUDA GPU; prints JSON lines).

For every type x flavor: kvlab.kernels.cuda.quantize on N blocks of tools/cuda_golden/large_inputs.py
against the CPU kernels (kvlab.kernels.<type>), and the cuda flavor also against ggml-cuda itself
(tools/cuda_golden/harness.cu, built here with nvcc when .vendor_cuda/ holds the ggml headers).
Dequantize is checked against the CPU kernels, the fused rotate+quantize against rotate_rows + quantize.
    python bench/gpu_check.py [n_blocks]      (default 2^20)
"""
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools", "cuda_golden"))
from large_inputs import large_inputs  # noqa: E402

import kvlab.kernels.cuda as kc  # noqa: E402
from kvlab.kernels import hadamard  # noqa: E402
from kvlab.rotation import hadamard_scale  # noqa: E402
from kvlab.types import TYPES  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def ggml_cuda_bytes(x):
    """Run ggml-cuda's own quantizers (the harness) on x; None when nvcc or the headers are missing."""
    g = os.path.join(ROOT, ".vendor_cuda", "ggml")
    if not os.path.isdir(g):
        return None
    work = tempfile.mkdtemp()
    exe = os.path.join(work, "harness")
    subprocess.run(["nvcc", "-use_fast_math", "-extended-lambda", "-arch=sm_90", "-std=c++17", "-O3", "-DNDEBUG",
                    "-I", f"{g}/include", "-I", f"{g}/src", "-I", f"{g}/src/ggml-cuda", "-o", exe,
                    os.path.join(ROOT, "tools", "cuda_golden", "harness.cu")], check=True)
    x.tofile(os.path.join(work, "in.bin"))
    subprocess.run([exe, os.path.join(work, "in.bin"), work], check=True, capture_output=True)
    return {t: np.fromfile(os.path.join(work, f"{t}.bin"), np.uint8) for t in TYPES}


def main(n_blocks):
    from numba import cuda
    x = large_inputs(n_blocks)                                      # (n_blocks, 32)
    rows = x.reshape(-1, 4096)                                      # (n_blocks / 128, 4096): ggml rows
    ggml = ggml_cuda_bytes(x)
    xd = cuda.to_device(rows)
    for name, info in TYPES.items():
        cpu = importlib.import_module(f"kvlab.kernels.{name}")
        xin = x if info.is_quantized else rows
        for flavor, fname in enumerate(("ref", "cpu", "cuda")):
            out = cuda.device_array((rows.shape[0], info.row_bytes(4096)), np.uint8)
            kc.quantize(xd, out, name, flavor)
            got = out.copy_to_host().reshape(-1, info.type_size)
            want = np.zeros((xin.shape[0], info.type_size if info.is_quantized else info.row_bytes(4096)), np.uint8)
            getattr(cpu, f"quantize_row_{name}")(xin, want, flavor)
            want = want.reshape(-1, info.type_size)
            rec = {"check": "quantize", "type": name, "flavor": fname, "blocks": int(got.shape[0]),
                   "differ_from_cpu_kernel": int((got != want).any(1).sum())}
            if flavor == 2 and ggml is not None:
                rec["differ_from_ggml_cuda"] = int((got != ggml[name].reshape(-1, info.type_size)).any(1).sum())
            print(json.dumps(rec), flush=True)
        deq = cuda.device_array(rows.shape, np.float32)
        kc.dequantize(out, deq, name)
        want = np.zeros(xin.shape, np.float32)
        getattr(cpu, f"dequantize_row_{name}")(out.copy_to_host().reshape(xin.shape[0], -1), want)
        print(json.dumps({"check": "dequantize", "type": name, "values": int(want.size),
                          "differ_from_cpu_kernel": int((deq.copy_to_host().reshape(-1).view(np.uint32)
                                                         != want.reshape(-1).view(np.uint32)).sum())}), flush=True)
        if info.is_quantized:
            for n in (64, 128, 256):
                rot = np.zeros((x.size // n, n), np.float32)
                hadamard.rotate_rows(x.reshape(-1, n), rot, hadamard_scale(n))   # (chunks, n)
                want = np.zeros((n_blocks, info.type_size), np.uint8)
                getattr(cpu, f"quantize_row_{name}")(rot.reshape(-1, 32), want, 0)
                out = cuda.device_array((rows.shape[0], info.row_bytes(4096)), np.uint8)
                kc.rotate_quantize(xd, out, name, 0, n, hadamard_scale(n))
                got = out.copy_to_host().reshape(-1, info.type_size)
                print(json.dumps({"check": "rotate_quantize", "type": name, "n": n, "flavor": "ref",
                                  "differ_from_cpu": int((got != want).any(1).sum())}), flush=True)


if __name__ == "__main__":
    t0 = time.time()
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 20)
    print(json.dumps({"check": "done", "seconds": round(time.time() - t0, 1)}))
